//! Kubernetes mode end to end: agents and the CA read the API server double
//! (the real wire protocol), pods are created through a real CNI chain
//! (bridge, host-local, then ambit-cni), and traffic, policy, restarts and
//! the CA's node authorization are checked as in a cluster.

mod common;

use std::{path::Path, time::Duration};

use ambit_identity::{Identity, IdentityProvider as _, ca_client::CaClient, tls::load_bundle};
use ambit_testbed::{
    Agent, Bed, CA_ADDR, CniFailure, agent_binary, apiserver::ApiServer, kubernetes_bed_or_skip, wait_until,
};
use common::*;
use serde_json::{Value, json};

const TD: &str = "spiffe://cluster.local";

fn spiffe(ns: &str, sa: &str) -> String {
    format!("{TD}/ns/{ns}/sa/{sa}")
}

/// A Kubernetes bed with nodes n1 and n2, namespace `shop` ambient and
/// `legacy` not, and both agents ready.
fn cluster() -> Option<(Bed, Agent, Agent)> {
    let bed = kubernetes_bed_or_skip(&["n1", "n2"])?;
    bed.api_namespace("shop", true).unwrap();
    bed.api_namespace("legacy", false).unwrap();
    let n1 = agent(&bed, "n1");
    let n2 = agent(&bed, "n2");
    Some((bed, n1, n2))
}

/// shop/web on n2 serving files, shop/client on n1; both through CNI.
fn client_and_web(bed: &mut Bed) -> String {
    bed.add_cni_pod("n1", "shop", "client").unwrap();
    let web = bed.add_cni_pod("n2", "shop", "web").unwrap();
    let www = bed.scratch().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from the web pod\n").unwrap();
    bed.http_server("shop/web", HTTP_PORT, &www, &bed.scratch().join("web.log")).unwrap();
    format!("http://{}:{HTTP_PORT}/", web.ip)
}

/// The pod's capture status, as `kubectl get pod -o yaml` shows it.
fn capture_status(bed: &Bed, id: &str) -> Option<String> {
    let (namespace, name) = id.split_once('/').unwrap();
    let pod = bed.api().get("pods", Some(namespace), name)?;
    pod["metadata"]["annotations"]["ambit.dev/capture"].as_str().map(str::to_string)
}

fn wait_capture_status(bed: &Bed, id: &str, wanted: Option<&str>) {
    wait_until(Duration::from_secs(10), &format!("{id}'s capture status {wanted:?}"), || {
        Ok(capture_status(bed, id).as_deref() == wanted)
    })
    .unwrap();
}

/// Asserts that pods' packets between the nodes (the API server's and the
/// CA's are there too) were all HBONE to `server`, and that there were some.
fn assert_only_hbone(packets: &[String], server: std::net::Ipv4Addr) {
    let pods: Vec<&String> = packets.iter().filter(|l| l.contains(" IP 10.244.")).collect();
    let not_api: Vec<&String> = packets.iter().filter(|l| !l.contains(".6443")).collect();
    assert!(!pods.is_empty(), "no pod packets between the nodes: {not_api:?}");
    let hbone = format!("{server}.15008");
    let other: Vec<_> = pods.iter().filter(|l| !l.contains(&hbone)).collect();
    assert!(other.is_empty(), "only HBONE crosses between the nodes: {other:?}");
}

/// Asserts that every connection to `dst` that `agent` logged was mTLS
/// between the two identities.
fn assert_mutual_tls(agent: &Agent, dst: &str, from: &str, to: &str) {
    let records: Vec<_> = agent.connections().into_iter().filter(|c| c.dst_addr == dst).collect();
    assert!(!records.is_empty(), "no connection to {dst} logged:\n{}", agent.log_text());
    for record in records {
        assert!(record.mtls && record.error.is_none(), "{record:?}");
        assert_eq!((record.src_identity.as_str(), record.dst_identity.as_str()), (from, to), "{record:?}");
    }
}

