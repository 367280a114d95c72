//! HBONE: a TCP connection carried as an HTTP/2 CONNECT stream over mutual
//! TLS, to the destination pod's port 15008, wire-compatible with Istio's
//! ztunnel: TLS 1.3, ALPN `h2`, `:authority` = the original destination
//! `ip:port`, a `forwarded: for=<source ip>` header, and each side's
//! identity in its X.509-SVID's URI SAN.
//!
//! - [`server::accept`]: the destination side's handshakes, and the check
//!   that a certificate comes from its own pod's address;
//! - [`pool::HbonePool`]: the source side, HTTP/2 connections kept per
//!   (origin, source identity, destination, expected destination identity),
//!   so most new streams cost no TLS handshake;
//! - [`relay`]: bytes between two TCP connections, or a TCP connection and
//!   an HTTP/2 stream.
//!
//! The node agent and the waypoint both use it; what happens to a stream
//! once accepted (authorization, delivery to the app) is theirs.
#![forbid(unsafe_code)]

pub mod pool;
pub mod relay;
pub mod server;

use std::time::Duration;

pub use ambit_abi::HBONE_PORT;
pub use pool::{Dialer, HboneError, HbonePool, HboneStream, HboneTarget, StreamGuard};

/// HTTP/2 flow-control windows: far above the bandwidth-delay product of a
/// node-to-node link (10 Gbit/s x 100 µs is 125 KB), so a bulk stream is
/// never window-bound, yet small enough to bound what a slow reader makes
/// the agent buffer.
pub(crate) const STREAM_WINDOW: u32 = 1024 * 1024;
pub(crate) const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
pub(crate) const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// Streams share one TLS connection up to this many; past it a new
/// connection opens. Cores are spread by the proxy workers (each has its
/// own pooled connections), so sharing is bounded only to keep one busy
/// TCP connection from queueing too many streams behind each other; more
/// sharing means fewer TLS records and system calls per request.
pub(crate) const MAX_STREAMS_PER_CONNECTION: usize = 16;
/// Bytes read from a TCP socket per HTTP/2 DATA frame at most.
pub(crate) const READ_CHUNK: usize = 128 * 1024;
/// A pooled connection that carries no stream for this long (up to twice
/// this long) is closed.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the mTLS and HTTP/2 handshakes may take, on either side. A peer
/// that accepts TCP and then says nothing (a frozen agent, a scanner) must
/// not hold a connection, a task or the pool's turn to dial for ever.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a CONNECT waits for its answer: longer than the destination's
/// own connect to the app (10 s), so that its 503 arrives first.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// TCP keepalive on HBONE connections: probed after this long without
/// traffic, then every [`KEEPALIVE_INTERVAL`], and closed after
/// [`KEEPALIVE_PROBES`] unanswered probes. A connection whose peer vanished
/// (a node gone without a FIN) would otherwise hold its streams, and the
/// connections to the apps behind them, for ever.
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub(crate) const KEEPALIVE_PROBES: u32 = 5;
/// Streams a peer may have open at once on one inbound connection; each
/// is a task and a connection to the app. Sources in this mesh open at
/// most [`MAX_STREAMS_PER_CONNECTION`].
pub(crate) const MAX_INBOUND_STREAMS: u32 = 100;
