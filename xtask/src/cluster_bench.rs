//! Kubernetes mode on one node, for `cargo xtask bench`: the agent's memory
//! with a large cluster in the API server double, and the time from a
//! pod's CNI ADD to its capture.

use std::{path::Path, time::Duration};

use ambit_testbed::{Bed, wait_until};
use anyhow::{Context as _, Result};
use serde_json::{Value, json};

/// Cluster objects besides the node's own pods.
const CLUSTER_PODS: usize = 10_000;
const CLUSTER_SERVICES: usize = 1_000;

/// Runs the agent (`release/ambit-agent`) in Kubernetes mode against
/// CLUSTER_PODS pods and CLUSTER_SERVICES services, then creates `pods`
/// ambient pods through the CNI chain, one after the other.
pub fn run(release: &Path, pods: usize) -> Result<Value> {
    let mut bed = Bed::kubernetes_with_agent(&["n1"], release.join("ambit-agent"))?;
    bed.api().fill_like_a_cluster(CLUSTER_PODS, CLUSTER_SERVICES)?;
    bed.api_namespace("bench", true)?;
    bed.api_namespace("plain", false)?;
    let mut agent = bed.start_agent("n1")?;
    agent.wait_ready()?;
    wait_until(Duration::from_secs(60), "the agent to hold the cluster", || {
        let dump: Value = serde_json::from_str(&bed.admin_get("n1", "/config_dump")?.1)?;
        Ok(dump["state"]["pods"].as_object().is_some_and(|p| p.len() >= CLUSTER_PODS))
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let rss_cluster_mb = rss_mb(agent.pid())?;

    // One pod the mesh does not capture: the plugin's own cost.
    bed.add_cni_pod("n1", "plain", "uncaptured")?;
    let uncaptured_ms = bed.cni_add_times().last().context("a timed ADD")?.as_secs_f64() * 1000.0;
    for index in 0..pods {
        bed.add_cni_pod("n1", "bench", &format!("pod-{index}"))?;
    }
    let mut captured: Vec<f64> = bed.cni_add_times()[1..].iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    captured.sort_by(f64::total_cmp);
    let percentile = |p: f64| captured[((captured.len() as f64 * p).ceil() as usize).clamp(1, captured.len()) - 1];
    std::thread::sleep(Duration::from_secs(1));
    let rss_with_pods_mb = rss_mb(agent.pid())?;
    let plugin = release.join("ambit-cni");
    let plugin_bytes = std::fs::metadata(&plugin).with_context(|| format!("{}", plugin.display()))?.len();
    Ok(json!({
        "cluster_pods": CLUSTER_PODS,
        "cluster_services": CLUSTER_SERVICES,
        "agent_rss_mb": rss_cluster_mb,
        "captured_pods": pods,
        "agent_rss_with_pods_mb": rss_with_pods_mb,
        "cni_add_to_capture_p50_ms": round(percentile(0.50)),
        "cni_add_to_capture_p99_ms": round(percentile(0.99)),
        "cni_add_uncaptured_ms": round(uncaptured_ms),
        "ambit_cni_bytes": plugin_bytes,
    }))
}

fn rss_mb(pid: u32) -> Result<f64> {
    Ok(round(ambit_testbed::proc_status(pid, "VmRSS:")? as f64 / 1024.0))
}

fn round(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}
