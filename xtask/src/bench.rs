//! `cargo xtask bench`: the data path measured against no mesh, in one run.
//!
//! One bed, six scenarios run alternately in every round (direct, plain
//! relays, ambit cross-node, and ambit same-node three ways: joined in the
//! kernel, relayed in user space, through HBONE), so each figure has a no-mesh
//! figure taken moments before it: ratios are computed within a round, and
//! the table shows their median and spread (min-max), which makes a noisy
//! run visible. "Plain relays" puts a byte-for-byte TCP relay where each
//! node's agent has its sockets (in the client pod on loopback, and in the
//! server pod), without TLS, HTTP/2 or policy: what proxying in user space
//! on both nodes costs on this machine before ambit does any work. Release
//! builds of the agent and of the traffic tools.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ambit_testbed::{Agent, Bed, wait_until};
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{
    cargo, exec,
    measure::{ECHO_PORT, HTTP_PORT, IPERF_PORT, cpu_seconds, machine_cpu_seconds},
    root, setup,
};

/// The server-side relay of the plain-relays scenario listens on each
/// server port plus this.
const RELAY_PORT_OFFSET: u16 = 10_000;
/// Pods enrolled on node 1 while its idle memory is measured.
const IDLE_PODS: usize = 50;

struct Plan {
    rounds: usize,
    seconds: u64,
    pings: usize,
    /// Authorization decisions timed per policy layout.
    decisions: usize,
    /// Pods created through the CNI chain in Kubernetes mode (200 in both:
    /// the p99 of fewer says little).
    cni_pods: usize,
}

/// How a scenario's client reaches its server.
#[derive(PartialEq)]
enum Route {
    /// Straight to the server pod's address.
    Direct,
    /// To the plain relay on the client pod's loopback.
    Relays,
    /// To the server pod's address, captured by ambit.
    Mesh,
}

/// One scenario: who talks to whom, and how.
struct Scenario {
    name: &'static str,
    client: &'static str,
    server: &'static str,
    route: Route,
}

const SCENARIOS: [Scenario; 6] = [
    Scenario { name: "direct", client: "legacy/client", server: "legacy/server", route: Route::Direct },
    Scenario { name: "plain relays", client: "legacy/client", server: "legacy/server", route: Route::Relays },
    Scenario { name: "ambit cross-node", client: "shop/client", server: "shop/server", route: Route::Mesh },
    Scenario { name: "ambit same-node, kernel", client: "shop/client", server: "shop/local", route: Route::Mesh },
    Scenario { name: "ambit same-node, relay", client: "shop/client3", server: "shop/local3", route: Route::Mesh },
    Scenario { name: "ambit same-node, HBONE", client: "shop/client4", server: "shop/local4", route: Route::Mesh },
];

/// The same-node path of each node's agent (`--same-node`): n1's default
/// (`kernel`), and one node for each of the others.
const SAME_NODE_ARGS: [(&str, &[&str]); 2] = [("n3", &["--same-node", "relay"]), ("n4", &["--same-node", "hbone"])];

/// The scenarios compared with direct, in table order.
fn compared() -> impl Iterator<Item = &'static Scenario> {
    SCENARIOS.iter().filter(|s| s.route != Route::Direct)
}

/// What one scenario measured in one round.
#[derive(Default, Clone)]
struct Sample {
    gbps_1: f64,
    gbps_8: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    http_rps: f64,
    conn_rate: f64,
    /// CPU seconds of the two proxies (agents or relays) per GB moved by
    /// iperf3; 0 for direct.
    cpu_s_per_gb: f64,
    /// Busy CPU seconds of the whole machine (apps, proxies, kernel) per
    /// GB moved by iperf3.
    machine_cpu_s_per_gb: f64,
}

