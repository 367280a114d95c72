//! Helpers shared by the end-to-end test files: the standard bed, agents,
//! served files, and the real clients (curl, iperf3).
#![allow(dead_code)] // each test file uses its own subset

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use ambit_testbed::{Agent, Bed, bed_or_skip, wait_until};
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

/// The value of an unlabelled metric (a gauge, say `ambit_config_errors`)
/// on `node`'s agent, as its `/metrics` prints it; empty if absent.
pub fn gauge(bed: &Bed, node: &str, name: &str) -> String {
    let (_, metrics) = bed.admin_get(node, "/metrics").unwrap();
    let prefix = format!("{name} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_default().to_string()
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

/// Where [`WireCapture::start`] knocks, and how tcpdump writes it.
const PROBE_URL: &str = "http://10.100.0.1:9/";
const PROBE_ENDPOINT: &str = "10.100.0.1.9";
const PCAP_HEADER_BYTES: u64 = 24;

/// tcpdump on node n1's uplink (`eth0`, to the fabric), which every packet
/// n1 exchanges with the other nodes crosses, writing a pcap; its own
/// knocks are left out of what it returns.
pub struct WireCapture {
    tcpdump: Child,
    pcap: PathBuf,
}

impl WireCapture {
    /// Starts capturing TCP on the fabric; returns once tcpdump listens.
    pub fn start(bed: &Bed, name: &str) -> WireCapture {
        let pcap = bed.scratch().join(format!("{name}.pcap"));
        let log = bed.scratch().join(format!("{name}.tcpdump.log"));
        let tcpdump = bed
            .node_command("n1", "tcpdump")
            // Immediate mode: otherwise packets wait in the kernel's ring
            // for a block to fill, and those still there at SIGINT are lost.
            .args(["-i", "eth0", "-n", "--immediate-mode", "-U", "-w"])
            .arg(&pcap)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // tcpdump says it listens a moment before packets reach it: knock
        // (a refused connection to node n1's discard port) until one is seen.
        wait_until(Duration::from_secs(10), "tcpdump to capture", || {
            let _ = bed.fabric_command("curl").args(["-s", "--max-time", "1", PROBE_URL]).output();
            Ok(std::fs::metadata(&pcap).is_ok_and(|m| m.len() > PCAP_HEADER_BYTES))
        })
        .unwrap_or_else(|e| panic!("{e:#}: {}", std::fs::read_to_string(&log).unwrap_or_default()));
        WireCapture { tcpdump, pcap }
    }

    /// Stops the capture; returns the raw pcap and tcpdump's decoding, one
    /// line per packet.
    pub fn stop(mut self) -> (Vec<u8>, Vec<String>) {
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill").args(["-INT", &self.tcpdump.id().to_string()]).status();
        self.tcpdump.wait().unwrap();
        let raw = std::fs::read(&self.pcap).unwrap();
        let decoded = Command::new("tcpdump").args(["-nn", "-r"]).arg(&self.pcap).output().unwrap();
        let lines = String::from_utf8_lossy(&decoded.stdout)
            .lines()
            .filter(|line| !line.contains(&format!(" {PROBE_ENDPOINT}")))
            .map(str::to_string)
            .collect();
        (raw, lines)
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The JWT issuer of the waypoint tests (`https://issuer.example`): P-256 keys `k1` and `k2`, the
/// JWKS files it publishes, and tokens signed with its keys (or with a
/// forger's key under kid `k1`).
pub struct Issuer {
    keys: Vec<(&'static str, jsonwebtoken::EncodingKey, serde_json::Value)>,
    forger: jsonwebtoken::EncodingKey,
}

impl Issuer {
    pub fn new() -> Issuer {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let generate = || {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            (
                jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
                pair.public_key_raw().to_vec(),
            )
        };
        let keys = ["k1", "k2"]
            .into_iter()
            .map(|kid| {
                let (key, point) = generate();
                let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                    "x": b64(&point[1..33]), "y": b64(&point[33..65])});
                (kid, key, jwk)
            })
            .collect();
        Issuer { keys, forger: generate().0 }
    }

    /// Writes a JWKS with the public keys `kids` to `file`.
    pub fn publish(&self, file: &std::path::Path, kids: &[&str]) {
        let keys: Vec<_> = self.keys.iter().filter(|(kid, ..)| kids.contains(kid)).map(|(_, _, jwk)| jwk).collect();
        std::fs::write(file, serde_json::json!({ "keys": keys }).to_string()).unwrap();
    }

    /// A token for alice with `scope`, expiring in `expires_in` seconds,
    /// signed with `k1` (or by the forger, under kid `k1`).
    pub fn token(&self, scope: &str, expires_in: i64, forged: bool) -> String {
        let key = if forged { &self.forger } else { &self.keys[0].1 };
        Self::sign("k1", key, scope, expires_in)
    }

    /// A valid token with `scope`, signed with key `kid`.
    pub fn signed_by(&self, kid: &str, scope: &str) -> String {
        let (_, key, _) = self.keys.iter().find(|(k, ..)| *k == kid).unwrap();
        Self::sign(kid, key, scope, 300)
    }

    fn sign(kid: &str, key: &jsonwebtoken::EncodingKey, scope: &str, expires_in: i64) -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let claims = serde_json::json!({"iss": "https://issuer.example", "sub": "alice", "aud": "payments",
            "exp": now + expires_in, "scope": scope});
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }
}
