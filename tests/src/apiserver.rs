//! A test double of the Kubernetes API server.
//!
//! No kube-apiserver can run on the machines ambit is tested on, so this
//! double speaks the API server's real wire protocol, over plain http, for
//! what ambit's Kubernetes source, its CA and kubectl use: the same paths,
//! query parameters, JSON bodies, status codes and watch event stream.
//!
//! - discovery: `/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`, `/version`;
//! - list, with `resourceVersion`, `limit` and `continue`, and label and
//!   field selectors;
//! - watch from a resourceVersion, with BOOKMARK events when asked
//!   (`allowWatchBookmarks`), closed at `timeoutSeconds`; a resourceVersion
//!   older than the history kept ([`ApiServer::compact`]) gets 410 Gone as
//!   an ERROR event inside the stream, as the real server sends it;
//! - get, create, replace, merge patch (`pods/status` too) and delete;
//! - TokenReview, answered for the tokens a test registers;
//! - faults on demand: watches dropped, 500s, slow responses.
//!
//! It is not a Kubernetes: no admission, no defaulting beyond metadata, no
//! garbage collection, and a strategic merge patch is applied as a JSON
//! merge patch (the same thing for the maps and scalars tests patch).

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Channel, Full, combinators::BoxBody};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header::CONTENT_TYPE};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// How often a watch that asked for bookmarks gets one.
const BOOKMARK_INTERVAL: Duration = Duration::from_millis(500);
/// A watch without `timeoutSeconds` is closed after this long, as the real
/// server closes every watch after a while.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(300);

/// A kind the double serves.
#[derive(Debug)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    /// The path segment, e.g. `pods`.
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

impl Resource {
    fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_string() } else { format!("{}/{}", self.group, self.version) }
    }
}

macro_rules! resource {
    ($group:expr, $version:expr, $plural:expr, $kind:expr, $namespaced:expr) => {
        Resource { group: $group, version: $version, plural: $plural, kind: $kind, namespaced: $namespaced }
    };
}

/// Every kind the double serves.
pub const RESOURCES: &[Resource] = &[
    resource!("", "v1", "namespaces", "Namespace", false),
    resource!("", "v1", "nodes", "Node", false),
    resource!("", "v1", "pods", "Pod", true),
    resource!("", "v1", "services", "Service", true),
    resource!("", "v1", "serviceaccounts", "ServiceAccount", true),
    resource!("", "v1", "secrets", "Secret", true),
    resource!("", "v1", "configmaps", "ConfigMap", true),
    resource!("", "v1", "events", "Event", true),
    resource!("apps", "v1", "daemonsets", "DaemonSet", true),
    resource!("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", true),
    resource!("security.istio.io", "v1", "peerauthentications", "PeerAuthentication", true),
    resource!("security.istio.io", "v1", "authorizationpolicies", "AuthorizationPolicy", true),
    resource!("security.istio.io", "v1", "requestauthentications", "RequestAuthentication", true),
    resource!("gateway.networking.k8s.io", "v1", "gateways", "Gateway", true),
    resource!("ambit.dev", "v1alpha1", "trustdomainfederations", "TrustDomainFederation", false),
];

const TOKEN_REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// Who a registered service-account token belongs to.
#[derive(Clone, Debug)]
pub struct TokenOwner {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token was projected into, as bound tokens name it.
    pub pod_name: String,
    pub pod_uid: String,
    /// The audiences the token was issued for.
    pub audiences: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn name(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watches see it.
#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: EventType,
    resource: usize,
    namespace: Option<String>,
    /// The object after the change (for a deletion, as it was, with the
    /// deletion's resourceVersion).
    object: Value,
    /// The object before a modification, so that a watch with a selector
    /// sees an object leave it as a deletion.
    before: Option<Value>,
}

/// (resource index, namespace, name).
type Key = (usize, String, String);

#[derive(Default)]
struct Store {
    /// Makes this double's uids unique on the machine: the agent's /proc
    /// scan matches pods by uid, and other test beds run alongside.
    uid_prefix: String,
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_watchable: u64,
    tokens: HashMap<String, TokenOwner>,
}

#[derive(Default)]
struct Faults {
    /// The next requests that fail with 500.
    fail_next: usize,
    delay: Duration,
}

struct Shared {
    store: Mutex<Store>,
    live: broadcast::Sender<Event>,
    /// Bumped to drop every open watch.
    drop_watches: watch::Sender<u64>,
    faults: Mutex<Faults>,
    requests: Mutex<Vec<String>>,
}

/// A running double on a loopback port. Dropping it stops it.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// The first three groups of this double's uids: the process and a
/// counter, e.g. `0000a1b2-0003-4000`.
fn uid_prefix() -> String {
    static DOUBLES: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let count = DOUBLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:08x}-{count:04x}-4000", std::process::id())
}

