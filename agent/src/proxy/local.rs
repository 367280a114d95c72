//! Same node: both ends are pods this agent enrolled. The agent holds both
//! identities, so it does here what the destination side of HBONE does
//! ([`super::hbone`]): the caller is the source pod's SVID identity (the
//! connection was captured inside that pod's netns, which is what the SVID
//! attests), PeerAuthentication treats it as mutual TLS, and the
//! destination's authorization decides, with the same `Connection` the
//! HBONE path builds. Allowed connections are delivered to the app and
//! joined in the kernel ([`crate::splice`]) or relayed in user space; no
//! HBONE tunnel, TLS or HTTP/2 is involved, since the bytes never leave
//! this node's kernel. Each connection is logged and counted by both
//! reporters, source and destination, as over HBONE.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use ambit_authz::{Connection, Peer};
use ambit_hbone::{HBONE_PORT, relay};
use ambit_identity::{
    Identity, Svid,
    tls::{self, TrustStore},
};
use tokio::net::TcpStream;

use super::{ConnectionLog, Direction, Flag, INBOUND_PORT, OUTBOUND_PORT, PodContext, ProxyContext};
use crate::splice::{Joined, Splicer};

/// How connections between two pods of this node go (`--same-node`).
pub enum SameNode {
    /// Through an HBONE tunnel to this agent, as to another node.
    Hbone,
    /// Checked here, relayed in user space.
    Relay,
    /// Checked here, joined in the kernel.
    Kernel(Arc<Splicer>),
}

impl SameNode {
    pub fn name(&self) -> &'static str {
        match self {
            SameNode::Hbone => "hbone",
            SameNode::Relay => "relay",
            SameNode::Kernel(_) => "kernel",
        }
    }
}

/// The enrolled pods of this node by address, kept by the enrolments.
#[derive(Default)]
pub struct LocalPods {
    by_ip: RwLock<HashMap<IpAddr, Arc<PodContext>>>,
}

impl LocalPods {
    pub fn add(&self, pod: &Arc<PodContext>) {
        let mut by_ip = self.by_ip.write().expect("local pods lock");
        for ip in &pod.ips {
            by_ip.insert(*ip, pod.clone());
        }
    }

    /// Forgets `pod`, not another pod that took one of its addresses since.
    pub fn remove(&self, pod: &Arc<PodContext>) {
        let mut by_ip = self.by_ip.write().expect("local pods lock");
        by_ip.retain(|_, local| !Arc::ptr_eq(local, pod));
    }

    /// The pod of this node at `ip`, if it is the workload and identity the
    /// configuration expects there (not a pod that held the address
    /// before); otherwise the HBONE path decides.
    pub fn get(&self, ip: IpAddr, workload: &str, expected: &Identity) -> Option<Arc<PodContext>> {
        let by_ip = self.by_ip.read().expect("local pods lock");
        by_ip.get(&ip).filter(|pod| pod.id == workload && pod.identity == *expected).cloned()
    }
}

impl PodContext {
    /// Whether `svid` is signed by a bundle trusted now: verified once per
    /// certificate and version of the trust store, not per connection.
    fn check_trusted(&self, svid: &Svid, trust: &TrustStore) -> Result<(), String> {
        let version = trust.version();
        let mut trusted = self.trusted.lock().expect("trusted lock");
        if trusted.as_ref().is_some_and(|(serial, at)| *serial == svid.serial && *at == version) {
            return Ok(());
        }
        trust.bundle_for(&svid.identity.trust_domain).and_then(|bundle| tls::verify_issued(&bundle, &svid.chain))?;
        *trusted = Some((svid.serial.clone(), version));
        Ok(())
    }
}