#[test]
fn a_namespace_labelled_through_the_api_captures_pods_created_through_cni() {
    let Some((mut bed, n1, n2)) = cluster() else { return };
    let base = client_and_web(&mut bed);
    wait_capture_status(&bed, "shop/client", Some("enrolled"));
    wait_capture_status(&bed, "shop/web", Some("enrolled"));

    let marker = "AMBIT-K8S-CLEARTEXT-7d41";
    std::fs::write(bed.scratch().join("www").join("marker.txt"), marker.repeat(100)).unwrap();
    let wire = WireCapture::start(&bed, "k8s-wire");
    assert!(curl(&bed, "shop/client", &format!("{base}marker.txt")).unwrap().starts_with(marker));
    let (raw, lines) = wire.stop();
    assert!(!contains(&raw, marker.as_bytes()), "the payload crossed the wire in clear");
    let web_ip = bed.pod("shop/web").ip;
    assert_only_hbone(&lines, web_ip);
    let dst = format!("{web_ip}:{HTTP_PORT}");
    assert_mutual_tls(&n1, &dst, &spiffe("shop", "client"), &spiffe("shop", "web"));
    assert_mutual_tls(&n2, &dst, &spiffe("shop", "client"), &spiffe("shop", "web"));

    // A pod of a namespace that is not ambient starts, uncaptured.
    bed.add_cni_pod("n1", "legacy", "old").unwrap();
    assert_eq!(capture_status(&bed, "legacy/old"), None);
    let dump: Value = serde_json::from_str(&bed.admin_get("n1", "/config_dump").unwrap().1).unwrap();
    let enrolled: Vec<&str> = dump["enrolled"].as_array().unwrap().iter().filter_map(|p| p["pod"].as_str()).collect();
    assert_eq!(enrolled, ["shop/client"]);
}

#[test]
fn an_authorization_policy_applied_through_the_api_denies_within_seconds() {
    let Some((mut bed, _n1, n2)) = cluster() else { return };
    let base = client_and_web(&mut bed);
    curl(&bed, "shop/client", &base).unwrap();

    let deny = json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-client", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}],
        },
    });
    let applied = std::time::Instant::now();
    bed.api().put(deny).unwrap();
    wait_until(Duration::from_secs(5), "the DENY to take effect", || Ok(curl(&bed, "shop/client", &base).is_err()))
        .unwrap();
    println!("denied {:?} after the policy was applied", applied.elapsed());
    let denied = n2.connections().into_iter().filter(|c| c.decision == "deny").count();
    assert!(denied >= 1, "{}", n2.log_text());

    // A misspelt field: refused, reported on the object, the DENY stays.
    let mut typo = bed.api().get("authorizationpolicies", Some("shop"), "no-client").unwrap();
    typo["spec"]["action"] = json!("DENNY");
    bed.api().put(typo).unwrap();
    wait_until(Duration::from_secs(5), "a Warning Event on the policy", || {
        Ok(bed.api().list("events").iter().any(|e| {
            e["involvedObject"]["name"] == "no-client"
                && e["type"] == "Warning"
                && e["message"].as_str().unwrap_or_default().contains("spec.action")
        }))
    })
    .unwrap();
    let events = bed.api().list("events").into_iter().filter(|e| e["involvedObject"]["name"] == "no-client").count();
    assert_eq!(events, 1, "one Event for the rejected version, however many agents");
    std::thread::sleep(Duration::from_millis(500));
    assert!(curl(&bed, "shop/client", &base).is_err(), "the last good policy stays in force");
    let metrics = bed.admin_get("n2", "/metrics").unwrap().1;
    assert!(metrics.lines().any(|l| l == "ambit_config_errors 1"), "{metrics}");
}