impl ApiServer {
    /// Starts the double on 127.0.0.1 (a port of the system's choice), in a
    /// runtime of its own, so that synchronous and async tests can use it.
    pub fn start() -> Result<Self> {
        // Bound outside the runtime: the caller may be inside another one.
        Self::serve_on(std::net::TcpListener::bind("127.0.0.1:0").context("listen for the API server double")?)
    }

    /// Starts the double on `addr` inside the network namespace at `netns`
    /// (the test bed's fabric, which every node reaches).
    pub fn start_in(netns: &std::path::Path, addr: SocketAddr) -> Result<Self> {
        let netns = std::fs::File::open(netns).with_context(|| format!("open {}", netns.display()))?;
        // A thread of its own enters the netns, so the caller's stays put;
        // the socket keeps the netns it was made in.
        let listener = std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<std::net::TcpListener> {
                    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).context("enter the netns")?;
                    std::net::TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the listening thread panicked"))?
        })?;
        Self::serve_on(listener)
    }

    fn serve_on(listener: std::net::TcpListener) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("start the API server double's runtime")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store { uid_prefix: uid_prefix(), ..Store::default() }),
            live: broadcast::channel(4096).0,
            drop_watches: watch::channel(0).0,
            faults: Mutex::default(),
            requests: Mutex::default(),
        });
        let serving = shared.clone();
        runtime.spawn(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, serving).await,
                Err(error) => eprintln!("the API server double cannot listen: {error}"),
            }
        });
        Ok(Self { addr, shared, runtime: Some(runtime) })
    }

    /// `http://<address>:<port>`, for kubectl's `--server` and kube's client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig that points at this double (no credentials), for
    /// processes that find the API server through $KUBECONFIG.
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster: {{server: \"{}\"}}\nusers:\n- name: double\n  user: {{}}\ncontexts:\n- name: double\n  context: {{cluster: double, user: double}}\ncurrent-context: double\n",
            self.url()
        );
        std::fs::write(path, config).with_context(|| format!("write {}", path.display()))
    }

    /// Creates or replaces an object, as a controller would.
    pub fn put(&self, object: Value) -> Result<Value> {
        let api_version = object["apiVersion"].as_str().context("the object has no apiVersion")?;
        let kind = object["kind"].as_str().context("the object has no kind")?;
        let index = RESOURCES
            .iter()
            .position(|r| r.api_version() == api_version && r.kind == kind)
            .with_context(|| format!("the double does not serve {api_version} {kind}"))?;
        let namespace = object["metadata"]["namespace"].as_str().map(str::to_string);
        let mut store = self.shared.store.lock().expect("store lock");
        let name = object["metadata"]["name"].as_str().context("the object has no name")?.to_string();
        let key = (index, namespace.clone().unwrap_or_default(), name);
        let stored = match store.objects.get(&key).cloned() {
            Some(before) => store.change(&self.shared.live, key, EventType::Modified, object, Some(before)),
            None => store.change(&self.shared.live, key, EventType::Added, object, None),
        };
        Ok(stored)
    }

    /// The object, if it exists.
    pub fn get(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let index = RESOURCES.iter().position(|r| r.plural == resource)?;
        let key = (index, namespace.unwrap_or_default().to_string(), name.to_string());
        self.shared.store.lock().expect("store lock").objects.get(&key).cloned()
    }

    /// Applies a JSON merge patch to an object's status (and its labels and
    /// annotations), as kubelet updates a pod; `false` if there is none.
    pub fn patch_status(&self, resource: &str, namespace: Option<&str>, name: &str, patch: &Value) -> bool {
        let Some(index) = RESOURCES.iter().position(|r| r.plural == resource) else { return false };
        let key = (index, namespace.unwrap_or_default().to_string(), name.to_string());
        let mut store = self.shared.store.lock().expect("store lock");
        let Some(before) = store.objects.get(&key).cloned() else { return false };
        let mut object = before.clone();
        merge_patch(&mut object["status"], &patch["status"]);
        store.change(&self.shared.live, key, EventType::Modified, object, Some(before));
        true
    }

    /// Stores `pods` pods and `services` services shaped like a real
    /// cluster's (container specs, managed fields, kubectl's last applied
    /// configuration, status conditions), in 100 ambient namespaces
    /// `ns-<n>`, the pods on 100 nodes `node-<n>` with addresses in
    /// 10.64.0.0/10: what the benchmarks measure memory with.
    pub fn fill_like_a_cluster(&self, pods: usize, services: usize) -> Result<()> {
        for index in 0..100 {
            let labels = json!({"ambit.dev/dataplane-mode": "ambient"});
            self.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns-{index}"), "labels": labels}}))?;
        }
        for index in 0..pods {
            self.put(realistic_pod(index))?;
        }
        for index in 0..services {
            self.put(realistic_service(index))?;
        }
        Ok(())
    }

    /// Deletes an object, as a controller would; `false` if there was none.
    pub fn remove(&self, resource: &str, namespace: Option<&str>, name: &str) -> bool {
        let Some(index) = RESOURCES.iter().position(|r| r.plural == resource) else { return false };
        let key = (index, namespace.unwrap_or_default().to_string(), name.to_string());
        let mut store = self.shared.store.lock().expect("store lock");
        let Some(before) = store.objects.get(&key).cloned() else { return false };
        store.change(&self.shared.live, key, EventType::Deleted, before, None);
        true
    }

    /// Every object of `resource` (its plural), in every namespace.
    pub fn list(&self, resource: &str) -> Vec<Value> {
        let Some(index) = RESOURCES.iter().position(|r| r.plural == resource) else { return Vec::new() };
        let store = self.shared.store.lock().expect("store lock");
        store.objects.iter().filter(|((kind, _, _), _)| *kind == index).map(|(_, object)| object.clone()).collect()
    }

    /// Accepts `token` in TokenReviews as `owner`'s.
    pub fn add_token(&self, token: &str, owner: TokenOwner) {
        self.shared.store.lock().expect("store lock").tokens.insert(token.to_string(), owner);
    }

    /// Advances the resourceVersion (as writes to kinds nobody here watches
    /// do) and forgets the history up to it, as the real server's
    /// compaction does: a watch from any version handed out before gets
    /// 410 Gone, and the client must list again.
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().expect("store lock");
        store.rv += 1;
        store.history.clear();
        store.oldest_watchable = store.rv;
    }

    /// Ends every open watch stream abruptly.
    pub fn drop_watches(&self) {
        self.shared.drop_watches.send_modify(|generation| *generation += 1);
    }

    /// The next `count` requests fail with 500 Internal Server Error.
    pub fn fail_next(&self, count: usize) {
        self.shared.faults.lock().expect("faults lock").fail_next = count;
    }

    /// Every response waits this long first.
    pub fn delay_responses(&self, delay: Duration) {
        self.shared.faults.lock().expect("faults lock").delay = delay;
    }

    /// `METHOD path?query` of every request so far, oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().expect("requests lock").clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Store {
    /// Applies one change, records it and tells the watches. Returns the
    /// stored object.
    fn change(
        &mut self,
        live: &broadcast::Sender<Event>,
        key: Key,
        kind: EventType,
        mut object: Value,
        before: Option<Value>,
    ) -> Value {
        self.rv += 1;
        let resource = &RESOURCES[key.0];
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind);
        let metadata = &mut object["metadata"];
        metadata["resourceVersion"] = json!(self.rv.to_string());
        match (&before, kind) {
            (Some(before), _) => {
                for kept in ["uid", "creationTimestamp"] {
                    metadata[kept] = before["metadata"][kept].clone();
                }
            }
            (None, EventType::Added) => {
                metadata["uid"] = json!(format!("{}-8000-{:012x}", self.uid_prefix, self.rv));
                metadata["creationTimestamp"] = json!(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
            }
            // A deletion carries the object as it was.
            (None, _) => {}
        }
        if resource.namespaced {
            metadata["namespace"] = json!(key.1);
        }
        match kind {
            EventType::Deleted => self.objects.remove(&key),
            _ => self.objects.insert(key.clone(), object.clone()),
        };
        let namespace = resource.namespaced.then(|| key.1.clone());
        let event = Event { rv: self.rv, kind, resource: key.0, namespace, object: object.clone(), before };
        self.history.push(event.clone());
        let _ = live.send(event);
        object
    }
}

