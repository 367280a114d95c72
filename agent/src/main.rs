//! `ambit-agent`: the per-node agent. Loads the kernel programs, enrols the
//! node's ambient pods, and carries their traffic over mTLS with each pod's
//! own identity. `ambit-agent ca ...` runs the embedded certificate authority.
//! See docs/ARCHITECTURE.md.
#![deny(unsafe_code)]

use std::{collections::HashSet, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use ambit_agent::{
    admin::Admin,
    ca::DirectoryPlacement,
    capture::Capture,
    enrolment::Enrolments,
    netns, probe,
    proxy::{ProxyContext, workers::Workers},
};
use ambit_config::{ConfigDir, Update, log_errors, watch_dir};
use ambit_hbone::HbonePool;
use ambit_identity::{
    ca::CertificateAuthority,
    ca_client::CaClient,
    ca_server::{CaServer, NodeTokenAuthorizer},
    manager::CertManager,
    tls::load_bundle,
};
use ambit_model::Snapshot;
use ambit_runtime::{
    logging::{self, LogFormat},
    metrics::Metrics,
};
use ambit_state::State;
use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

/// How often pods that failed to enrol are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(name = "ambit-agent", version, about = "ambit node agent: eBPF capture and per-pod mTLS tunnel")]
#[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    #[command(subcommand)]
    command: Option<Command>,
    /// Log format.
    #[arg(long, env = "AMBIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// Name of this node; the agent enrols the pods whose spec.nodeName matches.
    #[arg(long, env = "AMBIT_NODE", required = true)]
    node: Option<String>,
    /// Directory of standalone YAML objects (Namespace, Pod), watched for changes.
    #[arg(long, env = "AMBIT_CONFIG_DIR", required = true)]
    config_dir: Option<PathBuf>,
    /// Where the agent keeps what must outlive a restart: the last good
    /// version of each configuration file (in `config/`), which stands in
    /// for a file that is broken when the agent starts.
    #[arg(long, env = "AMBIT_STATE_DIR", default_value = "/var/lib/ambit")]
    state_dir: PathBuf,
    /// cgroup v2 directory to attach the capture programs to: the cgroup
    /// root, or the directory that holds the pods' cgroups.
    #[arg(long, env = "AMBIT_CGROUP", required = true)]
    cgroup: Option<PathBuf>,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Address of the certificate authority (`ambit-agent ca serve`).
    #[arg(long, env = "AMBIT_CA_ADDR", required = true)]
    ca_addr: Option<SocketAddr>,
    /// PEM file with the trust bundle's root certificate(s).
    #[arg(long, env = "AMBIT_CA_ROOT", required = true)]
    ca_root: Option<PathBuf>,
    /// File holding this node's token for the CA (`ambit-agent ca token`).
    #[arg(long, env = "AMBIT_NODE_TOKEN_FILE", required = true)]
    node_token_file: Option<PathBuf>,
    /// Admin endpoint: /metrics, /healthz/ready, /config_dump, /certs.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
    admin_addr: SocketAddr,
    /// Proxy worker threads (each connection runs on one); 0 means one per CPU.
    #[arg(long, env = "AMBIT_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    /// A pooled HBONE connection that carries no stream for this long (up
    /// to twice this long) is closed, e.g. 5m, 30s.
    #[arg(long, env = "AMBIT_HBONE_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    hbone_idle_timeout: Duration,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The embedded certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Create the root in DIR if there is none, and serve SVIDs.
    Serve {
        /// Directory holding the CA's root and secrets (created if empty).
        #[arg(long)]
        dir: PathBuf,
        /// The standalone configuration: which pods run on which node
        /// (nodes present the tokens of `ambit-agent ca token`).
        #[arg(long)]
        config_dir: PathBuf,
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Lifetime of issued SVIDs, e.g. 1h, 30m, 10s.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        leaf_ttl: Duration,
    },
    /// Print the token node NODE presents to the CA (creating the CA if needed).
    Token {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: String,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("a duration of zero cannot work".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("`{text}`: {e}; e.g. 1h, 30m, 10s")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Some(Command::Ca(command)) => run_ca(command),
        None => control_runtime().and_then(|rt| rt.block_on(run_agent(cli.agent))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run_ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Serve { dir, config_dir, listen, trust_domain, leaf_ttl } => {
            let ca = CertificateAuthority::load_or_create(&dir, &trust_domain)?;
            let listener =
                tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
            let authorizer =
                Box::new(NodeTokenAuthorizer::new(ca.node_tokens(), Box::new(DirectoryPlacement::new(config_dir))));
            let server = Arc::new(CaServer::new(ca, authorizer, leaf_ttl));
            tokio::select! {
                result = server.serve(listener) => result,
                _ = shutdown_signal() => Ok(()),
            }
        }
        CaCommand::Token { dir, node, trust_domain } => {
            let ca = CertificateAuthority::load_or_create(&dir, &trust_domain)?;
            println!("{}", ca.node_tokens().token(&node));
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let mut sigterm = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut sigint = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
}

/// The control plane's runtime (configuration, certificates, admin, accept
/// loops); connections run on the proxy workers.
fn control_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?)
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    // clap enforces these without a subcommand.
    let node = args.node.expect("required");
    let config_dir = args.config_dir.expect("required");
    let cgroup = args.cgroup.expect("required");
    let (ca_addr, ca_root, token_file) =
        (args.ca_addr.expect("required"), args.ca_root.expect("required"), args.node_token_file.expect("required"));

    // Runs on the main thread before any task: the netns to come back to.
    netns::record_agent_netns().context("read the agent's own network namespace")?;
    let missing = probe::missing_features(&cgroup);
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|m| format!("  - {}", m.0)).collect();
        bail!(
            "this node cannot run ambit; missing:\n{}\nambit needs Linux 5.14 or later with BPF enabled, cgroup v2, and root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)",
            list.join("\n")
        );
    }
    if !config_dir.is_dir() {
        bail!(
            "--config-dir {}: not a directory; create it or point at the standalone configuration",
            config_dir.display()
        );
    }
    let bundle = load_bundle(&ca_root, &args.trust_domain)?;
    let provider = CaClient::new(ca_addr, node.clone(), token_file, &bundle)?;

    let (capture, orig_dst, deliveries) = Capture::attach(&cgroup)?;
    tracing::info!(cgroup = %cgroup.display(), "kernel programs attached");
    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("--admin-addr {}: cannot listen", args.admin_addr))?;
    let metrics = Arc::new(Metrics::new());

    let config = ConfigDir::new(&config_dir).keeping_last_good_in(args.state_dir.join("config"));
    let mut updates = watch_dir(config).with_context(|| format!("watch {}", config_dir.display()))?;
    let Some(Update { snapshot, errors }) = updates.next().await else {
        bail!("--config-dir {}: the configuration source stopped before its first read", config_dir.display());
    };
    log_errors(&errors);
    metrics.config_errors.set(errors.len() as i64);
    let mut policy_warnings = HashSet::new();
    warn_policies(&snapshot, &args.trust_domain, &mut policy_warnings);
    let (state_tx, state_rx) = tokio::sync::watch::channel(Arc::new(State::new(snapshot, &args.trust_domain)));
    let ctx = Arc::new(ProxyContext {
        orig_dst,
        deliveries,
        state: state_rx.clone(),
        bundle,
        certs: CertManager::new(Arc::new(provider), metrics.clone()),
        pool: HbonePool::new(metrics.clone(), args.hbone_idle_timeout),
        next_endpoint: Default::default(),
        stats: Default::default(),
        metrics: metrics.clone(),
        workers: Workers::start(match args.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        })
        .context("start the proxy worker threads")?,
    });
    tracing::info!(workers = ctx.workers.count(), "proxy workers started");
    let capture_counters = capture.counters();
    let mut enrolments = Enrolments::new(node.clone(), capture, ctx.clone());
    let (enrolled_tx, enrolled_rx) = tokio::sync::watch::channel(Vec::new());
    let apply = async |enrolments: &mut Enrolments| {
        let state = state_rx.borrow().clone();
        enrolments.reconcile(&state).await;
        enrolled_tx.send_replace(enrolments.enrolled_pods());
        metrics.pods_not_enrolled.set(enrolments.not_enrolled() as i64);
        for (kind, count) in state.sizes() {
            metrics.state_objects.get_or_create(&Metrics::name(kind)).set(count as i64);
        }
    };
    apply(&mut enrolments).await;
    let admin = Arc::new(Admin {
        node: node.clone(),
        ctx: ctx.clone(),
        capture: capture_counters.clone(),
        enrolled: enrolled_rx,
    });
    tokio::spawn(admin.serve(admin_listener));

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    tracing::info!(%node, enrolled = enrolments.enrolled(), "agent ready");

    loop {
        tokio::select! {
            update = updates.next() => {
                let Some(Update { snapshot, errors }) = update else {
                    bail!("the configuration watcher stopped");
                };
                log_errors(&errors);
                metrics.config_errors.set(errors.len() as i64);
                warn_policies(&snapshot, &args.trust_domain, &mut policy_warnings);
                state_tx.send_replace(Arc::new(State::new(snapshot, &args.trust_domain)));
                apply(&mut enrolments).await;
                tracing::info!(enrolled = enrolments.enrolled(), errors = errors.len(), "configuration applied");
            }
            _ = retry.tick() => apply(&mut enrolments).await,
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    tracing::info!("shutting down");
    let counters: Vec<String> = capture_counters.read().iter().map(|(name, value)| format!("{name}={value}")).collect();
    tracing::info!(counters = %counters.join(" "), "kernel capture counters");
    let counters: Vec<String> = ctx.counters().iter().map(|(name, value)| format!("{name}={value}")).collect();
    tracing::info!(counters = %counters.join(" "), "proxy counters");
    enrolments.clear().await;
    drop(enrolments); // detaches every program
    tracing::info!("agent stopped");
    Ok(())
}

/// Logs what `ambit policy lint` would warn about, once per finding for as
/// long as it stays true (e.g. an L7 field that the tunnel cannot enforce).
fn warn_policies(snapshot: &Snapshot, trust_domain: &str, warned: &mut HashSet<String>) {
    let findings: HashSet<String> =
        ambit_authz::lint::lint(snapshot, trust_domain).into_iter().map(|f| f.message).collect();
    for finding in findings.difference(warned) {
        tracing::warn!(warning = %finding, "authorization policy");
    }
    *warned = findings;
}
