//! The Kubernetes API server double (`ambit_testbed::apiserver`) against
//! real clients: kubectl applying and getting objects, and curl speaking
//! the list and watch protocol the way kube's watcher does. No kernel
//! programs: these run anywhere.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use ambit_testbed::apiserver::{ApiServer, TokenOwner};
use serde_json::{Value, json};

/// Runs curl; returns its standard output, failing the test if curl fails.
fn curl(args: &[&str]) -> String {
    let output = Command::new("curl").args(["-sS", "--max-time", "20"]).args(args).output().expect("run curl");
    assert!(output.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// A request with a JSON body; returns the status code and the body.
fn send(method: &str, url: &str, content_type: &str, body: &Value) -> (u16, Value) {
    let out = curl(&[
        "-X",
        method,
        "-H",
        &format!("content-type: {content_type}"),
        "--data-binary",
        &body.to_string(),
        "-w",
        "\n%{http_code}",
        url,
    ]);
    let (body, code) = out.rsplit_once('\n').expect("curl prints the status last");
    (code.parse().expect("a status code"), serde_json::from_str(body).expect("a JSON body"))
}

fn get(url: &str) -> Value {
    serde_json::from_str(&curl(&[url])).expect("a JSON body")
}

/// Every event of a watch, until the server closes it.
fn watch(url: &str) -> Vec<Value> {
    curl(&["-N", url]).lines().map(|l| serde_json::from_str(l).expect("one JSON event per line")).collect()
}

fn pod(namespace: &str, name: &str, node: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
    })
}