/// What a request names.
struct Target {
    resource: usize,
    namespace: Option<String>,
    name: Option<String>,
    /// `status`, or `None` for the object itself.
    subresource: Option<String>,
}

type Body = BoxBody<Bytes, Infallible>;

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

async fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let line = format!("{} {}", request.method(), request.uri());
    shared.requests.lock().expect("requests lock").push(line);
    let (fail, delay) = {
        let mut faults = shared.faults.lock().expect("faults lock");
        let fail = faults.fail_next > 0;
        faults.fail_next = faults.fail_next.saturating_sub(1);
        (fail, faults.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if fail {
        return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "injected fault");
    }
    let (parts, body) = request.into_parts();
    let query: HashMap<String, String> = parts.uri.query().map(parse_query).unwrap_or_default();
    let path = parts.uri.path().trim_end_matches('/');
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return bad_request(&format!("cannot read the body: {e}")),
    };
    if let Some(discovery) = discovery(path) {
        return discovery;
    }
    if path == TOKEN_REVIEW_PATH && parts.method == Method::POST {
        return token_review(shared, &body);
    }
    let Some(target) = target(path) else {
        return status(StatusCode::NOT_FOUND, "NotFound", &format!("the server could not find {path}"));
    };
    let content_type = parts.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    match (&parts.method, &target.name) {
        (&Method::GET, None) if is_true(query.get("watch")) => watch_stream(shared, &target, &query),
        (&Method::GET, None) => list(shared, &target, &query),
        (&Method::GET, Some(_)) => get(shared, &target),
        (&Method::POST, None) => create(shared, &target, &body),
        (&Method::PUT, Some(_)) => replace(shared, &target, &body),
        (&Method::PATCH, Some(_)) => patch(shared, &target, content_type, &body),
        (&Method::DELETE, Some(_)) => delete(shared, &target),
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "the double does not serve this verb here"),
    }
}

