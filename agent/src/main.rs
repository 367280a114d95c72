//! `ambit-agent`: the per-node agent. Loads the kernel programs, enrols the
//! node's ambient pods, and carries their traffic over mTLS with each pod's
//! own identity. `ambit-agent ca ...` runs the embedded certificate authority.
//! See docs/ARCHITECTURE.md.
#![deny(unsafe_code)]

use std::{collections::HashSet, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use ambit_agent::{
    admin::{Admin, missing_certificates},
    bpffs::{self, PinDir},
    ca::DirectoryPlacement,
    capture::Capture,
    cni::CniCall,
    cni_install,
    enrolment::{Enrolments, NetnsPaths},
    handoff,
    kubernetes::{Cluster, DaemonSetFate, daemonset_fate},
    netns, probe,
    proxy::{ProxyContext, local::SameNode, workers::Workers},
    workload_api,
};
use ambit_config::{ConfigDir, Update, log_errors, watch_dir};
use ambit_hbone::HbonePool;
use ambit_identity::{
    IdentityProvider,
    ca::{CaTokens, CertificateAuthority, TokenClaims},
    ca_client::CaClient,
    ca_server::{Authorizer, BundleEndpointTls, CaServer, NodeTokenAuthorizer},
    federation::Federations,
    manager::CertManager,
    signing,
    spire::{self, SelectorTemplates, SpireProvider},
    tls::{TrustStore, follow_bundle_file, load_bundle},
};
use ambit_kube::{Labels, NodePods, Options, ca::TokenReviewAuthorizer, watch_cluster};
use ambit_model::Snapshot;
use ambit_runtime::{
    logging::{self, LogFormat, WarnLimiter},
    metrics::Metrics,
};
use ambit_state::State;
use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};

