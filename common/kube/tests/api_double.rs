//! The Kubernetes source against the API server double (which speaks the
//! real wire protocol): what is applied through the API reaches the
//! snapshot; a rejected object is reported and its last good version
//! stays; dropped watches, a 410 and 500s lose nothing.

use std::time::Duration;

use ambit_config::{Update, Updates};
use ambit_kube::{Labels, NodePods, Options, PodNetwork, PodNetworks, watch_cluster};
use ambit_model::{DataplaneMode, MtlsMode};
use ambit_testbed::apiserver::ApiServer;
use serde_json::{Value, json};

fn client(api: &ApiServer) -> kube::Client {
    // kube's client builds its TLS configuration even for plain http.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::new(api.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

/// The next update that satisfies `done`, within 10 s.
async fn until(updates: &mut Updates, what: &str, done: impl Fn(&Update) -> bool) -> Update {
    let wait = async {
        loop {
            let update = updates.next().await.expect("the source stopped");
            if done(&update) {
                return update;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.unwrap_or_else(|_| panic!("no update with {what}"))
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(name: &str, node: &str, ip: Option<&str>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "labels": {"app": name},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(4096)},
            "managedFields": [{"manager": "kubectl", "operation": "Update"}],
        },
        "spec": {"nodeName": node, "serviceAccountName": name, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running"},
    });
    if let Some(ip) = ip {
        pod["status"]["podIPs"] = json!([{"ip": ip}]);
    }
    pod
}

fn peer_authentication(mode: &str) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "shop"},
        "spec": {"mtls": {"mode": mode}},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_applied_through_the_api_reach_the_snapshot() {
    let api = ApiServer::start().unwrap();
    api.put(namespace("shop", json!({"ambit.dev/dataplane-mode": "ambient"}))).unwrap();
    api.put(pod("web", "n1", Some("10.244.1.5"))).unwrap();
    api.put(pod("pending", "n1", None)).unwrap();
    api.put(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "ingress", "namespace": "shop"},
        "spec": {"gatewayClassName": "istio"},
    }))
    .unwrap();
    let mut updates = watch_cluster(client(&api), Options::default());
    let first = until(&mut updates, "the pod", |u| !u.snapshot.pods.is_empty()).await;
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.snapshot.namespaces["shop"].dataplane_mode, Some(DataplaneMode::Ambient));
    let web = &first.snapshot.pods["shop/web"];
    assert_eq!((web.node.as_str(), web.service_account.as_str()), ("n1", "web"));
    assert!(!first.snapshot.pods.contains_key("shop/pending"), "a pod without an IP is not for the mesh yet");
    assert!(first.snapshot.gateways.is_empty(), "another class's Gateway is not a waypoint");

    api.put(peer_authentication("STRICT")).unwrap();
    let strict = until(&mut updates, "STRICT", |u| !u.snapshot.peer_authentications.is_empty()).await;
    assert_eq!(strict.snapshot.peer_authentications[0].mode, MtlsMode::Strict);

    // A typo is reported; the last good version stays in force.
    api.put(peer_authentication("STRCT")).unwrap();
    let broken = until(&mut updates, "the error", |u| !u.errors.is_empty()).await;
    assert!(broken.errors[0].to_string().contains("spec.mtls.mode"), "{}", broken.errors[0]);
    assert_eq!(broken.snapshot.peer_authentications[0].mode, MtlsMode::Strict);
    // ...and on the object, as a Warning Event.
    let reported = || {
        api.list("events").into_iter().find(|e| e["involvedObject"]["name"] == "default" && e["reason"] == "Rejected")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while reported().is_none() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let event = reported().expect("an Event on the rejected PeerAuthentication");
    assert_eq!((event["type"].as_str(), event["metadata"]["namespace"].as_str()), (Some("Warning"), Some("shop")));
    assert!(event["message"].as_str().unwrap().contains("spec.mtls.mode"), "{event}");
}