pub fn run(quick: bool, out: Option<PathBuf>) -> Result<()> {
    setup::run()?;
    exec(cargo().args([
        "build",
        "--release",
        "--package",
        "ambit-agent",
        "--package",
        "ambit-waypoint",
        "--package",
        "ambit-cni",
        "--package",
        "ambit-testbed",
        "--features",
        "ambit-testbed/aws-lc",
        "--bins",
    ]))?;
    // Built here so that compiling it is not part of the measured run.
    exec(cargo().args(["bench", "--package", "ambit-authz", "--bench", "authz", "--no-run"]))?;
    exec(cargo().args(["bench", "--package", "ambit-kube", "--bench", "source_memory", "--no-run"]))?;
    let release = root().join("target/release");
    let tool = release.join("ambit-bench");
    let plan = if quick {
        Plan { rounds: 2, seconds: 1, pings: 2000, decisions: 20_000, cni_pods: 200 }
    } else {
        Plan { rounds: 5, seconds: 4, pings: 10_000, decisions: 200_000, cni_pods: 200 }
    };
    let started = Instant::now();
    let authorization = policy_benchmark(&plan)?;
    eprintln!("bench: rustls with ring and aws-lc-rs");
    let crypto = crate::crypto_bench::run(&tool, plan.rounds, if quick { 128 } else { 1024 })?;
    let kubernetes = cargo_bench("ambit-kube", "source_memory", &["10000", "1000"])?;
    eprintln!("bench: Kubernetes mode, {} pods through the CNI chain", plan.cni_pods);
    let node = crate::cluster_bench::run(&release, plan.cni_pods)?;

    let mut bed = Bed::with_agent(&["n1", "n2", "n3", "n4"], release.join("ambit-agent"))?;
    bed.namespace("shop", true)?;
    bed.namespace("legacy", false)?;
    bed.add_pods(&[
        ("n1", "legacy/client"),
        ("n2", "legacy/server"),
        ("n1", "shop/client"),
        ("n2", "shop/server"),
        ("n1", "shop/local"),
        ("n3", "shop/client3"),
        ("n3", "shop/local3"),
        ("n4", "shop/client4"),
        ("n4", "shop/local4"),
    ])?;
    // Connection-rate runs open thousands of connections a second; give the
    // clients (and the server-side relay, which connects from legacy/server)
    // the whole port range and let them reuse TIME_WAIT ports, so no path is
    // capped by ephemeral ports.
    for client in ["legacy/client", "legacy/server", "shop/client", "shop/client3", "shop/client4"] {
        bed.run_ok(client, "sysctl", &["-qw", "net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1"])?;
    }
    // The same server behind two services: one plain (L4 only), one through
    // a waypoint, for the HTTP comparison.
    bed.add_pod("n2", "shop", "wp")?;
    bed.set_pod_label("shop/wp", "gateway.networking.k8s.io/gateway-name", Some("wp"))?;
    bed.write_config("bench-waypoint.yaml", WAYPOINT_CONFIG)?;
    for i in 0..IDLE_PODS - 2 {
        bed.add_pod("n1", "shop", &format!("idle-{i}"))?;
    }
    let mut agents = [
        bed.start_agent_with("n1", crate::lifecycle_bench::AGENT_ARGS)?,
        bed.start_agent_with("n2", crate::lifecycle_bench::AGENT_ARGS)?,
    ];
    let mut same_node_agents = Vec::new();
    for (node, args) in SAME_NODE_ARGS {
        let args: Vec<&str> = crate::lifecycle_bench::AGENT_ARGS.iter().chain(args).copied().collect();
        same_node_agents.push(bed.start_agent_with(node, &args)?);
    }
    for agent in agents.iter_mut().chain(&mut same_node_agents) {
        agent.wait_ready()?;
    }
    for node in ["n1", "n2", "n3", "n4"] {
        wait_until(Duration::from_secs(60), &format!("{node}: every pod's certificate"), || {
            Ok(bed.admin_get(node, "/healthz/ready")?.0 == 200)
        })?;
    }
    for server in ["legacy/server", "shop/server", "shop/local", "shop/local3", "shop/local4"] {
        bed.iperf3_server(server, IPERF_PORT)?;
        let ip = bed.pod(server).ip;
        for (mode, port) in [("echo", ECHO_PORT), ("http", HTTP_PORT)] {
            bed.spawn(server, tool.to_str().context("UTF-8 path")?, &[mode, "--listen", &format!("{ip}:{port}")])?;
            bed.wait_listening(server, port)?;
        }
    }
    let relays = start_relays(&bed, &tool)?;
    let agent_pids: Vec<u32> = agents.iter().chain(&same_node_agents).map(Agent::pid).collect();
    let _waypoint = bed.start_waypoint("shop/wp", &[])?;
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss_kb = ambit_testbed::proc_status(agents[0].pid(), "VmRSS:")?;

    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    let mut http: Vec<[HttpSample; 2]> = Vec::new();
    for round in 0..plan.rounds {
        eprintln!("bench: round {}/{}", round + 1, plan.rounds);
        for scenario in &SCENARIOS {
            let proxies: &[u32] = match scenario.route {
                Route::Direct => &[],
                Route::Relays => &relays,
                Route::Mesh => &agent_pids,
            };
            let sample = measure(&bed, proxies, &tool, scenario, &plan)
                .with_context(|| format!("{} (round {})", scenario.name, round + 1))?;
            samples.entry(scenario.name).or_default().push(sample);
        }
        let secs = plan.seconds.to_string();
        http.push([
            wrk(&bed, "shop/client", &format!("{L4_VIP}:80"), &secs)?,
            wrk(&bed, "shop/client", &format!("{L7_VIP}:80"), &secs)?,
        ]);
    }
    let peak_rss_kb =
        agents.iter().map(|a| ambit_testbed::proc_status(a.pid(), "VmHWM:")).collect::<Result<Vec<_>>>()?;
    let lifecycle = crate::lifecycle_bench::run(&mut bed, &mut agents, &tool)?;
    let elapsed = started.elapsed();

    let report = Report {
        samples,
        idle_rss_kb,
        peak_rss_kb: peak_rss_kb.into_iter().max().unwrap_or(0),
        authorization,
        kubernetes,
        node,
        http,
        lifecycle,
        crypto,
    };
    println!("{}", report.markdown(&plan, elapsed));
    if let Some(path) = out {
        std::fs::write(&path, serde_json::to_string_pretty(&report.json(&plan, elapsed))?)?;
        eprintln!("bench: JSON written to {}", path.display());
    }
    drop(agents);
    drop(same_node_agents);
    drop(bed);
    Ok(())
}