const DEFAULT_STATE_DIR: &str = "/var/lib/ambit";
const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/ambit";
/// How long a new agent waits for its pods' certificates before taking
/// over from the running one anyway.
const TAKEOVER_CERTIFICATE_WAIT: Duration = Duration::from_secs(30);
/// How often the draining agent looks at its open connections.
const DRAIN_POLL: Duration = Duration::from_millis(200);
/// How often the draining agent logs how many connections are still open.
const DRAIN_PROGRESS: Duration = Duration::from_secs(10);
/// How often pods that failed to enrol are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// Kubernetes mode: how often each ambient pod's netns is checked (it
/// still holds the pod's address) and missing ones are looked for in /proc.
const RECHECK_INTERVAL: Duration = Duration::from_secs(10);
/// How often the CNI installer makes sure ambit-cni is still chained.
const CNI_RECHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Kubernetes mode: how long the first snapshot may take to carry the pods
/// found in /proc.
const FIRST_SCAN_WAIT: Duration = Duration::from_secs(5);
/// Kubernetes mode: how often ADDs still waiting are looked at again.
const ADD_SETTLE_INTERVAL: Duration = Duration::from_millis(250);

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
    /// Standalone mode: directory of YAML objects (Namespace, Pod,
    /// policies...), watched for changes.
    #[arg(long, env = "AMBIT_CONFIG_DIR", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    config_dir: Option<PathBuf>,
    /// Kubernetes mode: read the objects from the API server (the pod's
    /// service account, or $KUBECONFIG) and learn pods' network namespaces
    /// from the ambit-cni plugin and /proc.
    #[arg(long, env = "AMBIT_KUBERNETES")]
    kubernetes: bool,
    /// Kubernetes mode: also honour istio.io/dataplane-mode and
    /// istio.io/use-waypoint, for clusters moving over from Istio ambient.
    #[arg(long, env = "AMBIT_ISTIO_LABELS", requires = "kubernetes")]
    istio_labels: bool,
    /// Kubernetes mode: the agents' DaemonSet (`namespace/name`). An agent
    /// stopping while it is being deleted removes the capture (ambit is
    /// being uninstalled); otherwise the capture stays.
    #[arg(long, env = "AMBIT_DAEMONSET", default_value = "ambit-system/ambit-agent")]
    daemonset: String,
    /// Kubernetes mode: where the ambit-cni plugin reaches the agent.
    #[arg(long, env = "AMBIT_CNI_SOCKET", default_value = ambit_cni_api::DEFAULT_SOCKET)]
    cni_socket: PathBuf,
    /// Kubernetes mode: the host's /proc, where pods that ran before the
    /// agent started are found.
    #[arg(long, env = "AMBIT_HOST_PROC", default_value = "/proc")]
    host_proc: PathBuf,
    /// Where the agent keeps what must outlive a restart: the last good
    /// version of each configuration file (in `config/`), which stands in
    /// for a file that is broken when the agent starts.
    #[arg(long, env = "AMBIT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// This agent's directory on the BPF filesystem, where the capture is
    /// pinned so that it outlives the agent: while no agent runs, enrolled
    /// pods' connections fail instead of flowing in plaintext. One per node.
    #[arg(long, env = "AMBIT_BPF_DIR", default_value = DEFAULT_BPF_DIR)]
    bpf_dir: PathBuf,
    /// Once another agent has taken over (an upgrade), how long this one
    /// keeps serving its open connections; those still open then are reset.
    #[arg(long, env = "AMBIT_DRAIN_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// cgroup v2 directory to attach the capture programs to: the cgroup
    /// root, or the directory that holds the pods' cgroups.
    #[arg(long, env = "AMBIT_CGROUP", required = true)]
    cgroup: Option<PathBuf>,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The certificate authority (`ambit-agent ca serve`), host:port; a
    /// name is resolved at every connection (e.g. the CA's Service).
    #[arg(
        long,
        env = "AMBIT_CA_ADDR",
        required_unless_present = "spire_admin_socket",
        conflicts_with = "spire_admin_socket"
    )]
    ca_addr: Option<String>,
    /// PEM file with the trust bundle's root certificate(s).
    #[arg(
        long,
        env = "AMBIT_CA_ROOT",
        required_unless_present = "spire_admin_socket",
        conflicts_with = "spire_admin_socket"
    )]
    ca_root: Option<PathBuf>,
    /// File holding this node's token for the CA: in standalone mode the
    /// output of `ambit-agent ca token`; in Kubernetes mode the agent's
    /// projected service-account token (audience `ambit-ca`), read again
    /// for every request as the kubelet rotates it.
    #[arg(
        long,
        env = "AMBIT_NODE_TOKEN_FILE",
        required_unless_present = "spire_admin_socket",
        conflicts_with = "spire_admin_socket"
    )]
    node_token_file: Option<PathBuf>,
    /// SPIRE as the identity provider instead of the embedded CA: the SPIRE
    /// agent's admin socket, where this agent is an authorized delegate
    /// (Delegated Identity API). SVIDs and trust bundles, federated ones
    /// included, then come from SPIRE.
    #[arg(long, env = "AMBIT_SPIRE_ADMIN_SOCKET")]
    spire_admin_socket: Option<PathBuf>,
    /// With SPIRE: the selectors that pick a pod's identity, `type:value`
    /// with {namespace}, {service_account} and {trust_domain}; repeat for
    /// each. Kubernetes workload attestation's by default.
    #[arg(long, env = "AMBIT_SPIRE_SELECTORS", value_delimiter = ',', requires = "spire_admin_socket",
          default_values_t = ["k8s:ns:{namespace}".to_string(), "k8s:sa:{service_account}".to_string()])]
    spire_selector: Vec<String>,
    /// Serve the SPIFFE Workload API to the enrolled pods on this Unix
    /// socket (mount its directory into the pods): each caller gets its own
    /// pod's X.509-SVID and the trust bundles. Kubernetes mode needs the
    /// pods' processes visible to the agent (hostPID).
    #[arg(long, env = "AMBIT_WORKLOAD_API_SOCKET")]
    workload_api_socket: Option<PathBuf>,
    /// Admin endpoint: /metrics, /healthz/ready, /config_dump, /certs.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
    admin_addr: SocketAddr,
    /// Proxy worker threads (each connection runs on one); 0 means one per CPU.
    #[arg(long, env = "AMBIT_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    /// Connections between two enrolled pods of this node: `kernel`
    /// checks them here (PeerAuthentication, the destination's
    /// authorization) and joins the agent's two sockets in the kernel
    /// (sockmap), falling back to `relay` when the kernel lacks sk_skb;
    /// `relay` checks them here and relays in user space; `hbone` sends
    /// them through an HBONE tunnel to this agent, like other nodes' traffic.
    #[arg(long, env = "AMBIT_SAME_NODE", value_enum, default_value = "kernel")]
    same_node: SameNodeMode,
    /// A pooled HBONE connection that carries no stream for this long (up
    /// to twice this long) is closed, e.g. 5m, 30s.
    #[arg(long, env = "AMBIT_HBONE_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    hbone_idle_timeout: Duration,
}

// Parsed once at start-up: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// The embedded certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The ambit-cni plugin on this node (Kubernetes mode).
    #[command(subcommand)]
    Cni(CniCommand),
    /// Remove the capture an agent left in place on this node (stop the
    /// agent first): enrolled pods' traffic then flows directly, with no
    /// mTLS and no policy.
    Uninstall {
        #[arg(long, env = "AMBIT_BPF_DIR", default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
        /// The agent's state directory, where a running agent answers.
        #[arg(long, env = "AMBIT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CniCommand {
    /// Chain ambit-cni into the host's primary CNI configuration and keep
    /// it there; on SIGTERM, remove it only if the DaemonSet is being
    /// deleted (a rolling update keeps it, so no pod starts uncaptured).
    Install {
        /// The plugin binary to copy to the host.
        #[arg(long, default_value = "/usr/local/bin/ambit-cni")]
        plugin: PathBuf,
        #[command(flatten)]
        host: CniHost,
        /// The agent's socket, as the plugin on the host reaches it.
        #[arg(long, default_value = ambit_cni_api::DEFAULT_SOCKET)]
        agent_socket: PathBuf,
        /// The DaemonSet (`namespace/name`) this installer belongs to.
        #[arg(long, env = "AMBIT_DAEMONSET", default_value = "ambit-system/ambit-agent")]
        daemonset: String,
    },
    /// Remove ambit-cni from the host's CNI configuration and bin directory.
    Uninstall {
        #[command(flatten)]
        host: CniHost,
    },
}

