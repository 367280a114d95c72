//! Outbound: an app in the pod called connect(); `ambit_connect4`/`6`
//! redirected it to this listener (127.0.0.1:15001 in the pod) and recorded
//! where it was going. The proxy finds that original destination in the
//! ORIG_DST_BY_CONN map. A meshed destination (an ambient pod) is reached
//! over HBONE with this pod's identity; a service that uses a waypoint is
//! reached through the waypoint, over HBONE too, and never around it;
//! anything else passes through as plain TCP from inside the pod, logged as
//! such.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
};

use ambit_abi::ConnKey;
use tokio::net::TcpStream;

use ambit_hbone::{
    HBONE_PORT, HboneError, HboneStream, HboneTarget,
    relay::{self, bridge},
};
use ambit_identity::Identity;
use ambit_model::GATEWAY_NAME_LABEL;
use ambit_state::Destination;

use super::{
    ConnectionLog, Direction, Flag, PodContext, ProxyContext,
    local::{self, SameNode},
};

pub async fn handle(mut app: TcpStream, app_addr: SocketAddr, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    // The entry is keyed by this connection's 4-tuple as the app sees it.
    let orig_dst = app.local_addr().ok().and_then(|listener_addr| {
        let key = ConnKey::new(pod.netns_cookie, app_addr.into(), listener_addr.into());
        ctx.orig_dst.take(&key).map(SocketAddr::from)
    });
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
    let source_ip = pod.ips.iter().find(|ip| ip.is_ipv4() == orig_dst.is_ipv4()).copied();
    let src_addr = source_ip.map_or(app_addr, |ip| SocketAddr::new(ip, app_addr.port()));
    let mut log = ConnectionLog::new(&ctx, Direction::Outbound, src_addr, orig_dst);
    log.src_workload = Some(pod.id.clone());
    log.src_identity = Some(pod.identity.to_string());
    let destination = ctx.state.borrow().destination(orig_dst);
    // A waypoint takes service traffic whole: the CONNECT names the service
    // address, and the waypoint picks the endpoint.
    let mut waypoint = None;
    let mut endpoints = match destination {
        Destination::External => {
            return passthrough(app, orig_dst, &pod, &ctx, &mut log).await;
        }
        Destination::Workload(endpoint) => vec![endpoint],
        Destination::Service { service, endpoints } => {
            log.dst_service = Some(service);
            endpoints
        }
        Destination::Waypoint { service, waypoint: name, endpoints } => {
            log.dst_service = service;
            waypoint = Some(name);
            endpoints
        }
    };
    // Round robin over the endpoints; on a failed connect, the next one.
    if endpoints.len() > 1 {
        let start = ctx.next_endpoint.fetch_add(1, Ordering::Relaxed) % endpoints.len();
        endpoints.rotate_left(start);
    }
    let mut last_error = None;
    for endpoint in endpoints {
        log.dst_addr = endpoint.addr;
        log.dst_workload = Some(endpoint.workload.clone());
        log.dst_identity = endpoint.identity.as_ref().map(ToString::to_string);
        log.mtls = endpoint.identity.is_some();
        let opened = match &endpoint.identity {
            // Both ends on this node: checked and joined here, no tunnel.
            Some(expected)
                if waypoint.is_none()
                    && !matches!(ctx.same_node, SameNode::Hbone)
                    && let Some(dst_pod) = ctx.local_pods.get(endpoint.addr.ip(), &endpoint.workload, expected) =>
            {
                match local::connect(app, (source_ip, endpoint.addr), &pod, &dst_pod, &ctx, &mut log).await {
                    Ok(()) => return,
                    Err((returned, e)) => {
                        app = returned;
                        log.fast_path = None;
                        Err(e)
                    }
                }
            }
            Some(expected) => {
                let (hbone, authority) = match waypoint {
                    Some(_) => (endpoint.addr, orig_dst),
                    None => (SocketAddr::new(endpoint.addr.ip(), HBONE_PORT), endpoint.addr),
                };
                match open_hbone(hbone, expected, authority, source_ip, &pod, &ctx).await {
                    // Policy at the destination, not a failure: another
                    // endpoint would refuse too, and must not be asked.
                    Err(e) if e.is_denial() => {
                        relay::reset(&app);
                        log.flag = Flag::Denied;
                        return log.finish(0, 0, Some(&e));
                    }
                    opened => opened.map(Upstream::Hbone).map_err(|e| e.to_string()),
                }
            }
            None => pod.connect(endpoint.addr).await.map(Upstream::Tcp).map_err(|e| e.to_string()),
        };
        match opened {
            Ok(upstream) => return upstream.relay(app, &mut log, &ctx).await,
            Err(e) => {
                tracing::debug!(endpoint = %endpoint.addr, error = %e, "endpoint failed; trying the next");
                last_error = Some(e);
            }
        }
    }
    relay::reset(&app);
    let error = match (waypoint, last_error) {
        (Some(waypoint), Some(e)) => format!("waypoint {waypoint} unreachable ({e}); not sent around it"),
        (Some(waypoint), None) => {
            format!(
                "waypoint {waypoint} has no pod (is its Gateway declared and a pod labelled {GATEWAY_NAME_LABEL}?); not sent around it"
            )
        }
        (None, Some(e)) => e,
        (None, None) => "the service has no endpoints".to_string(),
    };
    log.flag = Flag::ConnectFailure;
    log.finish(0, 0, Some(&error));
}

