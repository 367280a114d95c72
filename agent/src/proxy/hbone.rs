//! HBONE: a TCP connection carried as an HTTP/2 CONNECT stream over mutual
//! TLS, to the destination pod's port 15008, wire-compatible with Istio's
//! ztunnel: TLS 1.3, ALPN `h2`, `:authority` = the original destination
//! `ip:port`, a `forwarded: for=<source ip>` header, and each side's
//! identity in its X.509-SVID's URI SAN.
//!
//! [`serve`] is the destination side (one listener per pod IP); [`HbonePool`]
//! is the source side, which keeps HTTP/2 connections per (source pod and
//! identity, destination, expected destination identity) so most new
//! streams cost no TLS handshake.

use std::{
    collections::HashMap,
    future::{Future, poll_fn},
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{Method, Request, Response, StatusCode};
use rustls::pki_types::ServerName;
use spiffe::SpiffeId;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{
    ConnectionLog, Direction, Flag, INBOUND_PORT, OUTBOUND_PORT, PodContext, ProxyContext,
    relay::{self, RelayOutcome},
};
use crate::{
    authz::{Connection, Peer},
    identity::{Identity, Svid},
    metrics::Metrics,
    tls::{self, TrustBundle},
};

pub use ambit_common::HBONE_PORT;

/// HTTP/2 flow-control windows: far above the bandwidth-delay product of a
/// node-to-node link (10 Gbit/s x 100 µs is 125 KB), so a bulk stream is
/// never window-bound, yet small enough to bound what a slow reader makes
/// the agent buffer.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// Streams share one TLS connection up to this many; past it a new
/// connection opens. Cores are spread by the proxy workers (each has its
/// own pooled connections), so sharing is bounded only to keep one busy
/// TCP connection from queueing too many streams behind each other; more
/// sharing means fewer TLS records and system calls per request.
const MAX_STREAMS_PER_CONNECTION: usize = 16;
/// Bytes read from a TCP socket per HTTP/2 DATA frame at most.
const READ_CHUNK: usize = 128 * 1024;
/// A pooled connection that carries no stream for this long (up to twice
/// this long) is closed.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the mTLS and HTTP/2 handshakes may take, on either side. A peer
/// that accepts TCP and then says nothing (a frozen agent, a scanner) must
/// not hold a connection, a task or the pool's turn to dial for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a CONNECT waits for its answer: longer than the destination's
/// own connect to the app (10 s), so that its 503 arrives first.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// TCP keepalive on HBONE connections: probed after this long without
/// traffic, then every [`KEEPALIVE_INTERVAL`], and closed after
/// [`KEEPALIVE_PROBES`] unanswered probes. A connection whose peer vanished
/// (a node gone without a FIN) would otherwise hold its streams, and the
/// connections to the apps behind them, for ever.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 5;
/// Streams a peer may have open at once on one inbound connection; each
/// is a task and a connection to the app. Sources in this mesh open at
/// most [`MAX_STREAMS_PER_CONNECTION`].
const MAX_INBOUND_STREAMS: u32 = 100;

/// The destination side: mTLS from other tunnels, on one pod IP's port 15008.
pub async fn connection(tcp: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    let reject = |reason: &dyn std::fmt::Display| {
        ctx.stats.mtls_rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            target: "ambit::conn",
            direction = "inbound",
            src_addr = %peer,
            dst_workload = %pod.id,
            mtls = true,
            error = %reason,
            "HBONE connection rejected"
        );
    };
    let Some(config) = pod.server_tls(&ctx.bundle) else {
        reject(&format_args!("no certificate for {} yet", pod.identity));
        relay::reset(&tcp);
        return;
    };
    let owner = ctx.state.borrow().identity_at(peer.ip());
    let Accepted { mut conn, peer_id, serial } =
        match accept(tcp, peer, owner, config, &ctx.bundle.trust_domain, &ctx.metrics).await {
            Ok(accepted) => accepted,
            Err(reason) => return reject(&reason),
        };
    tracing::info!(
        target: "ambit::conn",
        src_addr = %peer,
        dst_workload = %pod.id,
        src_identity = %peer_id,
        peer_serial = %serial,
        "mTLS connection accepted"
    );
    while let Some(Ok((request, respond))) = conn.accept().await {
        // A stream is work on this worker, like a connection: counted, it
        // steers the next connections to less busy workers.
        let stream = stream(request, respond, peer_id.clone(), peer, pod.clone(), ctx.clone());
        tokio::spawn(ctx.workers.count_stream().around(stream));
    }
}