#[test]
fn a_deleted_pod_is_unenrolled_through_cni_del() {
    let Some((mut bed, mut n1, _n2)) = cluster() else { return };
    bed.add_cni_pod("n1", "shop", "client").unwrap();
    n1.wait_pod_event("pod enrolled", "shop/client", 0).unwrap();
    bed.delete_cni_pod("shop/client").unwrap();
    n1.wait_pod_event("pod unenrolled", "shop/client", 0).unwrap();
    let lines = n1.lines();
    assert!(lines.iter().any(|l| l["message"] == "CNI DEL" && l["pod"] == "shop/client"), "{}", n1.log_text());
    // The same name again, a new pod (new uid and sandbox): captured afresh.
    bed.add_cni_pod("n1", "shop", "client").unwrap();
    n1.wait_pod_event("pod enrolled", "shop/client", 1).unwrap();
}

#[test]
fn a_restarted_agent_finds_running_pods_in_proc_and_nothing_flows_in_plaintext() {
    let Some((mut bed, mut n1, n2)) = cluster() else { return };
    let base = client_and_web(&mut bed);
    curl(&bed, "shop/client", &base).unwrap();
    n1.stop().unwrap();
    drop(n1);

    // No CNI ADD comes again for running pods: /proc is where they are.
    let mut n1 = agent(&bed, "n1");
    let found = n1
        .wait_for("the pod found in /proc", Duration::from_secs(10), |l| {
            l["message"] == "found a running pod's network namespace in /proc" && l["pod"] == "shop/client"
        })
        .unwrap();
    assert!(found["netns"].as_str().unwrap().starts_with("/proc/"), "{found}");
    n1.wait_pod_event("pod enrolled", "shop/client", 0).unwrap();
    let lines = n1.lines();
    let ready = lines.iter().position(|l| l["message"] == "agent ready").unwrap();
    let enrolled = lines.iter().position(|l| l["message"] == "pod enrolled").unwrap();
    assert!(enrolled < ready, "enrolled before the agent said ready:\n{}", n1.log_text());
    assert!(!lines.iter().any(|l| l["message"] == "cannot enrol pod; will retry"), "{}", n1.log_text());

    let wire = WireCapture::start(&bed, "after-restart");
    curl(&bed, "shop/client", &base).unwrap();
    let (_, packets) = wire.stop();
    let web_ip = bed.pod("shop/web").ip;
    assert_only_hbone(&packets, web_ip);
    let dst = format!("{web_ip}:{HTTP_PORT}");
    assert_mutual_tls(&n1, &dst, &spiffe("shop", "client"), &spiffe("shop", "web"));
    assert_mutual_tls(&n2, &dst, &spiffe("shop", "client"), &spiffe("shop", "web"));
}

#[test]
fn a_dropped_watch_and_a_410_lose_no_state() {
    let Some((mut bed, n1, _n2)) = cluster() else { return };
    let base = client_and_web(&mut bed);
    curl(&bed, "shop/client", &base).unwrap();
    let relists_before = pod_lists(&bed);

    bed.api().drop_watches();
    bed.api().compact();
    bed.api().fail_next(3);
    std::thread::sleep(Duration::from_secs(2));
    curl(&bed, "shop/client", &base).unwrap();
    assert!(pod_lists(&bed) > relists_before, "the 410 made the agents list again");
    assert!(!n1.lines().iter().any(|l| l["message"] == "pod unenrolled"), "{}", n1.log_text());

    // Changes after the relist still arrive.
    bed.api()
        .put(json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-all", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY", "rules": [{}]},
        }))
        .unwrap();
    wait_until(Duration::from_secs(5), "the DENY after the relist", || Ok(curl(&bed, "shop/client", &base).is_err()))
        .unwrap();
}

fn pod_lists(bed: &Bed) -> usize {
    bed.api().requests().iter().filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=")).count()
}

