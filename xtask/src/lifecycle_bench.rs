//! The node agent under load and across an upgrade (issue 19), on the
//! bench's bed after the throughput rounds:
//! - 10,000 concurrent connections from shop/client (n1) to shop/server
//!   (n2), held open: each agent's RSS per connection, CPU at rest, and
//!   connections refused or broken;
//! - both agents upgraded, one after the other, under an iperf3 stream,
//!   1,000 HTTP keep-alive connections (a request every 500 ms, every body
//!   checked) and a stream of new connections: failures, broken
//!   connections, and what the old agents reset;
//! - 1,000 pods added to node 1 at once, then removed: the time to enrol
//!   and unenrol them all, and the agent's RSS per enrolled pod.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use ambit_testbed::{Agent, Bed, proc_status, wait_until};
use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use crate::measure::{ECHO_PORT, HTTP_PORT, IPERF_PORT, cpu_seconds};

const HELD: usize = 10_000;
const HOLD_SECONDS: u64 = 20;
/// How long the agents' CPU is sampled while the connections sit idle.
const REST_SECONDS: u64 = 10;
const KEEPALIVE: usize = 1_000;
const UPGRADE_LOAD_SECONDS: u64 = 20;
const CHURN_PODS: usize = 1_000;
/// Service accounts among the churned pods: each is a certificate.
const CHURN_ACCOUNTS: usize = 100;
const CHURN_FILE: &str = "bench-churn.yaml";
/// The bench's agents drain for at most this long after an upgrade: what
/// is still open then is reset, and counted.
pub const AGENT_ARGS: &[&str] = &["--drain-timeout", "30s"];

pub fn run(bed: &mut Bed, agents: &mut [Agent; 2], tool: &Path) -> Result<Value> {
    let tool = tool.to_str().context("UTF-8 path")?;
    let server = bed.pod("shop/server").ip.to_string();
    eprintln!("bench: {HELD} concurrent connections");
    let held = hold(bed, agents, tool, &server)?;
    eprintln!("bench: agents upgraded under load");
    let upgrade = upgrade(bed, agents, tool, &server)?;
    eprintln!("bench: {CHURN_PODS} pods enrolled and unenrolled");
    let churn = churn(bed, &agents[0])?;
    Ok(json!({ "held_connections": held, "upgrade_under_load": upgrade, "pod_churn": churn }))
}

fn churn(bed: &mut Bed, agent: &Agent) -> Result<Value> {
    let enrolled = |bed: &Bed| -> Result<usize> {
        let (_, metrics) = bed.admin_get("n1", "/metrics")?;
        let value = metrics.lines().find_map(|l| l.strip_prefix("ambit_enrolled_pods "));
        Ok(value.context("ambit_enrolled_pods")?.trim().parse()?)
    };
    let before = enrolled(bed)?;
    let rss_before = proc_status(agent.pid(), "VmRSS:")?;
    bed.add_enrolment_only_pods("n1", "shop", "churn", CHURN_PODS, CHURN_ACCOUNTS, CHURN_FILE)?;
    // Timed from the moment the file holding them all is written.
    let written = Instant::now();
    wait_until(Duration::from_secs(300), "every churned pod enrolled", || Ok(enrolled(bed)? >= before + CHURN_PODS))?;
    let enrol = written.elapsed();
    // Their certificates arrive right after.
    std::thread::sleep(Duration::from_secs(3));
    let rss_enrolled = proc_status(agent.pid(), "VmRSS:")?;
    std::fs::remove_file(bed.config_dir().join(CHURN_FILE))?;
    let removed = Instant::now();
    wait_until(Duration::from_secs(300), "every churned pod unenrolled", || Ok(enrolled(bed)? <= before))?;
    let unenrol = removed.elapsed();
    Ok(json!({
        "pods": CHURN_PODS,
        "service_accounts": CHURN_ACCOUNTS,
        "enrol_all_seconds": enrol.as_secs_f64(),
        "unenrol_all_seconds": unenrol.as_secs_f64(),
        "rss_kb_before": rss_before,
        "rss_kb_enrolled": rss_enrolled,
        "rss_kb_per_pod": rss_enrolled.saturating_sub(rss_before) as f64 / CHURN_PODS as f64,
    }))
}

