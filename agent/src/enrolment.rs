//! Enrolment: brings the set of captured pods in line with the state store.
//!
//! Enrolling a pod opens its listeners inside its netns (outbound, plaintext
//! inbound, HBONE), starts fetching its identity's certificate, registers it
//! in the kernel maps, attaches `ambit_sk_lookup` to its netns, and starts
//! its proxies. Unenrolling undoes that in reverse; connections already open run
//! to their end. A pod that cannot be enrolled (its netns is not there yet,
//! say) is retried at the next reconcile.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use ambit_abi::{EnrolledPod, IpKey};
use anyhow::Context as _;
use aya::programs::sk_lookup::SkLookupLinkId;
use tokio::task::JoinHandle;

use ambit_hbone::HBONE_PORT;
use ambit_identity::Identity;
use ambit_model::{NETNS_ANNOTATION, Pod};
use ambit_state::State;

use crate::{
    capture::Capture,
    netns::{Netns, netns_cookie},
    proxy::{self, INBOUND_PORT, OUTBOUND_PORT, PodContext, ProxyContext, hbone, inbound, outbound},
};

/// The parts of a pod that, when changed, need a fresh enrolment.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EnrolmentSpec {
    netns: Option<PathBuf>,
    ips: Vec<IpAddr>,
    service_account: String,
}

impl From<&Pod> for EnrolmentSpec {
    fn from(pod: &Pod) -> Self {
        Self { netns: pod.netns.clone(), ips: pod.ips.clone(), service_account: pod.service_account.clone() }
    }
}

struct ActivePod {
    spec: EnrolmentSpec,
    pod: Arc<PodContext>,
    inbound_ips: Vec<IpKey>,
    sk_lookup: SkLookupLinkId,
    proxies: Vec<JoinHandle<()>>,
}

pub struct Enrolments {
    node: String,
    capture: Capture,
    ctx: Arc<ProxyContext>,
    active: BTreeMap<String, ActivePod>,
    /// Pods that failed, with the error last logged, so a retry that fails
    /// the same way does not log again.
    failed: BTreeMap<String, String>,
    /// Cleanups inside unenrolled pods' netns, still running or not yet
    /// awaited: a pod enrolled again waits for its own first.
    cleanups: BTreeMap<String, JoinHandle<()>>,
}

impl Enrolments {
    pub fn new(node: String, capture: Capture, ctx: Arc<ProxyContext>) -> Self {
        Self { node, capture, ctx, active: BTreeMap::new(), failed: BTreeMap::new(), cleanups: BTreeMap::new() }
    }

    pub fn enrolled(&self) -> usize {
        self.active.len()
    }

    /// Pods that should be enrolled but are not (their last attempt failed).
    pub fn not_enrolled(&self) -> usize {
        self.failed.len()
    }

    /// Whether pod `id` (`namespace/name`) is captured now.
    pub fn is_enrolled(&self, id: &str) -> bool {
        self.active.contains_key(id)
    }

    /// Why pod `id` could not be enrolled, if its last attempt failed.
    pub fn failure(&self, id: &str) -> Option<&str> {
        self.failed.get(id).map(String::as_str)
    }

    /// The pods captured now, for the admin endpoint.
    pub fn enrolled_pods(&self) -> Vec<crate::admin::EnrolledPod> {
        self.active
            .iter()
            .map(|(id, active)| crate::admin::EnrolledPod {
                pod: id.clone(),
                identity: active.pod.identity.to_string(),
                ips: active.spec.ips.clone(),
                netns_cookie: active.pod.netns_cookie,
            })
            .collect()
    }

    pub async fn reconcile(&mut self, state: &State) {
        let node = self.node.clone();
        let desired: BTreeMap<String, &Pod> = state.pods_to_enrol(&node).map(|p| (p.id(), p)).collect();
        let stale: Vec<String> = self
            .active
            .iter()
            .filter(|(id, active)| desired.get(*id).is_none_or(|pod| EnrolmentSpec::from(*pod) != active.spec))
            .map(|(id, _)| id.clone())
            .collect();
        let mut stopping = Vec::new();
        for id in stale {
            stopping.extend(self.unenrol(&id));
        }
        // A pod enrolled again (new IP, netns or service account) binds the
        // same addresses: its old listeners must be closed first, or the new
        // bind fails and the pod goes uncaptured until the retry.
        for accept_loop in stopping {
            let _ = accept_loop.await;
        }
        self.failed.retain(|id, _| desired.contains_key(id));
        self.cleanups.retain(|_, cleanup| !cleanup.is_finished());
        for (id, pod) in desired {
            if self.active.contains_key(&id) {
                continue;
            }
            match self.enrol(pod, state.identity_of(pod)) {
                Ok(active) => {
                    tracing::info!(pod = %id, ips = ?pod.ips, netns_cookie = active.pod.netns_cookie, "pod enrolled");
                    self.failed.remove(&id);
                    self.active.insert(id, active);
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    if self.failed.get(&id) != Some(&message) {
                        tracing::error!(pod = %id, error = %message, "cannot enrol pod; will retry");
                        self.failed.insert(id, message);
                    }
                }
            }
        }
        // Only now: a pod unenrolled and enrolled again above kept its certificate.
        self.ctx.certs.drop_unused();
    }