#[test]
fn ambit_cni_fails_add_for_an_ambient_pod_while_the_agent_is_down() {
    let Some(mut bed) = kubernetes_bed_or_skip(&["n1"]) else { return };
    bed.api_namespace("shop", true).unwrap();
    bed.api_namespace("legacy", false).unwrap();
    // The agent ran once (it wrote which namespaces are captured), then stopped.
    let mut n1 = agent(&bed, "n1");
    n1.stop().unwrap();

    let error = bed.add_cni_pod("n1", "shop", "web").unwrap_err();
    let failure = error.downcast_ref::<CniFailure>().unwrap_or_else(|| panic!("{error:#}"));
    assert_eq!(failure.plugin, "ambit-cni");
    assert_eq!(failure.output["code"], 11, "try again later: {}", failure.output);
    assert!(failure.output["msg"].as_str().unwrap().contains("whose namespace is captured"), "{}", failure.output);
    // A pod the mesh does not capture starts.
    bed.add_cni_pod("n1", "legacy", "old").unwrap();

    // Kubelet retries; once the agent is back, the pod starts captured.
    let mut n1 = agent(&bed, "n1");
    bed.cni_add("shop/web").unwrap();
    n1.wait_pod_event("pod enrolled", "shop/web", 0).unwrap();
    wait_capture_status(&bed, "shop/web", Some("enrolled"));
}

/// Asks the CA, from the fabric (where the CA listens), for `identity`
/// as `node` with the token in `token_file`.
fn ask_ca(bed: &Bed, node: &str, token_file: &Path, identity: &Identity) -> Result<(), String> {
    let bundle = load_bundle(&bed.root_cert(), "cluster.local").unwrap();
    let client = CaClient::new(
        CA_ADDR,
        node.to_string(),
        token_file.to_path_buf(),
        &ambit_identity::tls::TrustStore::new(bundle),
    )
    .unwrap();
    bed.in_fabric(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(client.fetch(identity)).map(drop).map_err(|e| format!("{e:#}"))
    })
    .unwrap()
}

#[test]
fn the_ca_issues_by_token_review_and_pod_placement() {
    let Some(mut bed) = kubernetes_bed_or_skip(&["n1", "n2"]) else { return };
    bed.api_namespace("shop", true).unwrap();
    let _agents = (agent(&bed, "n1"), agent(&bed, "n2"));
    bed.add_cni_pod("n1", "shop", "web").unwrap();
    bed.add_cni_pod("n2", "shop", "db").unwrap();
    let web = Identity::new("cluster.local", "shop", "web");
    let db = Identity::new("cluster.local", "shop", "db");
    let agent_token = bed.agent_token_file("n1");

    // A waypoint pod on n1 with its own projected token.
    let waypoint = bed
        .api()
        .put(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "waypoint-0", "namespace": "shop", "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}},
            "spec": {"nodeName": "n1", "serviceAccountName": "waypoint"},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.99"}]},
        }))
        .unwrap();
    let waypoint_token = bed.project_token("waypoint-0", &waypoint).unwrap();
    // A pod of another service account, with a token the CA must not take for the agent's.
    let impostor = bed
        .api()
        .put(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "impostor", "namespace": "shop"},
            "spec": {"nodeName": "n1", "serviceAccountName": "impostor"},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.98"}]},
        }))
        .unwrap();
    let impostor_token = bed.project_token("impostor", &impostor).unwrap();

    let cases: [(&str, &str, &Path, &Identity, Option<&str>); 6] = [
        ("the agent, for a pod of its node", "n1", &agent_token, &web, None),
        ("the agent, for a pod of another node", "n1", &agent_token, &db, Some("no running pod on node n1")),
        ("the agent, claiming another node", "n2", &agent_token, &db, Some("runs on node \"n1\", not n2")),
        (
            "another service account, for a pod of the node",
            "n1",
            &impostor_token,
            &web,
            Some("may obtain only its own identity"),
        ),
        ("a waypoint, for itself", "n1", &waypoint_token, &Identity::new("cluster.local", "shop", "waypoint"), None),
        ("a waypoint, for a workload", "n1", &waypoint_token, &web, Some("may obtain only its own identity")),
    ];
    for (case, node, token, identity, refusal) in cases {
        let outcome = ask_ca(&bed, node, token, identity);
        match (refusal, outcome) {
            (None, Ok(())) => {}
            (Some(reason), Err(error)) => {
                assert!(error.contains(reason), "{case}: refused with `{error}`, expected `{reason}`")
            }
            (expected, outcome) => panic!("{case}: expected {expected:?}, got {outcome:?}"),
        }
    }
    let log = std::fs::read_to_string(bed.ca_log()).unwrap();
    let lines: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "loaded the root from its Secret"
                || l["message"] == "stored a new root in its Secret"),
        "{log}"
    );
}

