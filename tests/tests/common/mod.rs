//! Helpers shared by the end-to-end test files: the standard bed, agents,
//! served files, and the real clients (curl, iperf3).
#![allow(dead_code)] // each test file uses its own subset

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use ambit_testbed::{Agent, Bed, bed_or_skip};
use anyhow::Result;
use serde_json::Value;

pub const HTTP_PORT: u16 = 8080;
pub const IPERF_PORT: u16 = 5201;
pub const BIG_FILE_BYTES: usize = 32 * 1024 * 1024;

/// A bed with nodes n1, n2 and the namespaces `shop` (ambient) and `legacy`.
pub fn bed() -> Option<Bed> {
    let mut bed = bed_or_skip(&["n1", "n2"])?;
    bed.namespace("shop", true).unwrap();
    bed.namespace("legacy", false).unwrap();
    Some(bed)
}

pub fn agent(bed: &Bed, node: &str) -> Agent {
    let mut agent = bed.start_agent(node).unwrap();
    agent.wait_ready().unwrap();
    agent
}

/// A directory with `index.html` and a random `big.bin`; returns the
/// directory and big.bin's SHA-256.
pub fn web_root(bed: &Bed, big_bytes: usize) -> (PathBuf, String) {
    let dir = bed.scratch().join("www");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.html"), "hello from the web pod\n").unwrap();
    // xorshift: incompressible, different in every byte position.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..big_bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(dir.join("big.bin"), &data).unwrap();
    let sum = sha256(&dir.join("big.bin"));
    (dir, sum)
}

pub fn sha256(file: &Path) -> String {
    let out = Command::new("sha256sum").arg(file).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

pub fn curl(bed: &Bed, from: &str, url: &str) -> Result<String> {
    bed.run_ok(from, "curl", &["-sS", "--fail", "--max-time", "20", url])
}

/// Downloads `url` in pod `from` to a file and returns the file's SHA-256.
pub fn curl_sha256(bed: &Bed, from: &str, url: &str) -> String {
    let out = bed.scratch().join(format!("download-{}", from.replace('/', "-")));
    bed.run_ok(from, "curl", &["-sS", "--fail", "--max-time", "60", "-o", out.to_str().unwrap(), url]).unwrap();
    sha256(&out)
}

/// Runs an iperf3 client in `from` for 2 seconds; returns bytes received.
pub fn iperf3(bed: &Bed, from: &str, server_ip: &str, reverse: bool) -> u64 {
    let port = IPERF_PORT.to_string();
    let mut args = vec!["-c", server_ip, "-p", &port, "-t", "2", "-J"];
    if reverse {
        args.push("-R");
    }
    let out = bed.run_ok(from, "iperf3", &args).unwrap();
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(report.get("error").is_none(), "iperf3 error: {}", report["error"]);
    report["end"]["sum_received"]["bytes"].as_u64().unwrap()
}

/// The counters the agent logs when it stops (kernel and proxy).
pub fn stop_and_read_counters(agent: &mut Agent) -> Vec<(String, u64)> {
    assert!(agent.stop().unwrap().success(), "graceful stop exits 0");
    let lines: Vec<Value> = agent
        .lines()
        .into_iter()
        .filter(|l| matches!(l["message"].as_str(), Some("kernel capture counters" | "proxy counters")))
        .collect();
    assert_eq!(lines.len(), 2, "both counter lines are logged on stop");
    lines
        .iter()
        .flat_map(|l| l["counters"].as_str().unwrap().split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

pub fn counter(counters: &[(String, u64)], name: &str) -> u64 {
    counters.iter().find(|(k, _)| k == name).map(|(_, v)| *v).unwrap()
}

/// Waits until every named node's agent is ready (programs attached, every
/// local pod's certificate loaded).
pub fn wait_nodes_ready(bed: &Bed, nodes: &[&str]) {
    for node in nodes {
        ambit_testbed::wait_until(std::time::Duration::from_secs(20), &format!("{node} ready"), || {
            Ok(bed.admin_get(node, "/healthz/ready")?.0 == 200)
        })
        .unwrap();
    }
}
