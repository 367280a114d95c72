//! The Kubernetes source: watches the API server and produces the same
//! [`Updates`] as the standalone directory, so that one code path leads from
//! an object to its enforcement.
//!
//! One kube-runtime watcher per kind (with backoff, so an API server outage
//! or an expired watch relists without dropping what is known). Every
//! object goes through the model's parser as it arrives, as a file's would,
//! and only what the model made of it is kept: a cluster's pods carry
//! container specs, managed fields and statuses that would otherwise fill
//! the agent's memory. An object the model rejects is reported and its last
//! good version stays in force.
#![forbid(unsafe_code)]

pub mod ca;
mod convert;
pub mod crds;
mod events;

use std::{collections::HashMap, path::Path, pin::Pin, time::Duration};

use ambit_config::{Update, Updates};
use ambit_model::{ConfigError, Object, Snapshot};
use futures::{Stream, StreamExt as _, stream::select_all};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::{mpsc, watch};

pub use convert::{Labels, PodNetwork, PodNetworks};
use events::Rejection;

/// How long a burst of changes may run on before the snapshot is rebuilt:
/// a rollout changes many pods at once.
const SETTLE: Duration = Duration::from_millis(50);

/// A kind ambit watches.
#[derive(Clone, Copy, Debug)]
struct Kind {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
}

const KINDS: [Kind; 8] = [
    Kind { group: "", version: "v1", kind: "Namespace", plural: "namespaces" },
    Kind { group: "", version: "v1", kind: "Pod", plural: "pods" },
    Kind { group: "", version: "v1", kind: "Service", plural: "services" },
    Kind { group: "security.istio.io", version: "v1", kind: "PeerAuthentication", plural: "peerauthentications" },
    Kind { group: "security.istio.io", version: "v1", kind: "AuthorizationPolicy", plural: "authorizationpolicies" },
    Kind { group: "security.istio.io", version: "v1", kind: "RequestAuthentication", plural: "requestauthentications" },
    Kind { group: "gateway.networking.k8s.io", version: "v1", kind: "Gateway", plural: "gateways" },
    Kind { group: "ambit.dev", version: "v1alpha1", kind: "TrustDomainFederation", plural: "trustdomainfederations" },
];

impl Kind {
    fn resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(self.group, self.version, self.kind), self.plural)
    }
}

/// What a watcher reports to the loop that builds snapshots.
enum Change {
    Event { kind: usize, event: Box<watcher::Event<DynamicObject>> },
    Failed { kind: usize, error: watcher::Error },
}

/// A client for the API server: the pod's service account in a cluster, or
/// $KUBECONFIG. kube's TLS uses the process-wide rustls provider, installed
/// here (ring) unless the process has one.
pub async fn client() -> anyhow::Result<Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the Kubernetes API server ({e}): run in a pod with a service account, or set KUBECONFIG"
        )
    })
}

/// What a source is for, beyond the cluster's objects.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub labels: Labels,
    /// The node the source serves, if any.
    pub node: Option<NodePods>,
}

/// A node's pods as its CNI plugin reported them: they get their network
/// namespace, and their addresses until kubelet writes them, from these
/// reports and never from the API.
#[derive(Clone, Debug)]
pub struct NodePods {
    pub node: String,
    pub networks: watch::Receiver<PodNetworks>,
}

/// Starts watching the cluster `client` talks to. The first update comes
/// once every kind has been listed; then one per burst of changes. Objects
/// the model rejects are reported on the object as Events.
pub fn watch_cluster(client: Client, options: Options) -> Updates {
    Updates::spawn(move |tx| run(client, options, tx))
}