    fn enrol(&mut self, pod: &Pod, identity: Identity) -> anyhow::Result<ActivePod> {
        let path = pod.netns.as_ref().with_context(|| match pod.uid {
            // Kubernetes mode: only the CNI plugin or the /proc scan say where it is.
            Some(_) => format!(
                "pod {}: its network namespace is not known yet: no CNI ADD reached this agent for it, and none of the node's processes runs in a netns with the pod's uid and address",
                pod.id()
            ),
            None => format!(
                "{}: pod {}: metadata.annotations.{NETNS_ANNOTATION} is missing; give the path of the pod's network namespace",
                pod.source.display(),
                pod.id()
            ),
        })?;
        let netns = Netns::open_pod(path).with_context(|| format!("open netns {}", path.display()))?;
        let outbound_v4 = netns
            .listen(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT))
            .with_context(|| format!("outbound listener 127.0.0.1:{OUTBOUND_PORT} in {}", path.display()))?;
        // IPv6 may be disabled in the pod; then pure IPv6 is not captured, and
        // the kernel program counts every such connect().
        let outbound_v6 = match netns.listen(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT)) {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::warn!(pod = %pod.id(), error = %e, "no IPv6 outbound listener; IPv6 destinations of this pod are not captured");
                None
            }
        };
        let netns_cookie = netns_cookie(&outbound_v4).context("read the pod's netns cookie")?;
        let mut inbound_listeners = Vec::new();
        let mut hbone_listeners = Vec::new();
        for ip in &pod.ips {
            let listener = netns.listen(SocketAddr::new(*ip, INBOUND_PORT)).map_err(|e| {
                let hint = match e.kind() {
                    std::io::ErrorKind::AddrNotAvailable => " (is this status.podIPs address configured there?)",
                    _ => "",
                };
                anyhow::anyhow!("inbound listener {ip}:{INBOUND_PORT} in {}: {e}{hint}", path.display())
            })?;
            inbound_listeners.push((IpKey::from(*ip), listener));
            let hbone = netns
                .listen(SocketAddr::new(*ip, HBONE_PORT))
                .with_context(|| format!("HBONE listener {ip}:{HBONE_PORT} in {}", path.display()))?;
            hbone_listeners.push(hbone);
        }
        let registration = EnrolledPod {
            outbound_port_v4: OUTBOUND_PORT,
            outbound_port_v6: if outbound_v6.is_some() { OUTBOUND_PORT } else { 0 },
            _pad: 0,
        };
        let inbound: Vec<_> = inbound_listeners.iter().map(|(ip, l)| (*ip, l)).collect();
        let sk_lookup = match self.capture.enrol(&netns, netns_cookie, registration, &inbound) {
            Ok(link) => link,
            Err(e) => {
                // Leave nothing half-registered behind.
                self.capture
                    .remove_entries(netns_cookie, &inbound_listeners.iter().map(|(ip, _)| *ip).collect::<Vec<_>>());
                return Err(e.into());
            }
        };

        // Fetch the identity's certificate now, ahead of the first connection.
        let svid = self.ctx.certs.acquire(&identity, &pod.id());
        let pod_ctx = Arc::new(PodContext::new(
            pod.id(),
            netns,
            netns_cookie,
            pod.ips.clone(),
            identity.clone(),
            svid,
            self.cleanups.remove(&pod.id()),
        ));
        // Ahead of the first connection, like the certificate.
        let prepare = pod_ctx.clone();
        tokio::spawn(async move {
            prepare.route_deliveries().await;
        });
        let serve_outbound = |listener| proxy::serve(listener, pod_ctx.clone(), self.ctx.clone(), outbound::handle);
        let mut proxies = vec![serve_outbound(outbound_v4)];
        proxies.extend(outbound_v6.map(serve_outbound));
        let inbound_ips = inbound_listeners.iter().map(|(ip, _)| *ip).collect();
        for (_, listener) in inbound_listeners {
            proxies.push(proxy::serve(listener, pod_ctx.clone(), self.ctx.clone(), inbound::handle));
        }
        for listener in hbone_listeners {
            proxies.push(proxy::serve(listener, pod_ctx.clone(), self.ctx.clone(), hbone::connection));
        }
        Ok(ActivePod { spec: pod.into(), pod: pod_ctx, inbound_ips, sk_lookup, proxies })
    }

    /// Stops capturing a pod; a task finishes the cleanup inside its netns.
    /// Returns its accept loops, aborted: each has closed its listener once
    /// it has finished.
    fn unenrol(&mut self, id: &str) -> Vec<tokio::task::JoinHandle<()>> {
        let Some(active) = self.active.remove(id) else {
            return Vec::new();
        };
        self.capture.unenrol(active.pod.netns_cookie, &active.inbound_ips, active.sk_lookup);
        for task in &active.proxies {
            task.abort();
        }
        self.ctx.certs.release(&active.pod.identity, id);
        self.ctx.pool.forget_pod(id);
        tracing::info!(pod = %id, "pod unenrolled");
        let cleanup = tokio::spawn(async move { active.pod.unroute_deliveries().await });
        self.cleanups.insert(id.to_string(), cleanup);
        active.proxies
    }

    /// Unenrols every pod (on shutdown) and leaves their netns as they were.
    pub async fn clear(&mut self) {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        for id in ids {
            drop(self.unenrol(&id));
        }
        self.ctx.certs.drop_unused();
        for (_, cleanup) in std::mem::take(&mut self.cleanups) {
            let _ = cleanup.await;
        }
    }
}
