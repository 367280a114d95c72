//! Kubernetes mode's node side: the pods' network namespaces, from the
//! `ambit-cni` plugin (new pods) and from `/proc` (pods that ran before the
//! agent started), the answers to the plugin, and each pod's capture
//! status written back on the pod.
//!
//! The networks go to the Kubernetes source ([`ambit_kube::NodePods`]),
//! which gives them to the pods' objects, so enrolment reads a pod's netns
//! the same way in both modes.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ambit_cni_api::{Command, Reply, Request};
use ambit_kube::{PodNetwork, PodNetworks};
use ambit_model::{DataplaneMode, Pod};
use ambit_state::State;
use k8s_openapi::api::core::v1::Pod as ApiPod;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    cni::{self, CniCall},
    enrolment::Enrolments,
    podscan,
};

/// The annotation that shows a pod's capture (`kubectl get pod -o yaml`):
/// `enrolled`, or `failed: <why>`. Written through `pods/status`.
pub const CAPTURE_ANNOTATION: &str = "ambit.dev/capture";

/// How long an ADD waits for the pod's capture; under the plugin's own
/// timeout, so the plugin hears the reason.
const ADD_WAIT: Duration = Duration::from_secs(4);

/// An ADD waiting for its pod to be captured.
struct Waiting {
    request: Request,
    reply: oneshot::Sender<Reply>,
    since: Instant,
}

pub struct Cluster {
    node: String,
    socket: PathBuf,
    proc_root: PathBuf,
    networks: watch::Sender<PodNetworks>,
    calls: mpsc::Receiver<CniCall>,
    waiting: Vec<Waiting>,
    statuses: mpsc::UnboundedSender<(String, Option<String>)>,
    /// The capture status last written on each pod, by `namespace/name`.
    reported: HashMap<String, Option<String>>,
    captured_namespaces: Option<Vec<String>>,
}

impl Cluster {
    /// Listens for the plugin on `socket`; returns the networks for the
    /// Kubernetes source to follow. `proc_root` is the host's `/proc`.
    pub fn start(
        client: Client,
        node: String,
        socket: PathBuf,
        proc_root: PathBuf,
    ) -> anyhow::Result<(Self, watch::Receiver<PodNetworks>)> {
        let listener = cni::bind(&socket)?;
        let (calls_tx, calls) = mpsc::channel(256);
        tokio::spawn(cni::serve(listener, calls_tx));
        let (statuses, pending) = mpsc::unbounded_channel();
        tokio::spawn(write_statuses(client, pending));
        let (networks, followed) = watch::channel(PodNetworks::new());
        let cluster = Self {
            node,
            socket,
            proc_root,
            networks,
            calls,
            waiting: Vec::new(),
            statuses,
            reported: HashMap::new(),
            captured_namespaces: None,
        };
        Ok((cluster, followed))
    }

    /// The plugin's next request.
    pub async fn next_call(&mut self) -> Option<CniCall> {
        self.calls.recv().await
    }

    /// Takes a request from the plugin. An ADD is answered by [`Self::settle`]
    /// once the pod is captured (or found not to be for the mesh).
    pub fn receive(&mut self, call: CniCall, state: &State, enrolments: &Enrolments) {
        let CniCall { request, reply } = call;
        let id = request.pod_id();
        match request.command {
            Command::Add => {
                let network = PodNetwork {
                    uid: request.uid.clone(),
                    netns: self.host_path(&request.netns),
                    ips: request.ips.clone(),
                };
                tracing::info!(pod = %id, netns = %network.netns.display(), ips = ?network.ips, "CNI ADD");
                self.networks.send_modify(|networks| {
                    networks.insert(id, network);
                });
                self.waiting.push(Waiting { request, reply, since: Instant::now() });
            }
            Command::Del => {
                tracing::info!(pod = %id, "CNI DEL");
                self.networks.send_if_modified(|networks| {
                    let same_pod = networks.get(&id).is_some_and(|n| request.uid.is_none() || n.uid == request.uid);
                    same_pod && networks.remove(&id).is_some()
                });
                let _ = reply.send(Reply::NotCaptured { reason: "the pod's sandbox is gone".into() });
            }
            Command::Check => {
                let answer = self
                    .decide(&request, state, enrolments)
                    .unwrap_or_else(|| Reply::Failed { reason: "the agent has not captured the pod yet".into() });
                let _ = reply.send(answer);
            }
        }
    }