fn is_true(value: Option<&String>) -> bool {
    matches!(value.map(String::as_str), Some("true" | "1"))
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// Percent-decoding, `+` as a space.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("valid response")
}

/// A `Status` failure, as the API server reports errors.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_object(code, reason, message))
}

fn status_object(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn discovery(path: &str) -> Option<Response<Body>> {
    let groups: Vec<(&str, &str)> = {
        let mut groups: Vec<(&str, &str)> =
            RESOURCES.iter().filter(|r| !r.group.is_empty()).map(|r| (r.group, r.version)).collect();
        groups.push(("authentication.k8s.io", "v1"));
        groups.dedup();
        groups
    };
    let body = match path {
        "/version" => json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}),
        "/api" => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
        }),
        "/apis" => json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": groups.iter().map(|(group, version)| {
                let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
                json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
            }).collect::<Vec<_>>(),
        }),
        _ => {
            let group_version = path.strip_prefix("/api/").or_else(|| path.strip_prefix("/apis/"))?;
            if group_version.matches('/').count() > usize::from(path.starts_with("/apis/")) {
                return None;
            }
            let (group, version) = group_version.split_once('/').unwrap_or(("", group_version));
            let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
            let mut resources = Vec::new();
            for r in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
                let singular = r.kind.to_lowercase();
                resources.push(json!({"name": r.plural, "singularName": singular, "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs}));
                resources.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
            }
            if (group, version) == ("authentication.k8s.io", "v1") {
                resources.push(json!({"name": "tokenreviews", "singularName": "tokenreview", "namespaced": false, "kind": "TokenReview", "verbs": ["create"]}));
            }
            if resources.is_empty() {
                return None;
            }
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
        }
    };
    Some(json_response(StatusCode::OK, &body))
}