/// An inbound HBONE connection past its handshakes.
pub struct Accepted {
    pub conn: h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>,
    /// The peer's verified SPIFFE ID.
    pub peer_id: SpiffeId,
    /// Serial of the peer's leaf certificate, hex.
    pub serial: String,
}

/// The server half of an HBONE handshake from `peer`: mTLS with `config`
/// (which requires and SPIFFE-verifies a client certificate), counted in
/// the handshake metrics, then HTTP/2 with the tunnel's windows and frame
/// size, all within [`HANDSHAKE_TIMEOUT`]. `owner` is the identity of the
/// pod at the peer's address, if it is one: connections leave from inside
/// the source pod, so a certificate presented from a known pod's address
/// must be that pod's (a stolen key does not work from elsewhere). Returns
/// why the peer was refused otherwise.
pub async fn accept(
    tcp: TcpStream,
    peer: SocketAddr,
    owner: Option<Identity>,
    config: Arc<rustls::ServerConfig>,
    trust_domain: &str,
    metrics: &Metrics,
) -> Result<Accepted, String> {
    keep_alive(&tcp);
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let timed_out = |what: &str| format!("no {what} within {HANDSHAKE_TIMEOUT:?} of connecting; closed");
    let tls = tokio::time::timeout_at(deadline, TlsAcceptor::from(config).accept(tcp)).await;
    metrics.handshake("inbound", matches!(tls, Ok(Ok(_))));
    let tls = tls.map_err(|_| timed_out("mTLS handshake"))?.map_err(|e| format!("mTLS handshake failed: {e}"))?;
    let peer_certs = tls.get_ref().1.peer_certificates();
    let peer_id = tls::peer_identity(peer_certs, trust_domain).map_err(|e| e.to_string())?;
    if let Some(owner) = owner.filter(|owner| owner.spiffe_id() != peer_id) {
        return Err(format!("{peer_id} presented from {}, the address of a pod running as {owner}", peer.ip()));
    }
    let serial = peer_certs.and_then(|c| c.first()).map(leaf_serial).unwrap_or_default();
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_INBOUND_STREAMS)
        .handshake::<_, Bytes>(tls);
    let conn = tokio::time::timeout_at(deadline, handshake)
        .await
        .map_err(|_| timed_out("HTTP/2 preface"))?
        .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
    Ok(Accepted { conn, peer_id, serial })
}