/// The other side of a connection the agent opened for the pod.
enum Upstream {
    Hbone(HboneStream),
    Tcp(TcpStream),
}

impl Upstream {
    async fn relay(self, app: TcpStream, log: &mut ConnectionLog, ctx: &ProxyContext) {
        log.opened();
        let outcome = match self {
            Upstream::Hbone(stream) => bridge(app, stream.send, stream.recv, std::future::pending()).await,
            Upstream::Tcp(upstream) => {
                ctx.stats.passthrough.fetch_add(1, Ordering::Relaxed);
                relay::relay(app, upstream, std::future::pending()).await
            }
        };
        log.finish(outcome.a_to_b, outcome.b_to_a, outcome.error.as_ref().map(|e| e as _));
    }
}

/// Opens an HBONE stream (to a meshed endpoint or a waypoint) as this pod's
/// identity, to a server that must prove it is `target.expected`. Fails
/// closed without a valid certificate.
async fn open_hbone(
    hbone: SocketAddr,
    expected: &Identity,
    app: SocketAddr,
    source_ip: Option<IpAddr>,
    pod: &PodContext,
    ctx: &ProxyContext,
) -> Result<HboneStream, HboneError> {
    let svid = pod.svid().await.ok_or_else(|| HboneError::NoCertificate(pod.identity.clone()))?;
    let source_ip = source_ip.ok_or(HboneError::NoSourceAddress(app))?;
    let target = HboneTarget { hbone, expected: expected.clone(), app, source_ip };
    ctx.pool.open(pod, &svid, &ctx.trust, &target).await
}

/// A destination outside the mesh: plain TCP from the pod's own address,
/// logged (`mtls=false`) and counted as such.
async fn passthrough(app: TcpStream, dst: SocketAddr, pod: &PodContext, ctx: &ProxyContext, log: &mut ConnectionLog) {
    match pod.connect(dst).await {
        Ok(upstream) => {
            // On the wire the connection leaves from the pod's own address.
            if let Ok(local) = upstream.local_addr() {
                log.src_addr = local;
            }
            Upstream::Tcp(upstream).relay(app, log, ctx).await
        }
        Err(e) => {
            relay::reset(&app);
            log.flag = Flag::ConnectFailure;
            log.finish(0, 0, Some(&format_args!("connect to {dst}: {e}")));
        }
    }
}
