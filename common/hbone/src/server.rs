//! The destination side of HBONE: the mTLS and HTTP/2 handshakes of an
//! inbound connection, bounded in time, and the peer's verified identity.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ambit_identity::{Identity, tls};
use ambit_runtime::metrics::Metrics;
use bytes::Bytes;
use http::Request;
use spiffe::SpiffeId;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::{
    CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES, MAX_FRAME_SIZE,
    MAX_INBOUND_STREAMS, STREAM_WINDOW,
};

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
/// size, all within the handshake timeout (10 s). `owner` is the identity of the
/// pod at the peer's address, if it is one. Tunnels and waypoints connect
/// from inside the source pod, so an identity is believed only from the
/// address of a pod running it: a certificate presented from another pod's
/// address, the node's or anywhere else is refused (a stolen key or a
/// minted certificate does not work from elsewhere). Returns why the peer
/// was refused otherwise.
pub async fn accept(
    tcp: TcpStream,
    peer: SocketAddr,
    owner: Option<Identity>,
    config: Arc<rustls::ServerConfig>,
    metrics: &Metrics,
) -> Result<Accepted, String> {
    keep_alive(&tcp);
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let timed_out = |what: &str| format!("no {what} within {HANDSHAKE_TIMEOUT:?} of connecting; closed");
    let tls = tokio::time::timeout_at(deadline, TlsAcceptor::from(config).accept(tcp)).await;
    metrics.handshake("inbound", matches!(tls, Ok(Ok(_))));
    let tls = tls.map_err(|_| timed_out("mTLS handshake"))?.map_err(|e| format!("mTLS handshake failed: {e}"))?;
    let peer_certs = tls.get_ref().1.peer_certificates();
    let peer_id = tls::peer_identity(peer_certs).map_err(|e| e.to_string())?;
    match owner {
        Some(owner) if owner.spiffe_id() == peer_id => {}
        Some(owner) => {
            return Err(format!("{peer_id} presented from {}, the address of a pod running as {owner}", peer.ip()));
        }
        None => {
            return Err(format!(
                "{peer_id} presented from {}, which is no pod's address: an identity is believed only from a pod running it",
                peer.ip()
            ));
        }
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

/// Turns on TCP keepalive (see [`KEEPALIVE_IDLE`]) for an HBONE connection.
pub(crate) fn keep_alive(tcp: &TcpStream) {
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

/// Where a CONNECT asks to go: its authority, if that is `ip:port`.
pub fn connect_target<B>(request: &Request<B>) -> Option<SocketAddr> {
    request.uri().authority()?.as_str().parse().ok()
}

/// The original source a peer reports in `forwarded: for=`.
pub fn forwarded_for(headers: &http::HeaderMap) -> Option<IpAddr> {
    let value = headers.get("forwarded")?.to_str().ok()?;
    value.split(';').find_map(|part| part.trim().strip_prefix("for=")).and_then(|ip| ip.trim_matches('"').parse().ok())
}
