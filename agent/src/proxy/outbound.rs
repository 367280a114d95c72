//! Outbound: an app in the pod called connect(); `ambit_connect4`/`6`
//! redirected it to this listener (127.0.0.1:15001 in the pod) and recorded
//! where it was going. The proxy finds that original destination in the
//! ORIG_DST_BY_CONN map. A meshed destination (an ambient pod) is reached
//! over HBONE with this pod's identity; anything else passes through as
//! plain TCP from inside the pod, logged as such.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use ambit_common::ConnKey;
use tokio::net::{TcpListener, TcpStream};

use super::{
    ConnectionLog, Direction, PodContext, ProxyContext, accept_backoff,
    hbone::{self, HBONE_PORT},
    relay,
};
use crate::identity::Identity;

pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    loop {
        let (app, app_addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_backoff(e, &pod.id).await;
                continue;
            }
        };
        // Read the original destination before anything else: the entry is
        // keyed by this connection's 4-tuple as the app sees it.
        let orig_dst = app.local_addr().ok().and_then(|listener_addr| {
            let key = ConnKey::new(pod.netns_cookie, app_addr.into(), listener_addr.into());
            ctx.orig_dst.take(&key).map(SocketAddr::from)
        });
        tokio::spawn(handle(app, app_addr, orig_dst, pod.clone(), ctx.clone()));
    }
}

async fn handle(
    app: TcpStream,
    app_addr: SocketAddr,
    orig_dst: Option<SocketAddr>,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) {
    let started = Instant::now();
    let Some(orig_dst) = orig_dst else {
        // Not redirected by the kernel programs (e.g. an app dialling the
        // listener port directly): there is nowhere legitimate to send it.
        tracing::warn!(
            target: "ambit::conn",
            src_workload = %pod.id,
            src_addr = %app_addr,
            "outbound connection has no original destination; resetting it"
        );
        relay::reset(&app);
        return;
    };
    let meshed = ctx.state.borrow().meshed_workload(orig_dst.ip());
    let mut log = ConnectionLog {
        direction: Direction::Outbound,
        src_workload: Some(pod.id.clone()),
        src_addr: app_addr,
        dst_workload: ctx.workload_at(orig_dst.ip()),
        dst_addr: orig_dst,
        started,
        mtls: meshed.is_some(),
        src_identity: Some(pod.identity.to_string()),
        dst_identity: meshed.as_ref().map(|(_, id)| id.to_string()),
    };
    match meshed {
        Some((_, expected)) => via_hbone(app, orig_dst, &expected, &pod, &ctx, &mut log).await,
        None => passthrough(app, orig_dst, &pod, &mut log).await,
    }
}

/// A meshed destination: an HBONE stream to its pod's port 15008, as this
/// pod's identity, to a server that must prove it is `expected`.
async fn via_hbone(
    app: TcpStream,
    orig_dst: SocketAddr,
    expected: &Identity,
    pod: &PodContext,
    ctx: &ProxyContext,
    log: &mut ConnectionLog,
) {
    // Fail closed: no certificate, no connection.
    let Some(svid) = pod.current_svid() else {
        relay::reset(&app);
        return log.finish(0, 0, Some(&format_args!("no valid certificate for {} yet", pod.identity)));
    };
    let Some(source_ip) = pod.ips.iter().find(|ip| ip.is_ipv4() == orig_dst.is_ipv4()).copied() else {
        relay::reset(&app);
        return log.finish(0, 0, Some(&"the pod has no address of the destination's family"));
    };
    log.src_addr = SocketAddr::new(source_ip, app.peer_addr().map_or(0, |a| a.port()));
    let hbone_addr = SocketAddr::new(orig_dst.ip(), HBONE_PORT);
    match ctx.pool.open(pod, &svid, &ctx.bundle, hbone_addr, expected, orig_dst, source_ip).await {
        Ok(stream) => {
            let outcome = hbone::bridge(app, stream.send, stream.recv).await;
            drop(stream.guard);
            log.finish(outcome.a_to_b, outcome.b_to_a, outcome.error.as_ref().map(|e| e as _));
        }
        Err(e) => {
            relay::reset(&app);
            log.finish(0, 0, Some(&e));
        }
    }
}

/// A destination outside the mesh: plain TCP from the pod's own address.
async fn passthrough(app: TcpStream, orig_dst: SocketAddr, pod: &PodContext, log: &mut ConnectionLog) {
    let upstream = match pod.connect(orig_dst).await {
        Ok(upstream) => upstream,
        Err(e) => {
            relay::reset(&app);
            log.finish(0, 0, Some(&format_args!("connect to {orig_dst}: {e}")));
            return;
        }
    };
    // On the wire the connection leaves from the pod's own address.
    if let Ok(local) = upstream.local_addr() {
        log.src_addr = local;
    }
    let outcome = relay::relay(app, upstream).await;
    log.finish(outcome.a_to_b, outcome.b_to_a, outcome.error.as_ref().map(|e| e as _));
}
