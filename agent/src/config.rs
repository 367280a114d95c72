//! Standalone configuration: a directory of YAML files holding Kubernetes-shaped
//! objects (`Namespace`, `Pod`). This is the embedded default and the source the
//! test bed writes.
//!
//! Loading is per file and keeps the last good version: when a file fails to
//! parse or validate, every error is reported with the file, the object and
//! the field, and the file's previous objects stay in force. A bad edit never
//! drops pods from the mesh.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

use crate::authz::{self, AuthorizationPolicy, parse::RequestAuthentication};

/// Label on a Namespace (all its pods) or a Pod (that pod only).
pub const DATAPLANE_MODE_LABEL: &str = "ambit.dev/dataplane-mode";
/// Annotation on a Pod: path of its network namespace (the CNI's netns path).
pub const NETNS_ANNOTATION: &str = "ambit.dev/netns";
/// Label on a Namespace or Service: send its service traffic through the
/// named waypoint (a Gateway of the same namespace); `none` opts a service out.
pub const USE_WAYPOINT_LABEL: &str = "ambit.dev/use-waypoint";
/// Label on a Gateway: which traffic its waypoint takes (`service`, the
/// default, `workload`, `all` or `none`).
pub const WAYPOINT_FOR_LABEL: &str = "ambit.dev/waypoint-for";
/// Label on a Pod: the Gateway it serves as a waypoint (Gateway API's name).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The only `gatewayClassName` ambit acts on.
pub const WAYPOINT_CLASS: &str = "ambit-waypoint";

/// Value of [`DATAPLANE_MODE_LABEL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DataplaneMode {
    /// Captured and tunnelled by the node agent.
    Ambient,
    /// Explicitly left alone (opt-out on a pod in an ambient namespace).
    None,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: String,
    pub dataplane_mode: Option<DataplaneMode>,
    /// [`USE_WAYPOINT_LABEL`].
    pub use_waypoint: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub netns: Option<PathBuf>,
    pub dataplane_mode: Option<DataplaneMode>,
    /// [`USE_WAYPOINT_LABEL`]: its own traffic (addressed to the pod) goes
    /// through that waypoint if the waypoint takes workload traffic.
    pub use_waypoint: Option<String>,
    /// The file the pod came from, for error messages.
    pub source: PathBuf,
}

impl Pod {
    /// `namespace/name`, the way operators refer to a pod.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A Service: a virtual IP whose ports lead to the pods its selector picks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: IpAddr,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
    /// [`USE_WAYPOINT_LABEL`].
    pub use_waypoint: Option<String>,
}

impl Service {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
}

/// PeerAuthentication mode (security.istio.io/v1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum MtlsMode {
    /// Inherit from the enclosing scope.
    Unset,
    /// Plaintext and mTLS both accepted (the default).
    Permissive,
    /// Only mTLS accepted; plaintext is reset.
    Strict,
    /// The destination does not require mTLS (accepted as PERMISSIVE; see
    /// docs/ARCHITECTURE.md: ambit never downgrades ambient-to-ambient hops).
    Disable,
}

/// A PeerAuthentication: mesh-wide in the root namespace, namespace-wide
/// without a selector, per workload with one (and only then per port).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerAuthentication {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    pub port_modes: BTreeMap<u16, MtlsMode>,
}

/// Which traffic a waypoint takes ([`WAYPOINT_FOR_LABEL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

/// A Gateway of class [`WAYPOINT_CLASS`]: a waypoint, served by the pods
/// labelled with its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Gateway {
    pub namespace: String,
    pub name: String,
    pub waypoint_for: WaypointFor,
}

impl Gateway {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One parsed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
    RequestAuthentication(RequestAuthentication),
    Gateway(Gateway),
}

impl Object {
    fn key(&self) -> (&'static str, String) {
        match self {
            Object::Namespace(ns) => ("Namespace", ns.name.clone()),
            Object::Pod(pod) => ("Pod", pod.id()),
            Object::Service(svc) => ("Service", svc.id()),
            Object::PeerAuthentication(pa) => ("PeerAuthentication", format!("{}/{}", pa.namespace, pa.name)),
            Object::AuthorizationPolicy(ap) => ("AuthorizationPolicy", ap.id()),
            Object::RequestAuthentication(ra) => ("RequestAuthentication", format!("{}/{}", ra.namespace, ra.name)),
            Object::Gateway(gw) => ("Gateway", gw.id()),
        }
    }
}

