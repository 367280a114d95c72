//! `ambit`: the operator CLI. `ambit status` reads an agent's admin endpoint
//! and says, for a person, what the agent captures, which identities it holds
//! and how healthy they are, and who still calls in plaintext. `ambit policy
//! check` and `ambit policy lint` work offline on the agent's configuration
//! directory.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ambit_config::ConfigDir;
use ambit_model::Snapshot;
use ambit_state::{State, check::check};
use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Request, StatusCode, header::HOST};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;

/// A certificate older than this share of its lifetime has missed renewal.
const RENEWAL_WARNING: f64 = 0.8;

#[derive(Parser)]
#[command(name = "ambit", version, about = "ambit operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// What an agent captures, the identities it holds, and who calls in plaintext.
    Status {
        /// The agent's admin endpoint.
        #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
        admin: SocketAddr,
    },
    /// Authorization policies, offline on the agent's configuration directory.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Would the destination's tunnel allow this connection, and which rule decides?
    /// Exits 0 for ALLOW, 2 for DENY, and 1 whenever the configuration has
    /// errors (the decision printed is then the one a fresh agent makes,
    /// with broken policies failing closed), so a script never reads ALLOW
    /// from a broken configuration.
    Check {
        /// The agent's configuration directory.
        #[arg(long, env = "AMBIT_CONFIG_DIR")]
        config: PathBuf,
        /// The caller: a SPIFFE ID, an IP address, or a pod as namespace/name.
        #[arg(long)]
        from: String,
        /// The destination: namespace/name[:port] or IP:port.
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Policies that are malformed or cannot do what they say. Exits 1 on
    /// errors, 2 on warnings only.
    Lint {
        #[arg(long, env = "AMBIT_CONFIG_DIR")]
        config: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let result = match cli.command {
        Command::Status { admin } => runtime.block_on(status(admin)).map(|healthy| if healthy { 0 } else { 2 }),
        Command::Policy { command: PolicyCommand::Check { config, from, to, trust_domain } } => {
            policy_check(&config, &trust_domain, &from, &to)
        }
        Command::Policy { command: PolicyCommand::Lint { config, trust_domain } } => {
            policy_lint(&config, &trust_domain)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ambit: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration as the agent would load it from scratch: broken
/// documents left out (a broken AuthorizationPolicy replaced by its
/// fail-closed stand-in), and the errors.
fn load_config(dir: &Path) -> anyhow::Result<(Snapshot, Vec<String>)> {
    if !dir.is_dir() {
        bail!("--config {}: not a directory; give the agent's configuration directory", dir.display());
    }
    let (snapshot, errors) = ConfigDir::new(dir).reload();
    Ok((snapshot, errors.iter().map(ToString::to_string).collect()))
}

fn policy_check(dir: &Path, trust_domain: &str, from: &str, to: &str) -> anyhow::Result<u8> {
    let (snapshot, errors) = load_config(dir)?;
    for error in &errors {
        println!("error: {error}");
    }
    if !errors.is_empty() {
        println!(
            "the configuration has errors: broken objects are left out, and a broken AuthorizationPolicy denies everything it selects (a running agent keeps a last good version where it has one)\n"
        );
    }
    let report = check(&State::new(snapshot, trust_domain), from, to)?;
    print!("{report}");
    Ok(if !errors.is_empty() {
        1
    } else if report.allows() {
        0
    } else {
        2
    })
}

fn policy_lint(dir: &Path, trust_domain: &str) -> anyhow::Result<u8> {
    let (snapshot, errors) = load_config(dir)?;
    let findings = ambit_authz::lint::lint(&snapshot, trust_domain);
    for error in &errors {
        println!("error: {error}");
    }
    for finding in &findings {
        println!("{finding}");
    }
    let warnings = findings.len();
    println!(
        "{} AuthorizationPolicy objects loaded: {} errors, {warnings} warnings",
        snapshot.authorization_policies.len(),
        errors.len()
    );
    Ok(if !errors.is_empty() {
        1
    } else if warnings > 0 {
        2
    } else {
        0
    })
}

async fn get(admin: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let tcp = tokio::net::TcpStream::connect(admin).await.with_context(|| {
        format!("cannot reach the agent's admin endpoint at {admin} (is the agent running? --admin)")
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let request = Request::get(path).header(HOST, admin.to_string()).body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn get_json(admin: SocketAddr, path: &str) -> anyhow::Result<Json> {
    let (status, body) = get(admin, path).await?;
    if !status.is_success() {
        bail!("{path} answered {status}");
    }
    serde_json::from_str(&body).with_context(|| format!("{path} is not JSON"))
}

/// `subject, expires in ...` for a certificate summary from /certs.
fn describe_certificate(summary: &serde_json::Value, now: u64) -> String {
    let subject = summary["subject"].as_str().unwrap_or("?");
    match summary["not_after"].as_u64() {
        Some(not_after) if not_after > now => format!("{subject}, expires in {}", human(not_after - now)),
        Some(_) => format!("{subject}, EXPIRED"),
        None => subject.to_string(),
    }
}

/// Prints the status; returns whether everything is healthy.
async fn status(admin: SocketAddr) -> anyhow::Result<bool> {
    let (ready_status, ready_body) = get(admin, "/healthz/ready").await?;
    let config = get_json(admin, "/config_dump").await?;
    let certs = get_json(admin, "/certs").await?;
    let (_, metrics_text) = get(admin, "/metrics").await?;
    let metrics = Scrape::parse(metrics_text.lines().map(|l| Ok(l.to_string()))).context("parse /metrics")?;
    let mut healthy = ready_status.is_success();

    let node = config["node"].as_str().unwrap_or("?");
    println!("Agent on node {node} ({admin}): {}", if healthy { "READY" } else { "NOT READY" });
    if !healthy {
        for line in ready_body.lines().skip(1) {
            println!("  {}", line.trim());
        }
    }

    println!("\nEnrolled pods");
    let mut by_namespace: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pod in config["enrolled"].as_array().into_iter().flatten() {
        if let Some((ns, name)) = pod["pod"].as_str().and_then(|p| p.split_once('/')) {
            by_namespace.entry(ns.to_string()).or_default().push(name.to_string());
        }
    }
    if by_namespace.is_empty() {
        println!("  none");
    }
    for (ns, pods) in &by_namespace {
        println!("  {ns:<16} {}", pods.join(", "));
    }

    println!("\nIdentities");
    let now = certs["now"]
        .as_u64()
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs());
    let failures = counter_by(&metrics, "ambit_certificate_renewal_failures_total", "identity");
    for cert in certs["identities"].as_array().into_iter().flatten() {
        let identity = cert["identity"].as_str().unwrap_or("?");
        let (Some(not_before), Some(not_after)) = (cert["not_before"].as_u64(), cert["not_after"].as_u64()) else {
            println!("  {identity}\n    no certificate yet");
            healthy = false;
            continue;
        };
        let lifetime = not_after.saturating_sub(not_before).max(1);
        let age = now.saturating_sub(not_before);
        let serial: String = cert["serial"].as_str().unwrap_or_default().chars().take(12).collect();
        let expiry =
            if now >= not_after { "EXPIRED".to_string() } else { format!("expires in {}", human(not_after - now)) };
        println!(
            "  {identity}\n    serial {serial}..., {expiry}, {} of a {} lifetime used",
            percent(age, lifetime),
            human(lifetime)
        );
        for signer in cert["signers"].as_array().into_iter().flatten() {
            println!("    signed by {}", describe_certificate(signer, now));
        }
        if age as f64 > RENEWAL_WARNING * lifetime as f64 {
            healthy = false;
            let failed = failures.get(identity).copied().unwrap_or(0.0);
            println!(
                "    WARNING: past {:.0}% of its lifetime without renewal ({failed:.0} failed attempts); check that the CA is reachable",
                RENEWAL_WARNING * 100.0
            );
        }
    }

    let bundle = &certs["trust_bundle"];
    println!("\nTrust bundle ({})", bundle["trust_domain"].as_str().unwrap_or("?"));
    for root in bundle["roots"].as_array().into_iter().flatten() {
        println!("  root {}", describe_certificate(root, now));
    }
    let federated = certs["federated_bundles"].as_array().cloned().unwrap_or_default();
    if !federated.is_empty() {
        println!("\nFederated trust domains");
        for bundle in &federated {
            println!("  {}", bundle["trust_domain"].as_str().unwrap_or("?"));
            for root in bundle["roots"].as_array().into_iter().flatten() {
                println!("    root {}", describe_certificate(root, now));
            }
        }
    }

    println!("\nConnections by security policy (since the agent started)");
    let opened = "ambit_tcp_connections_opened_total";
    for reporter in ["destination", "source"] {
        let mut by_policy: BTreeMap<String, f64> = BTreeMap::new();
        for sample in samples(&metrics, opened).filter(|s| s.labels.get("reporter") == Some(reporter)) {
            *by_policy
                .entry(sample.labels.get("connection_security_policy").unwrap_or("?").to_string())
                .or_default() += value(&sample.value);
        }
        let role = if reporter == "destination" { "into this node's pods" } else { "out of this node's pods" };
        let summary: Vec<String> = by_policy.iter().map(|(policy, n)| format!("{policy} {n:.0}")).collect();
        println!("  {role:<24} {}", if summary.is_empty() { "none".to_string() } else { summary.join(", ") });
    }

    println!("\nPlaintext callers into this node's pods (move these into the mesh before STRICT)");
    let mut callers: BTreeMap<(String, String), f64> = BTreeMap::new();
    for sample in samples(&metrics, opened).filter(|s| {
        s.labels.get("reporter") == Some("destination") && s.labels.get("connection_security_policy") == Some("none")
    }) {
        let workload = |kind: &str| {
            format!(
                "{}/{}",
                sample.labels.get(&format!("{kind}_workload_namespace")).unwrap_or("?"),
                sample.labels.get(&format!("{kind}_workload")).unwrap_or("?")
            )
        };
        let flags = sample.labels.get("response_flags").unwrap_or("-");
        let callee =
            if flags == "DENIED" { format!("{} (denied)", workload("destination")) } else { workload("destination") };
        *callers.entry((workload("source"), callee)).or_default() += value(&sample.value);
    }
    if callers.is_empty() {
        println!("  none");
    }
    for ((from, to), n) in &callers {
        println!("  {from:<28} -> {to:<28} {n:.0} connections");
    }

    // The mesh carries TCP: say so, and what the opt-in drop has stopped.
    let udp_dropped = samples(&metrics, "ambit_capture_events")
        .find(|s| s.labels.get("name") == Some("inbound_udp_dropped"))
        .map_or(0.0, |s| value(&s.value));
    println!("\nUDP");
    println!("  not carried by the mesh: neither encrypted nor authorized (as in Istio ambient)");
    println!("  inbound UDP dropped for STRICT pods labelled ambit.dev/inbound-udp=drop: {udp_dropped:.0} datagrams");
    Ok(healthy)
}

fn samples<'a>(scrape: &'a Scrape, name: &'a str) -> impl Iterator<Item = &'a prometheus_parse::Sample> + 'a {
    scrape.samples.iter().filter(move |s| s.metric == name)
}

fn counter_by(scrape: &Scrape, name: &str, label: &str) -> BTreeMap<String, f64> {
    samples(scrape, name).filter_map(|s| Some((s.labels.get(label)?.to_string(), value(&s.value)))).collect()
}

fn value(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        _ => 0.0,
    }
}

fn percent(part: u64, whole: u64) -> String {
    format!("{:.0}%", part as f64 * 100.0 / whole as f64)
}

fn human(secs: u64) -> String {
    let d = Duration::from_secs(secs);
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}s", d.as_secs()),
    }
}