async fn stream(
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer_id: SpiffeId,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) {
    let authority = request.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok());
    // The original source, as the source tunnel reports it, if the peer's
    // identity backs it (`State::source_of`); the TLS peer address is the
    // same pod's IP with another port.
    let src_addr = ctx.state.borrow().source_of(peer, forwarded_for(&request), &peer_id);
    let dst_addr = authority.unwrap_or_else(|| SocketAddr::new(peer.ip(), 0));
    let mut log = ConnectionLog::new(&ctx, Direction::Inbound, src_addr, dst_addr);
    log.src_workload = ctx.workload_at(src_addr.ip());
    log.dst_workload = Some(pod.id.clone());
    log.mtls = true;
    log.src_identity = Some(peer_id.to_string());
    log.dst_identity = Some(pod.identity.to_string());
    let refuse = |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode| {
        let response = Response::builder().status(status).body(()).expect("valid response");
        let _ = respond.send_response(response, true);
    };
    if request.method() != Method::CONNECT {
        refuse(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        return log.finish(0, 0, Some(&format_args!("HBONE expects CONNECT, got {}", request.method())));
    }
    let Some(dst) = authority else {
        refuse(&mut respond, StatusCode::BAD_REQUEST);
        return log.finish(0, 0, Some(&"CONNECT authority is not ip:port"));
    };
    if !pod.ips.contains(&dst.ip()) || [HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT].contains(&dst.port()) {
        refuse(&mut respond, StatusCode::BAD_REQUEST);
        return log.finish(0, 0, Some(&format_args!("{dst} is not an application address of this pod")));
    }
    log.dst_addr = dst;
    // ipBlocks and source.ip match the TCP peer, whose address was checked
    // against the identity above, never the `forwarded` header it sent.
    let conn = Connection {
        peer: Some(Peer::from_spiffe_id(&peer_id)),
        src_ip: Some(peer.ip()),
        dst_ip: Some(dst.ip()),
        dst_port: Some(dst.port()),
        request: None,
    };
    if !ctx.authorize(&pod, &conn, &mut log) {
        refuse(&mut respond, StatusCode::UNAUTHORIZED);
        return log.finish(0, 0, None);
    }
    let app = match pod.deliver(&ctx.deliveries, peer.ip(), dst).await {
        Ok(app) => app,
        Err(e) => {
            refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            log.flag = Flag::ConnectFailure;
            return log.finish(0, 0, Some(&format_args!("deliver to {dst}: {e}")));
        }
    };
    log.opened();
    let response = Response::builder().status(StatusCode::OK).body(()).expect("valid response");
    let send = match respond.send_response(response, false) {
        Ok(send) => send,
        Err(e) => return log.finish(0, 0, Some(&e)),
    };
    let outcome = bridge(app, send, request.into_body(), ctx.revoked(&pod.id, &conn)).await;
    if outcome.revoked() {
        log.flag = Flag::Denied;
    }
    // The tunnel is the source here: what it sends to the app came from the client.
    log.finish(outcome.b_to_a, outcome.a_to_b, outcome.error.as_ref().map(|e| e as _));
}

/// Turns on TCP keepalive (see [`KEEPALIVE_IDLE`]) for an HBONE connection.
fn keep_alive(tcp: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(error) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        tracing::warn!(%error, "cannot turn on TCP keepalive for an HBONE connection");
    }
}

/// Serial number of a certificate, hex, as `Svid::serial` spells it.
fn leaf_serial(cert: &rustls::pki_types::CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .map(|(_, c)| c.raw_serial_as_string().replace(':', ""))
        .unwrap_or_default()
}

fn forwarded_for(request: &Request<RecvStream>) -> Option<IpAddr> {
    let value = request.headers().get("forwarded")?.to_str().ok()?;
    value.split(';').find_map(|part| part.trim().strip_prefix("for=")).and_then(|ip| ip.trim_matches('"').parse().ok())
}

/// Copies between a TCP connection and an HTTP/2 stream. `a_to_b` counts
/// TCP to stream, `b_to_a` stream to TCP. End of stream travels as a
/// half-close each way; an error on either side, or `stop` resolving,
/// resets both.
pub async fn bridge(
    mut tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    stop: impl Future<Output = String>,
) -> RelayOutcome {
    let (mut tcp_read, mut tcp_write) = tcp.split();
    let mut up = 0u64;
    let mut down = 0u64;
    let upstream = async {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buf.reserve(READ_CHUNK);
            if tcp_read.read_buf(&mut buf).await? == 0 {
                send.send_data(Bytes::new(), true).map_err(io::Error::other)?;
                return Ok::<_, io::Error>(());
            }
            let mut chunk = buf.split().freeze();
            up += chunk.len() as u64;
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(granted) => granted.map_err(io::Error::other)?,
                    None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed")),
                };
                if granted > 0 {
                    send.send_data(chunk.split_to(granted.min(chunk.len())), false).map_err(io::Error::other)?;
                }
            }
        }
    };
    let downstream = async {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(io::Error::other)?;
            tcp_write.write_all(&chunk).await?;
            down += chunk.len() as u64;
            let _ = recv.flow_control().release_capacity(chunk.len());
        }
        tcp_write.shutdown().await
    };
    let error = tokio::select! {
        result = async { tokio::try_join!(upstream, downstream) } => result.err(),
        reason = stop => Some(relay::revoked(reason)),
    };
    if error.is_some() {
        relay::reset(&tcp);
        send.send_reset(h2::Reason::CANCEL);
    }
    RelayOutcome { a_to_b: up, b_to_a: down, error }
}