/// Where the host keeps its CNI plugins and configuration.
#[derive(Args, Debug)]
struct CniHost {
    #[arg(long, default_value = "/host/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Create the root in DIR if there is none, and serve SVIDs.
    Serve {
        /// Directory holding the CA's root and secrets (created if empty).
        #[arg(long)]
        dir: PathBuf,
        /// Standalone mode: the configuration that says which pods run on
        /// which node (nodes present the tokens of `ambit-agent ca token`).
        #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
        config_dir: Option<PathBuf>,
        /// Kubernetes mode: callers present projected service-account
        /// tokens, checked with TokenReview and the pods' placement; the
        /// root is kept in the Secret --root-secret and published in a
        /// ConfigMap `ambit-root-cert` in every namespace.
        #[arg(long)]
        kubernetes: bool,
        /// A plug-in CA: sign with the intermediate in this directory, in
        /// Istio's `cacerts` layout (ca-cert.pem, ca-key.pem, cert-chain.pem,
        /// root-cert.pem), followed as it changes. Agents trust
        /// root-cert.pem. In Kubernetes mode, an empty directory (the
        /// optional Secret `cacerts` is absent) means the embedded root.
        #[arg(long)]
        cacerts_dir: Option<PathBuf>,
        /// Kubernetes mode: the Secret (`namespace/name`) that holds the
        /// root; created with a new root if it does not exist.
        #[arg(long, default_value = "ambit-system/ambit-ca-root")]
        root_secret: String,
        /// Kubernetes mode: the node agents' service account
        /// (`namespace/name`), the one that may speak for its node's pods.
        #[arg(long, default_value = "ambit-system/ambit-agent")]
        agent_service_account: String,
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Lifetime of issued SVIDs, e.g. 1h, 30m, 10s.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        leaf_ttl: Duration,
        /// Serve the trust bundle on a SPIFFE bundle endpoint at this
        /// address, profile https_spiffe: the endpoint presents the CA's
        /// own SVID, spiffe://<trust domain>/ns/ambit-system/sa/ambit-ca.
        #[arg(long)]
        bundle_endpoint: Option<SocketAddr>,
        /// Serve the trust bundle on a SPIFFE bundle endpoint at this
        /// address, profile https_web, with --bundle-endpoint-web-cert/-key.
        #[arg(long, requires_all = ["bundle_endpoint_web_cert", "bundle_endpoint_web_key"])]
        bundle_endpoint_web: Option<SocketAddr>,
        /// PEM certificate chain (Web PKI) of the https_web bundle endpoint.
        #[arg(long, requires = "bundle_endpoint_web")]
        bundle_endpoint_web_cert: Option<PathBuf>,
        /// PEM private key of the https_web bundle endpoint.
        #[arg(long, requires = "bundle_endpoint_web")]
        bundle_endpoint_web_key: Option<PathBuf>,
        /// How often federated meshes should fetch the bundle again
        /// (`spiffe_refresh_hint`).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        bundle_refresh_hint: Duration,
        /// A plug-in CA's new root (a root rotation) is in the bundle this
        /// long before it signs, so that every peer has it first: at least
        /// the refresh hint, plus the time a ConfigMap takes to reach pods.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        root_propagation: Duration,
    },
    /// Print a token for the CA (creating its secret if needed): node NODE's,
    /// or with --identity a waypoint's, which obtains that identity only.
    /// Tokens expire: put a new one in the file before then (no restart).
    Token {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: String,
        /// NAMESPACE/SERVICE_ACCOUNT: the one identity the token obtains
        /// (a waypoint's), and only while a pod on NODE runs as it.
        #[arg(long)]
        identity: Option<String>,
        /// How long the token is valid, e.g. 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
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
        Some(Command::Cni(command)) => run_cni(command),
        Some(Command::Uninstall { bpf_dir, state_dir }) => uninstall(&bpf_dir, &state_dir),
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
        CaCommand::Serve {
            dir,
            config_dir,
            kubernetes,
            cacerts_dir,
            root_secret,
            agent_service_account,
            listen,
            trust_domain,
            leaf_ttl,
            bundle_endpoint,
            bundle_endpoint_web,
            bundle_endpoint_web_cert,
            bundle_endpoint_web_key,
            bundle_refresh_hint,
            root_propagation,
        } => {
            let (ca, authorizer): (_, Box<dyn Authorizer>) = match config_dir {
                Some(config_dir) if !kubernetes => {
                    let ca = match &cacerts_dir {
                        Some(cacerts) => CertificateAuthority::plugged(&dir, cacerts, &trust_domain)?,
                        None => CertificateAuthority::load_or_create(&dir, &trust_domain)?,
                    };
                    let placement = Box::new(DirectoryPlacement::new(config_dir));
                    let authorizer = Box::new(NodeTokenAuthorizer::new(ca.tokens(), placement));
                    (Arc::new(ca), authorizer)
                }
                _ => {
                    let client = ambit_kube::client().await?;
                    let secret = namespaced_name("--root-secret", &root_secret)?;
                    let (namespace, service_account) =
                        namespaced_name("--agent-service-account", &agent_service_account)?;
                    let plugged = match &cacerts_dir {
                        Some(cacerts) if signing::plugged_files_present(cacerts)? => Some(cacerts),
                        _ => None,
                    };
                    let ca = match plugged {
                        Some(cacerts) => CertificateAuthority::plugged(&dir, cacerts, &trust_domain)?,
                        None => ambit_kube::ca::load_root(&client, secret, &dir, &trust_domain).await?,
                    };
                    let ca = Arc::new(ca);
                    tokio::spawn(ambit_kube::ca::publish_root(client.clone(), ca.clone()));
                    let authorizer = Box::new(TokenReviewAuthorizer::new(client, namespace, service_account));
                    (ca, authorizer)
                }
            };
            let listener =
                tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
            let server = Arc::new(
                CaServer::new(ca, authorizer, leaf_ttl).with_bundle_timing(bundle_refresh_hint, root_propagation),
            );
            let mut endpoints = tokio::task::JoinSet::new();
            if let Some(addr) = bundle_endpoint {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--bundle-endpoint {addr}: cannot listen"))?;
                endpoints.spawn(server.clone().serve_bundle_endpoint(listener, BundleEndpointTls::Spiffe));
            }
            if let (Some(addr), Some(cert), Some(key)) =
                (bundle_endpoint_web, bundle_endpoint_web_cert, bundle_endpoint_web_key)
            {
                let tls = BundleEndpointTls::web_from_files(&cert, &key)?;
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--bundle-endpoint-web {addr}: cannot listen"))?;
                endpoints.spawn(server.clone().serve_bundle_endpoint(listener, tls));
            }
            tokio::select! {
                result = server.serve(listener) => result,
                Some(Ok(Err(error))) = endpoints.join_next() => Err(error),
                _ = shutdown_signal() => Ok(()),
            }
        }
        CaCommand::Token { dir, node, identity, ttl } => {
            if let Some(identity) = &identity {
                namespaced_name("--identity", identity)?;
            }
            let tokens = CaTokens::load_or_create(&dir)?;
            let exp = (std::time::SystemTime::now() + ttl).duration_since(std::time::UNIX_EPOCH)?.as_secs();
            println!("{}", tokens.issue(&TokenClaims { node, identity, exp }));
            Ok(())
        }
    }
}