/// Connects `app` (captured in `pod`, from `source_ip`) to `dst` in
/// `dst_pod`. Gives the app back when the destination cannot be reached,
/// so the next endpoint is tried (the caller forgets `log.fast_path`); a
/// denial ends the connection.
pub(super) async fn connect(
    app: TcpStream,
    (source_ip, dst): (Option<IpAddr>, SocketAddr),
    pod: &PodContext,
    dst_pod: &PodContext,
    ctx: &ProxyContext,
    log: &mut ConnectionLog,
) -> Result<(), (TcpStream, String)> {
    // As over HBONE: the caller must have an address of the destination's
    // family, or the app would see a loopback caller.
    let Some(source_ip) = source_ip else {
        return Err((app, format!("pod {} has no address of the family of {dst}", pod.id)));
    };
    log.fast_path = Some(ctx.same_node.name());
    let mut inbound = ConnectionLog::new(ctx, Direction::Inbound, log.src_addr, dst);
    inbound.src_workload = Some(pod.id.clone());
    inbound.dst_workload = Some(dst_pod.id.clone());
    inbound.dst_identity = Some(dst_pod.identity.to_string());
    inbound.mtls = true;
    inbound.fast_path = log.fast_path;
    // Both SVIDs must be valid and trusted now, as both handshakes would
    // require (a root withdrawn since they were issued fails them).
    let (Some(svid), Some(dst_svid)) = (pod.svid().await, dst_pod.svid().await) else {
        let why = format!("no valid certificate for {} or {} yet", pod.identity, dst_pod.identity);
        return Err((app, why));
    };
    for (owner, svid) in [(pod, &svid), (dst_pod, &dst_svid)] {
        if let Err(e) = owner.check_trusted(svid, &ctx.trust) {
            return Err((app, format!("the certificate of {}: {e}", svid.identity)));
        }
    }
    let peer_id = svid.identity.spiffe_id();
    inbound.src_identity = Some(peer_id.to_string());
    let conn = Connection {
        peer: Some(Peer::from_spiffe_id(&peer_id)),
        src_ip: Some(source_ip),
        dst_ip: Some(dst.ip()),
        dst_port: Some(dst.port()),
        request: None,
    };
    let allowed = if [HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT].contains(&dst.port()) {
        inbound.flag = Flag::Denied;
        inbound.denial = Some(format!("{dst} is not an application address of this pod"));
        false
    } else {
        ctx.authorize(dst_pod, &conn, &mut inbound)
    };
    if !allowed {
        relay::reset(&app);
        log.flag = Flag::Denied;
        inbound.finish(0, 0, None);
        let why = inbound.denial.clone().unwrap_or_default();
        log.finish(0, 0, Some(&why));
        return Ok(());
    }
    let server = match dst_pod.deliver(&ctx.deliveries, source_ip, dst).await {
        Ok(server) => server,
        Err(e) => {
            inbound.flag = Flag::ConnectFailure;
            let why = format!("deliver to {dst}: {e}");
            inbound.finish(0, 0, Some(&why));
            return Err((app, why));
        }
    };
    log.opened();
    inbound.opened();
    let stop = ctx.revoked(&dst_pod.id, &conn);
    let outcome = match &ctx.same_node {
        SameNode::Kernel(splicer) => match splicer.join(app, server) {
            Ok(Joined::Spliced(spliced)) => {
                let (outcome, relayed) = spliced.run(stop).await;
                // Past its budget, a direction went on in user space.
                if relayed {
                    log.fast_path = Some("kernel, then relay");
                    inbound.fast_path = log.fast_path;
                }
                outcome
            }
            Ok(Joined::NotJoined(app, server, why)) => {
                tracing::debug!(src_workload = %pod.id, dst = %dst, why, "not joined in the kernel; relaying");
                log.fast_path = Some("relay");
                inbound.fast_path = Some("relay");
                relay::relay(app, server, stop).await
            }
            Err(e) => relay::RelayOutcome { a_to_b: 0, b_to_a: 0, error: Some(e) },
        },
        _ => relay::relay(app, server, stop).await,
    };
    for log in [&mut *log, &mut inbound] {
        if outcome.revoked() {
            log.flag = Flag::Denied;
        }
        log.finish(outcome.a_to_b, outcome.b_to_a, outcome.error.as_ref().map(|e| e as _));
    }
    Ok(())
}