async fn run(client: Client, options: Options, tx: mpsc::Sender<Update>) {
    let Options { labels, node } = options;
    let (node_name, mut networks) = match node {
        Some(NodePods { node, networks }) => (Some(node), networks),
        None => (None, watch::channel(PodNetworks::new()).1),
    };
    let reporter = node_name.clone().unwrap_or_else(|| "cluster".to_string());
    let mut changes: Vec<Pin<Box<dyn Stream<Item = Change> + Send>>> = Vec::new();
    for (index, kind) in KINDS.iter().enumerate() {
        let api = Api::<DynamicObject>::all_with(client.clone(), &kind.resource());
        let kind = *kind;
        let stream = watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(move |object| convert::keep_what_ambit_reads(kind.kind, object))
            .map(move |event| match event {
                Ok(event) => Change::Event { kind: index, event: Box::new(event) },
                Err(error) => Change::Failed { kind: index, error },
            });
        changes.push(Box::pin(stream));
    }
    let mut changes = select_all(changes);
    let mut kinds: Vec<KindObjects> =
        KINDS.iter().map(|kind| KindObjects::new(*kind, labels, node_name.clone())).collect();
    let mut dirty = false;
    loop {
        let settle = tokio::time::sleep(SETTLE);
        tokio::select! {
            change = changes.next() => match change {
                Some(Change::Event { kind, event }) => {
                    dirty |= kinds[kind].apply(*event, &networks.borrow());
                    for rejection in kinds[kind].rejections.drain(..) {
                        tokio::spawn(events::report(client.clone(), rejection, reporter.clone()));
                    }
                }
                Some(Change::Failed { kind, error }) => {
                    // The watcher retries with backoff; what is known stays.
                    tracing::warn!(kind = KINDS[kind].kind, %error, "watching the API server failed; retrying, the last known objects stay in force");
                }
                None => return,
            },
            Ok(()) = networks.changed() => {
                let networks = networks.borrow_and_update().clone();
                let mut changed = false;
                for kind in &mut kinds {
                    changed |= kind.renetwork(&networks);
                }
                // A CNI ADD waits on this: no settling.
                if changed && kinds.iter().all(|k| k.listed) {
                    dirty = false;
                    if tx.send(snapshot(&kinds)).await.is_err() {
                        return;
                    }
                } else {
                    dirty |= changed;
                }
            }
            _ = settle, if dirty && kinds.iter().all(|k| k.listed) => {
                dirty = false;
                if tx.send(snapshot(&kinds)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// What the model made of one object: kept instead of the object itself,
/// so that the source holds each object once, parsed.
struct Parsed {
    resource_version: String,
    /// The CNI report the object was parsed with (a pod of this node).
    network: Option<PodNetwork>,
    /// `None`: not for ambit (an unscheduled pod, say).
    outcome: Option<Result<Object, ConfigError>>,
    /// The last version the model accepted, while the current one is
    /// rejected: it stays in force.
    last_good: Option<Object>,
}

/// The objects of one kind, by uid, as the watcher's events leave them.
struct KindObjects {
    kind: Kind,
    labels: Labels,
    /// The node whose pods' objects are kept in `local`.
    node: Option<String>,
    objects: HashMap<String, Parsed>,
    /// This node's pods, by uid, as the watcher left them (pruned): parsed
    /// again when their CNI report changes.
    local: HashMap<String, DynamicObject>,
    /// Objects the model has just rejected, to report.
    rejections: Vec<Rejection>,
    /// A relist under way: it replaces `objects` when complete, so that
    /// objects deleted while the watch was down go, and nothing is missing
    /// meanwhile.
    relisting: Option<HashMap<String, Parsed>>,
    /// Whether the first list is complete.
    listed: bool,
}

impl KindObjects {
    fn new(kind: Kind, labels: Labels, node: Option<String>) -> Self {
        Self {
            kind,
            labels,
            node: node.filter(|_| kind.kind == "Pod"),
            objects: HashMap::new(),
            local: HashMap::new(),
            rejections: Vec::new(),
            relisting: None,
            listed: false,
        }
    }

    /// Applies one event; says whether what is in force may have changed.
    fn apply(&mut self, event: watcher::Event<DynamicObject>, networks: &PodNetworks) -> bool {
        match event {
            watcher::Event::Init => {
                self.relisting = Some(HashMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                let (uid, parsed) = self.parse(object, networks);
                self.relisting.get_or_insert_with(HashMap::new).insert(uid, parsed);
                false
            }
            watcher::Event::InitDone => {
                self.objects = self.relisting.take().unwrap_or_default();
                self.local.retain(|uid, _| self.objects.contains_key(uid));
                self.listed = true;
                true
            }
            watcher::Event::Apply(object) => {
                let (uid, parsed) = self.parse(object, networks);
                self.objects.insert(uid, parsed);
                true
            }
            watcher::Event::Delete(object) => {
                let uid = object.metadata.uid.as_deref().unwrap_or_default();
                self.objects.remove(uid);
                self.local.remove(uid);
                true
            }
        }
    }

    /// Parses this node's pods again after their CNI reports changed.
    fn renetwork(&mut self, networks: &PodNetworks) -> bool {
        let changed: Vec<DynamicObject> = self
            .local
            .values()
            .filter(|object| {
                let uid = object.metadata.uid.as_deref().unwrap_or_default();
                let known = self.objects.get(uid).and_then(|parsed| parsed.network.as_ref());
                convert::network_of(networks, object) != known
            })
            .cloned()
            .collect();
        for object in &changed {
            let (uid, parsed) = self.parse(object.clone(), networks);
            self.objects.insert(uid, parsed);
        }
        !changed.is_empty()
    }

    /// Parses `object` once per resourceVersion (and CNI report), carrying
    /// its last good version over from what is known of it.
    fn parse(&mut self, object: DynamicObject, networks: &PodNetworks) -> (String, Parsed) {
        let uid = object.metadata.uid.clone().unwrap_or_default();
        let resource_version = object.metadata.resource_version.clone().unwrap_or_default();
        let on_this_node = self.node.is_some() && object.data["spec"]["nodeName"].as_str() == self.node.as_deref();
        let network = convert::network_of(networks, &object).filter(|_| on_this_node).cloned();
        if on_this_node {
            self.local.insert(uid.clone(), object.clone());
        }
        let known = self.objects.get(&uid);
        if let Some(known) = known.filter(|k| k.resource_version == resource_version && k.network == network) {
            let same = Parsed {
                resource_version,
                network,
                outcome: known.outcome.clone(),
                last_good: known.last_good.clone(),
            };
            return (uid, same);
        }
        let value = convert::to_model(self.kind.kind, &object, &self.labels, network.as_ref());
        let outcome = value.clone().map(|value| ambit_model::parse_object(Path::new(SOURCE), 1, value));
        if let Some(Err(error)) = &outcome {
            self.rejections.push(Rejection::new(&self.kind, &object, error));
        }
        let last_good = match (&outcome, known) {
            (Some(Err(_)), Some(known)) => match &known.outcome {
                Some(Ok(good)) => Some(good.clone()),
                _ => known.last_good.clone(),
            },
            _ => None,
        };
        // A policy rejected with no good version to stand in fails closed.
        let last_good = match (&outcome, value) {
            (Some(Err(error)), Some(value)) if last_good.is_none() && self.kind.kind == "AuthorizationPolicy" => {
                Some(Object::AuthorizationPolicy(ambit_model::policy_parse::fail_closed(&value, error)))
            }
            _ => last_good,
        };
        (uid, Parsed { resource_version, network, outcome, last_good })
    }
}

/// Every object in force, and what the model rejected.
fn snapshot(kinds: &[KindObjects]) -> Update {
    let mut snapshot = Snapshot::default();
    let mut errors = Vec::new();
    for parsed in kinds.iter().flat_map(|kind| kind.objects.values()) {
        match &parsed.outcome {
            None => {}
            Some(Ok(object)) => snapshot.insert(object.clone()),
            Some(Err(error)) => {
                errors.push(error.clone());
                if let Some(good) = &parsed.last_good {
                    snapshot.insert(good.clone());
                }
            }
        }
    }
    Update { snapshot, errors }
}

/// How errors name where an object came from.
const SOURCE: &str = "kubernetes";
