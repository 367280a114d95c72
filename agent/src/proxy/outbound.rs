//! Outbound: an app in the pod called connect(); `ambit_connect4`/`6`
//! redirected it to this listener (127.0.0.1:15001 in the pod) and recorded
//! where it was going. The proxy finds that original destination in the
//! ORIG_DST_BY_CONN map and connects there from inside the pod.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use ambit_common::ConnKey;
use tokio::net::{TcpListener, TcpStream};

use super::{ConnectionLog, Direction, PodContext, ProxyContext, accept_backoff, relay};

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
    let mut log = ConnectionLog {
        direction: Direction::Outbound,
        src_workload: Some(pod.id.clone()),
        src_addr: app_addr,
        dst_workload: ctx.workload_at(orig_dst.ip()),
        dst_addr: orig_dst,
        started,
    };
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
    log.finish(
        outcome.a_to_b,
        outcome.b_to_a,
        outcome.error.as_ref().map(|e| e as _),
    );
}