    /// After each reconcile: answers the ADDs that can be answered, writes
    /// changed capture statuses on the pods, and the list of captured
    /// namespaces for the plugin.
    pub fn settle(&mut self, state: &State, enrolments: &Enrolments) {
        for waiting in std::mem::take(&mut self.waiting) {
            let answer = match self.decide(&waiting.request, state, enrolments) {
                Some(answer) => answer,
                None if waiting.since.elapsed() >= ADD_WAIT => self.too_late(&waiting.request, state),
                None => {
                    self.waiting.push(waiting);
                    continue;
                }
            };
            let id = waiting.request.pod_id();
            tracing::info!(pod = %id, answer = ?answer, "CNI ADD answered");
            let _ = waiting.reply.send(answer);
        }
        self.report_statuses(state, enrolments);
        let mut namespaces: Vec<String> = state
            .snapshot()
            .namespaces
            .values()
            .filter(|ns| ns.dataplane_mode == Some(DataplaneMode::Ambient))
            .map(|ns| ns.name.clone())
            .collect();
        namespaces.sort();
        if self.captured_namespaces.as_ref() != Some(&namespaces) {
            match cni::write_capture_namespaces(&self.socket, namespaces.clone()) {
                Ok(()) => self.captured_namespaces = Some(namespaces),
                Err(error) => tracing::warn!(%error, "cannot write the captured namespaces for the CNI plugin"),
            }
        }
    }