/// Why an outbound HBONE stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("mTLS with {dst} (expecting {expected}) failed: {reason}")]
    Tls { dst: SocketAddr, expected: String, reason: String },
    #[error("HTTP/2 with {0}: {1}")]
    Http2(SocketAddr, h2::Error),
    #[error("{0} answered CONNECT with {1}")]
    Status(SocketAddr, StatusCode),
    #[error("the connection to {0} this stream waited for was not made: {1}")]
    SharedDial(SocketAddr, String),
    #[error(
        "{dst} accepted TCP but did not finish the mTLS and HTTP/2 handshakes within {HANDSHAKE_TIMEOUT:?}; \
         is the agent on its node running?"
    )]
    HandshakeTimeout { dst: SocketAddr },
    #[error("no valid certificate for {0} yet (not yet issued, or expired); the agent's log says why")]
    NoCertificate(Identity),
    #[error("the pod has no address of {0}'s family")]
    NoSourceAddress(SocketAddr),
    #[error(
        "{dst} did not answer CONNECT within {RESPONSE_TIMEOUT:?}; its connection left the pool, \
         the next stream dials anew"
    )]
    ResponseTimeout { dst: SocketAddr },
}

impl HboneError {
    /// The destination refused the stream by policy (401 or 403).
    pub fn is_denial(&self) -> bool {
        matches!(self, HboneError::Status(_, status) if [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(status))
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    /// The proxy worker whose tasks use the connection and drive it.
    worker: usize,
    /// The source pod (its netns is where the connection starts).
    src_pod: String,
    src_identity: Identity,
    dst: SocketAddr,
    expected: Identity,
}

struct Pooled {
    send: SendRequest<Bytes>,
    active: Arc<AtomicUsize>,
    /// Whether a stream was opened on it since the idle sweep last looked.
    used: Arc<AtomicBool>,
    /// Serial of the client certificate the connection was made with: a
    /// rotated certificate retires the connections made with the old one.
    serial: String,
}

/// Counts one open stream on a pooled connection.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where outbound HBONE connections start: a pod's network namespace (the
/// node agent, on the pod's behalf) or the process's own (a waypoint).
pub trait Dialer: Sync {
    /// Names the origin in the pool key: connections are never shared
    /// between origins.
    fn origin(&self) -> &str;
    fn dial(&self, dst: SocketAddr) -> impl Future<Output = io::Result<TcpStream>> + Send;
}

impl Dialer for PodContext {
    fn origin(&self) -> &str {
        &self.id
    }

    async fn dial(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        self.connect(dst).await
    }
}

/// Outbound HTTP/2 connections, reused across streams.
pub struct HbonePool {
    keys: Arc<Keys>,
    metrics: Arc<Metrics>,
}

type Keys = Mutex<HashMap<PoolKey, Arc<KeyPool>>>;

/// The connections of one pool key, and the turn to dial another.
#[derive(Default)]
struct KeyPool {
    conns: Mutex<Vec<Pooled>>,
    /// Held while a connection is dialled, so that streams opened together
    /// share one new connection (one TLS handshake, not one each). It keeps
    /// when and why the last dial failed: the streams that waited for that
    /// dial report its failure instead of each dialling again in turn.
    dial: tokio::sync::Mutex<Option<(Instant, String)>>,
}

/// Where an outbound HBONE stream goes.
pub struct HboneTarget {
    /// The destination pod's HBONE address (its IP, port 15008).
    pub hbone: SocketAddr,
    /// The identity the destination must prove.
    pub expected: Identity,
    /// The application address inside the destination pod (`:authority`).
    pub app: SocketAddr,
    /// The source pod's IP, sent as `forwarded: for=`.
    pub source_ip: IpAddr,
}

/// An open HBONE stream and the identity that answered it.
pub struct HboneStream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub guard: StreamGuard,
}

impl HbonePool {
    /// A pool that closes connections idle for `idle_timeout`; call it
    /// within a tokio runtime, which runs the idle sweep.
    pub fn new(metrics: Arc<Metrics>, idle_timeout: Duration) -> Self {
        let keys = Arc::new(Keys::default());
        tokio::spawn(release_idle(Arc::downgrade(&keys), idle_timeout));
        Self { keys, metrics }
    }