/// The DaemonSet's installer container, against a host's CNI directories:
/// it chains ambit-cni last in the primary conflist, puts it back when the
/// primary plugin rewrites the file, keeps it through a rolling update,
/// and removes it when the DaemonSet is deleted.
#[test]
fn the_cni_installer_keeps_the_plugin_chained_until_the_daemonset_goes() {
    let api = ApiServer::start().unwrap();
    api.put(json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "ambit-agent", "namespace": "ambit-system"}}))
        .unwrap();
    let host = tempfile::tempdir().unwrap();
    let (bin, conf) = (host.path().join("opt/cni/bin"), host.path().join("etc/cni/net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    let conflist = conf.join("10-primary.conflist");
    let primary = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]});
    std::fs::write(&conflist, primary.to_string()).unwrap();
    let kubeconfig = host.path().join("kubeconfig");
    let log = host.path().join("installer.log");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let chained = || -> Vec<String> {
        let conf: Value = serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
        conf["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap().to_string()).collect()
    };
    let start = || {
        let agent = agent_binary();
        std::process::Command::new(&agent)
            .args(["cni", "install", "--plugin"])
            .arg(agent.with_file_name("ambit-cni"))
            .arg("--cni-bin-dir")
            .arg(&bin)
            .arg("--cni-conf-dir")
            .arg(&conf)
            .args(["--agent-socket", "/var/run/ambit/cni.sock"])
            .env("KUBECONFIG", &kubeconfig)
            .stderr(std::fs::File::options().create(true).append(true).open(&log).unwrap())
            .stdout(std::fs::File::options().create(true).append(true).open(&log).unwrap())
            .spawn()
            .unwrap()
    };
    let stop = |mut installer: std::process::Child| {
        std::process::Command::new("kill").args(["-TERM", &installer.id().to_string()]).status().unwrap();
        let status = installer.wait().unwrap();
        assert!(status.success(), "{status}: {}", std::fs::read_to_string(&log).unwrap_or_default());
    };
    let running = |count: usize| {
        wait_until(Duration::from_secs(10), "the installer to run", || {
            Ok(std::fs::read_to_string(&log)?.matches("CNI installer running").count() >= count)
        })
        .unwrap()
    };
    let is_chained = |want: bool| {
        wait_until(Duration::from_secs(10), &format!("ambit-cni chained: {want}"), || {
            Ok((chained() == ["bridge", "ambit-cni"]) == want && bin.join("ambit-cni").exists() == want)
        })
        .unwrap()
    };

    let installer = start();
    running(1);
    is_chained(true);
    // The primary plugin rewrites its conflist: the installer puts ambit-cni back.
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(&conflist, primary.to_string()).unwrap();
    assert_eq!(chained(), ["bridge"]);
    is_chained(true);
    // A rolling update stops this installer: the plugin stays for the next.
    stop(installer);
    assert_eq!(chained(), ["bridge", "ambit-cni"]);
    // The DaemonSet is deleted: the last installer removes the plugin.
    let installer = start();
    running(2);
    is_chained(true);
    api.remove("daemonsets", Some("ambit-system"), "ambit-agent");
    stop(installer);
    is_chained(false);
}