/// The plain-relays scenario's two relays: legacy/client's loopback ->
/// legacy/server's address (port + RELAY_PORT_OFFSET) -> the server.
/// Returns their pids.
fn start_relays(bed: &Bed, tool: &Path) -> Result<Vec<u32>> {
    let tool = tool.to_str().context("UTF-8 path")?;
    let server = IpAddr::V4(bed.pod("legacy/server").ip);
    let hop = |port: u16| SocketAddr::new(server, port + RELAY_PORT_OFFSET);
    let ports = [IPERF_PORT, ECHO_PORT, HTTP_PORT];
    let server_side = ports.map(|p| (hop(p), SocketAddr::new(server, p)));
    let client_side = ports.map(|p| (SocketAddr::from(([127, 0, 0, 1], p)), hop(p)));
    let mut pids = Vec::new();
    for (pod, forwards) in [("legacy/server", server_side), ("legacy/client", client_side)] {
        let mut args = vec!["relay".to_string()];
        for (listen, to) in forwards {
            args.extend(["--forward".to_string(), format!("{listen}={to}")]);
        }
        pids.push(bed.spawn(pod, tool, &args.iter().map(String::as_str).collect::<Vec<_>>())?);
        for (listen, _) in forwards {
            bed.wait_listening(pod, listen.port())?;
        }
    }
    Ok(pids)
}

/// One scenario's measurements; `proxies` are the processes whose CPU time
/// is charged to it.
fn measure(bed: &Bed, proxies: &[u32], tool: &Path, scenario: &Scenario, plan: &Plan) -> Result<Sample> {
    let server =
        if scenario.route == Route::Relays { "127.0.0.1".to_string() } else { bed.pod(scenario.server).ip.to_string() };
    let secs = plan.seconds.to_string();
    let (cpu_before, machine_before) = (cpu_seconds(proxies)?, machine_cpu_seconds()?);
    let (gbps_1, bytes_1) = iperf3(bed, scenario.client, &server, &secs, 1)?;
    let (gbps_8, bytes_8) = iperf3(bed, scenario.client, &server, &secs, 8)?;
    let cpu = cpu_seconds(proxies)? - cpu_before;
    let machine_cpu = machine_cpu_seconds()? - machine_before;
    let gigabytes = (bytes_1 + bytes_8) as f64 / 1e9;
    let tool = tool.to_str().context("UTF-8 path")?;
    let pings = bed.run_ok(
        scenario.client,
        tool,
        &["pingpong", "--to", &format!("{server}:{ECHO_PORT}"), "--size", "64", "--count", &plan.pings.to_string()],
    )?;
    let pings: Value = serde_json::from_str(&pings)?;
    let rate =
        bed.run_ok(scenario.client, tool, &["connrate", "--to", &format!("{server}:{ECHO_PORT}"), "--seconds", &secs])?;
    let rate: Value = serde_json::from_str(&rate)?;
    if rate["failed"].as_u64() != Some(0) {
        bail!("{}: {} connections failed", scenario.name, rate["failed"]);
    }
    Ok(Sample {
        gbps_1,
        gbps_8,
        p50_us: pings["p50_us"].as_f64().unwrap_or_default(),
        p90_us: pings["p90_us"].as_f64().unwrap_or_default(),
        p99_us: pings["p99_us"].as_f64().unwrap_or_default(),
        http_rps: wrk(bed, scenario.client, &format!("{server}:{HTTP_PORT}"), &secs)?.rps,
        conn_rate: rate["connections_per_sec"].as_f64().unwrap_or_default(),
        cpu_s_per_gb: cpu / gigabytes,
        machine_cpu_s_per_gb: machine_cpu / gigabytes,
    })
}