/// Parses `/api/v1/...` and `/apis/<group>/<version>/...`.
fn target(path: &str) -> Option<Target> {
    let (group, rest) = match path.strip_prefix("/api/") {
        Some(rest) => ("", rest),
        None => {
            let rest = path.strip_prefix("/apis/")?;
            rest.split_once('/')?
        }
    };
    let (version, rest) = rest.split_once('/')?;
    let segments: Vec<&str> = rest.split('/').collect();
    let (namespace, rest) = match segments.as_slice() {
        ["namespaces", namespace, plural, rest @ ..] if *plural != "status" => (Some(namespace.to_string()), {
            let mut all = vec![*plural];
            all.extend_from_slice(rest);
            all
        }),
        _ => (None, segments.clone()),
    };
    let plural = rest.first()?;
    let resource = RESOURCES.iter().position(|r| r.group == group && r.version == version && r.plural == *plural)?;
    let namespaced = RESOURCES[resource].namespaced;
    // A namespaced object is named within its namespace; a collection of
    // them may span every namespace.
    if (namespace.is_some() && !namespaced) || (namespace.is_none() && namespaced && rest.len() > 1) {
        return None;
    }
    Some(Target {
        resource,
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

/// Whether `object` passes the request's `labelSelector` and `fieldSelector`.
struct Selector {
    labels: Vec<(String, Option<String>, bool)>,
    fields: Vec<(String, String, bool)>,
}

impl Selector {
    fn parse(query: &HashMap<String, String>) -> Result<Self, String> {
        let mut labels = Vec::new();
        for term in query.get("labelSelector").iter().flat_map(|s| s.split(',')).filter(|t| !t.is_empty()) {
            let term = term.trim();
            if let Some((key, value)) = term.split_once("!=") {
                labels.push((key.to_string(), Some(value.to_string()), false));
            } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
                labels.push((key.to_string(), Some(value.to_string()), true));
            } else if let Some(key) = term.strip_prefix('!') {
                labels.push((key.to_string(), None, false));
            } else if term.contains([' ', '(']) {
                return Err(format!("label selector `{term}`: the double supports =, ==, != and existence only"));
            } else {
                labels.push((term.to_string(), None, true));
            }
        }
        let mut fields = Vec::new();
        for term in query.get("fieldSelector").iter().flat_map(|s| s.split(',')).filter(|t| !t.is_empty()) {
            if let Some((path, value)) = term.split_once("!=") {
                fields.push((path.to_string(), value.to_string(), false));
            } else if let Some((path, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
                fields.push((path.to_string(), value.to_string(), true));
            } else {
                return Err(format!("field selector `{term}`: use path=value or path!=value"));
            }
        }
        Ok(Self { labels, fields })
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let labels_hold = self.labels.iter().all(|(key, value, equal)| match value {
            None => labels.get(key).is_some() == *equal,
            Some(value) => (labels.get(key).and_then(Value::as_str) == Some(value.as_str())) == *equal,
        });
        let fields_hold = self.fields.iter().all(|(path, value, equal)| {
            let found = path.split('.').try_fold(object, |v, segment| v.get(segment));
            let text = match found {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (text == *value) == *equal
        });
        labels_hold && fields_hold
    }
}

fn in_scope(target: &Target, resource: usize, namespace: &Option<String>) -> bool {
    resource == target.resource && (target.namespace.is_none() || *namespace == target.namespace)
}

/// The stored objects a list or a watch of `target` sees now.
fn current<'a>(store: &'a Store, target: &Target, selector: &Selector) -> Vec<&'a Value> {
    store
        .objects
        .iter()
        .filter(|((resource, namespace, _), _)| {
            let namespace = RESOURCES[*resource].namespaced.then(|| namespace.clone());
            in_scope(target, *resource, &namespace)
        })
        .map(|(_, object)| object)
        .filter(|object| selector.matches(object))
        .collect()
}

fn list(shared: &Shared, target: &Target, query: &HashMap<String, String>) -> Response<Body> {
    let selector = match Selector::parse(query) {
        Ok(selector) => selector,
        Err(message) => return bad_request(&message),
    };
    let store = shared.store.lock().expect("store lock");
    let mut matching = current(&store, target, &selector);
    // `continue` is the offset into the list, with the resourceVersion of
    // the first page; a page from a compacted version is gone, as on the
    // real server.
    let (list_rv, offset) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match token.split_once(':').and_then(|(rv, at)| Some((rv.parse().ok()?, at.parse().ok()?))) {
            Some((rv, _)) if rv < store.oldest_watchable => {
                return status(StatusCode::GONE, "Expired", "the continue token is too old; list again");
            }
            Some(parsed) => parsed,
            None => return bad_request("malformed continue token"),
        },
        None => (store.rv, 0usize),
    };
    matching = matching.into_iter().skip(offset).collect();
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if let Some(limit) = limit.filter(|l| matching.len() > *l) {
        matching.truncate(limit);
        metadata["continue"] = json!(format!("{list_rv}:{}", offset + limit));
        metadata["remainingItemCount"] = json!(0);
    }
    let resource = &RESOURCES[target.resource];
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", resource.kind),
            "apiVersion": resource.api_version(),
            "metadata": metadata,
            "items": matching,
        }),
    )
}

