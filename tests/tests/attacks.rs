//! Attacks on the mesh, end to end: each one must fail, and the test says
//! how it was stopped. (Issue 18's suite; more attacks join it.)

mod common;

use std::time::Duration;

use ambit_testbed::Bed;
use common::*;
use serde_json::Value;

/// A pod's configuration names the node's own network namespace (the
/// agent's) or the host's (`/proc/1/ns/net`) as its netns: enrolling it
/// would put the mesh's listeners and redirection on the node itself. The
/// agent refuses, says why, and keeps refusing.
#[test]
fn a_pod_cannot_name_the_nodes_own_network_namespace() {
    let Some(bed) = bed() else { return };
    let mut n1 = agent(&bed, "n1");
    let node_netns = format!("/run/netns/{}", bed.node("n1").netns);
    for (name, path) in [("agents-netns", node_netns.as_str()), ("host-netns", "/proc/1/ns/net")] {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  annotations:\n    ambit.dev/netns: {path}\nspec:\n  nodeName: n1\n  serviceAccountName: {name}\nstatus:\n  podIPs:\n  - ip: 10.100.0.1\n"
        );
        bed.write_config(&format!("pod-shop-{name}.yaml"), &yaml).unwrap();
        let refused = n1
            .wait_for(&format!("{name} refused"), Duration::from_secs(10), |l| {
                l["message"] == "cannot enrol pod; will retry" && l["pod"] == format!("shop/{name}")
            })
            .unwrap();
        let error = refused["error"].as_str().unwrap();
        // Init's netns: where the kernel lets the agent open it at all (it
        // may not: this machine answers EACCES), the agent recognises it.
        let kernel_refused = name == "host-netns" && error.contains("Permission denied");
        assert!(error.contains("the node's own network namespace") || kernel_refused, "{name}: {error}");
    }
    std::thread::sleep(Duration::from_secs(3));
    let dump: Value = serde_json::from_str(&bed.admin_get("n1", "/config_dump").unwrap().1).unwrap();
    assert_eq!(dump["enrolled"], serde_json::json!([]), "nothing enrolled: {}", dump["enrolled"]);
}

const STRICT_SHOP: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec:\n  mtls: {mode: STRICT}\n";

/// A plaintext GET from `from` to `url`; true if the app answered.
fn plaintext_get(bed: &Bed, from: &str, url: &str) -> bool {
    bed.run(from, "curl", &["-g", "-sS", "--max-time", "5", "-o", "/dev/null", url]).unwrap().status.success()
}

/// The pod's IPv6 link-local address on eth0, once duplicate address
/// detection has finished with it.
fn link_local(bed: &Bed, pod: &str) -> String {
    let mut found = String::new();
    ambit_testbed::wait_until(Duration::from_secs(10), &format!("{pod} link-local address"), || {
        let out = bed.run_ok(pod, "ip", &["-6", "-j", "addr", "show", "dev", "eth0", "scope", "link"])?;
        let links: Value = serde_json::from_str(&out)?;
        let addresses = links[0]["addr_info"].as_array().cloned().unwrap_or_default();
        let addr = addresses.into_iter().find(|a| a["family"] == "inet6").unwrap_or_default();
        found = addr["local"].as_str().unwrap_or_default().to_string();
        Ok(!found.is_empty() && addr.get("tentative").is_none())
    })
    .unwrap();
    found
}

/// Attack 1. An app listening on `[::]` (Go's, Java's and nginx's default)
/// in a STRICT pod, reached in plaintext by a plain pod on the same node:
/// through the pod's IPv6 link-local address, an IPv6 address the pod's
/// config does not list, and one added after the pod was enrolled. The
/// first two are steered to the pod's inbound listener and rejected as
/// plaintext (logged, counted); the last is dropped in the kernel (counted).
#[test]
fn plaintext_cannot_reach_a_strict_pod_through_any_of_its_addresses() {
    let Some(mut bed) = bed() else { return };
    let web = bed.add_pod("n1", "shop", "web").unwrap();
    bed.add_pod("n1", "legacy", "attacker").unwrap();
    for (pod, ip) in [("shop/web", "fd00:244:1::10/64"), ("legacy/attacker", "fd00:244:1::66/64")] {
        bed.run_ok(pod, "ip", &["addr", "add", ip, "dev", "eth0", "nodad"]).unwrap();
    }
    let web_link_local = link_local(&bed, "shop/web");
    bed.write_config("peer-authentication.yaml", STRICT_SHOP).unwrap();
    let mut n1 = agent(&bed, "n1");
    n1.wait_pod_event("pod enrolled", "shop/web", 0).unwrap();
    let (root, _) = web_root(&bed, 1024);
    bed.http_server_at("shop/web", "::", HTTP_PORT, &root, &bed.scratch().join("web.log")).unwrap();
    // The same app over the listed address: rejected as always.
    assert!(!plaintext_get(&bed, "legacy/attacker", &format!("http://{}:{HTTP_PORT}/", web.ip)));
    let attempts =
        [format!("http://[{web_link_local}%25eth0]:{HTTP_PORT}/"), format!("http://[fd00:244:1::10]:{HTTP_PORT}/")];
    for url in &attempts {
        assert!(!plaintext_get(&bed, "legacy/attacker", url), "plaintext reached the STRICT pod's app at {url}");
    }
    let rejected = n1
        .wait_connections(3, |c| c.direction == "inbound" && c.error.as_deref().unwrap_or_default().contains("STRICT"))
        .unwrap();
    let v6: Vec<_> = rejected.iter().filter(|c| c.src_addr.starts_with('[')).collect();
    assert_eq!(v6.len(), 2, "both IPv6 attempts are logged as rejected plaintext: {rejected:#?}");

    // An address that appears after enrolment is not steered: dropped.
    bed.run_ok("shop/web", "ip", &["addr", "add", "fd00:244:1::11/64", "dev", "eth0", "nodad"]).unwrap();
    assert!(!plaintext_get(&bed, "legacy/attacker", &format!("http://[fd00:244:1::11]:{HTTP_PORT}/")));

    let served = std::fs::read_to_string(bed.scratch().join("web.log")).unwrap_or_default();
    assert!(served.lines().all(|l| !l.contains("GET")), "the app served nothing: {served}");
    let counters = stop_and_read_counters(&mut n1);
    assert_eq!(counter(&counters, "plaintext_rejected"), 3, "{counters:?}");
    assert!(counter(&counters, "inbound_no_listener") >= 1, "{counters:?}");
}

