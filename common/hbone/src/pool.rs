//! The source side of HBONE: CONNECT streams over pooled mTLS HTTP/2
//! connections, dialled from the caller's [`Dialer`].

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ambit_identity::{
    Identity, Svid,
    tls::{self, TrustStore},
};
use ambit_runtime::metrics::Metrics;
use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::{
    CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, MAX_FRAME_SIZE, MAX_STREAMS_PER_CONNECTION, RESPONSE_TIMEOUT, STREAM_WINDOW,
    server::keep_alive,
};

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
    /// [`Dialer::worker`].
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
    /// Keeps pooled connections apart per value: the node agent gives its
    /// proxy worker, so that a connection is driven by the thread whose
    /// tasks use it.
    fn worker(&self) -> usize {
        0
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
        trust: &TrustStore,
        target: &HboneTarget,
    ) -> Result<HboneStream, HboneError> {
        let HboneTarget { hbone: dst, expected, app: target, source_ip } = target;
        let (dst, target, source_ip) = (*dst, *target, *source_ip);
        let key = PoolKey {
            worker: from.worker(),
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
            None => self.dial_once(&pool, &key, from, svid, trust).await?,
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
        trust: &TrustStore,
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
        match self.dial(key, from, svid, trust).await {
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
        trust: &TrustStore,
    ) -> Result<(SendRequest<Bytes>, Arc<AtomicUsize>), HboneError> {
        let dst = key.dst;
        let tls_error = |reason: String| HboneError::Tls { dst, expected: key.expected.to_string(), reason };
        let config =
            tls::client_config(Some(svid), trust, key.expected.spiffe_id()).map_err(|e| tls_error(e.to_string()))?;
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