/// Kubernetes mode: an agent stopped by a rolling update leaves the
/// capture in place (the node fails closed until the next agent); one
/// stopped while its DaemonSet is being deleted removes it, and the pods
/// talk directly.
#[test]
fn an_agent_stopped_as_its_daemonset_is_deleted_removes_the_capture() {
    let Some((mut bed, mut n1, _n2)) = cluster() else { return };
    bed.api()
        .put(json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "ambit-agent", "namespace": "ambit-system"}}))
        .unwrap();
    let base = client_and_web(&mut bed);
    curl(&bed, "shop/client", &base).unwrap();

    n1.stop().unwrap();
    assert!(bed.bpf_dir("n1").exists(), "a rolling update keeps the capture");
    assert!(curl(&bed, "shop/client", &base).is_err(), "and the node fails closed");

    let mut n1 = agent(&bed, "n1");
    n1.wait_pod_event("pod enrolled", "shop/client", 0).unwrap();
    curl(&bed, "shop/client", &base).unwrap();
    bed.api().remove("daemonsets", Some("ambit-system"), "ambit-agent");
    n1.stop().unwrap();
    assert!(
        n1.lines()
            .iter()
            .any(|l| l["message"]
                == "ambit is being uninstalled: the capture is removed, and pods' traffic flows directly"),
        "{}",
        n1.log_text()
    );
    assert!(!bed.bpf_dir("n1").exists());
    curl(&bed, "shop/client", &base).expect("the pod talks directly");
}

/// A TrustDomainFederation put to the API reaches the agents (its
/// configured bundle is trusted at once, its endpoint is followed), and
/// deleting it drops the trust domain; a pod's `ambit.dev/trust-domain`
/// annotation is not believed in a cluster.
#[test]
fn a_trust_domain_federation_applied_through_the_api_is_followed_and_withdrawn() {
    let Some((mut bed, mut n1, _n2)) = cluster() else { return };
    let partner = ambit_identity::ca::CertificateAuthority::create("partner.example").unwrap();
    let bundle = partner.bundle_json(Duration::from_secs(300)).to_string();
    bed.api()
        .put(json!({
            "apiVersion": "ambit.dev/v1alpha1",
            "kind": "TrustDomainFederation",
            "metadata": {"name": "partner"},
            "spec": {
                "trustDomain": "partner.example",
                "bundleEndpointURL": "https://10.100.0.200:8443/",
                "bundleEndpointProfile": {
                    "type": "https_spiffe",
                    "endpointSPIFFEID": "spiffe://partner.example/ns/ambit-system/sa/ambit-ca",
                },
                "trustDomainBundle": bundle,
            },
        }))
        .unwrap();
    let federated = |bed: &Bed| -> Vec<String> {
        let (_, body) = bed.admin_get("n1", "/certs").unwrap();
        let certs: Value = serde_json::from_str(&body).unwrap();
        certs["federated_bundles"].as_array().unwrap().iter().map(|b| b["trust_domain"].to_string()).collect()
    };
    wait_until(Duration::from_secs(10), "the federation to reach the agent", || {
        Ok(federated(&bed) == ["\"partner.example\""])
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", n1.log_text()));

    // Annotated as a partner workload: in a cluster, it is the cluster's.
    let url = client_and_web(&mut bed);
    let mut pod = bed.api().get("pods", Some("shop"), "client").unwrap();
    pod["metadata"]["annotations"]["ambit.dev/trust-domain"] = json!("partner.example");
    bed.api().put(pod).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(curl(&bed, "shop/client", &format!("{url}index.html")).unwrap(), "hello from the web pod\n");
    let web = format!("{}:{HTTP_PORT}", bed.pod("shop/web").ip);
    // Logged when the agent has seen the connection close, after curl has.
    n1.wait_connections(1, |c| c.dst_addr == web).unwrap();
    assert_mutual_tls(&n1, &web, &spiffe("shop", "client"), &spiffe("shop", "web"));

    assert!(bed.api().remove("trustdomainfederations", None, "partner"));
    wait_until(Duration::from_secs(10), "the federation to be withdrawn", || Ok(federated(&bed).is_empty()))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", n1.log_text()));
}