fn rv(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"].as_str().expect("a resourceVersion").parse().expect("a number")
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

#[test]
fn list_pages_and_selects_by_label_and_field() {
    let api = ApiServer::start().unwrap();
    let pods = format!("{}/api/v1/namespaces/shop/pods", api.url());
    for (name, node) in [("a", "n1"), ("b", "n2"), ("c", "n1"), ("d", "n1"), ("e", "n2")] {
        let (code, created) = send("POST", &pods, "application/json", &pod("shop", name, node, name));
        assert_eq!(code, 201, "{created}");
        assert!(created["metadata"]["uid"].is_string());
    }
    api.put(pod("legacy", "z", "n1", "z")).unwrap();
    let (code, conflict) = send("POST", &pods, "application/json", &pod("shop", "a", "n1", "a"));
    assert_eq!((code, conflict["reason"].as_str()), (409, Some("AlreadyExists")));

    let mut names = Vec::new();
    let mut next = format!("{pods}?limit=2");
    loop {
        let page = get(&next);
        assert!(page["items"].as_array().unwrap().len() <= 2);
        names.extend(page["items"].as_array().unwrap().iter().map(|p| p["metadata"]["name"].clone()));
        match page["metadata"]["continue"].as_str() {
            Some(token) => next = format!("{pods}?limit=2&continue={token}"),
            None => break,
        }
    }
    assert_eq!(names, ["a", "b", "c", "d", "e"]);

    let every = get(&format!("{}/api/v1/pods?fieldSelector=spec.nodeName%3Dn1", api.url()));
    let on_n1: Vec<&str> =
        every["items"].as_array().unwrap().iter().map(|p| p["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(on_n1, ["z", "a", "c", "d"], "every namespace, node n1 only (sorted by namespace, then name)");
    let selected = get(&format!("{pods}?labelSelector=app%3Db"));
    assert_eq!(selected["items"][0]["metadata"]["name"], "b");
    assert_eq!(selected["items"].as_array().unwrap().len(), 1);
    let not = get(&format!("{pods}?labelSelector=app!%3Db,app"));
    assert_eq!(not["items"].as_array().unwrap().len(), 4);
}

#[test]
fn watch_replays_from_a_version_sends_bookmarks_and_closes_at_its_timeout() {
    let api = ApiServer::start().unwrap();
    let pods = format!("{}/api/v1/namespaces/shop/pods", api.url());
    let first = api.put(pod("shop", "a", "n1", "web")).unwrap();
    api.put(pod("shop", "b", "n2", "web")).unwrap();
    let started = Instant::now();
    let events =
        watch(&format!("{pods}?watch=true&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds=2", rv(&first)));
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(5), "closed after {elapsed:?}");
    assert_eq!(events[0]["type"], "ADDED", "only what came after the version asked for");
    assert_eq!(events[0]["object"]["metadata"]["name"], "b");
    let bookmark = events.iter().find(|e| e["type"] == "BOOKMARK").expect("a bookmark");
    assert_eq!(bookmark["object"]["kind"], "Pod");
    assert!(!types(&events).contains(&"ERROR"));

    // From "0": the current objects as ADDED, then live changes, with the
    // label selector applied to both (an object leaving it is DELETED).
    let url = format!("{pods}?watch=1&resourceVersion=0&labelSelector=app%3Dweb&timeoutSeconds=3");
    let live = std::thread::spawn(move || watch(&url));
    std::thread::sleep(Duration::from_millis(500));
    let pod_a = format!("{pods}/a");
    let (code, _) =
        send("PATCH", &pod_a, "application/merge-patch+json", &json!({"metadata": {"labels": {"app": "db"}}}));
    assert_eq!(code, 200);
    let (code, deleted) = send("DELETE", &format!("{pods}/b"), "application/json", &json!({}));
    assert_eq!((code, deleted["metadata"]["name"].as_str()), (200, Some("b")));
    let events = live.join().unwrap();
    assert_eq!(types(&events), ["ADDED", "ADDED", "DELETED", "DELETED"], "{events:?}");
    assert_eq!(events[2]["object"]["metadata"]["labels"]["app"], "db", "a left the selector");
}

#[test]
fn a_watch_from_a_compacted_version_gets_410_inside_the_stream() {
    let api = ApiServer::start().unwrap();
    let old = api.put(pod("shop", "a", "n1", "web")).unwrap();
    api.put(pod("shop", "b", "n1", "web")).unwrap();
    api.compact();
    let events = watch(&format!("{}/api/v1/pods?watch=true&resourceVersion={}", api.url(), rv(&old)));
    assert_eq!(types(&events), ["ERROR"]);
    assert_eq!(events[0]["object"]["code"], 410);
    assert_eq!(events[0]["object"]["reason"], "Expired");
    // A relist works, and a watch from its version replays nothing old.
    let list = get(&format!("{}/api/v1/pods", api.url()));
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
}

#[test]
fn pod_status_takes_the_status_and_annotations_and_other_patches_are_refused() {
    let api = ApiServer::start().unwrap();
    let created = api.put(pod("shop", "a", "n1", "web")).unwrap();
    let url = format!("{}/api/v1/namespaces/shop/pods/a/status", api.url());
    // As the real server's pod status strategy: the status, labels and
    // annotations change; the spec does not.
    let patch = json!({
        "metadata": {"annotations": {"ambit.dev/capture": "enrolled"}},
        "spec": {"nodeName": "elsewhere"},
        "status": {"podIPs": [{"ip": "10.244.1.5"}], "conditions": [{"type": "Ready", "status": "True"}]},
    });
    let (code, patched) = send("PATCH", &url, "application/merge-patch+json", &patch);
    assert_eq!(code, 200, "{patched}");
    assert_eq!(patched["status"]["podIPs"][0]["ip"], "10.244.1.5");
    assert_eq!(patched["metadata"]["annotations"]["ambit.dev/capture"], "enrolled");
    assert_eq!(patched["spec"]["nodeName"], "n1", "the status subresource leaves the spec alone");
    assert!(rv(&patched) > rv(&created));
    assert_eq!(patched["metadata"]["uid"], created["metadata"]["uid"]);
    let (code, _) = send("PATCH", &url, "application/json-patch+json", &json!([]));
    assert_eq!(code, 415);
    let (code, missing) = send("PATCH", &url.replace("/a/", "/gone/"), "application/merge-patch+json", &patch);
    assert_eq!((code, missing["reason"].as_str()), (404, Some("NotFound")));
}

#[test]
fn token_review_names_the_pod_and_checks_the_audience() {
    let api = ApiServer::start().unwrap();
    api.add_token(
        "agent-token",
        TokenOwner {
            namespace: "ambit-system".into(),
            service_account: "ambit-agent".into(),
            pod_name: "ambit-agent-x1".into(),
            pod_uid: "uid-1".into(),
            audiences: vec!["ambit-ca".into()],
        },
    );
    let url = format!("{}/apis/authentication.k8s.io/v1/tokenreviews", api.url());
    let review = |token: &str, audience: &str| {
        let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token, "audiences": [audience]}});
        let (code, answer) = send("POST", &url, "application/json", &body);
        assert_eq!(code, 201);
        answer["status"].clone()
    };
    let good = review("agent-token", "ambit-ca");
    assert_eq!(good["authenticated"], true);
    assert_eq!(good["user"]["username"], "system:serviceaccount:ambit-system:ambit-agent");
    assert_eq!(good["user"]["extra"]["authentication.kubernetes.io/pod-name"][0], "ambit-agent-x1");
    assert_eq!(review("agent-token", "kubernetes")["authenticated"], false, "another audience");
    assert_eq!(review("forged", "ambit-ca")["authenticated"], false);
}