    /// Whether ADDs are waiting (the caller settles again soon).
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Finds, in `/proc`, the netns of the node's ambient pods that have
    /// none, and forgets those that no longer hold their pod's address (the
    /// sandbox was replaced, the node rebooted): the next scan or ADD finds
    /// the new one. Says whether the networks changed.
    pub fn rescan(&mut self, state: &State) -> bool {
        let local: Vec<&Pod> = state.pods_to_enrol(&self.node).collect();
        let mut changed = false;
        let stale: Vec<String> = self
            .networks
            .borrow()
            .iter()
            .filter(|(id, network)| {
                local.iter().any(|pod| pod.id() == **id) && !podscan::holds_any(&network.netns, &network.ips)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            tracing::warn!(pod = %id, "the pod's network namespace no longer holds its address; looking for it again");
            self.networks.send_modify(|networks| {
                networks.remove(&id);
            });
            changed = true;
        }
        let wanted: HashMap<String, Vec<IpAddr>> = local
            .iter()
            .filter(|pod| !self.networks.borrow().contains_key(&pod.id()))
            .filter_map(|pod| Some((pod.uid.clone()?, pod.ips.clone())))
            .collect();
        if wanted.is_empty() {
            return changed;
        }
        let found = podscan::find_pod_netns(&self.proc_root, &wanted);
        for pod in local.iter().filter(|pod| pod.uid.as_ref().is_some_and(|uid| found.contains_key(uid))) {
            let uid = pod.uid.clone().expect("filtered");
            let netns = found[&uid].clone();
            tracing::info!(pod = %pod.id(), netns = %netns.display(), "found a running pod's network namespace in /proc");
            let network = PodNetwork { uid: Some(uid), netns, ips: pod.ips.clone() };
            self.networks.send_modify(|networks| {
                networks.insert(pod.id(), network);
            });
            changed = true;
        }
        changed
    }

    /// The answer for `request` now, if there is one yet.
    fn decide(&self, request: &Request, state: &State, enrolments: &Enrolments) -> Option<Reply> {
        let id = request.pod_id();
        let pod = state.snapshot().pods.get(&id).filter(|pod| request.uid.is_none() || pod.uid == request.uid)?;
        if pod.node != self.node {
            return Some(Reply::NotCaptured { reason: format!("the pod is scheduled on node {}", pod.node) });
        }
        if !state.pods_to_enrol(&self.node).any(|p| p.id() == id) {
            return Some(Reply::NotCaptured { reason: "the pod is not in ambient mode".into() });
        }
        if pod.netns.as_deref() != Some(self.host_path(&request.netns).as_path()) {
            return None; // the source has not given the pod this netns yet
        }
        if enrolments.is_enrolled(&id) {
            return Some(Reply::Captured);
        }
        enrolments.failure(&id).map(|reason| Reply::Failed { reason: reason.to_string() })
    }

    /// The answer for an ADD whose pod was not decided in time.
    fn too_late(&self, request: &Request, state: &State) -> Reply {
        let id = request.pod_id();
        if state.snapshot().pods.contains_key(&id) {
            return Reply::Failed { reason: format!("the pod was not captured within {ADD_WAIT:?}") };
        }
        let namespace_ambient = state
            .snapshot()
            .namespaces
            .get(&request.namespace)
            .is_some_and(|ns| ns.dataplane_mode == Some(DataplaneMode::Ambient));
        if namespace_ambient {
            Reply::Failed { reason: format!("the agent has not seen pod {id} in the API server within {ADD_WAIT:?}") }
        } else {
            // Its netns is kept: should the pod turn out to be ambient, it is captured then.
            Reply::NotCaptured { reason: "not seen in the API server yet, and its namespace is not ambient".into() }
        }
    }

    /// Queues a `pods/status` patch for every pod whose capture changed.
    fn report_statuses(&mut self, state: &State, enrolments: &Enrolments) {
        let mut now: BTreeMap<String, Option<String>> = self.reported.keys().map(|id| (id.clone(), None)).collect();
        for pod in state.pods_to_enrol(&self.node) {
            let id = pod.id();
            let status = match (enrolments.is_enrolled(&id), enrolments.failure(&id)) {
                (true, _) => Some("enrolled".to_string()),
                (false, Some(reason)) => Some(format!("failed: {reason}")),
                (false, None) => None,
            };
            now.insert(id, status);
        }
        for (id, status) in now {
            let gone = !state.snapshot().pods.contains_key(&id);
            if gone {
                self.reported.remove(&id);
                continue;
            }
            if self.reported.get(&id) != Some(&status) {
                self.reported.insert(id.clone(), status.clone());
                let _ = self.statuses.send((id, status));
            }
        }
        self.reported.retain(|_, status| status.is_some());
    }

    /// A netns path as the runtime gave it, as this agent can open it: a
    /// `/proc/<pid>/ns/net` path is under the host's `/proc`.
    fn host_path(&self, netns: &str) -> PathBuf {
        match netns.strip_prefix("/proc/") {
            Some(rest) => self.proc_root.join(rest),
            None => Path::new(netns).to_path_buf(),
        }
    }
}

/// Writes capture statuses on the pods, in order, through `pods/status`.
async fn write_statuses(client: Client, mut pending: mpsc::UnboundedReceiver<(String, Option<String>)>) {
    while let Some((id, status)) = pending.recv().await {
        let Some((namespace, name)) = id.split_once('/') else { continue };
        let patch = json!({"metadata": {"annotations": {CAPTURE_ANNOTATION: status}}});
        let pods = Api::<ApiPod>::namespaced(client.clone(), namespace);
        match pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => tracing::warn!(pod = %id, %error, "cannot write the pod's capture status"),
        }
    }
}

/// What a stopping container of the agents' DaemonSet is part of.
pub enum DaemonSetFate {
    /// The DaemonSet stays: a rolling update or a node drain.
    Stays,
    /// It is being deleted, or the container's own access is gone (its
    /// service account or RBAC went first): ambit is being uninstalled.
    Deleted(&'static str),
    /// The API server could not tell.
    Unknown(String),
}

/// Asks the API server about DaemonSet `namespace/name`.
pub async fn daemonset_fate(namespace: &str, name: &str) -> DaemonSetFate {
    let client = match ambit_kube::client().await {
        Ok(client) => client,
        Err(error) => return DaemonSetFate::Unknown(format!("{error:#}")),
    };
    let daemonsets = kube::Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client, namespace);
    match daemonsets.get_opt(name).await {
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_none() => DaemonSetFate::Stays,
        Ok(_) => DaemonSetFate::Deleted("the DaemonSet is being deleted"),
        Err(kube::Error::Api(status)) if status.code == 401 || status.code == 403 => {
            DaemonSetFate::Deleted("the DaemonSet's own access is gone")
        }
        Err(error) => DaemonSetFate::Unknown(error.to_string()),
    }
}
