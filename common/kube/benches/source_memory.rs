//! Memory of the Kubernetes source with a large cluster, run by
//! `cargo xtask bench`: 10,000 pods and 1,000 services (or the counts
//! given) in the API server double, shaped like real objects (container
//! specs, managed fields, kubectl's last applied configuration, status
//! conditions). Prints one JSON object: how long the first snapshot took,
//! and the resident memory of the process that runs the source, before it
//! starts and once it holds the snapshot. The double runs in a child
//! process (this program again), so its objects are not counted.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ambit_kube::{Options, watch_cluster};
use ambit_testbed::apiserver::ApiServer;
use serde_json::json;

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn pod(index: usize) -> serde_json::Value {
    let (namespace, app) = (format!("ns-{}", index % 100), format!("app-{}", index % 500));
    let container = json!({
        "name": "app",
        "image": format!("registry.example/{app}:1.2.{index}"),
        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
        "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
    });
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("{app}-{index}"),
            "namespace": namespace,
            "labels": {"app": app, "pod-template-hash": "5d9c7f8b6"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(1200)},
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}, "f:spec": {"f:containers": {}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:conditions": {}, "f:podIPs": {}}}, "subresource": "status"},
            ],
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-5d9c7f8b6"), "uid": "u", "controller": true}],
        },
        "spec": {
            "nodeName": format!("node-{}", index % 100),
            "serviceAccountName": app,
            "containers": [container],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
        },
        "status": {
            "phase": "Running",
            "podIPs": [{"ip": format!("10.{}.{}.{}", 64 + index / 65536, (index / 256) % 256, index % 256)}],
            "conditions": [
                {"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"},
                {"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"},
            ],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "registry.example/app", "imageID": "sha256:0123456789abcdef", "containerID": "containerd://0123456789abcdef"}],
        },
    })
}

fn service(index: usize) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": format!("svc-{index}"), "namespace": format!("ns-{}", index % 100)},
        "spec": {
            "clusterIP": format!("10.96.{}.{}", index / 256, index % 256),
            "selector": {"app": format!("app-{}", index % 500)},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    })
}

/// The child: serves the cluster until its standard input closes.
fn serve(pods: usize, services: usize) {
    let api = ApiServer::start().expect("start the API server double");
    for index in 0..100 {
        let labels = json!({"ambit.dev/dataplane-mode": "ambient"});
        api.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns-{index}"), "labels": labels}}))
            .expect("store a namespace");
    }
    for index in 0..pods {
        api.put(pod(index)).expect("store a pod");
    }
    for index in 0..services {
        api.put(service(index)).expect("store a service");
    }
    println!("{}", api.url());
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with("--"));
    let pods: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let services: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    if std::env::var_os("SOURCE_MEMORY_SERVE").is_some() {
        return serve(pods, services);
    }
    let mut child = Command::new(std::env::current_exe().expect("this program"))
        .args([pods.to_string(), services.to_string()])
        .env("SOURCE_MEMORY_SERVE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the API server double");
    let mut url = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut url).expect("the double's URL");
    let report = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(measure(url.trim(), pods, services));
    drop(child.stdin.take());
    let _ = child.wait();
    println!("{report}");
}

async fn measure(url: &str, pods: usize, services: usize) -> serde_json::Value {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let before = rss_mb();
    let client = kube::Client::try_from(kube::Config::new(url.parse().expect("a URL"))).expect("a client");
    let started = Instant::now();
    let mut updates = watch_cluster(client, Options::default());
    let first = updates.next().await.expect("a first snapshot");
    let first_snapshot_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(first.snapshot.pods.len(), pods, "{:?}", first.errors.first());
    // Let the listing's buffers go before reading the figure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_mb();
    json!({
        "pods": pods,
        "services": services,
        "first_snapshot_ms": first_snapshot_ms.round() as u64,
        "rss_before_mb": (before * 10.0).round() / 10.0,
        "rss_with_source_mb": (after * 10.0).round() / 10.0,
        "source_mb": ((after - before) * 10.0).round() / 10.0,
    })
}