fn key_of(target: &Target) -> Key {
    (target.resource, target.namespace.clone().unwrap_or_default(), target.name.clone().unwrap_or_default())
}

fn not_found(target: &Target) -> Response<Body> {
    let resource = &RESOURCES[target.resource];
    let name = target.name.as_deref().unwrap_or_default();
    status(StatusCode::NOT_FOUND, "NotFound", &format!("{}.{} \"{name}\" not found", resource.plural, resource.group))
}

fn get(shared: &Shared, target: &Target) -> Response<Body> {
    match shared.store.lock().expect("store lock").objects.get(&key_of(target)) {
        Some(object) => json_response(StatusCode::OK, object),
        None => not_found(target),
    }
}

/// The request body as a JSON object, or why it is not one.
fn parse_object(body: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(object) if object.is_object() => Ok(object),
        Ok(_) => Err("the body is not a JSON object".into()),
        Err(e) => Err(format!("the body is not JSON: {e}")),
    }
}

fn bad_request(message: &str) -> Response<Body> {
    status(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn create(shared: &Shared, target: &Target, body: &[u8]) -> Response<Body> {
    let object = match parse_object(body) {
        Ok(object) => object,
        Err(message) => return bad_request(&message),
    };
    let resource = &RESOURCES[target.resource];
    if object["kind"] != resource.kind {
        return bad_request(&format!("expected kind {}", resource.kind));
    }
    let Some(name) = object["metadata"]["name"].as_str().filter(|n| !n.is_empty()) else {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.name: Required value");
    };
    if let (Some(path), Some(body)) = (&target.namespace, object["metadata"]["namespace"].as_str())
        && path != body
    {
        return bad_request("the namespace of the body does not match the path");
    }
    let key = (target.resource, target.namespace.clone().unwrap_or_default(), name.to_string());
    let mut store = shared.store.lock().expect("store lock");
    if store.objects.contains_key(&key) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", resource.plural),
        );
    }
    let stored = store.change(&shared.live, key, EventType::Added, object, None);
    json_response(StatusCode::CREATED, &stored)
}