/// What went wrong with a configuration file. Each variant names the file and,
/// where there is one, the object and field, and says how to fix it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{file}: cannot read the file: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: document {doc}: not valid YAML: {reason}")]
    Yaml { file: PathBuf, doc: usize, reason: String },
    #[error("{file}: document {doc}: missing `kind`; every object needs `apiVersion` and `kind` (e.g. Namespace, Pod)")]
    MissingKind { file: PathBuf, doc: usize },
    #[error(
        "{file}: document {doc}: kind `{kind}` is not supported; use Namespace, Pod, Service, Gateway, PeerAuthentication, AuthorizationPolicy or RequestAuthentication"
    )]
    UnknownKind { file: PathBuf, doc: usize, kind: String },
    #[error("{file}: document {doc} ({object}): field `{field}`: {reason}")]
    Field { file: PathBuf, doc: usize, object: String, field: String, reason: String },
    #[error("{file}: {object} is also defined in {first}; remove one of the two (the one in {first} stays in force)")]
    Duplicate { file: PathBuf, object: String, first: PathBuf },
}

impl ConfigError {
    pub(crate) fn field(file: &Path, doc: usize, object: &str, field: &str, reason: impl Into<String>) -> Self {
        ConfigError::Field {
            file: file.to_path_buf(),
            doc,
            object: object.to_string(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawMetadata {
    pub(crate) name: String,
    pub(crate) namespace: Option<String>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawNamespace {
    metadata: RawMetadata,
}

#[derive(Deserialize)]
struct RawPod {
    metadata: RawMetadata,
    spec: RawPodSpec,
    #[serde(default)]
    status: RawPodStatus,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPodSpec {
    node_name: String,
    #[serde(default = "default_service_account")]
    service_account_name: String,
}

fn default_service_account() -> String {
    "default".to_string()
}

#[derive(Deserialize, Default)]
struct RawPodStatus {
    #[serde(rename = "podIPs", default)]
    pod_ips: Vec<RawPodIp>,
}

#[derive(Deserialize)]
struct RawPodIp {
    ip: IpAddr,
}

#[derive(Deserialize)]
struct RawService {
    metadata: RawMetadata,
    spec: RawServiceSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServiceSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: IpAddr,
    ports: Vec<RawServicePort>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServicePort {
    port: u16,
    target_port: Option<u16>,
}

#[derive(Deserialize)]
struct RawGateway {
    metadata: RawMetadata,
    spec: RawGatewaySpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawGatewaySpec {
    gateway_class_name: String,
}

#[derive(Deserialize)]
struct RawPeerAuthentication {
    metadata: RawMetadata,
    #[serde(default)]
    spec: RawPeerAuthenticationSpec,
}

// A misspelt field in a security setting must be an error, not a silent
// default (`mdoe: STRICT` would leave the mode unset, i.e. PERMISSIVE).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPeerAuthenticationSpec {
    selector: Option<RawSelector>,
    mtls: Option<RawMtls>,
    #[serde(default)]
    port_level_mtls: BTreeMap<String, RawMtls>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMtls {
    #[serde(default)]
    mode: Option<String>,
}

/// Parses one file's text into objects, or every error it holds.
pub fn parse_file(file: &Path, text: &str) -> Result<Vec<Object>, Vec<ConfigError>> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc = index + 1;
        let value = match Value::deserialize(document) {
            Ok(Value::Null) => continue, // empty document, e.g. a trailing `---`
            Ok(value) => value,
            Err(e) => {
                errors.push(ConfigError::Yaml { file: file.to_path_buf(), doc, reason: e.to_string() });
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        match parse_object(file, doc, value) {
            Ok(object) => objects.push(object),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() { Ok(objects) } else { Err(errors) }
}

fn parse_object(file: &Path, doc: usize, value: Value) -> Result<Object, ConfigError> {
    let kind = match value.get("kind") {
        Some(Value::String(kind)) => kind.clone(),
        _ => {
            return Err(ConfigError::MissingKind { file: file.to_path_buf(), doc });
        }
    };
    let object_name = || {
        let meta = value.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("<unnamed>");
        match meta.and_then(|m| m.get("namespace")).and_then(Value::as_str) {
            Some(ns) => format!("{kind} {ns}/{name}"),
            None => format!("{kind} {name}"),
        }
    };
    let describe = object_name();
    match kind.as_str() {
        "Namespace" => {
            let raw: RawNamespace = deserialize(file, doc, &describe, value)?;
            let dataplane_mode = dataplane_mode(file, doc, &describe, &raw.metadata.labels)?;
            let use_waypoint = raw.metadata.labels.get(USE_WAYPOINT_LABEL).cloned();
            Ok(Object::Namespace(Namespace { name: raw.metadata.name, dataplane_mode, use_waypoint }))
        }
        "Pod" => {
            let raw: RawPod = deserialize(file, doc, &describe, value)?;
            let dataplane_mode = dataplane_mode(file, doc, &describe, &raw.metadata.labels)?;
            if raw.status.pod_ips.is_empty() {
                return Err(ConfigError::field(
                    file,
                    doc,
                    &describe,
                    "status.podIPs",
                    "a pod needs at least one IP, e.g. `status: {podIPs: [{ip: 10.244.1.5}]}`",
                ));
            }
            let netns = match raw.metadata.annotations.get(NETNS_ANNOTATION) {
                None => None,
                Some(path) if Path::new(path).is_absolute() => Some(PathBuf::from(path)),
                Some(path) => {
                    return Err(ConfigError::field(
                        file,
                        doc,
                        &describe,
                        &format!("metadata.annotations.{NETNS_ANNOTATION}"),
                        format!("`{path}` is not an absolute path; give the pod's netns path, e.g. /run/netns/<name>"),
                    ));
                }
            };
            let use_waypoint = raw.metadata.labels.get(USE_WAYPOINT_LABEL).cloned();
            // Both become segments of the pod's SPIFFE ID.
            let namespace = raw.metadata.namespace.unwrap_or_else(|| "default".to_string());
            for (field, value) in
                [("metadata.namespace", &namespace), ("spec.serviceAccountName", &raw.spec.service_account_name)]
            {
                if let Err(reason) = check_dns_name(value) {
                    return Err(ConfigError::field(file, doc, &describe, field, reason));
                }
            }
            Ok(Object::Pod(Pod {
                namespace,
                name: raw.metadata.name,
                service_account: raw.spec.service_account_name,
                node: raw.spec.node_name,
                labels: raw.metadata.labels,
                ips: raw.status.pod_ips.into_iter().map(|p| p.ip).collect(),
                netns,
                dataplane_mode,
                use_waypoint,
                source: file.to_path_buf(),
            }))
        }
        "Service" => {
            let raw: RawService = deserialize(file, doc, &describe, value)?;
            if raw.spec.ports.is_empty() {
                return Err(ConfigError::field(
                    file,
                    doc,
                    &describe,
                    "spec.ports",
                    "a service needs at least one port",
                ));
            }
            Ok(Object::Service(Service {
                namespace: raw.metadata.namespace.unwrap_or_else(|| "default".to_string()),
                name: raw.metadata.name,
                cluster_ip: raw.spec.cluster_ip,
                ports: raw
                    .spec
                    .ports
                    .iter()
                    .map(|p| ServicePort { port: p.port, target_port: p.target_port.unwrap_or(p.port) })
                    .collect(),
                selector: raw.spec.selector,
                use_waypoint: raw.metadata.labels.get(USE_WAYPOINT_LABEL).cloned(),
            }))
        }
        "PeerAuthentication" => {
            let raw: RawPeerAuthentication = deserialize(file, doc, &describe, value)?;
            let mode = mtls_mode(file, doc, &describe, "spec.mtls.mode", raw.spec.mtls.as_ref())?;
            let selector = raw.spec.selector.map(|s| s.match_labels);
            if selector.as_ref().is_some_and(BTreeMap::is_empty) {
                // It would select every pod of the namespace, at workload precedence.
                return Err(ConfigError::field(
                    file,
                    doc,
                    &describe,
                    "spec.selector.matchLabels",
                    "selects no labels; name the workload's labels, or remove spec.selector for a namespace-wide policy",
                ));
            }
            if selector.is_none() && !raw.spec.port_level_mtls.is_empty() {
                return Err(ConfigError::field(
                    file,
                    doc,
                    &describe,
                    "spec.portLevelMtls",
                    "port-level settings apply to selected workloads only; add spec.selector.matchLabels",
                ));
            }
            let mut port_modes = BTreeMap::new();
            for (port, setting) in &raw.spec.port_level_mtls {
                let field = format!("spec.portLevelMtls.{port}");
                let port: u16 = port.parse().map_err(|_| {
                    ConfigError::field(file, doc, &describe, &field, "the key must be a port number (1-65535)")
                })?;
                port_modes.insert(port, mtls_mode(file, doc, &describe, &format!("{field}.mode"), Some(setting))?);
            }
            Ok(Object::PeerAuthentication(PeerAuthentication {
                namespace: raw.metadata.namespace.unwrap_or_else(|| "default".to_string()),
                name: raw.metadata.name,
                selector,
                mode,
                port_modes,
            }))
        }
        "AuthorizationPolicy" => Ok(Object::AuthorizationPolicy(authz::parse::policy(file, doc, &describe, value)?)),
        "Gateway" => {
            let raw: RawGateway = deserialize(file, doc, &describe, value)?;
            if raw.spec.gateway_class_name != WAYPOINT_CLASS {
                return Err(ConfigError::field(
                    file,
                    doc,
                    &describe,
                    "spec.gatewayClassName",
                    format!(
                        "`{}` is not handled by ambit; waypoints use `{WAYPOINT_CLASS}`",
                        raw.spec.gateway_class_name
                    ),
                ));
            }
            let waypoint_for = match raw.metadata.labels.get(WAYPOINT_FOR_LABEL).map(String::as_str) {
                None | Some("service") => WaypointFor::Service,
                Some("workload") => WaypointFor::Workload,
                Some("all") => WaypointFor::All,
                Some("none") => WaypointFor::None,
                Some(other) => {
                    return Err(ConfigError::field(
                        file,
                        doc,
                        &describe,
                        &format!("metadata.labels.{WAYPOINT_FOR_LABEL}"),
                        format!("`{other}` is not a traffic type; use service, workload, all or none"),
                    ));
                }
            };
            Ok(Object::Gateway(Gateway {
                namespace: raw.metadata.namespace.unwrap_or_else(|| "default".to_string()),
                name: raw.metadata.name,
                waypoint_for,
            }))
        }
        "RequestAuthentication" => {
            Ok(Object::RequestAuthentication(authz::parse::request_authentication(file, doc, &describe, value)?))
        }
        _ => Err(ConfigError::UnknownKind { file: file.to_path_buf(), doc, kind }),
    }
}

pub(crate) fn deserialize<T: serde::de::DeserializeOwned>(
    file: &Path,
    doc: usize,
    object: &str,
    value: Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        ConfigError::field(file, doc, object, &field, e.into_inner().to_string())
    })
}

/// Whether `name` is a Kubernetes DNS-1123 subdomain (what namespaces and
/// service accounts must be), which is also a valid SPIFFE ID segment.
fn check_dns_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alphanumeric = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.len() > 253
        || !name.chars().all(allowed)
        || !alphanumeric(name.chars().next())
        || !alphanumeric(name.chars().last())
    {
        return Err(format!(
            "`{name}` is not a valid name: use at most 253 lowercase letters, digits, `-` and `.`, \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

fn mtls_mode(
    file: &Path,
    doc: usize,
    object: &str,
    field: &str,
    setting: Option<&RawMtls>,
) -> Result<MtlsMode, ConfigError> {
    match setting.and_then(|s| s.mode.as_deref()) {
        None | Some("UNSET") => Ok(MtlsMode::Unset),
        Some("PERMISSIVE") => Ok(MtlsMode::Permissive),
        Some("STRICT") => Ok(MtlsMode::Strict),
        Some("DISABLE") => Ok(MtlsMode::Disable),
        Some(other) => Err(ConfigError::field(
            file,
            doc,
            object,
            field,
            format!("`{other}` is not a mode; use STRICT, PERMISSIVE, DISABLE or UNSET"),
        )),
    }
}

fn dataplane_mode(
    file: &Path,
    doc: usize,
    object: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Option<DataplaneMode>, ConfigError> {
    match labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        None => Ok(None),
        Some("ambient") => Ok(Some(DataplaneMode::Ambient)),
        Some("none") => Ok(Some(DataplaneMode::None)),
        Some(other) => Err(ConfigError::field(
            file,
            doc,
            object,
            &format!("metadata.labels.{DATAPLANE_MODE_LABEL}"),
            format!("`{other}` is not a data-plane mode; use `ambient` or `none`"),
        )),
    }
}

/// Every namespace and pod currently in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Keyed by `namespace/name`.
    pub pods: BTreeMap<String, Pod>,
    /// Keyed by `namespace/name`.
    pub services: BTreeMap<String, Service>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// Keyed by `namespace/name`.
    pub gateways: BTreeMap<String, Gateway>,
    /// JWT rules, enforced by waypoints (public keys only).
    pub request_authentications: Vec<RequestAuthentication>,
}

impl Snapshot {
    /// The waypoint (`namespace/name`) that traffic of `kind` to an object
    /// in `namespace` must take: the object's own label, else its
    /// namespace's; `none` opts out. A label naming a Gateway that does not
    /// exist still names it, so that traffic fails closed.
    pub fn waypoint_for(&self, namespace: &str, own_label: Option<&str>, kind: WaypointFor) -> Option<String> {
        let namespace_label = self.namespaces.get(namespace).and_then(|ns| ns.use_waypoint.as_deref());
        let name = own_label.or(namespace_label)?;
        if name == "none" {
            return None;
        }
        let id = format!("{namespace}/{name}");
        match self.gateways.get(&id).map(|gw| gw.waypoint_for) {
            Some(WaypointFor::None) => None,
            Some(WaypointFor::All) | None => Some(id),
            Some(takes) => (takes == kind).then_some(id),
        }
    }
}

/// Logs what a reload could not apply; those files keep their last good objects.
pub fn log_errors(errors: &[ConfigError]) {
    for error in errors {
        tracing::error!(error = %error, "configuration error; the last good version of this file stays in force");
    }
}

/// The configuration directory and the last good objects of each file in it.
pub struct ConfigDir {
    dir: PathBuf,
    /// Where the text of each file's last good version is kept, if anywhere
    /// ([`ConfigDir::keeping_last_good_in`]).
    kept: Option<PathBuf>,
    last_good: BTreeMap<PathBuf, Vec<Object>>,
}

impl ConfigDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), kept: None, last_good: BTreeMap::new() }
    }

    /// Keeps the text of each file's last good version in `kept`, and falls
    /// back to it for a file that fails to parse when this process has no
    /// good version of its own (after a restart): a broken file's last good
    /// version stands across restarts too, not only across edits.
    pub fn keeping_last_good_in(mut self, kept: PathBuf) -> Self {
        self.kept = Some(kept);
        self
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory again. Files that fail keep their last good
    /// objects; the errors come back alongside the snapshot.
    pub fn reload(&mut self) -> (Snapshot, Vec<ConfigError>) {
        let mut errors = Vec::new();
        let files = match yaml_files(&self.dir) {
            Ok(files) => files,
            Err(e) => {
                // Unreadable directory: keep everything as it was.
                errors.push(ConfigError::Read { file: self.dir.clone(), reason: e.to_string() });
                return (self.snapshot(&mut errors), errors);
            }
        };
        self.last_good.retain(|path, _| files.contains(path));
        self.forget_kept(&files);
        for file in files {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| vec![ConfigError::Read { file: file.clone(), reason: e.to_string() }]);
            match text.and_then(|text| parse_file(&file, &text).map(|objects| (text, objects))) {
                Ok((text, objects)) => {
                    self.keep(&file, &text);
                    self.last_good.insert(file, objects);
                }
                Err(file_errors) => {
                    errors.extend(file_errors);
                    if !self.last_good.contains_key(&file)
                        && let Some(objects) = self.kept_version(&file)
                    {
                        self.last_good.insert(file, objects);
                    }
                }
            }
        }
        (self.snapshot(&mut errors), errors)
    }

    fn kept_path(&self, file: &Path) -> Option<PathBuf> {
        Some(self.kept.as_ref()?.join(file.file_name()?))
    }

    /// Saves `text` as the last good version of `file` (write, then rename,
    /// so a crash leaves the previous version whole).
    fn keep(&self, file: &Path, text: &str) {
        let Some(path) = self.kept_path(file) else { return };
        if std::fs::read_to_string(&path).is_ok_and(|kept| kept == text) {
            return;
        }
        let temporary = path.with_extension("partial");
        let saved = std::fs::create_dir_all(path.parent().expect("a file in a directory"))
            .and_then(|()| std::fs::write(&temporary, text))
            .and_then(|()| std::fs::rename(&temporary, &path));
        if let Err(error) = saved {
            tracing::warn!(file = %file.display(), kept = %path.display(), %error, "cannot keep this file's last good version; it will not outlive a restart");
        }
    }

    /// The objects of `file`'s kept last good version, if there is one.
    fn kept_version(&self, file: &Path) -> Option<Vec<Object>> {
        let path = self.kept_path(file)?;
        let objects = parse_file(file, &std::fs::read_to_string(&path).ok()?).ok()?;
        tracing::warn!(file = %file.display(), kept = %path.display(), "using the last good version of this file, kept from before a restart");
        Some(objects)
    }

    /// Deletes the kept versions of files that are gone from the directory.
    fn forget_kept(&self, files: &[PathBuf]) {
        let Some(entries) = self.kept.as_ref().and_then(|kept| std::fs::read_dir(kept).ok()) else { return };
        let names: Vec<_> = files.iter().filter_map(|f| f.file_name()).collect();
        for entry in entries.flatten() {
            if !names.contains(&entry.file_name().as_os_str()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn snapshot(&self, errors: &mut Vec<ConfigError>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let mut first_seen: BTreeMap<(&'static str, String), &Path> = BTreeMap::new();
        for (file, objects) in &self.last_good {
            for object in objects {
                let key = object.key();
                if let Some(first) = first_seen.get(&key) {
                    errors.push(ConfigError::Duplicate {
                        file: file.clone(),
                        object: format!("{} {}", key.0, key.1),
                        first: first.to_path_buf(),
                    });
                    continue;
                }
                first_seen.insert(key, file);
                match object {
                    Object::Namespace(ns) => {
                        snapshot.namespaces.insert(ns.name.clone(), ns.clone());
                    }
                    Object::Pod(pod) => {
                        snapshot.pods.insert(pod.id(), pod.clone());
                    }
                    Object::Service(svc) => {
                        snapshot.services.insert(svc.id(), svc.clone());
                    }
                    Object::PeerAuthentication(pa) => snapshot.peer_authentications.push(pa.clone()),
                    Object::AuthorizationPolicy(ap) => snapshot.authorization_policies.push(ap.clone()),
                    Object::RequestAuthentication(ra) => snapshot.request_authentications.push(ra.clone()),
                    Object::Gateway(gw) => {
                        snapshot.gateways.insert(gw.id(), gw.clone());
                    }
                }
            }
        }
        snapshot
    }
}

fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
        // Editors and atomic writers leave hidden temporary files; skip them.
        let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if is_yaml && !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    ambit.dev/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: cart
  namespace: shop
  labels: {app: cart}
  annotations:
    ambit.dev/netns: /run/netns/cart
spec:
  nodeName: node1
  serviceAccountName: cart
status:
  podIPs:
  - ip: 10.244.1.2
"#;

    fn errors_of(text: &str) -> Vec<String> {
        parse_file(Path::new("pods.yaml"), text).unwrap_err().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn parses_namespace_and_pod() {
        let objects = parse_file(Path::new("a.yaml"), GOOD).unwrap();
        assert_eq!(
            objects[0],
            Object::Namespace(Namespace {
                name: "shop".into(),
                dataplane_mode: Some(DataplaneMode::Ambient),
                use_waypoint: None
            })
        );
        let Object::Pod(pod) = &objects[1] else { panic!("expected a pod") };
        assert_eq!(pod.id(), "shop/cart");
        assert_eq!(pod.service_account, "cart");
        assert_eq!(pod.node, "node1");
        assert_eq!(pod.ips, vec!["10.244.1.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(pod.netns.as_deref(), Some(Path::new("/run/netns/cart")));
        assert_eq!(pod.dataplane_mode, None);
    }

    #[test]
    fn names_that_cannot_be_spiffe_id_segments_are_refused() {
        for (bad, field) in [
            ("serviceAccountName: cart", "serviceAccountName: \"\"", "spec.serviceAccountName"),
            ("serviceAccountName: cart", "serviceAccountName: my sa", "spec.serviceAccountName"),
            ("serviceAccountName: cart", "serviceAccountName: Cart", "spec.serviceAccountName"),
            ("serviceAccountName: cart", "serviceAccountName: \".\"", "spec.serviceAccountName"),
            ("  namespace: shop\n  labels: {app", "  namespace: shop-\n  labels: {app", "metadata.namespace"),
        ]
        .map(|(good, bad, field)| (GOOD.replace(good, bad), field))
        {
            let errors = errors_of(&bad);
            assert!(
                errors.iter().any(|e| e.contains(&format!("field `{field}`")) && e.contains("not a valid name")),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn defaults_namespace_and_service_account() {
        let text = "kind: Pod\nmetadata: {name: p}\nspec: {nodeName: n}\nstatus: {podIPs: [{ip: 10.0.0.1}]}\n";
        let Object::Pod(pod) = &parse_file(Path::new("a.yaml"), text).unwrap()[0] else { panic!() };
        assert_eq!((pod.namespace.as_str(), pod.service_account.as_str()), ("default", "default"));
    }

    #[test]
    fn bad_ip_names_file_object_and_field() {
        let text = GOOD.replace("10.244.1.2", "10.244.1.300");
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("pods.yaml: document 2 (Pod shop/cart): field `status.podIPs[0].ip`"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn missing_node_name_is_reported() {
        let errors = errors_of(&GOOD.replace("  nodeName: node1\n", ""));
        assert!(errors[0].contains("field `spec`") && errors[0].contains("nodeName"), "{}", errors[0]);
    }

    #[test]
    fn wrong_type_names_the_field() {
        let errors = errors_of(&GOOD.replace("serviceAccountName: cart", "serviceAccountName: [cart]"));
        assert!(errors[0].contains("field `spec.serviceAccountName`"), "{}", errors[0]);
    }

    #[test]
    fn bad_dataplane_mode_says_which_values_work() {
        let errors = errors_of(&GOOD.replace("dataplane-mode: ambient", "dataplane-mode: ambeint"));
        assert!(errors[0].contains("metadata.labels.ambit.dev/dataplane-mode"), "{}", errors[0]);
        assert!(errors[0].contains("use `ambient` or `none`"), "{}", errors[0]);
    }

    #[test]
    fn pod_without_ips_is_rejected() {
        let errors = errors_of(&GOOD.replace("  podIPs:\n  - ip: 10.244.1.2\n", "  podIPs: []\n"));
        assert!(errors[0].contains("field `status.podIPs`"), "{}", errors[0]);
    }

    #[test]
    fn relative_netns_path_is_rejected() {
        let errors = errors_of(&GOOD.replace("/run/netns/cart", "netns/cart"));
        assert!(errors[0].contains("metadata.annotations.ambit.dev/netns"), "{}", errors[0]);
    }

    #[test]
    fn unknown_and_missing_kinds() {
        assert_eq!(
            errors_of("kind: Deployment\nmetadata: {name: x}\n"),
            vec![
                "pods.yaml: document 1: kind `Deployment` is not supported; use Namespace, Pod, Service, Gateway, PeerAuthentication, AuthorizationPolicy or RequestAuthentication"
            ]
        );
        assert!(errors_of("metadata: {name: x}\n")[0].contains("missing `kind`"));
    }

    #[test]
    fn parses_service_with_default_target_port() {
        let text = "kind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: 8080}\n  - {port: 443}\n";
        let Object::Service(svc) = &parse_file(Path::new("svc.yaml"), text).unwrap()[0] else { panic!() };
        assert_eq!(svc.cluster_ip, "10.96.0.10".parse::<IpAddr>().unwrap());
        assert_eq!(
            svc.ports,
            vec![ServicePort { port: 80, target_port: 8080 }, ServicePort { port: 443, target_port: 443 }]
        );
        assert!(errors_of(&text.replace("10.96.0.10", "vip"))[0].contains("field `spec.clusterIP`"));
    }

    #[test]
    fn parses_peer_authentication_modes_and_ports() {
        let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    \"8080\": {mode: PERMISSIVE}\n";
        let Object::PeerAuthentication(pa) = &parse_file(Path::new("pa.yaml"), text).unwrap()[0] else { panic!() };
        assert_eq!(pa.mode, MtlsMode::Strict);
        assert_eq!(pa.port_modes.get(&8080), Some(&MtlsMode::Permissive));
        let bad_mode = errors_of(&text.replace("mode: STRICT", "mode: STRICKT"));
        assert!(
            bad_mode[0].contains("field `spec.mtls.mode`") && bad_mode[0].contains("use STRICT, PERMISSIVE"),
            "{}",
            bad_mode[0]
        );
        let bad_port = errors_of(&text.replace("\"8080\"", "http"));
        assert!(bad_port[0].contains("spec.portLevelMtls.http"), "{}", bad_port[0]);
        let no_selector = errors_of(&text.replace("  selector: {matchLabels: {app: web}}\n", ""));
        assert!(no_selector[0].contains("add spec.selector.matchLabels"), "{}", no_selector[0]);
        // Misspelt or empty security settings are errors, never a quiet PERMISSIVE.
        let cases = [
            ("mtls: {mode: STRICT}", "mtls: {mdoe: STRICT}", "field `spec.mtls.mdoe`"),
            ("mtls: {mode: STRICT}", "mTLS: {mode: STRICT}", "unknown field `mTLS`"),
            ("{matchLabels: {app: web}}", "{matchLabel: {app: web}}", "field `spec.selector.matchLabel`"),
            ("{matchLabels: {app: web}}", "{matchLabels: {}}", "field `spec.selector.matchLabels`: selects no labels"),
        ];
        for (good, bad, want) in cases {
            let errors = errors_of(&text.replace(good, bad));
            assert!(errors[0].contains(want), "{bad}: {}", errors[0]);
        }
    }

    #[test]
    fn yaml_syntax_error_is_reported_with_document() {
        let errors = errors_of("kind: Namespace\nmetadata: {name: [\n");
        assert!(errors[0].starts_with("pods.yaml: document 1: not valid YAML"), "{}", errors[0]);
    }

    #[test]
    fn every_bad_document_is_reported() {
        let text = format!("{GOOD}---\nkind: Nope\n---\nkind: Namespace\nmetadata: {{}}\n");
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[1].contains("document 4") && errors[1].contains("`metadata`"), "{}", errors[1]);
    }

    #[test]
    fn bad_edit_keeps_last_good_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pods.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let mut config = ConfigDir::new(dir.path());
        let (good, errors) = config.reload();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(good.pods.len(), 1);

        std::fs::write(&file, GOOD.replace("10.244.1.2", "not-an-ip")).unwrap();
        let (after, errors) = config.reload();
        assert_eq!(errors.len(), 1);
        assert_eq!(after, good, "the last good objects stay in force");

        std::fs::remove_file(&file).unwrap();
        let (empty, errors) = config.reload();
        assert!(errors.is_empty());
        assert!(empty.pods.is_empty(), "a deleted file takes its objects with it");
    }

    #[test]
    fn the_last_good_version_outlives_a_restart_when_kept() {
        let (dir, kept) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let file = dir.path().join("pods.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let (good, _) = ConfigDir::new(dir.path()).keeping_last_good_in(kept.path().into()).reload();
        std::fs::write(&file, GOOD.replace("10.244.1.2", "not-an-ip")).unwrap();

        // A restart: a new ConfigDir, the broken file on disk.
        let (restarted, errors) = ConfigDir::new(dir.path()).keeping_last_good_in(kept.path().into()).reload();
        assert_eq!(errors.len(), 1, "the broken file is still reported");
        assert_eq!(restarted, good, "its kept last good version stands");
        let (without, _) = ConfigDir::new(dir.path()).reload();
        assert!(without.pods.is_empty(), "nothing kept, nothing to stand in");

        std::fs::remove_file(&file).unwrap();
        let (gone, _) = ConfigDir::new(dir.path()).keeping_last_good_in(kept.path().into()).reload();
        assert!(gone.pods.is_empty());
        assert_eq!(std::fs::read_dir(kept.path()).unwrap().count(), 0, "a deleted file's kept version goes too");
    }

    #[test]
    fn duplicates_keep_the_first_and_report_the_second() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("b.yml"), GOOD.replace("node1", "node2")).unwrap();
        std::fs::write(dir.path().join(".a.yaml.swp"), "garbage: [").unwrap();
        let (snapshot, errors) = ConfigDir::new(dir.path()).reload();
        assert_eq!(snapshot.pods["shop/cart"].node, "node1");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(matches!(&errors[0], ConfigError::Duplicate { object, .. } if object == "Namespace shop"));
    }
}
