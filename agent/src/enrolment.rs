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

use ambit_abi::{EnrolledPod, PodAddress};
use anyhow::Context as _;
use tokio::task::JoinHandle;

use ambit_hbone::HBONE_PORT;
use ambit_identity::Identity;
use ambit_model::{NETNS_ANNOTATION, Pod};
use ambit_state::State;

use crate::{
    capture::{Capture, FamilyListeners, Registration},
    handoff::Handed,
    netns::Netns,
    proxy::{self, INBOUND_PORT, OUTBOUND_PORT, PodContext, ProxyContext, hbone, inbound, outbound},
};

/// The parts of a pod that, when changed, need a fresh enrolment.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EnrolmentSpec {
    netns: Option<PathBuf>,
    ips: Vec<IpAddr>,
    service_account: String,
    drop_inbound_udp: bool,
}

impl EnrolmentSpec {
    fn of(pod: &Pod, state: &State) -> Self {
        Self {
            netns: pod.netns.clone(),
            ips: pod.ips.clone(),
            service_account: pod.service_account.clone(),
            drop_inbound_udp: state.drops_inbound_udp(pod),
        }
    }
}

struct ActivePod {
    spec: EnrolmentSpec,
    pod: Arc<PodContext>,
    proxies: Vec<JoinHandle<()>>,
    /// Copies of the pod's listening sockets, to hand over to the next agent.
    listeners: Vec<std::net::TcpListener>,
}

pub struct Enrolments {
    node: String,
    /// Where a pod's netns may be: in standalone mode only a named netns
    /// (the configuration names it); in Kubernetes mode anywhere the CNI
    /// report or the /proc scan found it.
    netns_paths: NetnsPaths,
    capture: Capture,
    ctx: Arc<ProxyContext>,
    active: BTreeMap<String, ActivePod>,
    /// Pods that failed, with the error last logged, so a retry that fails
    /// the same way does not log again.
    failed: BTreeMap<String, String>,
    /// Cleanups inside unenrolled pods' netns, still running or not yet
    /// awaited: a pod enrolled again waits for its own first.
    cleanups: BTreeMap<String, JoinHandle<()>>,
    /// Listening sockets the agent this one replaces handed over, taken as
    /// their pods are enrolled.
    handed: Handed,
}

/// Which netns paths a pod may be enrolled from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetnsPaths {
    /// `/run/netns/<name>` or `/var/run/netns/<name>` only: a configuration
    /// file cannot point the agent at a process's or the host's netns.
    Named,
    /// Any: the agent found the path itself (CNI report, /proc scan).
    Found,
}

/// Whether `path` is a named netns (`/run/netns/<name>`, `/var/run/netns/<name>`).
fn is_named_netns(path: &std::path::Path) -> bool {
    ["/run/netns", "/var/run/netns"].iter().any(|dir| {
        path.parent() == Some(std::path::Path::new(dir))
            && path.file_name().is_some_and(|name| name != "." && name != "..")
    })
}

impl Enrolments {
    pub fn new(node: String, netns_paths: NetnsPaths, capture: Capture, ctx: Arc<ProxyContext>) -> Self {
        Self {
            node,
            netns_paths,
            capture,
            ctx,
            active: BTreeMap::new(),
            failed: BTreeMap::new(),
            cleanups: BTreeMap::new(),
            handed: Handed::default(),
        }
    }

    /// Enrols pods on these sockets, not new ones (see [`crate::handoff`]).
    pub fn take_handed(&mut self, handed: Handed) {
        self.handed = handed;
    }

    /// Closes the handed-over sockets no pod took (pods gone meanwhile).
    pub fn drop_handed(&mut self) -> usize {
        std::mem::take(&mut self.handed).len()
    }

    /// Copies of every pod's listening sockets, for the next agent.
    pub fn listener_fds(&self) -> Vec<std::os::fd::OwnedFd> {
        self.active
            .values()
            .flat_map(|active| &active.listeners)
            .filter_map(|listener| listener.try_clone().ok().map(Into::into))
            .collect()
    }