fn replace(shared: &Shared, target: &Target, body: &[u8]) -> Response<Body> {
    let mut object = match parse_object(body) {
        Ok(object) => object,
        Err(message) => return bad_request(&message),
    };
    let key = key_of(target);
    let mut store = shared.store.lock().expect("store lock");
    let Some(before) = store.objects.get(&key).cloned() else { return not_found(target) };
    let sent_rv = object["metadata"]["resourceVersion"].as_str().unwrap_or_default();
    if !sent_rv.is_empty() && sent_rv != before["metadata"]["resourceVersion"] {
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            "the object has been modified; apply your changes to the latest version",
        );
    }
    if target.subresource.as_deref() == Some("status") {
        let status = object["status"].take();
        object = before.clone();
        object["status"] = status;
    }
    let stored = store.change(&shared.live, key, EventType::Modified, object, Some(before));
    json_response(StatusCode::OK, &stored)
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let object = target.as_object_mut().expect("made an object just above");
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn patch(shared: &Shared, target: &Target, content_type: &str, body: &[u8]) -> Response<Body> {
    if !content_type.starts_with("application/merge-patch+json")
        && !content_type.starts_with("application/strategic-merge-patch+json")
    {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "the double applies merge patches (application/merge-patch+json) only",
        );
    }
    let patch = match parse_object(body) {
        Ok(patch) => patch,
        Err(message) => return bad_request(&message),
    };
    let key = key_of(target);
    let mut store = shared.store.lock().expect("store lock");
    let Some(before) = store.objects.get(&key).cloned() else { return not_found(target) };
    let mut object = before.clone();
    match target.subresource.as_deref() {
        // As the real server's status strategy for pods: the status, and
        // the metadata's labels and annotations, may change; the spec not.
        Some("status") => {
            if let Some(status) = patch.get("status") {
                merge_patch(&mut object["status"], status);
            }
            for field in ["labels", "annotations"] {
                if let Some(value) = patch["metadata"].get(field) {
                    merge_patch(&mut object["metadata"][field], value);
                }
            }
        }
        None => merge_patch(&mut object, &patch),
        Some(other) => return status(StatusCode::NOT_FOUND, "NotFound", &format!("no subresource {other}")),
    }
    let stored = store.change(&shared.live, key, EventType::Modified, object, Some(before));
    json_response(StatusCode::OK, &stored)
}

fn delete(shared: &Shared, target: &Target) -> Response<Body> {
    let key = key_of(target);
    let mut store = shared.store.lock().expect("store lock");
    let Some(before) = store.objects.get(&key).cloned() else { return not_found(target) };
    let deleted = store.change(&shared.live, key, EventType::Deleted, before, None);
    json_response(StatusCode::OK, &deleted)
}

fn token_review(shared: &Shared, body: &[u8]) -> Response<Body> {
    let review = match parse_object(body) {
        Ok(review) => review,
        Err(message) => return bad_request(&message),
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    let owner = shared.store.lock().expect("store lock").tokens.get(token).cloned();
    let audiences = |owner: &TokenOwner| if wanted.is_empty() { owner.audiences.clone() } else { wanted.clone() };
    let status = match owner {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(owner) if !wanted.is_empty() && !wanted.iter().any(|a| owner.audiences.contains(a)) => {
            json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
        }
        Some(owner) => json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{}:{}", owner.namespace, owner.service_account),
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", owner.namespace), "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/pod-name": [owner.pod_name],
                    "authentication.kubernetes.io/pod-uid": [owner.pod_uid],
                },
            },
            "audiences": audiences(&owner),
        }),
    };
    json_response(
        StatusCode::CREATED,
        &json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {}, "spec": review["spec"], "status": status}),
    )
}

/// One line of a watch stream.
fn watch_line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
}

