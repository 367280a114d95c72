//! `cargo xtask demo`: the main job of ambit, shown on one machine.
//!
//! Two simulated nodes, pods in an ambient namespace (`shop`) and a plain one
//! (`legacy`), one agent per node, real curl requests between the pods, and
//! for each request what each node's agent captured. Everything is torn
//! down at the end or on Ctrl-C.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ambit_testbed::{Agent, Bed, ConnectionRecord, missing_prerequisites};
use anyhow::{Context as _, Result, bail};

use crate::{build_agent, root, setup};

const PORT: u16 = 8080;
const PAYLOAD_BYTES: usize = 1024 * 1024;

/// The requests the demo sends: (from, to, what it shows).
const STEPS: &[(&str, &str, &str)] = &[
    ("shop/frontend", "shop/cart", "ambient to ambient, across nodes: captured on both ends"),
    ("shop/frontend", "shop/checkout", "ambient to ambient, same node: captured out and in by one agent"),
    ("legacy/batch", "shop/cart", "plain to ambient: captured inbound at the destination"),
    ("shop/frontend", "legacy/reports", "ambient to plain: captured outbound at the source"),
    ("legacy/batch", "legacy/reports", "plain to plain: not touched"),
];

pub fn run(hold: bool) -> Result<()> {
    setup::run()?;
    let agent_binary = build_agent(false)?;
    if let Some(missing) = missing_prerequisites() {
        bail!("the demo needs {missing}");
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("install the Ctrl-C handler")?;
    let check = || {
        if interrupted.load(Ordering::SeqCst) {
            bail!("interrupted by Ctrl-C; the cluster was torn down")
        } else {
            Ok(())
        }
    };

    heading("ambit demo: eBPF capture of pod traffic into a per-node agent");
    let mut bed = Bed::with_agent(&["node-1", "node-2"], agent_binary)?;
    bed.namespace("shop", true)?;
    bed.namespace("legacy", false)?;
    for (node, pod) in [
        ("node-1", "shop/frontend"),
        ("node-1", "shop/checkout"),
        ("node-1", "legacy/batch"),
        ("node-2", "shop/cart"),
        ("node-2", "legacy/reports"),
    ] {
        let (ns, name) = pod.split_once('/').expect("namespace/name");
        bed.add_pod(node, ns, name)?;
    }
    describe_cluster(&bed);
    check()?;

    let www = bed.scratch().join("www");
    std::fs::create_dir(&www)?;
    std::fs::write(www.join("payload"), vec![b'x'; PAYLOAD_BYTES])?;
    for server in ["shop/cart", "shop/checkout", "legacy/reports"] {
        bed.http_server(server, PORT, &www, &bed.scratch().join(format!("{}.log", server.replace('/', "-"))))?;
    }

    println!("\nStarting one ambit-agent per node (each attaches its programs to its node's cgroup)...");
    let mut agents = Vec::new();
    for node in ["node-1", "node-2"] {
        let mut agent = bed.start_agent(node)?;
        agent.wait_ready()?;
        agents.push(agent);
    }
    for (agent, pods) in agents.iter_mut().zip([&["shop/frontend", "shop/checkout"][..], &["shop/cart"][..]]) {
        for pod in pods {
            agent.wait_pod_event("pod enrolled", pod, 0)?;
        }
        println!("  {} agent ready, enrolled: {}", agent.node, pods.join(", "));
    }
    check()?;

    heading("Traffic: real curl requests from inside the pods (1 MiB each)");
    for (index, (from, to, story)) in STEPS.iter().enumerate() {
        check()?;
        send(&bed, &mut agents, index + 1, from, to, story)?;
    }

    heading("Kernel counters, per node (read from the programs' per-CPU map)");
    for agent in &mut agents {
        let status = agent.stop()?;
        let counters = agent
            .lines()
            .into_iter()
            .find(|l| l["message"] == "kernel capture counters")
            .and_then(|l| l["counters"].as_str().map(str::to_string))
            .unwrap_or_default();
        println!("  {}: {counters}  (agent exited: {status})", agent.node);
    }
    keep_logs(&agents)?;

    if hold {
        println!("\nThe cluster stays up until Ctrl-C. Run a command in a pod with, e.g.:");
        let pod = bed.pod("shop/frontend");
        println!("  ip netns exec {} curl http://{}:{PORT}/", pod.netns, bed.pod("legacy/reports").ip);
        println!("(the agents have stopped, so traffic is no longer captured)");
        while !interrupted.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!("\nTearing down the network namespaces and cgroups...");
    drop(agents);
    drop(bed);
    println!("Done. Nothing is left behind: `ip netns list` shows no ambit-* entries.");
    Ok(())
}

fn heading(text: &str) {
    println!("\n{text}\n{}", "=".repeat(text.len()));
}

fn describe_cluster(bed: &Bed) {
    println!("Cluster, built from network namespaces, veth pairs and bridges on this machine:");
    for node in bed.nodes() {
        println!("  {}  (node IP {})", node.name, node.ip);
        for pod in bed.pods().iter().filter(|p| p.node == node.name) {
            let mode = if pod.namespace == "shop" { "ambient" } else { "plain" };
            println!("    {:<16} {:<12} {mode}", pod.id(), pod.ip.to_string());
        }
    }
    println!("Namespace `shop` carries the label ambit.dev/dataplane-mode=ambient; `legacy` does not.");
    println!("Configuration (standalone YAML the agents watch): {}", bed.config_dir().display());
}

fn send(bed: &Bed, agents: &mut [Agent], index: usize, from: &str, to: &str, story: &str) -> Result<()> {
    let dst = bed.pod(to).clone();
    let src = bed.pod(from).clone();
    println!("\n{index}. {from} -> {to}:{PORT}   ({story})");
    let seen_before: Vec<usize> = agents.iter().map(|a| a.connections().len()).collect();
    let url = format!("http://{}:{PORT}/payload", dst.ip);
    let result = bed.run_ok(
        from,
        "curl",
        &["-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", &url],
    )?;
    let parts: Vec<&str> = result.split_whitespace().collect();
    let seconds: f64 = parts.get(2).and_then(|t| t.parse().ok()).unwrap_or_default();
    println!(
        "   curl: HTTP {}, {} received in {:.1} ms",
        parts.first().unwrap_or(&"?"),
        bytes(parts.get(1).and_then(|b| b.parse().ok()).unwrap_or_default()),
        seconds * 1000.0
    );
    // Which agents should report it: the source's for an ambient source,
    // the destination's for an ambient destination.
    let mut expected = vec![0usize; agents.len()];
    for (pod, ambient) in [(&src, src.namespace == "shop"), (&dst, dst.namespace == "shop")] {
        if ambient {
            let node = agents.iter().position(|a| a.node == pod.node).expect("agent per node");
            expected[node] += 1;
        }
    }
    let mut reported = false;
    for ((agent, before), want) in agents.iter_mut().zip(seen_before).zip(expected) {
        if want == 0 {
            continue;
        }
        let records = agent.wait_connections(before + want, |_| true)?;
        for record in &records[before..] {
            print_record(&agent.node, record);
            reported = true;
        }
    }
    if !reported {
        println!("   no agent saw it: neither pod is enrolled, so the kernel programs left it alone");
    }
    Ok(())
}

fn print_record(node: &str, r: &ConnectionRecord) {
    let named = |addr: &str, workload: &str| {
        if workload == "-" { addr.to_string() } else { format!("{addr} ({workload})") }
    };
    println!(
        "   {node} agent, {:<8}  {} -> {}  sent {}, received {}",
        r.direction,
        named(&r.src_addr, &r.src_workload),
        named(&r.dst_addr, &r.dst_workload),
        bytes(r.bytes_sent),
        bytes(r.bytes_received)
    );
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1024 * 1024 => format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0)),
        n if n >= 1024 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Copies the agents' logs out of the bed before it is removed.
fn keep_logs(agents: &[Agent]) -> Result<()> {
    let dir = root().join("target/demo");
    std::fs::create_dir_all(&dir)?;
    for agent in agents {
        let to = dir.join(format!("agent-{}.log", agent.node));
        std::fs::copy(agent.log_path(), &to)?;
        println!("  {} agent log (JSON lines): {}", agent.node, to.display());
    }
    Ok(())
}