fn hold(bed: &Bed, agents: &[Agent; 2], tool: &str, server: &str) -> Result<Value> {
    let rss = || agents.iter().map(|a| proc_status(a.pid(), "VmRSS:")).collect::<Result<Vec<u64>>>();
    let before = rss()?;
    let mut client = bed
        .pod("shop/client")
        .command(tool)
        .args(["hold", "--to", &format!("{server}:{ECHO_PORT}"), "--count", &HELD.to_string()])
        .args(["--seconds", &HOLD_SECONDS.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(client.stdout.take().context("stdout")?).lines();
    let opened: Value = serde_json::from_str(&lines.next().context("hold: no report")??)?;
    let during = rss()?;
    let pids: Vec<u32> = agents.iter().map(Agent::pid).collect();
    let cpu_before = cpu_seconds(&pids)?;
    std::thread::sleep(Duration::from_secs(REST_SECONDS));
    let cpu_at_rest = (cpu_seconds(&pids)? - cpu_before) / REST_SECONDS as f64;
    let end: Value = serde_json::from_str(&lines.next().context("hold: no final report")??)?;
    client.wait()?;
    let per_connection: Vec<f64> =
        before.iter().zip(&during).map(|(b, d)| (d.saturating_sub(*b) as f64 * 1024.0) / HELD as f64).collect();
    Ok(json!({
        "connections": HELD,
        "opened": opened["opened"],
        "refused": opened["refused"],
        "broken_after_hold": end["broken"],
        "rss_kb_before": before,
        "rss_kb_held": during,
        "rss_bytes_per_connection": per_connection,
        "cpu_at_rest_cores": cpu_at_rest,
    }))
}

fn upgrade(bed: &Bed, agents: &mut [Agent; 2], tool: &str, server: &str) -> Result<Value> {
    let secs = UPGRADE_LOAD_SECONDS.to_string();
    let spawn = |program: &str, args: &[&str]| {
        bed.pod("shop/client").command(program).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()
    };
    let iperf = spawn("iperf3", &["-c", server, "-p", &IPERF_PORT.to_string(), "-t", &secs, "-J"])?;
    let (http, connections) = (format!("{server}:{HTTP_PORT}"), KEEPALIVE.to_string());
    let keepalive = spawn(tool, &["keepalive", "--to", &http, "--connections", &connections, "--seconds", &secs])?;
    let connrate = spawn(tool, &["connrate", "--to", &format!("{server}:{ECHO_PORT}"), "--seconds", &secs])?;
    std::thread::sleep(Duration::from_secs(4));
    let (mut switch_ms, mut drained) = (Vec::new(), Vec::new());
    for (index, node) in ["n1", "n2"].into_iter().enumerate() {
        let started = Instant::now();
        let mut next = bed.start_agent_with(node, AGENT_ARGS)?;
        next.wait_ready()?;
        switch_ms.push(started.elapsed().as_millis() as u64);
        let old = std::mem::replace(&mut agents[index], next);
        drained.push(old);
        std::thread::sleep(Duration::from_secs(4));
    }
    let output = |child: std::process::Child| -> Result<Value> {
        let out = child.wait_with_output()?;
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    };
    let (iperf, keepalive, connrate) = (output(iperf)?, output(keepalive)?, output(connrate)?);
    let mut reset = 0;
    // Why connections failed: agent, direction, destination and error, over
    // the old and the new agents' logs.
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    for (role, agent) in drained.iter().map(|a| ("old", a)).chain(agents.iter().map(|a| ("new", a))) {
        for c in agent.connections() {
            if let Some(error) = c.error {
                let key = format!("{role} {}: {} to {}: {error}", agent.node, c.direction, c.dst_addr);
                *errors.entry(key).or_default() += 1;
            }
        }
    }
    for old in &mut drained {
        old.wait_exit(Duration::from_secs(60)).with_context(|| {
            let log = old.log_text();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            format!("the old agent of {} did not exit; its log ends:\n{}", old.node, tail.join("\n"))
        })?;
        reset += old.lines().iter().filter_map(|l| l["reset"].as_u64()).sum::<u64>();
    }
    Ok(json!({
        "iperf3_error": iperf.get("error"),
        "iperf3_gbps": iperf["end"]["sum_received"]["bits_per_second"].as_f64().map(|b| b / 1e9),
        "keepalive": keepalive,
        "new_connections": connrate,
        "switch_ms": switch_ms,
        "reset_at_drain_deadline": reset,
        "connection_errors": errors,
    }))
}

/// The section of the bench's markdown report.
pub fn markdown(lifecycle: &Value) -> String {
    let held = &lifecycle["held_connections"];
    let upgrade = &lifecycle["upgrade_under_load"];
    let churn = &lifecycle["pod_churn"];
    let per_connection = |i: usize| held["rss_bytes_per_connection"][i].as_f64().unwrap_or_default() / 1024.0;
    format!(
        "\n## The agent under load and across an upgrade\n\n\
        | measure | value |\n| --- | --- |\n\
        | {HELD} connections held: opened / refused / broken after {HOLD_SECONDS} s | {} / {} / {} |\n\
        | agent RSS per held connection, n1 (app side) / n2 (delivery side) | {:.1} KiB / {:.1} KiB |\n\
        | agents' CPU at rest with them held | {:.3} cores |\n\
        | upgrade under load: iperf3 error | {} |\n\
        | {KEEPALIVE} keep-alive connections: opened / requests answered / failed / connections broken | {} / {} / {} / {} |\n\
        | new connections during the switch: per second / failed | {} / {} |\n\
        | connections reset at the drain deadline | {} |\n\
        | time from starting the new agent to ready, n1 / n2 | {} ms / {} ms |\n\
        | {CHURN_PODS} pods ({CHURN_ACCOUNTS} service accounts) added at once: all enrolled after | {:.2} s |\n\
        | the same removed: all unenrolled after | {:.2} s |\n\
        | agent RSS per enrolled pod | {:.1} KiB |\n",
        held["opened"],
        held["refused"],
        held["broken_after_hold"],
        per_connection(0),
        per_connection(1),
        held["cpu_at_rest_cores"].as_f64().unwrap_or_default(),
        upgrade["iperf3_error"].as_str().unwrap_or("none"),
        upgrade["keepalive"]["opened"],
        upgrade["keepalive"]["requests"],
        upgrade["keepalive"]["failed"],
        upgrade["keepalive"]["broken"],
        upgrade["new_connections"]["connections_per_sec"],
        upgrade["new_connections"]["failed"],
        upgrade["reset_at_drain_deadline"],
        upgrade["switch_ms"][0],
        upgrade["switch_ms"][1],
        churn["enrol_all_seconds"].as_f64().unwrap_or_default(),
        churn["unenrol_all_seconds"].as_f64().unwrap_or_default(),
        churn["rss_kb_per_pod"].as_f64().unwrap_or_default(),
    )
}