/// UDP is not carried by the mesh (as in Istio ambient). A STRICT pod can
/// opt in to dropping inbound UDP (`ambit.dev/inbound-udp: drop`): a plain
/// pod's datagram is dropped in the kernel and counted, while a DNS reply
/// (from port 53) still arrives.
#[test]
fn a_strict_pod_that_opts_in_drops_inbound_udp_but_dns_replies() {
    let Some(mut bed) = bed() else { return };
    let web = bed.add_pod("n1", "shop", "web").unwrap();
    bed.add_pod("n1", "legacy", "attacker").unwrap();
    bed.set_pod_label("shop/web", "ambit.dev/inbound-udp", Some("drop")).unwrap();
    bed.write_config("peer-authentication.yaml", STRICT_SHOP).unwrap();
    let mut n1 = agent(&bed, "n1");
    n1.wait_pod_event("pod enrolled", "shop/web", 0).unwrap();
    let received = bed.scratch().join("udp.log");
    const RECEIVER: &str = "import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 5353))\nwhile True:\n    data, peer = s.recvfrom(2048)\n    open(sys.argv[1], 'a').write(f'{peer[1]} {data.decode()}\\n')\n";
    bed.spawn("shop/web", "python3", &["-c", RECEIVER, received.to_str().unwrap()]).unwrap();
    ambit_testbed::wait_until(Duration::from_secs(10), "UDP receiver", || {
        Ok(!bed.run_ok("shop/web", "ss", &["-Hlun", "sport = :5353"])?.trim().is_empty())
    })
    .unwrap();
    const SEND: &str = "import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', int(sys.argv[2])))\nfor _ in range(3):\n    s.sendto(sys.argv[3].encode(), (sys.argv[1], 5353))\n";
    for (port, text) in [("40000", "attack"), ("53", "dns-reply")] {
        bed.run_ok("legacy/attacker", "python3", &["-c", SEND, &web.ip.to_string(), port, text]).unwrap();
    }
    ambit_testbed::wait_until(Duration::from_secs(5), "the DNS reply", || {
        Ok(std::fs::read_to_string(&received).unwrap_or_default().contains("dns-reply"))
    })
    .unwrap();
    let log = std::fs::read_to_string(&received).unwrap();
    assert!(!log.contains("attack"), "UDP from a plain pod reached the app: {log}");
    let counters = stop_and_read_counters(&mut n1);
    assert_eq!(counter(&counters, "inbound_udp_dropped"), 3, "{counters:?}");
}

/// Attack 5. A pod is deleted and its IP handed to a new pod before the
/// agent has seen the deletion: for a moment both are enrolled with one
/// IP. Unenrolling the old pod must leave the new pod's steering alone, so
/// plaintext to the live STRICT pod is still rejected.
#[test]
fn unenrolling_a_pod_leaves_the_pod_that_reuses_its_ip_protected() {
    let Some(mut bed) = bed() else { return };
    let old = bed.add_pod("n1", "shop", "old").unwrap();
    bed.add_pod("n1", "legacy", "attacker").unwrap();
    bed.write_config("peer-authentication.yaml", STRICT_SHOP).unwrap();
    let mut n1 = agent(&bed, "n1");
    n1.wait_pod_event("pod enrolled", "shop/old", 0).unwrap();
    // The old pod's network goes away; its configuration is still there.
    bed.run_ok("shop/old", "ip", &["link", "del", "eth0"]).unwrap();
    bed.add_pod_at("n1", "shop", "new", Some(old.ip)).unwrap();
    n1.wait_pod_event("pod enrolled", "shop/new", 0).unwrap();
    std::fs::remove_file(bed.config_dir().join("pod-shop-old.yaml")).unwrap();
    n1.wait_pod_event("pod unenrolled", "shop/old", 0).unwrap();

    let (root, _) = web_root(&bed, 1024);
    bed.http_server("shop/new", HTTP_PORT, &root, &bed.scratch().join("new.log")).unwrap();
    assert!(
        !plaintext_get(&bed, "legacy/attacker", &format!("http://{}:{HTTP_PORT}/", old.ip)),
        "plaintext reached the new pod after the old one left"
    );
    let rejected = n1
        .wait_connections(1, |c| c.direction == "inbound" && c.error.as_deref().unwrap_or_default().contains("STRICT"))
        .unwrap();
    assert_eq!(rejected[0].dst_workload, "shop/new", "{rejected:?}");
    let counters = stop_and_read_counters(&mut n1);
    assert_eq!(counter(&counters, "plaintext_rejected"), 1, "{counters:?}");
}