    /// After a handoff: stops every accept loop and lets go of the
    /// listeners (the next agent has them), leaving the kernel maps and
    /// links as they are. Connections already open run on.
    pub async fn stop_accepting(&mut self) {
        let accept_loops: Vec<JoinHandle<()>> =
            std::mem::take(&mut self.active).into_values().flat_map(|active| active.proxies).collect();
        for accept_loop in &accept_loops {
            accept_loop.abort();
        }
        for accept_loop in accept_loops {
            let _ = accept_loop.await;
        }
    }

    /// After the first enrolment: removes what earlier agents left that no
    /// pod needs; pods that failed to enrol keep theirs (they stay closed).
    pub fn sweep(&mut self) {
        let failed = &self.failed;
        self.capture.sweep(|pod| failed.contains_key(pod));
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
            .filter(|(id, active)| desired.get(*id).is_none_or(|pod| EnrolmentSpec::of(pod, state) != active.spec))
            .map(|(id, _)| id.clone())
            .collect();
        // A netns deleted under the agent (the pod's runtime tore it down
        // without telling anyone): the pod is unenrolled, and enrolling it
        // again fails and is reported until its configuration goes or
        // names a netns that exists.
        let gone: Vec<String> = self
            .active
            .iter()
            .filter(|(id, active)| {
                !stale.contains(*id) && active.spec.netns.as_deref().is_some_and(|path| !active.pod.netns.is_at(path))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            tracing::warn!(pod = %id, "the pod's network namespace is gone; unenrolling it");
        }
        let stale: Vec<String> = stale.into_iter().chain(gone).collect();
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
            match self.enrol(pod, EnrolmentSpec::of(pod, state), state.identity_of(pod)) {
                Ok(active) => {
                    tracing::info!(pod = %id, ips = ?pod.ips, netns_cookie = active.pod.netns_cookie, "pod enrolled");
                    self.failed.remove(&id);
                    self.ctx.local_pods.add(&active.pod);
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

    fn enrol(&mut self, pod: &Pod, spec: EnrolmentSpec, identity: Identity) -> anyhow::Result<ActivePod> {
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
        if self.netns_paths == NetnsPaths::Named && !is_named_netns(path) {
            anyhow::bail!(
                "{}: pod {}: metadata.annotations.{NETNS_ANNOTATION} is {}, not a named network namespace; give /run/netns/<name> or /var/run/netns/<name>",
                pod.source.display(),
                pod.id(),
                path.display()
            );
        }
        let netns = Netns::open_pod(path).with_context(|| format!("open netns {}", path.display()))?;
        let netns_cookie = netns.cookie().context("read the pod's netns cookie")?;
        let handed = &mut self.handed;
        let mut listen = |ip: IpAddr, port| {
            let addr = SocketAddr::new(ip, port);
            match handed.take(netns_cookie, addr) {
                Some(listener) => Ok(listener),
                None => netns.listen(addr).with_context(|| format!("listener {addr} in {}", path.display())),
            }
        };
        let outbound_v4 = listen(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT)?;
        // IPv6 may be disabled in the pod; then pure IPv6 is not captured, and
        // the kernel program counts every such connect().
        let outbound_v6 = match listen(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT) {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::warn!(pod = %pod.id(), error = %e, "no IPv6 outbound listener; IPv6 destinations of this pod are not captured");
                None
            }
        };
        // Every address of the netns is steered, not only the listed ones: an
        // app on [::] is reachable through link-local and unlisted addresses.
        let addresses = netns.addresses().with_context(|| format!("list the addresses of {}", path.display()))?;
        // The listed addresses must be the pod's: other nodes send its
        // traffic there, and peers are believed only from them.
        if let Some(ip) = pod.ips.iter().find(|ip| !addresses.contains(ip)) {
            anyhow::bail!(
                "pod address {ip} is not an address of {} (is this status.podIPs address configured there?)",
                path.display()
            );
        }
        // One plaintext and one HBONE listener per family, on the wildcard
        // address; the kernel program steers every address to them.
        let inbound_v4 = listen(Ipv4Addr::UNSPECIFIED.into(), INBOUND_PORT)?;
        let hbone_v4 = listen(Ipv4Addr::UNSPECIFIED.into(), HBONE_PORT)?;
        // Without IPv6 in the pod there is no IPv6 address to steer.
        let v6 = match (
            listen(Ipv6Addr::UNSPECIFIED.into(), INBOUND_PORT),
            listen(Ipv6Addr::UNSPECIFIED.into(), HBONE_PORT),
        ) {
            (Ok(inbound), Ok(hbone)) => Some((inbound, hbone)),
            (Err(e), _) | (_, Err(e)) if addresses.iter().any(IpAddr::is_ipv6) => return Err(e),
            _ => None,
        };
        let enrolled = EnrolledPod {
            outbound_port_v4: OUTBOUND_PORT,
            outbound_port_v6: if outbound_v6.is_some() { OUTBOUND_PORT } else { 0 },
            _pad: 0,
        };
        let pod_id = pod.id();
        let registration = Registration {
            pod_id: &pod_id,
            netns_cookie,
            pod: enrolled,
            addresses: &addresses,
            address: PodAddress { flags: if spec.drop_inbound_udp { PodAddress::DROP_INBOUND_UDP } else { 0 } },
            v4: FamilyListeners { inbound: &inbound_v4, hbone: &hbone_v4 },
            v6: v6.as_ref().map(|(inbound, hbone)| FamilyListeners { inbound, hbone }),
        };
        if let Err(e) = self.capture.enrol(&netns, &registration) {
            // Leave nothing half-registered behind.
            self.capture.remove_entries(netns_cookie);
            return Err(e.into());
        }
        let mut copies = vec![&outbound_v4, &inbound_v4, &hbone_v4];
        copies.extend(outbound_v6.iter());
        copies.extend(v6.iter().flat_map(|(inbound, hbone)| [inbound, hbone]));
        let listeners = copies
            .into_iter()
            .map(std::net::TcpListener::try_clone)
            .collect::<std::io::Result<_>>()
            .context("copy the pod's listeners")?;

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
        let (inbound_v6, hbone_v6) = v6.unzip();
        for listener in std::iter::once(inbound_v4).chain(inbound_v6) {
            proxies.push(proxy::serve(listener, pod_ctx.clone(), self.ctx.clone(), inbound::handle));
        }
        for listener in std::iter::once(hbone_v4).chain(hbone_v6) {
            proxies.push(proxy::serve(listener, pod_ctx.clone(), self.ctx.clone(), hbone::connection));
        }
        Ok(ActivePod { spec, pod: pod_ctx, proxies, listeners })
    }

    /// Stops capturing a pod; a task finishes the cleanup inside its netns.
    /// Returns its accept loops, aborted: each has closed its listener once
    /// it has finished.
    fn unenrol(&mut self, id: &str) -> Vec<tokio::task::JoinHandle<()>> {
        let Some(active) = self.active.remove(id) else {
            return Vec::new();
        };
        self.ctx.local_pods.remove(&active.pod);
        self.capture.unenrol(active.pod.netns_cookie);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_netns_paths_are_named_ones() {
        for (path, named) in [
            ("/run/netns/web", true),
            ("/var/run/netns/cni-1234", true),
            ("/proc/1/ns/net", false),
            ("/run/netns/../../proc/1/ns/net", false),
            ("/run/netns/", false),
            ("/run/netns/a/b", false),
            ("/etc/netns/web", false),
        ] {
            assert_eq!(is_named_netns(std::path::Path::new(path)), named, "{path}");
        }
    }
}