#[test]
fn faults_fail_slow_down_and_drop_watches_on_demand() {
    let api = ApiServer::start().unwrap();
    let pods = format!("{}/api/v1/pods", api.url());
    api.fail_next(2);
    for _ in 0..2 {
        let out = curl(&["-w", "\n%{http_code}", &pods]);
        assert!(out.ends_with("\n500"), "{out}");
    }
    assert_eq!(get(&pods)["kind"], "PodList", "the fault was for two requests");

    api.delay_responses(Duration::from_millis(400));
    let started = Instant::now();
    get(&pods);
    assert!(started.elapsed() >= Duration::from_millis(400));
    api.delay_responses(Duration::ZERO);

    let url = format!("{pods}?watch=true&timeoutSeconds=30");
    let started = Instant::now();
    let watcher = std::thread::spawn(move || watch(&url));
    std::thread::sleep(Duration::from_millis(500));
    api.drop_watches();
    watcher.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "the watch ended when dropped, not at its timeout");
}

/// kubectl, client-side apply, as operators will use it against a cluster.
#[test]
fn kubectl_applies_and_gets_objects() {
    if Command::new("kubectl").arg("version").arg("--client").output().is_err() {
        assert!(std::env::var("CI").is_err(), "kubectl is missing; CI must have it");
        eprintln!("SKIPPED: kubectl is not installed");
        return;
    }
    let api = ApiServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("shop.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {ambit.dev/dataplane-mode: ambient}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: shop}\nspec: {}\n",
    )
    .unwrap();
    let kubectl = |args: &[&str]| {
        let output = Command::new("kubectl")
            .env("KUBECONFIG", dir.path().join("none"))
            .args(["--server", &api.url(), "--cache-dir", dir.path().join("cache").to_str().unwrap()])
            .args(args)
            .output()
            .expect("run kubectl");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "kubectl {args:?}: {text}");
        text
    };
    let applied = kubectl(&["apply", "--validate=false", "-f", manifest.to_str().unwrap()]);
    assert!(applied.contains("namespace/shop created"), "{applied}");
    assert!(applied.contains("authorizationpolicy.security.istio.io/deny-all created"), "{applied}");
    let labels = kubectl(&["get", "namespace", "shop", "-o", "jsonpath={.metadata.labels}"]);
    assert!(labels.contains("\"ambit.dev/dataplane-mode\":\"ambient\""), "{labels}");
    let policies = kubectl(&["get", "authorizationpolicies", "-n", "shop", "-o", "name"]);
    assert_eq!(policies.trim(), "authorizationpolicy.security.istio.io/deny-all");
    let stored = api.get("namespaces", None, "shop").unwrap();
    assert!(
        stored["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"].is_string(),
        "client-side apply records what it applied"
    );
}