/// The identity provider the arguments name, and the trust store it keeps:
/// SPIRE, or the embedded CA with the root file.
async fn identity_provider(args: &AgentArgs, node: &str) -> anyhow::Result<(Arc<dyn IdentityProvider>, TrustStore)> {
    if let Some(socket) = &args.spire_admin_socket {
        let selectors = SelectorTemplates::parse(&args.spire_selector).map_err(anyhow::Error::msg)?;
        let (provider, trust) = SpireProvider::connect(socket, &args.trust_domain, selectors).await?;
        let provider = Arc::new(provider);
        tokio::spawn(spire::follow_bundles(provider.clone()));
        tracing::info!(socket = %socket.display(), "identities from SPIRE");
        return Ok((provider, trust));
    }
    let (Some(ca_addr), Some(ca_root), Some(token_file)) = (&args.ca_addr, &args.ca_root, &args.node_token_file) else {
        bail!("give --ca-addr, --ca-root and --node-token-file (the embedded CA), or --spire-admin-socket");
    };
    let trust = TrustStore::new(load_bundle(ca_root, &args.trust_domain)?);
    tokio::spawn(follow_bundle_file(ca_root.clone(), trust.clone()));
    let provider = CaClient::new(ca_addr, node.to_string(), token_file.clone(), &trust)?;
    Ok((Arc::new(provider), trust))
}

/// `ambit-agent uninstall`: removes the pinned capture, which detaches the
/// programs and frees the maps.
fn uninstall(bpf_dir: &std::path::Path, state_dir: &std::path::Path) -> anyhow::Result<()> {
    if handoff::agent_running(state_dir).unwrap_or(false) {
        bail!(
            "an agent is running (it answers on {}); stop it first, or it keeps capturing",
            handoff::socket_path(state_dir).display()
        );
    }
    if !bpf_dir.exists() {
        println!("nothing to remove: {} does not exist", bpf_dir.display());
        return Ok(());
    }
    bpffs::remove(bpf_dir).with_context(|| format!("remove {}", bpf_dir.display()))?;
    println!("removed the capture pinned in {}; enrolled pods' traffic now flows directly", bpf_dir.display());
    Ok(())
}

