//! The per-pod proxies. Each enrolled pod has listeners inside its own netns:
//! [`outbound`] takes connections the pod's apps make, [`inbound`] takes
//! plaintext connections made to the pod, and [`hbone`] takes mTLS tunnels
//! from other pods' agents. Bytes move through `ambit_hbone::relay`: `relay`
//! (TCP to TCP) or `bridge` (TCP to an HTTP/2 stream); between two pods of
//! this node, [`local`] checks and joins them itself.

pub mod hbone;
pub mod inbound;
pub mod local;
pub mod outbound;
pub mod workers;

use std::{
    future::Future,
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use ambit_abi::DeliveryKey;

use ambit_authz::{Connection, Decision, RuleRef};
use ambit_hbone::HbonePool;
use ambit_identity::{
    Identity, Svid,
    manager::CertManager,
    tls::{self, TrustStore},
};
use ambit_runtime::{
    listener::accept_next,
    logging::WarnLimiter,
    metrics::{ConnectionLabels, DirectionLabels, Metrics},
};
use ambit_state::State;

use crate::{
    capture::{DeliveryTable, OrigDstTable},
    netns::{DeliveryRouting, Netns},
};

/// Port of the outbound listener, on 127.0.0.1 and ::1 inside each pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the plaintext inbound listener, on the wildcard address in each pod.
pub use ambit_abi::INBOUND_PORT;
/// How long a connection waits for its pod's certificate when there is no
/// valid one yet, before it fails.
const CERTIFICATE_WAIT: Duration = Duration::from_secs(5);
/// How long to wait for the destination to accept before failing the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every proxy task shares.
pub struct ProxyContext {
    pub orig_dst: OrigDstTable,
    pub deliveries: DeliveryTable,
    pub state: watch::Receiver<Arc<State>>,
    pub trust: TrustStore,
    pub certs: CertManager,
    pub pool: HbonePool,
    /// Round-robin position over service endpoints.
    pub next_endpoint: AtomicUsize,
    pub stats: Stats,
    pub metrics: Arc<Metrics>,
    /// Where accepted connections run.
    pub workers: workers::Workers,
    /// Rate limit for the warnings any peer can trigger (refused plaintext,
    /// refused HBONE).
    pub warnings: WarnLimiter,
    /// True once another agent has taken over: HBONE connections from
    /// peers get GOAWAY, so their next streams go to the new agent.
    pub draining: watch::Sender<bool>,
    /// How connections between two pods of this node go.
    pub same_node: local::SameNode,
    /// This node's enrolled pods, for [`local`].
    pub local_pods: local::LocalPods,
}

/// Counters the agent reports (in its log on shutdown; as metrics later).
#[derive(Default)]
pub struct Stats {
    /// Plaintext inbound connections admitted: PERMISSIVE or DISABLE, and
    /// allowed by authorization.
    pub plaintext_accepted: AtomicU64,
    /// Plaintext inbound connections reset by STRICT.
    pub plaintext_rejected: AtomicU64,
    /// HBONE connections refused (TLS failure, identity mismatch).
    pub mtls_rejected: AtomicU64,
    /// Outbound connections to destinations outside the mesh (plain TCP).
    pub passthrough: AtomicU64,
}

impl ProxyContext {
    /// Counter values, for the shutdown report.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let handshakes = self
            .metrics
            .tls_handshakes
            .get_or_create(&DirectionLabels { direction: "outbound".into(), result: "ok".into() })
            .get();
        vec![
            ("hbone_handshakes", handshakes),
            ("hbone_streams", self.metrics.hbone_streams.get()),
            ("mtls_rejected", load(&self.stats.mtls_rejected)),
            ("passthrough", load(&self.stats.passthrough)),
            ("plaintext_accepted", load(&self.stats.plaintext_accepted)),
            ("plaintext_rejected", load(&self.stats.plaintext_rejected)),
        ]
    }

    fn workload_at(&self, ip: IpAddr) -> Option<String> {
        self.state.borrow().workload_at(ip).map(str::to_string)
    }

    /// Resolves, with the reason, once a configuration change means the
    /// open connection `conn` to pod `pod_id` would no longer be allowed:
    /// revoking access cuts open connections too, not only new ones.
    async fn revoked(&self, pod_id: &str, conn: &Connection) -> String {
        let mut state = self.state.clone();
        loop {
            if state.changed().await.is_err() {
                // The agent is shutting down; the connection ends with it.
                return std::future::pending().await;
            }
            let decision = state.borrow_and_update().authorize(pod_id, conn);
            if !decision.allows() {
                return decision.reason.to_string();
            }
        }
    }

    /// Authorizes a new inbound connection to `pod` against the policies in
    /// force now, records the outcome in `log` and the metrics, and says
    /// whether it may go on.
    fn authorize(&self, pod: &PodContext, conn: &Connection, log: &mut ConnectionLog) -> bool {
        let Decision { reason, audited, dry_run } = self.state.borrow().authorize(&pod.id, conn);
        let policy_of = |rule: Option<&RuleRef>| rule.map(|r| r.policy.clone()).unwrap_or("-".into());
        let allowed = reason.allows();
        self.metrics.authorization(if allowed { "allow" } else { "deny" }, reason.kind(), &policy_of(reason.rule()));
        for rule in &audited {
            self.metrics.authorization("audit", "audit_policy", &rule.policy);
        }
        if let Some(shadow) = &dry_run {
            let would = if shadow.allows() { "dry_run_allow" } else { "dry_run_deny" };
            self.metrics.authorization(would, shadow.kind(), &policy_of(shadow.rule()));
            log.dry_run = Some(shadow.to_string());
        }
        log.policy = reason.rule().map(ToString::to_string);
        log.audit =
            (!audited.is_empty()).then(|| audited.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "));
        if !allowed {
            log.flag = Flag::Denied;
            log.denial = Some(reason.to_string());
        }
        allowed
    }
}

/// An enrolled pod, as its proxies see it.
pub struct PodContext {
    /// `namespace/name`.
    pub id: String,
    pub netns: Netns,
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
    pub identity: Identity,
    /// The pod identity's current SVID, kept fresh by the certificate manager.
    pub svid: watch::Receiver<Option<Arc<Svid>>>,
    /// Server TLS configuration for the current SVID, rebuilt on rotation.
    server_tls: Mutex<Option<(String, Arc<rustls::ServerConfig>)>>,
    /// The serial of the SVID last found trusted, and the trust store's
    /// version then ([`local`]: checked once per certificate and bundle).
    trusted: Mutex<Option<(String, u64)>>,
    /// The pod's routing for deliveries from the client's address, set up
    /// once, at enrolment or first use; `None` if that failed.
    delivery_routing: tokio::sync::OnceCell<Option<DeliveryRouting>>,
    /// The cleanup of this pod's previous enrolment, if it may still run:
    /// the setup waits for it, or it would undo the new routing.
    previous_cleanup: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl PodContext {
    pub fn new(
        id: String,
        netns: Netns,
        netns_cookie: u64,
        ips: Vec<IpAddr>,
        identity: Identity,
        svid: watch::Receiver<Option<Arc<Svid>>>,
        previous_cleanup: Option<tokio::task::JoinHandle<()>>,
    ) -> Self {
        Self {
            id,
            netns,
            netns_cookie,
            ips,
            identity,
            svid,
            server_tls: Mutex::new(None),
            trusted: Mutex::new(None),
            delivery_routing: tokio::sync::OnceCell::new(),
            previous_cleanup: Mutex::new(previous_cleanup),
        }
    }

    /// A valid SVID: the current one, or the first to arrive within
    /// [`CERTIFICATE_WAIT`] (the pod was just enrolled, or this agent just
    /// took over from another and is still fetching its certificates).
    pub async fn svid(&self) -> Option<Arc<Svid>> {
        let valid =
            |svid: &Option<Arc<Svid>>| svid.as_ref().is_some_and(|s| s.is_valid_at(std::time::SystemTime::now()));
        let mut svid = self.svid.clone();
        let arrived = tokio::time::timeout(CERTIFICATE_WAIT, svid.wait_for(valid)).await;
        arrived.ok()?.ok().and_then(|svid| svid.clone())
    }

    /// The HBONE server configuration for `svid`.
    fn server_tls(&self, svid: &Svid, trust: &TrustStore) -> Option<Arc<rustls::ServerConfig>> {
        let mut cached = self.server_tls.lock().expect("server tls lock");
        if let Some((_, config)) = cached.as_ref().filter(|(serial, _)| *serial == svid.serial) {
            return Some(config.clone());
        }
        let config = match tls::server_config(svid, trust) {
            Ok(config) => Arc::new(config),
            Err(e) => {
                tracing::error!(pod = %self.id, error = %e, "cannot build the mTLS server configuration");
                return None;
            }
        };
        *cached = Some((svid.serial.clone(), config.clone()));
        Some(config)
    }

    /// Connects from inside the pod's netns, as the agent (marked socket).
    async fn connect(&self, dst: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        connect_within_timeout(self.netns.tcp_socket(dst)?, dst).await
    }

    /// Connects to an app of this pod, `dst`, for a client at `client`:
    /// from the client's own address, so the app sees who called and
    /// the tuples differ per client; otherwise from the pod's address.
    /// While it connects, `deliveries` tells `ambit_sk_lookup` to let it
    /// through to the app.
    async fn deliver(
        &self,
        deliveries: &DeliveryTable,
        client: IpAddr,
        dst: SocketAddr,
    ) -> std::io::Result<tokio::net::TcpStream> {
        // A client of the other family (or the pod itself) is delivered
        // from the pod's own address.
        if client.is_ipv4() != dst.is_ipv4() || self.ips.contains(&client) {
            return self.connect(dst).await;
        }
        let Some(routing) = self.route_deliveries().await else { return self.connect(dst).await };
        if client.is_ipv6() && !routing.routes_ipv6() {
            return self.connect(dst).await;
        }
        // A port can be taken: by a listener (bind), or by a live or recent
        // delivery with the same tuple (connect). Then the next one is tried.
        for _ in 0..DELIVERY_PORT_ATTEMPTS {
            let from = SocketAddr::new(client, routing.next_port());
            let socket = match self.netns.delivery_socket(from) {
                Err(e) if e.kind() == ErrorKind::AddrInUse => {
                    routing.skip_run();
                    continue;
                }
                other => other?,
            };
            let key = DeliveryKey { client: from.into(), app: dst.into() };
            deliveries.begin(key)?;
            let result = connect_within_timeout(socket, dst).await;
            deliveries.end(&key);
            match result {
                Err(e) if e.kind() == ErrorKind::AddrNotAvailable => routing.skip_run(),
                other => return other,
            }
        }
        Err(std::io::Error::new(
            ErrorKind::AddrNotAvailable,
            format!("no free port for a delivery from {client} after {DELIVERY_PORT_ATTEMPTS} tries"),
        ))
    }

    /// Sets up (once) the pod's routing for deliveries from clients'
    /// addresses. Without it, apps see connections from their pod's address.
    pub async fn route_deliveries(&self) -> Option<&DeliveryRouting> {
        self.delivery_routing
            .get_or_init(|| async {
                let previous = self.previous_cleanup.lock().expect("previous cleanup lock").take();
                if let Some(previous) = previous {
                    let _ = previous.await;
                }
                match self.netns.route_deliveries().await {
                    Ok(routing) => Some(routing),
                    Err(error) => {
                        tracing::warn!(pod = %self.id, %error, "cannot route deliveries back to the agent in this pod; its apps see connections from the pod's own address");
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    /// Undoes [`PodContext::route_deliveries`] when the pod leaves the mesh.
    pub async fn unroute_deliveries(&self) {
        // Waits for a setup still running, so nothing is left behind.
        if let Some(routing) = self.route_deliveries().await
            && let Err(error) = self.netns.unroute_deliveries(routing).await
        {
            tracing::warn!(pod = %self.id, %error, "cannot remove the delivery routing from this pod");
        }
    }
}

/// How many ports [`PodContext::deliver`] tries before it gives up.
const DELIVERY_PORT_ATTEMPTS: usize = 16;

async fn connect_within_timeout(
    socket: tokio::net::TcpSocket,
    dst: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")),
    }
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Outbound,
    Inbound,
}

/// How a connection ended, for `response_flags` and the log's `decision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flag {
    /// Carried to its end (or failed after it was established).
    None,
    /// Refused by policy (PeerAuthentication STRICT; authorization later).
    Denied,
    /// The destination could not be reached.
    ConnectFailure,
}

/// One access-log line and one set of metrics per connection.
struct ConnectionLog {
    metrics: Arc<Metrics>,
    direction: Direction,
    src_workload: Option<String>,
    src_addr: SocketAddr,
    dst_workload: Option<String>,
    /// The service whose virtual IP the app dialled, if it dialled one.
    dst_service: Option<String>,
    dst_addr: SocketAddr,
    started: Instant,
    /// Whether the hop was carried over mTLS (HBONE).
    mtls: bool,
    /// Verified or own SPIFFE IDs; `None` for a plaintext peer.
    src_identity: Option<String>,
    dst_identity: Option<String>,
    flag: Flag,
    /// The metric labels the connection was counted as opened with; it is
    /// counted as closed with the same ones, so that opened minus closed
    /// is what is open even when a policy change cuts it later.
    opened: Option<ConnectionLabels>,
    /// The policy rule that decided (`namespace/name rule N`).
    policy: Option<String>,
    /// AUDIT rules that matched.
    audit: Option<String>,
    /// The outcome with dry-run policies enforced, when any apply.
    dry_run: Option<String>,
    /// Why authorization denied the connection.
    denial: Option<String>,
    /// How many lines like this one the rate limit left out before it.
    suppressed: Option<u64>,
    /// The rate limit leaves this line out: metrics only.
    quiet: bool,
    /// Same-node connections: `kernel` or `relay` ([`local`]).
    fast_path: Option<&'static str>,
}

impl ConnectionLog {
    fn new(ctx: &ProxyContext, direction: Direction, src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        Self {
            metrics: ctx.metrics.clone(),
            direction,
            src_workload: None,
            src_addr,
            dst_workload: None,
            dst_service: None,
            dst_addr,
            started: Instant::now(),
            mtls: false,
            src_identity: None,
            dst_identity: None,
            flag: Flag::None,
            opened: None,
            policy: None,
            audit: None,
            dry_run: None,
            denial: None,
            suppressed: None,
            quiet: false,
            fast_path: None,
        }
    }

    /// Applies the warning rate limit to this failed connection's line.
    fn rate_limit(&mut self, warnings: &WarnLimiter, name: &str, reason: &str) {
        self.suppressed = warnings.admit(self.src_addr.ip(), name, reason);
        self.quiet = self.suppressed.is_none();
    }

    fn labels(&self) -> ConnectionLabels {
        let split = |workload: &Option<String>| match workload.as_deref().and_then(|w| w.split_once('/')) {
            Some((ns, name)) => (name.to_string(), ns.to_string()),
            None => ("unknown".to_string(), "unknown".to_string()),
        };
        let (source_workload, source_workload_namespace) = split(&self.src_workload);
        let (destination_workload, destination_workload_namespace) = split(&self.dst_workload);
        ConnectionLabels {
            reporter: match self.direction {
                Direction::Outbound => "source".into(),
                Direction::Inbound => "destination".into(),
            },
            source_workload,
            source_workload_namespace,
            source_principal: self.src_identity.clone().unwrap_or_else(|| "unknown".into()),
            destination_workload,
            destination_workload_namespace,
            destination_principal: self.dst_identity.clone().unwrap_or_else(|| "unknown".into()),
            destination_service: self.dst_service.clone().unwrap_or_else(|| "unknown".into()),
            connection_security_policy: if self.mtls { "mutual_tls" } else { "none" }.into(),
            response_flags: match self.flag {
                Flag::None => "-",
                Flag::Denied => "DENIED",
                Flag::ConnectFailure => "CONNECT_FAILURE",
            }
            .into(),
        }
    }

    /// The connection reached its destination: count it as opened now.
    fn opened(&mut self) -> &ConnectionLabels {
        if self.opened.is_none() {
            let labels = self.labels();
            self.metrics.connections_opened.get_or_create(&labels).inc();
            self.opened = Some(labels);
        }
        self.opened.as_ref().expect("set just above")
    }

    /// `sent`: bytes from the source to the destination; `received`: back.
    fn finish(&mut self, sent: u64, received: u64, error: Option<&dyn std::fmt::Display>) {
        let labels = self.opened().clone();
        self.metrics.connections_closed.get_or_create(&labels).inc();
        self.metrics.sent_bytes.get_or_create(&labels).inc_by(sent);
        self.metrics.received_bytes.get_or_create(&labels).inc_by(received);
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let direction = match self.direction {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        };
        let decision = match (self.flag, error) {
            (Flag::Denied, _) => "deny",
            (Flag::ConnectFailure, _) => "connect_failure",
            (Flag::None, Some(_)) => "allow_error",
            (Flag::None, None) => "allow",
        };
        let src_workload = self.src_workload.as_deref().unwrap_or("-");
        let dst_workload = self.dst_workload.as_deref().unwrap_or("-");
        let dst_service = self.dst_service.as_deref().unwrap_or("-");
        let src_identity = self.src_identity.as_deref().unwrap_or("-");
        let dst_identity = self.dst_identity.as_deref().unwrap_or("-");
        let mtls = self.mtls;
        let policy = self.policy.as_deref().unwrap_or("-");
        let audit = self.audit.as_deref().unwrap_or("-");
        let dry_run = self.dry_run.as_deref().unwrap_or("-");
        let fast_path = self.fast_path.unwrap_or("-");
        let error = error.map(ToString::to_string).or_else(|| self.denial.clone());
        if self.quiet {
            return;
        }
        let suppressed = self.suppressed.filter(|n| *n > 0);
        match error {
            None => tracing::info!(
                target: "ambit::conn",
                direction,
                src_workload,
                src_addr = %self.src_addr,
                dst_workload,
                dst_service,
                dst_addr = %self.dst_addr,
                src_identity,
                dst_identity,
                mtls,
                bytes_sent = sent,
                bytes_received = received,
                duration_ms,
                decision,
                policy,
                audit,
                dry_run,
                fast_path,
                "connection closed"
            ),
            Some(error) => tracing::warn!(
                target: "ambit::conn",
                direction,
                src_workload,
                src_addr = %self.src_addr,
                dst_workload,
                dst_service,
                dst_addr = %self.dst_addr,
                src_identity,
                dst_identity,
                mtls,
                bytes_sent = sent,
                bytes_received = received,
                duration_ms,
                decision,
                policy,
                audit,
                dry_run,
                fast_path,
                error = %error,
                suppressed,
                "connection failed"
            ),
        }
    }
}

/// Accepts connections on one of a pod's listeners, in a task on a proxy
/// worker, for as long as the pod is enrolled (until the task is aborted);
/// each connection is handled in a task of its own
/// ([`workers::Workers::dispatch`] picks the worker).
pub fn serve<F, Fut>(
    listener: std::net::TcpListener,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
    handle: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(TcpStream, SocketAddr, Arc<PodContext>, Arc<ProxyContext>) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let workers = &ctx.workers;
    let ctx = ctx.clone();
    workers.spawn(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                return tracing::error!(pod = %pod.id, %error, "a proxy worker cannot take a listener; not served");
            }
        };
        loop {
            let (stream, peer) = accept_next(&listener, &pod.id).await;
            // Small writes (HTTP/2 frames, request/response apps) must not
            // wait for ACKs: Nagle off on every proxied socket.
            let _ = stream.set_nodelay(true);
            let (pod, for_task) = (pod.clone(), ctx.clone());
            ctx.workers.dispatch(stream, move |stream| handle(stream, peer, pod, for_task));
        }
    })
}
