//! Inbound: a connection to one of the pod's addresses was steered by
//! `ambit_sk_lookup` to this listener (podIP:15006). The accepted socket's
//! local address is the original destination, untouched. The proxy delivers
//! the connection to the app by connecting to that address from inside the
//! pod, from the client's address (`PodContext::deliver`); `ambit_sk_lookup`
//! lets that connection through because the agent listed it in `DELIVERIES`.
//!
//! This is the plaintext path: PeerAuthentication decides whether it is
//! allowed (PERMISSIVE, the default, and DISABLE) or reset (STRICT), and
//! either way it is counted, so a rollout can see who still comes in plaintext.
//! Authorization then sees a caller without identity.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use tokio::net::TcpStream;

use ambit_authz::Connection;
use ambit_hbone::relay;
use ambit_model::MtlsMode;

use super::{ConnectionLog, Direction, Flag, INBOUND_PORT, OUTBOUND_PORT, PodContext, ProxyContext};

pub async fn handle(client: TcpStream, client_addr: SocketAddr, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    let orig_dst = match client.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::warn!(pod = %pod.id, error = %e, "inbound connection vanished before it could be read");
            return;
        }
    };
    let mut log = ConnectionLog::new(&ctx, Direction::Inbound, client_addr, orig_dst);
    log.src_workload = ctx.workload_at(client_addr.ip());
    log.dst_workload = Some(pod.id.clone());
    log.dst_identity = Some(pod.identity.to_string());
    // Delivering to one of the agent's own ports would connect the agent to
    // itself, forever.
    if [INBOUND_PORT, OUTBOUND_PORT].contains(&orig_dst.port()) {
        relay::reset(&client);
        log.flag = Flag::Denied;
        log.finish(0, 0, Some(&"destination is an ambit listener port; refusing to loop"));
        return;
    }
    // PeerAuthentication: STRICT admits mTLS (HBONE) only.
    let mode = ctx.state.borrow().mtls_mode(&pod.id, orig_dst.port());
    if mode == MtlsMode::Strict {
        const STRICT: &str = "plaintext rejected: PeerAuthentication mode is STRICT";
        ctx.stats.plaintext_rejected.fetch_add(1, Ordering::Relaxed);
        relay::reset(&client);
        log.flag = Flag::Denied;
        log.rate_limit(&ctx.warnings, "plaintext_rejected", STRICT);
        log.finish(0, 0, Some(&STRICT));
        return;
    }
    // A plaintext caller has no identity: only address-based rules can admit it.
    let conn = Connection {
        peer: None,
        src_ip: Some(client_addr.ip()),
        dst_ip: Some(orig_dst.ip()),
        dst_port: Some(orig_dst.port()),
        request: None,
    };
    if !ctx.authorize(&pod, &conn, &mut log) {
        relay::reset(&client);
        log.finish(0, 0, None);
        return;
    }
    ctx.stats.plaintext_accepted.fetch_add(1, Ordering::Relaxed);
    let app = match pod.deliver(&ctx.deliveries, client_addr.ip(), orig_dst).await {
        Ok(app) => app,
        Err(e) => {
            relay::reset(&client);
            log.flag = Flag::ConnectFailure;
            log.finish(0, 0, Some(&format_args!("deliver to {orig_dst}: {e}")));
            return;
        }
    };
    log.opened();
    let outcome = relay::relay(client, app, ctx.revoked(&pod.id, &conn)).await;
    if outcome.revoked() {
        log.flag = Flag::Denied;
    }
    log.finish(outcome.a_to_b, outcome.b_to_a, outcome.error.as_ref().map(|e| e as _));
}