/// `--same-node`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum SameNodeMode {
    Kernel,
    Relay,
    Hbone,
}

/// The same-node path this node can run: `kernel` needs sk_skb, and
/// falls back to `relay`, said once, without it.
fn same_node(mode: SameNodeMode, capture: &mut Capture) -> SameNode {
    let same_node = match mode {
        SameNodeMode::Hbone => SameNode::Hbone,
        SameNodeMode::Relay => SameNode::Relay,
        SameNodeMode::Kernel => {
            let missing: Vec<String> = probe::missing_for_splice().into_iter().map(|m| m.0).collect();
            if !missing.is_empty() {
                tracing::warn!(missing = %missing.join("; "), "same-node connections are relayed in user space: the kernel lacks what joining them needs");
                SameNode::Relay
            } else {
                match capture.splicer() {
                    Ok(splicer) => SameNode::Kernel(Arc::new(splicer)),
                    Err(error) => {
                        tracing::warn!(%error, "same-node connections are relayed in user space: the splice program cannot be attached");
                        SameNode::Relay
                    }
                }
            }
        }
    };
    tracing::info!(same_node = same_node.name(), "same-node connections");
    same_node
}

/// Every proxied connection holds a descriptor on each side it passes (the
/// app's socket on the source node, the delivery socket on the destination
/// node), so the agent raises its soft limit on open files to the hard
/// one, and says when that limit is low for a busy node.
fn raise_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    /// Below this, a node carrying thousands of connections runs out.
    const ENOUGH: u64 = 65_536;
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard
                && let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            {
                tracing::warn!(soft, hard, %error, "cannot raise the open-file limit");
            }
            let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(soft, _)| soft);
            if limit < ENOUGH {
                tracing::warn!(
                    limit,
                    "the open-file limit is low: each proxied connection takes a descriptor on each node it passes; raise LimitNOFILE (or the container's nofile ulimit) to at least {ENOUGH}"
                );
            } else {
                tracing::info!(limit, "open-file limit");
            }
        }
        Err(error) => tracing::warn!(%error, "cannot read the open-file limit"),
    }
}

/// Checks that the state directory takes a write (a full disk or a
/// read-only mount does not), says so when that changes, and sets
/// `ambit_state_dir_writable`. The agent goes on enforcing either way.
fn check_state_dir(dir: &std::path::Path, metrics: &Metrics) {
    let probe = dir.join(".writable");
    let written = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&probe, b"ambit\n"));
    let _ = std::fs::remove_file(&probe);
    let was = metrics.state_dir_writable.get();
    match written {
        Ok(()) => {
            if was == 0 {
                tracing::info!(dir = %dir.display(), "the state directory takes writes");
            }
            metrics.state_dir_writable.set(1);
        }
        Err(error) => {
            if was != 0 {
                tracing::error!(dir = %dir.display(), %error, "cannot write the state directory; enforcement goes on, but the last good configuration kept there will not outlive a restart");
            }
            metrics.state_dir_writable.set(0);
        }
    }
}

/// `namespace/name` from a flag's value.
fn namespaced_name<'a>(flag: &str, value: &'a str) -> anyhow::Result<(&'a str, &'a str)> {
    value
        .split_once('/')
        .filter(|(namespace, name)| !namespace.is_empty() && !name.is_empty())
        .with_context(|| format!("{flag} {value}: give namespace/name, e.g. ambit-system/ambit-agent"))
}

