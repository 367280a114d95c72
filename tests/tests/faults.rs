//! Faults the agent must ride out (issue 19): each one is made on the real
//! kernel, and the test says what the agent did about it.

mod common;

use std::time::Duration;

use common::*;

/// A pod's runtime deletes the pod's network namespace without telling the
/// agent (no CNI DEL, the configuration unchanged). The agent notices within
/// its 2 s reconcile, unenrols the pod, reports it as not enrolled (log and
/// `ambit_pods_not_enrolled`) for as long as its configuration names the
/// missing netns, and every other pod keeps working.
#[test]
fn a_netns_deleted_under_the_agent_is_unenrolled_and_reported() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/client"), ("n1", "shop/gone"), ("n2", "shop/web")]).unwrap();
    let mut n1 = agent(&bed, "n1");
    let _n2 = agent(&bed, "n2");
    wait_nodes_ready(&bed, &["n1", "n2"]);
    let (root, _) = web_root(&bed, 1024);
    bed.http_server("shop/web", HTTP_PORT, &root, &bed.scratch().join("web.log")).unwrap();
    let url = format!("http://{}:{HTTP_PORT}/index.html", bed.pod("shop/web").ip);
    curl(&bed, "shop/client", &url).unwrap();

    let gone = bed.pod("shop/gone").netns.clone();
    bed.run_ok("shop/gone", "ip", &["link", "del", "eth0"]).unwrap();
    let deleted = std::process::Command::new("ip").args(["netns", "del", &gone]).status().unwrap();
    assert!(deleted.success());
    n1.wait_for("the netns noticed", Duration::from_secs(10), |l| {
        l["message"] == "the pod's network namespace is gone; unenrolling it" && l["pod"] == "shop/gone"
    })
    .unwrap();
    let refused = n1
        .wait_for("the failed enrolment", Duration::from_secs(10), |l| {
            l["message"] == "cannot enrol pod; will retry" && l["pod"] == "shop/gone"
        })
        .unwrap();
    assert!(refused["error"].as_str().unwrap().contains("No such file"), "{refused}");
    let not_enrolled = || gauge(&bed, "n1", "ambit_pods_not_enrolled");
    ambit_testbed::wait_until(Duration::from_secs(5), "reported", || Ok(not_enrolled() == "1")).unwrap();
    curl(&bed, "shop/client", &url).expect("the other pods keep working");

    std::fs::remove_file(bed.config_dir().join("pod-shop-gone.yaml")).unwrap();
    ambit_testbed::wait_until(Duration::from_secs(10), "no longer reported", || Ok(not_enrolled() == "0")).unwrap();
    assert!(n1.lines().iter().all(|l| l["level"] != "ERROR" || l["pod"] == "shop/gone"), "{}", n1.log_text());
}

/// The agent's state directory is full (a 16 KiB tmpfs, filled): the agent
/// starts, enforces its policies (STRICT refuses a plain pod), and reports
/// the directory (log and `ambit_state_dir_writable 0`); once there is room
/// again it says so.
#[test]
fn a_full_state_directory_is_reported_and_enforcement_goes_on() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/web"), ("n1", "legacy/caller")]).unwrap();
    bed.write_config(
        "peer-authentication.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec:\n  mtls: {mode: STRICT}\n",
    )
    .unwrap();
    let state = bed.state_dir("n1");
    std::fs::create_dir_all(&state).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16k", "ambit-full-state"])
        .arg(&state)
        .status()
        .unwrap();
    assert!(mounted.success());
    // Unmounted whatever happens, or the bed could not remove its directory;
    // lazily, as the agent's handoff socket is bound there.
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let unmount = Unmount(state.clone());
    let _ = std::fs::write(state.join("filler"), vec![0u8; 64 * 1024]);

    let mut n1 = agent(&bed, "n1");
    n1.wait_pod_event("pod enrolled", "shop/web", 0).unwrap();
    let (root, _) = web_root(&bed, 1024);
    bed.http_server("shop/web", HTTP_PORT, &root, &bed.scratch().join("web.log")).unwrap();
    let url = format!("http://{}:{HTTP_PORT}/index.html", bed.pod("shop/web").ip);
    assert!(curl(&bed, "legacy/caller", &url).is_err(), "STRICT is enforced");
    n1.wait_for("the report", Duration::from_secs(10), |l| {
        l["message"].as_str().is_some_and(|m| m.starts_with("cannot write the state directory"))
    })
    .unwrap();
    let writable = || gauge(&bed, "n1", "ambit_state_dir_writable");
    assert_eq!(writable(), "0");

    drop(unmount);
    ambit_testbed::wait_until(Duration::from_secs(15), "room again", || Ok(writable() == "1")).unwrap();
    assert!(curl(&bed, "legacy/caller", &url).is_err(), "still enforced");
}

/// Node clocks that disagree by less than the certificates' leeway (leaves
/// are back-dated by a tenth of their lifetime, at most a minute): n1's
/// clock runs 30 s ahead, n2's 30 s behind. mTLS between them works both
/// ways, and each still sees the other's verified identity.
#[test]
fn clocks_skewed_within_the_leeway_keep_mtls_working() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/client"), ("n2", "shop/web"), ("n2", "shop/peer"), ("n1", "shop/api")]).unwrap();
    let mut n1 = bed.start_agent_skewed("n1", "+30s").unwrap();
    let mut n2 = bed.start_agent_skewed("n2", "-30s").unwrap();
    n1.wait_ready().unwrap();
    n2.wait_ready().unwrap();
    wait_nodes_ready(&bed, &["n1", "n2"]);
    let (root, _) = web_root(&bed, 1024);
    bed.http_server("shop/web", HTTP_PORT, &root, &bed.scratch().join("web.log")).unwrap();
    bed.http_server("shop/api", HTTP_PORT, &root, &bed.scratch().join("api.log")).unwrap();
    let url = |pod: &str| format!("http://{}:{HTTP_PORT}/index.html", bed.pod(pod).ip);
    curl(&bed, "shop/client", &url("shop/web")).expect("n1 (ahead) to n2 (behind)");
    curl(&bed, "shop/peer", &url("shop/api")).expect("n2 (behind) to n1 (ahead)");
    let at_n2 = n2.wait_connections(1, |c| c.direction == "inbound" && c.src_workload == "shop/client").unwrap();
    assert!(at_n2[0].mtls && at_n2[0].src_identity == "spiffe://cluster.local/ns/shop/sa/client", "{at_n2:?}");
    let at_n1 = n1.wait_connections(1, |c| c.direction == "inbound" && c.src_workload == "shop/peer").unwrap();
    assert!(at_n1[0].mtls && at_n1[0].src_identity == "spiffe://cluster.local/ns/shop/sa/peer", "{at_n1:?}");
    // The skew is real: each agent's log is stamped with its own clock.
    let stamp = |agent: &ambit_testbed::Agent| agent.lines()[0]["timestamp"].as_str().unwrap().to_string();
    assert!(stamp(&n1) > stamp(&n2), "n1 runs ahead of n2: {} vs {}", stamp(&n1), stamp(&n2));
}
