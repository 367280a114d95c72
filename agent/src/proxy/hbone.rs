//! The destination side of HBONE for enrolled pods: mTLS from other
//! tunnels and waypoints on each pod IP's port 15008, authorized, then
//! delivered to the app inside the pod. The handshakes themselves, the
//! client pool and the wire format are `ambit_hbone`'s.

use std::{io, net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use ambit_authz::{Connection, Peer};
use ambit_hbone::{
    Dialer, HBONE_PORT,
    relay::{self, bridge},
    server::{Accepted, accept, connect_target, forwarded_for},
};
use bytes::Bytes;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use spiffe::SpiffeId;
use tokio::net::TcpStream;

use super::{ConnectionLog, Direction, Flag, INBOUND_PORT, OUTBOUND_PORT, PodContext, ProxyContext, workers};

/// While draining, how often a connection that got GOAWAY checks whether
/// it still carries a stream.
const DRAIN_IDLE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The destination side: mTLS from other tunnels, on one pod IP's port 15008.
pub async fn connection(tcp: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    let reject = |reason: &dyn std::fmt::Display| {
        ctx.stats.mtls_rejected.fetch_add(1, Ordering::Relaxed);
        let reason = reason.to_string();
        let Some(suppressed) = ctx.warnings.admit(peer.ip(), "hbone_rejected", &reason) else { return };
        tracing::warn!(
            target: "ambit::conn",
            direction = "inbound",
            src_addr = %peer,
            dst_workload = %pod.id,
            mtls = true,
            error = %reason,
            suppressed = (suppressed > 0).then_some(suppressed),
            "HBONE connection rejected"
        );
    };
    let Some(config) = pod.svid().await.and_then(|svid| pod.server_tls(&svid, &ctx.trust)) else {
        reject(&format_args!("no certificate for {} yet", pod.identity));
        relay::reset(&tcp);
        return;
    };
    let owner = ctx.state.borrow().identity_at(peer.ip());
    let Accepted { mut conn, peer_id, serial } = match accept(tcp, peer, owner, config, &ctx.metrics).await {
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
    let mut draining = ctx.draining.subscribe();
    let mut going_away = false;
    // One clone per stream running: the connection may close only when none is.
    let streams = Arc::new(());
    let (mut idle_check, mut idle_checks) = (tokio::time::interval(DRAIN_IDLE_CHECK), 0);
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            _ = draining.wait_for(|draining| *draining), if !going_away => {
                // The streams open run to their end; the peer opens its
                // next ones on a new connection, to the agent taking over.
                conn.graceful_shutdown();
                going_away = true;
                continue;
            }
            // A peer that keeps an idle connection open after GOAWAY would
            // hold the draining agent until its deadline.
            // Idle at two checks in a row: the last stream's final frames
            // have been flushed by then.
            _ = idle_check.tick(), if going_away => {
                idle_checks = if Arc::strong_count(&streams) == 1 { idle_checks + 1 } else { 0 };
                if idle_checks == 2 {
                    break;
                }
                continue;
            }
        };
        let Some(Ok((request, respond))) = next else { break };
        // A stream is work on this worker, like a connection: counted, it
        // steers the next connections to less busy workers.
        let running = streams.clone();
        let stream = stream(request, respond, peer_id.clone(), peer, pod.clone(), ctx.clone());
        tokio::spawn(ctx.workers.count_stream().around(async move {
            stream.await;
            drop(running);
        }));
    }
}

async fn stream(
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer_id: SpiffeId,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) {
    let authority = connect_target(&request);
    // The original source, as the source tunnel reports it, if the peer's
    // identity backs it (`State::source_of`); the TLS peer address is the
    // same pod's IP with another port.
    let src_addr = ctx.state.borrow().source_of(peer, forwarded_for(request.headers()), &peer_id);
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

impl Dialer for PodContext {
    fn origin(&self) -> &str {
        &self.id
    }

    async fn dial(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        self.connect(dst).await
    }

    fn worker(&self) -> usize {
        workers::current()
    }
}