#[tokio::main(flavor = "current_thread")]
async fn run_cni(command: CniCommand) -> anyhow::Result<()> {
    let (plugin, host, agent_socket, daemonset) = match command {
        CniCommand::Uninstall { host } => return cni_install::uninstall(&host.cni_bin_dir, &host.cni_conf_dir),
        CniCommand::Install { plugin, host, agent_socket, daemonset } => (plugin, host, agent_socket, daemonset),
    };
    let (namespace, name) = namespaced_name("--daemonset", &daemonset)?;
    // Before anything: a SIGTERM must never take the default action here.
    let (mut sigterm, mut sigint) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    let install = || cni_install::install(&plugin, &host.cni_bin_dir, &host.cni_conf_dir, &agent_socket);
    install()?;
    tracing::info!(conf_dir = %host.cni_conf_dir.display(), "CNI installer running: ambit-cni is chained");
    let mut check = tokio::time::interval(CNI_RECHECK_INTERVAL);
    loop {
        tokio::select! {
            _ = check.tick() => if let Err(error) = install() {
                tracing::warn!(error = %format!("{error:#}"), "cannot keep ambit-cni in the CNI configuration");
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    match daemonset_fate(namespace, name).await {
        DaemonSetFate::Stays => {
            tracing::info!("the DaemonSet stays (a rolling update): ambit-cni stays chained for the next installer");
            Ok(())
        }
        DaemonSetFate::Deleted(why) => {
            tracing::info!(why, "removing ambit-cni from the host");
            cni_install::uninstall(&host.cni_bin_dir, &host.cni_conf_dir)
        }
        DaemonSetFate::Unknown(error) => {
            tracing::warn!(%error, "cannot tell whether the DaemonSet is being deleted; ambit-cni stays chained (run `ambit-agent cni uninstall` on the node to remove it)");
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
    let node = args.node.clone().expect("required");
    let cgroup = args.cgroup.clone().expect("required");

    // Runs on the main thread before any task: the netns to come back to.
    netns::record_agent_netns().context("read the agent's own network namespace")?;
    raise_file_limit();
    let missing = probe::missing_features(&cgroup);
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|m| format!("  - {}", m.0)).collect();
        bail!(
            "this node cannot run ambit; missing:\n{}\nambit needs Linux 5.14 or later with BPF enabled, cgroup v2, and root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)",
            list.join("\n")
        );
    }
    if let Some(config_dir) = args.config_dir.as_ref().filter(|dir| !dir.is_dir()) {
        bail!(
            "--config-dir {}: not a directory; create it or point at the standalone configuration",
            config_dir.display()
        );
    }
    if args.kubernetes {
        namespaced_name("--daemonset", &args.daemonset)?;
    }
    let (provider, trust) = identity_provider(&args, &node).await?;

    let pins = PinDir::open(&args.bpf_dir)?;
    // An agent already running here hands its listeners over (an upgrade).
    let state_dir = args.state_dir.clone();
    let predecessor = tokio::task::spawn_blocking(move || handoff::request(&state_dir)).await?.with_context(|| {
        format!(
            "an agent runs with --state-dir {} but cannot hand over to this one; stop it, or give this agent another state directory",
            args.state_dir.display()
        )
    })?;
    let (mut capture, orig_dst, deliveries) = Capture::attach(&cgroup, pins)?;
    tracing::info!(cgroup = %cgroup.display(), bpf_dir = %args.bpf_dir.display(), "kernel programs attached");
    let same_node = same_node(args.same_node, &mut capture);
    let admin_listener =
        admin_listener(args.admin_addr).with_context(|| format!("--admin-addr {}: cannot listen", args.admin_addr))?;
    let metrics = Arc::new(Metrics::new());

    let (mut updates, mut cluster) = match &args.config_dir {
        Some(config_dir) => {
            let config = ConfigDir::new(config_dir).keeping_last_good_in(args.state_dir.join("config"));
            (watch_dir(config).with_context(|| format!("watch {}", config_dir.display()))?, None)
        }
        None => {
            let client = ambit_kube::client().await?;
            let (cluster, networks) =
                Cluster::start(client.clone(), node.clone(), args.cni_socket.clone(), args.host_proc.clone())?;
            let options = Options {
                labels: Labels { istio: args.istio_labels },
                node: Some(NodePods { node: node.clone(), networks }),
            };
            tracing::info!(cni_socket = %args.cni_socket.display(), "Kubernetes mode: watching the API server");
            (watch_cluster(client, options), Some(cluster))
        }
    };
    let Some(Update { snapshot, mut errors }) = updates.next().await else {
        bail!("the configuration source stopped before its first read");
    };
    let mut snapshot = snapshot;
    if let Some(cluster) = cluster.as_mut() {
        // Pods that ran before this agent: their netns, from /proc, before
        // the first enrolment, so that none is enrolled late or logged as failing.
        if cluster.rescan(&State::new(snapshot.clone(), &args.trust_domain)) {
            match tokio::time::timeout(FIRST_SCAN_WAIT, updates.next()).await {
                Ok(Some(update)) => (snapshot, errors) = (update.snapshot, update.errors),
                Ok(None) => bail!("the configuration source stopped"),
                Err(_) => tracing::warn!(
                    "the pods found in /proc did not reach the state in time; enrolling them at the next update"
                ),
            }
        }
    }
    log_errors(&errors);
    metrics.config_errors.set(errors.len() as i64);
    let mut policy_warnings = HashSet::new();
    warn_policies(&snapshot, &args.trust_domain, &mut policy_warnings);
    let state = State::new(snapshot, &args.trust_domain);
    let federations = Federations::new(trust.clone());
    // With SPIRE, federated bundles are SPIRE's: one source per trust domain.
    let follow_federations = |state: &State| match args.spire_admin_socket.is_some() {
        true if !state.federations().is_empty() => tracing::warn!(
            "TrustDomainFederation objects are ignored: with SPIRE as the provider, federated bundles come from SPIRE"
        ),
        true => {}
        false => federations.follow(&state.federations()),
    };
    follow_federations(&state);
    let (state_tx, state_rx) = tokio::sync::watch::channel(Arc::new(state));
    let ctx = Arc::new(ProxyContext {
        orig_dst,
        deliveries,
        state: state_rx.clone(),
        trust,
        certs: CertManager::new(provider, metrics.clone()),
        pool: HbonePool::new(metrics.clone(), args.hbone_idle_timeout),
        next_endpoint: Default::default(),
        stats: Default::default(),
        metrics: metrics.clone(),
        workers: Workers::start(match args.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        })
        .context("start the proxy worker threads")?,
        warnings: WarnLimiter::new(metrics.clone()),
        draining: tokio::sync::watch::Sender::new(false),
        same_node,
        local_pods: Default::default(),
    });
    tracing::info!(workers = ctx.workers.count(), "proxy workers started");
    let capture_counters = capture.counters();
    let netns_paths = if args.kubernetes { NetnsPaths::Found } else { NetnsPaths::Named };
    let mut enrolments = Enrolments::new(node.clone(), netns_paths, capture, ctx.clone());
    let predecessor = predecessor.map(|(handed, predecessor)| {
        tracing::info!(listeners = handed.len(), "taking over from the agent running here");
        enrolments.take_handed(handed);
        predecessor
    });
    let (enrolled_tx, enrolled_rx) = tokio::sync::watch::channel(Vec::new());
    let apply = async |enrolments: &mut Enrolments, cluster: &mut Option<Cluster>| {
        let state = state_rx.borrow().clone();
        enrolments.reconcile(&state).await;
        if let Some(cluster) = cluster.as_mut() {
            cluster.settle(&state, enrolments);
        }
        enrolled_tx.send_replace(enrolments.enrolled_pods());
        metrics.pods_not_enrolled.set(enrolments.not_enrolled() as i64);
        for (kind, count) in state.sizes() {
            metrics.state_objects.get_or_create(&Metrics::name(kind)).set(count as i64);
        }
    };
    apply(&mut enrolments, &mut cluster).await;
    enrolments.sweep();
    match predecessor {
        Some(predecessor) => {
            // The old agent serves until this one holds its pods' certificates.
            let certificates = async {
                while !missing_certificates(&ctx, &enrolments.enrolled_pods()).is_empty() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            if tokio::time::timeout(TAKEOVER_CERTIFICATE_WAIT, certificates).await.is_err() {
                tracing::warn!(
                    missing = %missing_certificates(&ctx, &enrolments.enrolled_pods()).join("; "),
                    "taking over without every pod's certificate"
                );
            }
            tokio::task::spawn_blocking(move || predecessor.take_over())
                .await?
                .context("the running agent did not stop accepting")?;
            let unused = enrolments.drop_handed();
            tracing::info!(unused, "took over: the previous agent drains its connections");
        }
        // No agent delivers anything: deliveries left by one that died go.
        None => ctx.deliveries.clear(),
    }
    let (handoff_tx, mut handoff_rx) = tokio::sync::mpsc::channel(1);
    if let Err(error) = handoff::serve(&args.state_dir, handoff_tx) {
        tracing::warn!(%error, dir = %args.state_dir.display(), "cannot listen for a handoff: the next agent cannot take over without cutting connections");
    }
    let admin = Arc::new(Admin {
        node: node.clone(),
        ctx: ctx.clone(),
        capture: capture_counters.clone(),
        enrolled: enrolled_rx.clone(),
    });
    let admin_enrolled = enrolled_rx;
    let admin = tokio::spawn(admin.serve(admin_listener));
    if let Some(socket) = &args.workload_api_socket {
        let listener = workload_api::listen(socket)?;
        tokio::spawn(workload_api::serve(listener, args.host_proc.clone(), ctx.clone(), admin_enrolled.clone()));
    }

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
    let mut state_check = tokio::time::interval(RECHECK_INTERVAL);
    // Checked at once (the first tick); a failure then is reported.
    metrics.state_dir_writable.set(1);
    let mut waiting_adds = tokio::time::interval(ADD_SETTLE_INTERVAL);
    tracing::info!(%node, enrolled = enrolments.enrolled(), "agent ready");

    let mut taken_over = None;
    loop {
        tokio::select! {
            update = updates.next() => {
                let Some(Update { snapshot, errors }) = update else {
                    bail!("the configuration watcher stopped");
                };
                log_errors(&errors);
                metrics.config_errors.set(errors.len() as i64);
                warn_policies(&snapshot, &args.trust_domain, &mut policy_warnings);
                let state = State::new(snapshot, &args.trust_domain);
                follow_federations(&state);
                state_tx.send_replace(Arc::new(state));
                apply(&mut enrolments, &mut cluster).await;
                tracing::info!(enrolled = enrolments.enrolled(), errors = errors.len(), "configuration applied");
            }
            _ = retry.tick() => apply(&mut enrolments, &mut cluster).await,
            _ = state_check.tick() => check_state_dir(&args.state_dir, &metrics),
            Some(call) = next_cni_call(&mut cluster) => {
                let state = state_rx.borrow().clone();
                let cluster = cluster.as_mut().expect("calls come only in Kubernetes mode");
                cluster.receive(call, &state, &enrolments);
                // Answers a CNI ADD for a pod the source will not change (its netns was already known).
                cluster.settle(&state, &enrolments);
            }
            _ = waiting_adds.tick(), if cluster.as_ref().is_some_and(Cluster::has_waiting) => {
                let state = state_rx.borrow().clone();
                cluster.as_mut().expect("checked").settle(&state, &enrolments);
            }
            _ = recheck.tick(), if cluster.is_some() => {
                let state = state_rx.borrow().clone();
                // A change reaches the state through the source, as an update.
                cluster.as_mut().expect("checked").rescan(&state);
            }
            Some(request) = handoff_rx.recv() => match request {
                handoff::Request::Listeners(reply) => {
                    let _ = reply.send(enrolments.listener_fds());
                }
                handoff::Request::TakeOver(stopped) => {
                    taken_over = Some(stopped);
                    break;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    match taken_over {
        Some(stopped) => {
            enrolments.stop_accepting().await;
            admin.abort();
            let _ = stopped.send(());
            drain(&ctx, args.drain_timeout, &mut sigterm).await;
        }
        None => stop_capture(args.kubernetes, &args.daemonset, &args.bpf_dir).await,
    }
    let counters: Vec<String> = capture_counters.read().iter().map(|(name, value)| format!("{name}={value}")).collect();
    tracing::info!(counters = %counters.join(" "), "kernel capture counters");
    let counters: Vec<String> = ctx.counters().iter().map(|(name, value)| format!("{name}={value}")).collect();
    tracing::info!(counters = %counters.join(" "), "proxy counters");
    tracing::info!("agent stopped");
    Ok(())
}

/// A stop with no agent taking over: the capture stays in place, so
/// enrolled pods' connections fail until the next agent is ready, unless
/// ambit is being uninstalled (Kubernetes mode: the DaemonSet is going).
async fn stop_capture(kubernetes: bool, daemonset: &str, bpf_dir: &std::path::Path) {
    if kubernetes && let Ok((namespace, name)) = namespaced_name("--daemonset", daemonset) {
        match daemonset_fate(namespace, name).await {
            DaemonSetFate::Deleted(why) => {
                return match bpffs::remove(bpf_dir) {
                    Ok(()) => tracing::info!(
                        why,
                        "ambit is being uninstalled: the capture is removed, and pods' traffic flows directly"
                    ),
                    Err(error) => {
                        tracing::error!(why, %error, bpf_dir = %bpf_dir.display(), "ambit is being uninstalled, but the capture cannot be removed; run `ambit-agent uninstall` on the node")
                    }
                };
            }
            DaemonSetFate::Unknown(error) => {
                tracing::warn!(%error, "cannot tell whether the DaemonSet is being deleted; the capture stays");
            }
            DaemonSetFate::Stays => {}
        }
    }
    tracing::info!(
        "shutting down; the capture stays in place, so enrolled pods' connections fail until the next agent is ready (`ambit-agent uninstall` removes it)"
    );
}

/// After a handoff: GOAWAY to the peers' HBONE connections, then waits for
/// the open connections to end, up to `timeout`; those still open then are
/// reset when the agent exits, and counted in the log.
async fn drain(ctx: &ProxyContext, timeout: Duration, sigterm: &mut tokio::signal::unix::Signal) {
    ctx.draining.send_replace(true);
    tracing::info!(open = ctx.workers.in_flight(), ?timeout, "another agent took over; draining the open connections");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut progress = tokio::time::interval(DRAIN_PROGRESS);
    loop {
        let open = ctx.workers.in_flight();
        if open == 0 {
            return tracing::info!("drained: every connection has ended");
        }
        if tokio::time::Instant::now() >= deadline {
            return tracing::warn!(reset = open, "the drain deadline passed; resetting the connections still open");
        }
        tokio::select! {
            _ = tokio::time::sleep(DRAIN_POLL) => {}
            _ = progress.tick() => tracing::info!(open, "draining"),
            _ = sigterm.recv() => tracing::info!(open, "SIGTERM while draining: exiting once the connections end or at the drain deadline"),
        }
    }
}

/// The admin endpoint's listener. SO_REUSEPORT lets the agent of a rolling
/// update start (and report ready) while the one it replaces still runs.
fn admin_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// The CNI plugin's next request, in Kubernetes mode; never otherwise.
async fn next_cni_call(cluster: &mut Option<Cluster>) -> Option<CniCall> {
    match cluster {
        Some(cluster) => cluster.next_call().await,
        None => std::future::pending().await,
    }
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
