//! Memory of the Kubernetes source with a large cluster, run by
//! `cargo xtask bench`: 10,000 pods and 1,000 services (or the counts
//! given) in the API server double, shaped like real objects
//! ([`ApiServer::fill_like_a_cluster`]). Prints one JSON object: how long the first snapshot took,
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

/// The child: serves the cluster until its standard input closes.
fn serve(pods: usize, services: usize) {
    let api = ApiServer::start().expect("start the API server double");
    api.fill_like_a_cluster(pods, services).expect("store the cluster's objects");
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