    /// Opens a CONNECT stream to `target.app` through `target.hbone`, as
    /// `svid`, accepting only a server that proves it is `target.expected`.
    pub async fn open(
        &self,
        from: &impl Dialer,
        svid: &Svid,
        bundle: &TrustBundle,
        target: &HboneTarget,
    ) -> Result<HboneStream, HboneError> {
        let HboneTarget { hbone: dst, expected, app: target, source_ip } = target;
        let (dst, target, source_ip) = (*dst, *target, *source_ip);
        let key = PoolKey {
            worker: super::workers::current(),
            src_pod: from.origin().to_string(),
            src_identity: svid.identity.clone(),
            dst,
            expected: expected.clone(),
        };
        let pool = self.key_pool(&key);
        let (mut send, active) = match pool.reuse(&svid.serial).await {
            Some(found) => {
                self.metrics.hbone_pool_reuse.inc();
                found
            }
            None => self.dial_once(&pool, &key, from, svid, bundle).await?,
        };
        active.fetch_add(1, Ordering::Relaxed);
        let guard = StreamGuard(active);
        self.metrics.hbone_streams.inc();
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header("forwarded", format!("for={source_ip}"))
            .body(())
            .expect("valid CONNECT request");
        let (response, send_stream) = send.send_request(request, false).map_err(|e| HboneError::Http2(dst, e))?;
        let response = match tokio::time::timeout(RESPONSE_TIMEOUT, response).await {
            Ok(response) => response.map_err(|e| HboneError::Http2(dst, e))?,
            Err(_) => {
                // Silent, not closed: without this, every stream that
                // reuses the connection would wait out the same timeout.
                pool.retire(&guard.0);
                return Err(HboneError::ResponseTimeout { dst });
            }
        };
        if response.status() != StatusCode::OK {
            return Err(HboneError::Status(dst, response.status()));
        }
        Ok(HboneStream { send: send_stream, recv: response.into_body(), guard })
    }

    /// The connections of `key`, made empty on first use (the key is
    /// cloned only then).
    fn key_pool(&self, key: &PoolKey) -> Arc<KeyPool> {
        let mut keys = self.keys.lock().expect("pool lock");
        match keys.get(key) {
            Some(pool) => pool.clone(),
            None => keys.entry(key.clone()).or_default().clone(),
        }
    }

    /// Drops the connections of a pod that left this node (open streams
    /// keep theirs until they end).
    pub fn forget_pod(&self, pod: &str) {
        self.keys.lock().expect("pool lock").retain(|key, _| key.src_pod != pod);
    }