/// iperf3 throughput (Gbit/s, as received) and bytes moved.
fn iperf3(bed: &Bed, client: &str, server: &str, secs: &str, streams: usize) -> Result<(f64, u64)> {
    let out = bed.run_ok(
        client,
        "iperf3",
        &["-c", server, "-p", &IPERF_PORT.to_string(), "-t", secs, "-P", &streams.to_string(), "-J"],
    )?;
    let report: Value = serde_json::from_str(&out)?;
    let received = &report["end"]["sum_received"];
    Ok((received["bits_per_second"].as_f64().unwrap_or_default() / 1e9, received["bytes"].as_u64().unwrap_or_default()))
}

struct Report<'a> {
    samples: BTreeMap<&'a str, Vec<Sample>>,
    idle_rss_kb: u64,
    peak_rss_kb: u64,
    /// The output of common/authz/benches/authz.rs.
    authorization: Value,
    /// The output of common/kube/benches/source_memory.rs.
    kubernetes: Value,
    /// Kubernetes mode on one node (`cluster_bench`).
    node: Value,
    /// Per round: the L4-only service, then the same through the waypoint.
    http: Vec<[HttpSample; 2]>,
    /// `lifecycle_bench`: connections held, and an upgrade under load.
    lifecycle: Value,
    /// `crypto_bench`: one object per provider, suite and round.
    crypto: Vec<Value>,
}

const L4_VIP: &str = "10.96.0.30";
const L7_VIP: &str = "10.96.0.31";

/// Two services for shop/server's HTTP port, the second through waypoint
/// shop/wp, whose L7 policy admits GET from shop/client.
const WAYPOINT_CONFIG: &str = r#"apiVersion: v1
kind: Service
metadata: {name: l4, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  selector: {app: server}
  ports: [{port: 80, targetPort: 8000}]
---
apiVersion: v1
kind: Service
metadata:
  name: l7
  namespace: shop
  labels: {ambit.dev/use-waypoint: wp}
spec:
  clusterIP: 10.96.0.31
  selector: {app: server}
  ports: [{port: 80, targetPort: 8000}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: ambit-waypoint}
---
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {name: bench, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, name: wp}]
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
    to: [{operation: {methods: [GET], paths: ["/*"]}}]
"#;

type ReadHttp = fn(&HttpSample) -> f64;

/// What wrk measured: requests per second and latency.
#[derive(Clone, Copy, Default)]
struct HttpSample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// wrk from `client` to `http://<target>/` over 16 keep-alive connections.
fn wrk(bed: &Bed, client: &str, target: &str, secs: &str) -> Result<HttpSample> {
    let out = bed.run_ok(
        client,
        "wrk",
        &["-t", "2", "-c", "16", "-d", &format!("{secs}s"), "--latency", &format!("http://{target}/")],
    )?;
    let field = |prefix: &str| out.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string()));
    let millis = |v: String| -> Option<f64> {
        let (number, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = number.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    };
    let context = || format!("wrk output not understood:\n{out}");
    Ok(HttpSample {
        rps: field("Requests/sec:").and_then(|v| v.parse().ok()).with_context(context)?,
        p50_ms: field("50%").and_then(millis).with_context(context)?,
        p99_ms: field("99%").and_then(millis).with_context(context)?,
    })
}

