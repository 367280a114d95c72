//! The Kubernetes source: watches the API server and produces the same
//! [`Updates`] as the standalone directory, so that one code path leads from
//! an object to its enforcement.
//!
//! One kube-runtime watcher per kind (with backoff, so an API server outage
//! or an expired watch relists without dropping what is known), each feeding
//! a reflector store. Objects keep only the fields ambit reads: a cluster's
//! pods carry container specs, managed fields and statuses that would
//! otherwise fill the agent's memory. Every object goes through the model's
//! parser, as a file's would; an object the model rejects is reported and
//! its last good version stays in force.
#![forbid(unsafe_code)]

pub mod ca;
mod convert;
pub mod crds;

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    pin::Pin,
    time::Duration,
};

use ambit_config::{Update, Updates};
use ambit_model::{ConfigError, Object, Snapshot};
use futures::{Stream, StreamExt as _, stream::select_all};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt as _,
        reflector::store::{Store, Writer},
        watcher,
    },
};
use tokio::sync::mpsc;

pub use convert::Labels;

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

const KINDS: [Kind; 7] = [
    Kind { group: "", version: "v1", kind: "Namespace", plural: "namespaces" },
    Kind { group: "", version: "v1", kind: "Pod", plural: "pods" },
    Kind { group: "", version: "v1", kind: "Service", plural: "services" },
    Kind { group: "security.istio.io", version: "v1", kind: "PeerAuthentication", plural: "peerauthentications" },
    Kind { group: "security.istio.io", version: "v1", kind: "AuthorizationPolicy", plural: "authorizationpolicies" },
    Kind { group: "security.istio.io", version: "v1", kind: "RequestAuthentication", plural: "requestauthentications" },
    Kind { group: "gateway.networking.k8s.io", version: "v1", kind: "Gateway", plural: "gateways" },
];

impl Kind {
    fn resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(self.group, self.version, self.kind), self.plural)
    }
}

/// What a watcher reports to the loop that builds snapshots.
enum Change {
    /// The kind's store changed; `ready` once its first list is complete.
    Stored {
        kind: usize,
        ready: bool,
    },
    Failed {
        kind: usize,
        error: watcher::Error,
    },
}

/// Starts watching the cluster `client` talks to. The first update comes
/// once every kind has been listed; then one per burst of changes.
pub fn watch_cluster(client: Client, labels: Labels) -> Updates {
    Updates::spawn(move |tx| run(client, labels, tx))
}

async fn run(client: Client, labels: Labels, tx: mpsc::Sender<Update>) {
    let mut stores = Vec::new();
    let mut changes: Vec<Pin<Box<dyn Stream<Item = Change> + Send>>> = Vec::new();
    for (index, kind) in KINDS.iter().enumerate() {
        let resource = kind.resource();
        let writer = Writer::<DynamicObject>::new(resource.clone());
        stores.push(writer.as_reader());
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        let kind = *kind;
        let stream = watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(move |object| convert::keep_what_ambit_reads(kind.kind, object))
            .reflect(writer)
            .map(move |event| match event {
                Ok(event) => Change::Stored { kind: index, ready: matches!(event, watcher::Event::InitDone) },
                Err(error) => Change::Failed { kind: index, error },
            });
        changes.push(Box::pin(stream));
    }
    let mut changes = select_all(changes);
    let mut ready = [false; KINDS.len()];
    let mut builder = SnapshotBuilder::new(labels);
    let mut dirty = false;
    loop {
        let settle = tokio::time::sleep(SETTLE);
        tokio::select! {
            change = changes.next() => match change {
                Some(Change::Stored { kind, ready: listed }) => {
                    ready[kind] |= listed;
                    dirty = true;
                }
                Some(Change::Failed { kind, error }) => {
                    // The watcher retries with backoff; what is stored stays.
                    tracing::warn!(kind = KINDS[kind].kind, %error, "watching the API server failed; retrying, the last known objects stay in force");
                }
                None => return,
            },
            _ = settle, if dirty && ready.iter().all(|r| *r) => {
                dirty = false;
                if tx.send(builder.build(&stores)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Builds snapshots from the stores, parsing each object once per version
/// and keeping the last good version of each object the model rejects.
struct SnapshotBuilder {
    labels: Labels,
    /// By uid: the resourceVersion parsed, and what came of it.
    parsed: HashMap<String, (String, Option<Result<Object, ConfigError>>)>,
    /// By uid: the last version the model accepted.
    last_good: HashMap<String, Object>,
}

impl SnapshotBuilder {
    fn new(labels: Labels) -> Self {
        Self { labels, parsed: HashMap::new(), last_good: HashMap::new() }
    }

    fn build(&mut self, stores: &[Store<DynamicObject>]) -> Update {
        let mut snapshot = Snapshot::default();
        let mut errors = Vec::new();
        let mut seen = HashSet::new();
        for (kind, store) in KINDS.iter().zip(stores) {
            for object in store.state() {
                let uid = object.metadata.uid.clone().unwrap_or_default();
                let version = object.metadata.resource_version.clone().unwrap_or_default();
                let outcome = match self.parsed.get(&uid) {
                    Some((parsed_version, outcome)) if *parsed_version == version => outcome.clone(),
                    _ => {
                        let outcome = convert::to_model(kind.kind, &object, &self.labels)
                            .map(|value| ambit_model::parse_object(Path::new(SOURCE), 1, value));
                        self.parsed.insert(uid.clone(), (version, outcome.clone()));
                        outcome
                    }
                };
                match outcome {
                    None => {}
                    Some(Ok(object)) => {
                        self.last_good.insert(uid.clone(), object.clone());
                        snapshot.insert(object);
                    }
                    Some(Err(error)) => {
                        errors.push(error);
                        if let Some(good) = self.last_good.get(&uid) {
                            snapshot.insert(good.clone());
                        }
                    }
                }
                seen.insert(uid);
            }
        }
        // Objects gone from the cluster take their history with them.
        self.parsed.retain(|uid, _| seen.contains(uid));
        self.last_good.retain(|uid, _| seen.contains(uid));
        Update { snapshot, errors }
    }
}

/// How errors name where an object came from.
const SOURCE: &str = "kubernetes";
