//! `ambit-agent`: the per-node agent. Loads the kernel programs, enrols the
//! node's ambient pods, and proxies their traffic. See docs/ARCHITECTURE.md.
#![deny(unsafe_code)]

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};

use ambit_agent::{
    capture::Capture, config, config::ConfigDir, enrolment::Enrolments, netns, probe,
    proxy::ProxyContext, state::State, watch,
};

/// How often pods that failed to enrol are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(
    name = "ambit-agent",
    version,
    about = "ambit node agent: eBPF capture and per-pod tunnel"
)]
struct Args {
    /// Name of this node; the agent enrols the pods whose spec.nodeName matches.
    #[arg(long, env = "AMBIT_NODE")]
    node: String,
    /// Directory of standalone YAML objects (Namespace, Pod), watched for changes.
    #[arg(long, env = "AMBIT_CONFIG_DIR")]
    config_dir: PathBuf,
    /// cgroup v2 directory to attach the capture programs to: the cgroup
    /// root, or the directory that holds the pods' cgroups.
    #[arg(long, env = "AMBIT_CGROUP")]
    cgroup: PathBuf,
    /// Log format.
    #[arg(long, env = "AMBIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AMBIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<()> {
    // Runs on the main thread before any task: the netns to come back to.
    netns::record_agent_netns().context("read the agent's own network namespace")?;
    let missing = probe::missing_features(&args.cgroup);
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|m| format!("  - {}", m.0)).collect();
        bail!(
            "this node cannot run ambit; missing:\n{}\nambit needs Linux 5.14 or later with BPF enabled, cgroup v2, and root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)",
            list.join("\n")
        );
    }
    if !args.config_dir.is_dir() {
        bail!(
            "--config-dir {}: not a directory; create it or point at the standalone configuration",
            args.config_dir.display()
        );
    }

    let (capture, orig_dst) = Capture::attach(&args.cgroup)?;
    tracing::info!(cgroup = %args.cgroup.display(), "kernel programs attached");

    let mut config = ConfigDir::new(&args.config_dir);
    let (snapshot, errors) = config.reload();
    report(&errors);
    let (state_tx, state_rx) = tokio::sync::watch::channel(Arc::new(State::new(snapshot)));
    let ctx = Arc::new(ProxyContext {
        orig_dst,
        state: state_rx.clone(),
    });
    let mut enrolments = Enrolments::new(args.node.clone(), capture, ctx);
    enrolments.reconcile(&state_rx.borrow());

    let (_watcher, mut changes) = watch::watch_dir(config.path())
        .with_context(|| format!("watch {}", config.path().display()))?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    tracing::info!(node = %args.node, enrolled = enrolments.enrolled(), "agent ready");

    loop {
        tokio::select! {
            more = watch::next_change(&mut changes) => {
                if !more {
                    bail!("the configuration watcher stopped");
                }
                let (snapshot, errors) = config.reload();
                report(&errors);
                state_tx.send_replace(Arc::new(State::new(snapshot)));
                enrolments.reconcile(&state_rx.borrow());
                tracing::info!(enrolled = enrolments.enrolled(), errors = errors.len(), "configuration applied");
            }
            _ = retry.tick() => enrolments.reconcile(&state_rx.borrow()),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    tracing::info!("shutting down");
    let counters: Vec<String> = enrolments
        .capture()
        .counters()
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    tracing::info!(counters = %counters.join(" "), "kernel capture counters");
    enrolments.clear();
    drop(enrolments); // detaches every program
    tracing::info!("agent stopped");
    Ok(())
}

fn report(errors: &[config::ConfigError]) {
    for error in errors {
        tracing::error!(error = %error, "configuration error; the last good version of this file stays in force");
    }
}