/// L4 authorization with 10,000 policies (common/authz/benches/authz.rs), outside
/// the bed: pure CPU, no network.
fn policy_benchmark(plan: &Plan) -> Result<Value> {
    cargo_bench("ambit-authz", "authz", &[&plan.decisions.to_string()])
}

/// Runs a benchmark that prints one JSON object, and returns that object.
fn cargo_bench(package: &str, bench: &str, args: &[&str]) -> Result<Value> {
    let output = cargo()
        .args(["bench", "--package", package, "--bench", bench, "--"])
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run the {bench} benchmark"))?;
    if !output.status.success() {
        bail!("the {bench} benchmark failed ({})", output.status);
    }
    serde_json::from_slice(&output.stdout).with_context(|| format!("the {bench} benchmark's output is not JSON"))
}

/// A metric of the table: its name, how to read it, and how mesh compares
/// with direct (a ratio, or added half round trip for latency).
struct Metric {
    name: &'static str,
    read: fn(&Sample) -> f64,
    added_half_rtt: bool,
}

const METRICS: &[Metric] = &[
    Metric { name: "iperf3 1 stream (Gbit/s)", read: |s| s.gbps_1, added_half_rtt: false },
    Metric { name: "iperf3 8 streams (Gbit/s)", read: |s| s.gbps_8, added_half_rtt: false },
    Metric { name: "64 B ping-pong p50 (µs round trip)", read: |s| s.p50_us, added_half_rtt: true },
    Metric { name: "64 B ping-pong p90 (µs round trip)", read: |s| s.p90_us, added_half_rtt: true },
    Metric { name: "64 B ping-pong p99 (µs round trip)", read: |s| s.p99_us, added_half_rtt: true },
    Metric { name: "HTTP keep-alive req/s (wrk, 16 conns)", read: |s| s.http_rps, added_half_rtt: false },
    Metric { name: "new connections/s (1-byte exchange)", read: |s| s.conn_rate, added_half_rtt: false },
];

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