fn watch_stream(shared: &Arc<Shared>, target: &Target, query: &HashMap<String, String>) -> Response<Body> {
    let selector = match Selector::parse(query) {
        Ok(selector) => selector,
        Err(message) => return bad_request(&message),
    };
    let bookmarks = is_true(query.get("allowWatchBookmarks"));
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let from = query.get("resourceVersion").filter(|rv| !rv.is_empty() && *rv != "0");
    let resource = &RESOURCES[target.resource];
    let in_scope_of = {
        let (index, namespace) = (target.resource, target.namespace.clone());
        move |event: &Event| event.resource == index && (namespace.is_none() || event.namespace == namespace)
    };
    // The first lines and the live subscription are taken under one lock,
    // so no change falls between them.
    let (first, mut live, mut last_rv) = {
        let store = shared.store.lock().expect("store lock");
        let live = shared.live.subscribe();
        match from.map(|rv| rv.parse::<u64>()) {
            Some(Err(_)) => return bad_request("resourceVersion is not a number"),
            Some(Ok(rv)) if rv < store.oldest_watchable => {
                let gone = status_object(
                    StatusCode::GONE,
                    "Expired",
                    &format!("too old resource version: {rv} ({})", store.oldest_watchable),
                );
                (vec![watch_line("ERROR", &gone)], None, store.rv)
            }
            Some(Ok(rv)) => {
                let replay =
                    store.history.iter().filter(|e| e.rv > rv && in_scope_of(e)).filter_map(|e| seen(e, &selector));
                (replay.collect(), Some(live), store.rv)
            }
            None => {
                let added = current(&store, target, &selector).into_iter().map(|object| watch_line("ADDED", object));
                (added.collect(), Some(live), store.rv)
            }
        }
    };
    let (mut sender, body) = Channel::<Bytes, Infallible>::new(64);
    let mut dropped = shared.drop_watches.subscribe();
    let (kind, api_version) = (resource.kind, resource.api_version());
    tokio::spawn(async move {
        for line in first {
            if sender.send_data(line).await.is_err() {
                return;
            }
        }
        let Some(live) = live.as_mut() else { return };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmark = tokio::time::interval(BOOKMARK_INTERVAL);
        loop {
            let line = tokio::select! {
                _ = &mut deadline => return,
                _ = dropped.changed() => return,
                _ = bookmark.tick(), if bookmarks => {
                    let object = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": last_rv.to_string()}});
                    watch_line("BOOKMARK", &object)
                }
                event = live.recv() => match event {
                    Ok(event) => {
                        last_rv = event.rv;
                        match Some(&event).filter(|e| in_scope_of(e)).and_then(|e| seen(e, &selector)) {
                            Some(line) => line,
                            None => continue,
                        }
                    }
                    // A watcher this far behind must relist, as on the real server.
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if sender.send_data(line).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(body.boxed())
        .expect("valid response")
}

/// How a watch with `selector` sees `event`: an object that stops matching
/// leaves as a deletion, one that starts matching arrives as an addition.
fn seen(event: &Event, selector: &Selector) -> Option<Bytes> {
    let now = selector.matches(&event.object);
    let before = event.before.as_ref().is_some_and(|b| selector.matches(b));
    let kind = match (event.kind, before, now) {
        (EventType::Modified, true, false) => "DELETED",
        (EventType::Modified, false, true) => "ADDED",
        (EventType::Modified, false, false) | (_, _, false) => return None,
        (kind, _, true) => kind.name(),
    };
    Some(watch_line(kind, &event.object))
}

fn realistic_pod(index: usize) -> Value {
    let (namespace, app) = (format!("ns-{}", index % 100), format!("app-{}", index % 500));
    let container = json!({
        "name": "app",
        "image": format!("registry.example/{app}:1.2.{index}"),
        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
        "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
    });
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("{app}-{index}"),
            "namespace": namespace,
            "labels": {"app": app, "pod-template-hash": "5d9c7f8b6"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(1200)},
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}, "f:spec": {"f:containers": {}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:conditions": {}, "f:podIPs": {}}}, "subresource": "status"},
            ],
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-5d9c7f8b6"), "uid": "u", "controller": true}],
        },
        "spec": {
            "nodeName": format!("node-{}", index % 100),
            "serviceAccountName": app,
            "containers": [container],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
        },
        "status": {
            "phase": "Running",
            "podIPs": [{"ip": format!("10.{}.{}.{}", 64 + index / 65536, (index / 256) % 256, index % 256)}],
            "conditions": [
                {"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"},
                {"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"},
            ],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "registry.example/app", "imageID": "sha256:0123456789abcdef", "containerID": "containerd://0123456789abcdef"}],
        },
    })
}

fn realistic_service(index: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": format!("svc-{index}"), "namespace": format!("ns-{}", index % 100)},
        "spec": {
            "clusterIP": format!("10.96.{}.{}", index / 256, index % 256),
            "selector": {"app": format!("app-{}", index % 500)},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    })
}