    /// A connection for `key` with room for a stream: dialled by this call,
    /// or by the call it waited for.
    async fn dial_once(
        &self,
        pool: &KeyPool,
        key: &PoolKey,
        from: &impl Dialer,
        svid: &Svid,
        bundle: &TrustBundle,
    ) -> Result<(SendRequest<Bytes>, Arc<AtomicUsize>), HboneError> {
        let waiting_since = Instant::now();
        let mut last_failure = pool.dial.lock().await;
        if let Some(found) = pool.reuse(&svid.serial).await {
            self.metrics.hbone_pool_reuse.inc();
            return Ok(found);
        }
        if let Some((_, reason)) = last_failure.as_ref().filter(|(failed_at, _)| *failed_at >= waiting_since) {
            return Err(HboneError::SharedDial(key.dst, reason.clone()));
        }
        match self.dial(key, from, svid, bundle).await {
            Ok((send, active)) => {
                *last_failure = None;
                let used = Arc::new(AtomicBool::new(true));
                let pooled = Pooled { send: send.clone(), active: active.clone(), used, serial: svid.serial.clone() };
                pool.conns.lock().expect("pool lock").push(pooled);
                Ok((send, active))
            }
            Err(e) => {
                *last_failure = Some((Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    async fn dial(
        &self,
        key: &PoolKey,
        from: &impl Dialer,
        svid: &Svid,
        bundle: &TrustBundle,
    ) -> Result<(SendRequest<Bytes>, Arc<AtomicUsize>), HboneError> {
        let dst = key.dst;
        let tls_error = |reason: String| HboneError::Tls { dst, expected: key.expected.to_string(), reason };
        let config =
            tls::client_config(Some(svid), bundle, key.expected.spiffe_id()).map_err(|e| tls_error(e.to_string()))?;
        let tcp = from.dial(dst).await.map_err(|e| HboneError::Connect(dst, e))?;
        keep_alive(&tcp);
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        let timed_out = |_| HboneError::HandshakeTimeout { dst };
        let connector = TlsConnector::from(Arc::new(config));
        let tls =
            tokio::time::timeout_at(deadline, connector.connect(ServerName::IpAddress(dst.ip().into()), tcp)).await;
        self.metrics.handshake("outbound", matches!(tls, Ok(Ok(_))));
        let tls = tls.map_err(timed_out)?.map_err(|e| tls_error(e.to_string()))?;
        let handshake = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .handshake::<_, Bytes>(tls);
        let (send, conn) = tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(timed_out)?
            .map_err(|e| HboneError::Http2(dst, e))?;
        let active = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%dst, error = %e, "HBONE connection closed");
            }
        });
        let send = tokio::time::timeout_at(deadline, send.ready())
            .await
            .map_err(timed_out)?
            .map_err(|e| HboneError::Http2(dst, e))?;
        Ok((send, active))
    }
}

impl KeyPool {
    /// A live connection with room for another stream, made with the
    /// current certificate. Dead ones are dropped on the way.
    async fn reuse(&self, serial: &str) -> Option<(SendRequest<Bytes>, Arc<AtomicUsize>)> {
        let candidates: Vec<(SendRequest<Bytes>, Arc<AtomicUsize>, Arc<AtomicBool>)> = {
            let mut conns = self.conns.lock().expect("pool lock");
            conns.retain(|c| c.serial == serial || c.active.load(Ordering::Relaxed) > 0);
            conns
                .iter()
                .filter(|c| c.serial == serial && c.active.load(Ordering::Relaxed) < MAX_STREAMS_PER_CONNECTION)
                .map(|c| (c.send.clone(), c.active.clone(), c.used.clone()))
                .collect()
        };
        for (send, active, used) in candidates {
            match send.ready().await {
                Ok(send) => {
                    used.store(true, Ordering::Relaxed);
                    return Some((send, active));
                }
                Err(_) => self.retire(&active),
            }
        }
        None
    }

    /// Takes the connection whose stream count is `active` out of the pool;
    /// its open streams keep it until they end.
    fn retire(&self, active: &Arc<AtomicUsize>) {
        self.conns.lock().expect("pool lock").retain(|c| !Arc::ptr_eq(&c.active, active));
    }
}

/// Every `idle_timeout`, drops the pooled connections that carried no
/// stream since the sweep before, and the keys left with none. Dropping a
/// connection's last handle makes h2 close it (GOAWAY) once its streams are
/// done. Ends when the pool is dropped.
async fn release_idle(keys: Weak<Keys>, idle_timeout: Duration) {
    let mut sweeps = tokio::time::interval(idle_timeout);
    sweeps.tick().await; // the first tick is immediate
    loop {
        sweeps.tick().await;
        let Some(keys) = keys.upgrade() else { return };
        keys.lock().expect("pool lock").retain(|_, pool| {
            let mut conns = pool.conns.lock().expect("pool lock");
            conns.retain(|c| c.active.load(Ordering::Relaxed) > 0 || c.used.swap(false, Ordering::Relaxed));
            // A key whose dial is under way stays: its connection joins it.
            !conns.is_empty() || pool.dial.try_lock().is_err()
        });
    }
}