impl Report<'_> {
    fn series(&self, scenario: &str, read: fn(&Sample) -> f64) -> Vec<f64> {
        self.samples[scenario].iter().map(read).collect()
    }

    /// Per round: mesh/direct (or added half round trip), then median, min, max.
    fn comparison(&self, scenario: &str, metric: &Metric) -> (f64, f64, f64) {
        let direct = self.series("direct", metric.read);
        let mesh = self.series(scenario, metric.read);
        let per_round: Vec<f64> =
            direct.iter().zip(&mesh).map(|(d, m)| if metric.added_half_rtt { (m - d) / 2.0 } else { m / d }).collect();
        let min = per_round.iter().copied().fold(f64::INFINITY, f64::min);
        let max = per_round.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (median(per_round), min, max)
    }

    fn markdown(&self, plan: &Plan, elapsed: Duration) -> String {
        let format_comparison = |(m, lo, hi): (f64, f64, f64), added: bool| {
            if added { format!("{m:+.1} µs ({lo:+.1}…{hi:+.1})") } else { format!("{m:.2}× ({lo:.2}…{hi:.2})") }
        };
        let mut out = String::new();
        out.push_str(&format!(
            "ambit bench: {} rounds, {} s per throughput/rate run, {} ping-pongs; medians over rounds, ratios taken within each round (min…max in brackets)\n\n",
            plan.rounds, plan.seconds, plan.pings
        ));
        out.push_str("| metric | direct |");
        for scenario in compared() {
            out.push_str(&format!(" {} | vs direct |", scenario.name));
        }
        out.push_str(&format!("\n|---|---|{}\n", "---|---|".repeat(compared().count())));
        for metric in METRICS {
            let value = |s: &str| median(self.series(s, metric.read));
            out.push_str(&format!("| {} | {:.1} |", metric.name, value("direct")));
            for scenario in compared() {
                let comparison = format_comparison(self.comparison(scenario.name, metric), metric.added_half_rtt);
                out.push_str(&format!(" {:.1} | {comparison} |", value(scenario.name)));
            }
            out.push('\n');
        }
        out.push_str("| proxy CPU s per GB (iperf3 runs; both relays or both agents) | - |");
        for scenario in compared() {
            out.push_str(&format!(" {:.2} | |", median(self.series(scenario.name, |x| x.cpu_s_per_gb))));
        }
        let machine = |s: &str| median(self.series(s, |x| x.machine_cpu_s_per_gb));
        out.push_str(&format!(
            "\n| machine CPU s per GB (iperf3 runs; apps, proxies, kernel threads, interrupts) | {:.2} |",
            machine("direct")
        ));
        for scenario in compared() {
            out.push_str(&format!(
                " {:.2} | {:.2}× |",
                machine(scenario.name),
                machine(scenario.name) / machine("direct")
            ));
        }
        out.push('\n');
        out.push_str(&format!(
            "\nAgent memory: {:.1} MB RSS idle with {IDLE_PODS} enrolled pods (node 1), {:.1} MB peak RSS during the run (the larger of the two agents).\n",
            self.idle_rss_kb as f64 / 1024.0,
            self.peak_rss_kb as f64 / 1024.0
        ));
        out.push_str("Latency rows compare as added latency per direction: (scenario − direct) / 2 of the round trip, as sockperf reports it.\n");
        out.push_str("Plain relays: a byte-for-byte TCP relay on the client pod's loopback and another in the server pod (ambit-bench relay: no TLS, HTTP/2 or policy), where the agents' sockets are; what any pair of user-space proxies costs on this machine.\n");
        for (layout, label) in
            [("100_namespaces", "spread over 100 namespaces"), ("one_namespace", "all in the destination's namespace")]
        {
            let run = &self.authorization[layout];
            out.push_str(&format!(
                "Authorization, {} policies {label}: index built in {} ms, {} ns per decision ({} policies apply; mean of {} decisions).\n",
                run["policies"], run["index_build_ms"], run["decision_ns"], run["applicable"], self.authorization["iterations"]
            ));
        }
        let k = &self.kubernetes;
        out.push_str(&format!(
            "Kubernetes source, {} pods and {} services in the API server double: first snapshot in {} ms, {} MB resident for the source and its snapshot.\n",
            k["pods"], k["services"], k["first_snapshot_ms"], k["source_mb"]
        ));
        let n = &self.node;
        out.push_str(&format!(
            "Kubernetes mode, one node: the agent holds {} pods and {} services in {} MB RSS ({} MB with {} pods of its own enrolled); CNI ADD to capture (ambit-cni's start to exit, the agent answering once the pod is captured) p50 {} ms, p99 {} ms over {} pods; ADD of a pod not captured {} ms; ambit-cni is {} bytes.\n",
            n["cluster_pods"], n["cluster_services"], n["agent_rss_mb"], n["agent_rss_with_pods_mb"], n["captured_pods"],
            n["cni_add_to_capture_p50_ms"], n["cni_add_to_capture_p99_ms"], n["captured_pods"], n["cni_add_uncaptured_ms"],
            n["ambit_cni_bytes"]
        ));
        out.push_str(&self.http_markdown());
        out.push_str(&crate::lifecycle_bench::markdown(&self.lifecycle));
        out.push_str(&self.crypto_markdown());
        out.push_str(&format!("Run time: {:.0} s.\n", elapsed.as_secs_f64()));
        out
    }

    /// HTTP through the waypoint against the L4-only path, per round.
    fn http_markdown(&self) -> String {
        let column = |i: usize, read: ReadHttp| median(self.http.iter().map(|r| read(&r[i])).collect());
        let spread = |read: ReadHttp, ratio: bool| {
            let per_round: Vec<f64> = self
                .http
                .iter()
                .map(|r| if ratio { read(&r[1]) / read(&r[0]) } else { read(&r[1]) - read(&r[0]) })
                .collect();
            let min = per_round.iter().copied().fold(f64::INFINITY, f64::min);
            let max = per_round.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let m = median(per_round);
            if ratio {
                format!("{m:.2}× ({min:.2}…{max:.2})")
            } else {
                format!("{m:+.2} ms ({min:+.2}…{max:+.2})")
            }
        };
        let rows: [(&str, ReadHttp, bool); 3] = [
            ("HTTP keep-alive req/s (wrk, 16 conns)", |s| s.rps, true),
            ("HTTP latency p50 (ms)", |s| s.p50_ms, false),
            ("HTTP latency p99 (ms)", |s| s.p99_ms, false),
        ];
        let mut out = String::from(
            "\nHTTP through a waypoint (L7 policy, HBONE both hops) against the same server on the L4-only path, cross-node:\n\n| metric | L4 only | via waypoint | waypoint vs L4 |\n|---|---|---|---|\n",
        );
        for (name, read, ratio) in rows {
            out.push_str(&format!(
                "| {name} | {:.2} | {:.2} | {} |\n",
                column(0, read),
                column(1, read),
                spread(read, ratio)
            ));
        }
        out
    }

    /// rustls seal+open throughput per provider and suite (median of rounds).
    fn crypto_markdown(&self) -> String {
        let mut out = String::from(
            "\nrustls, one core, 16 KiB records sealed and opened in memory (GB/s of plaintext, median of rounds):\n\n| provider | TLS13_AES_128_GCM_SHA256 | TLS13_AES_256_GCM_SHA384 |\n|---|---|---|\n",
        );
        let mut providers: Vec<&str> = self.crypto.iter().filter_map(|r| r["provider"].as_str()).collect();
        providers.sort_unstable();
        providers.dedup();
        for provider in providers {
            let speed = |suite: &str| {
                median(
                    self.crypto
                        .iter()
                        .filter(|r| r["provider"] == provider && r["suite"] == suite)
                        .filter_map(|r| r["seal_and_open_gbytes_per_s"].as_f64())
                        .collect(),
                )
            };
            out.push_str(&format!(
                "| {provider} | {:.2} | {:.2} |\n",
                speed("TLS13_AES_128_GCM_SHA256"),
                speed("TLS13_AES_256_GCM_SHA384")
            ));
        }
        out
    }

    fn json(&self, plan: &Plan, elapsed: Duration) -> Value {
        let rounds: BTreeMap<&str, Vec<Value>> = self
            .samples
            .iter()
            .map(|(name, samples)| {
                let values = samples
                    .iter()
                    .map(|s| {
                        json!({
                            "iperf3_1_stream_gbps": s.gbps_1, "iperf3_8_streams_gbps": s.gbps_8,
                            "pingpong_p50_us": s.p50_us, "pingpong_p90_us": s.p90_us, "pingpong_p99_us": s.p99_us,
                            "http_keepalive_rps": s.http_rps, "new_connections_per_sec": s.conn_rate,
                            "proxy_cpu_seconds_per_gb": s.cpu_s_per_gb,
                            "machine_cpu_seconds_per_gb": s.machine_cpu_s_per_gb,
                        })
                    })
                    .collect();
                (*name, values)
            })
            .collect();
        let comparisons: BTreeMap<String, Value> = compared()
            .flat_map(|scenario| {
                METRICS.iter().map(move |metric| {
                    let (median, min, max) = self.comparison(scenario.name, metric);
                    let kind = if metric.added_half_rtt { "added_half_rtt_us" } else { "ratio" };
                    (format!("{}: {}", scenario.name, metric.name), json!({ kind: median, "min": min, "max": max }))
                })
            })
            .collect();
        json!({
            "plan": { "rounds": plan.rounds, "seconds": plan.seconds, "pings": plan.pings },
            "rounds": rounds,
            "comparisons_to_direct": comparisons,
            "agent_idle_rss_mb": self.idle_rss_kb as f64 / 1024.0,
            "idle_enrolled_pods": IDLE_PODS,
            "agent_peak_rss_mb": self.peak_rss_kb as f64 / 1024.0,
            "authorization": self.authorization,
            "kubernetes_source": self.kubernetes,
            "kubernetes_node": self.node,
            "http_via_waypoint": self.http.iter().map(|[l4, l7]| json!({
                "l4": {"rps": l4.rps, "p50_ms": l4.p50_ms, "p99_ms": l4.p99_ms},
                "waypoint": {"rps": l7.rps, "p50_ms": l7.p50_ms, "p99_ms": l7.p99_ms},
            })).collect::<Vec<_>>(),
            "lifecycle": self.lifecycle,
            "crypto_providers": self.crypto,
            "elapsed_seconds": elapsed.as_secs_f64(),
            "machine": machine(),
        })
    }
}

fn machine() -> Value {
    let read = |cmd: &mut Command| {
        cmd.stderr(Stdio::null()).output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    json!({
        "kernel": read(Command::new("uname").arg("-r")),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpuinfo("model name"),
        "cpu_flags": cpuinfo("flags").map(|flags| flags.split_whitespace().map(str::to_string).collect::<Vec<_>>()),
        "openssl_speed_aes_gcm": crate::crypto_bench::openssl_speed(),
    })
}

/// The first CPU's `field` in /proc/cpuinfo.
fn cpuinfo(field: &str) -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        (name.trim() == field).then(|| value.trim().to_string())
    })
}