/// This node's pods take their netns, and their addresses until kubelet
/// writes them, from the CNI reports, never from an annotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_nodes_pods_take_their_network_from_the_cni_reports() {
    let api = ApiServer::start().unwrap();
    api.put(namespace("shop", json!({}))).unwrap();
    let mut starting = pod("starting", "n1", None);
    starting["metadata"]["annotations"]["ambit.dev/netns"] = json!("/proc/1/ns/net");
    let starting = api.put(starting).unwrap();
    api.put(pod("elsewhere", "n2", None)).unwrap();
    api.put(pod("renamed", "n1", None)).unwrap();
    let (networks_tx, networks) = tokio::sync::watch::channel(PodNetworks::new());
    let node = NodePods { node: "n1".into(), networks };
    let mut updates = watch_cluster(client(&api), Options { node: Some(node), ..Default::default() });
    let first = until(&mut updates, "the namespace", |u| u.snapshot.namespaces.contains_key("shop")).await;
    assert!(first.snapshot.pods.is_empty(), "no pod has an address yet: {:?}", first.snapshot.pods.keys());

    let report = |uid: Option<&str>, ip: &str| PodNetwork {
        uid: uid.map(str::to_string),
        netns: format!("/var/run/netns/cni-{ip}").into(),
        ips: vec![ip.parse().unwrap()],
    };
    let uid = starting["metadata"]["uid"].as_str().unwrap();
    networks_tx.send_replace(PodNetworks::from([
        ("shop/starting".to_string(), report(Some(uid), "10.244.1.7")),
        ("shop/elsewhere".to_string(), report(None, "10.244.1.8")),
        ("shop/renamed".to_string(), report(Some("another-pods-uid"), "10.244.1.9")),
    ]));
    let reported = until(&mut updates, "the reported pod", |u| u.snapshot.pods.contains_key("shop/starting")).await;
    let started = &reported.snapshot.pods["shop/starting"];
    assert_eq!(started.ips, ["10.244.1.7".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(started.netns.as_deref(), Some(std::path::Path::new("/var/run/netns/cni-10.244.1.7")));
    assert_eq!(started.uid.as_deref(), Some(uid));
    let others: Vec<_> = reported.snapshot.pods.keys().filter(|id| *id != "shop/starting").collect();
    assert!(others.is_empty(), "another node's pod, or another pod's report: {others:?}");

    // Kubelet's addresses win once written; the report still gives the netns.
    let mut running = pod("starting", "n1", Some("10.244.1.70"));
    running["metadata"]["uid"] = json!(uid);
    api.put(running).unwrap();
    let updated = until(&mut updates, "kubelet's address", |u| {
        u.snapshot
            .pods
            .get("shop/starting")
            .is_some_and(|p| p.ips == ["10.244.1.70".parse::<std::net::IpAddr>().unwrap()])
    })
    .await;
    assert!(updated.snapshot.pods["shop/starting"].netns.is_some());

    // CNI DEL: the report goes, and with it the netns.
    networks_tx.send_replace(PodNetworks::new());
    until(&mut updates, "the report gone", |u| u.snapshot.pods.get("shop/starting").is_some_and(|p| p.netns.is_none()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_a_410_and_500s_lose_nothing() {
    let api = ApiServer::start().unwrap();
    api.put(namespace("shop", json!({}))).unwrap();
    api.put(pod("a", "n1", Some("10.244.1.5"))).unwrap();
    let mut updates = watch_cluster(client(&api), Options::default());
    until(&mut updates, "pod a", |u| u.snapshot.pods.contains_key("shop/a")).await;

    api.drop_watches();
    api.put(pod("b", "n1", Some("10.244.1.6"))).unwrap();
    let after_drop = until(&mut updates, "pod b", |u| u.snapshot.pods.contains_key("shop/b")).await;
    assert!(after_drop.snapshot.pods.contains_key("shop/a"));

    // The history is gone: re-watching from the last version seen gets
    // 410 (after three 500s), and the relist keeps what is there.
    let pod_lists =
        || api.requests().iter().filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=")).count();
    let lists_before = pod_lists();
    api.compact();
    api.fail_next(3);
    api.drop_watches();
    // Let every watch see the drop before the next change, so that none
    // carries it on the old stream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.put(pod("c", "n2", Some("10.244.2.5"))).unwrap();
    let after_gone = until(&mut updates, "pod c", |u| u.snapshot.pods.contains_key("shop/c")).await;
    assert_eq!(after_gone.snapshot.pods.len(), 3, "{:?}", after_gone.snapshot.pods.keys());
    assert!(pod_lists() > lists_before, "the 410 made the watcher list again: {:#?}", api.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_labels_count_only_when_asked() {
    let api = ApiServer::start().unwrap();
    api.put(namespace("shop", json!({"istio.io/dataplane-mode": "ambient"}))).unwrap();
    let mut plain = watch_cluster(client(&api), Options::default());
    let update = until(&mut plain, "the namespace", |u| u.snapshot.namespaces.contains_key("shop")).await;
    assert_eq!(update.snapshot.namespaces["shop"].dataplane_mode, None);
    let mut istio = watch_cluster(client(&api), Options { labels: Labels { istio: true }, ..Default::default() });
    let update = until(&mut istio, "the namespace", |u| u.snapshot.namespaces.contains_key("shop")).await;
    assert_eq!(update.snapshot.namespaces["shop"].dataplane_mode, Some(DataplaneMode::Ambient));
}
