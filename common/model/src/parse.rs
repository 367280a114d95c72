//! Parsing and validation: YAML or JSON documents in the Kubernetes
//! resources' schemas, turned into [`Object`]s. Every error names the
//! file, the document, the object and the field, and says how to fix it.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::{
    BundleEndpointProfile, DATAPLANE_MODE_LABEL, DataplaneMode, Gateway, INBOUND_UDP_LABEL, InboundUdp, MtlsMode,
    NETNS_ANNOTATION, Namespace, Object, PeerAuthentication, Pod, Service, ServicePort, TRUST_DOMAIN_ANNOTATION,
    TrustDomainFederation, USE_WAYPOINT_LABEL, WAYPOINT_CLASS, WAYPOINT_FOR_LABEL, WaypointFor,
    document::{ConfigError, RawMetadata, deserialize},
    policy_parse,
};

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
struct RawFederation {
    metadata: RawMetadata,
    spec: RawFederationSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawFederationSpec {
    trust_domain: String,
    #[serde(rename = "bundleEndpointURL")]
    bundle_endpoint_url: String,
    bundle_endpoint_profile: RawEndpointProfile,
    #[serde(default)]
    trust_domain_bundle: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEndpointProfile {
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "endpointSPIFFEID", default)]
    endpoint_spiffe_id: Option<String>,
    #[serde(default)]
    ca_certificates: Option<String>,
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
    let (objects, errors) = parse_documents(file, text);
    if errors.is_empty() { Ok(objects) } else { Err(errors) }
}

/// Parses every document of a file on its own: the good ones, and the
/// errors of the others. An AuthorizationPolicy that cannot be parsed is
/// replaced by its fail-closed stand-in ([`policy_parse::fail_closed`]).
/// After a YAML syntax error the rest of the file cannot be read.
pub fn parse_documents(file: &Path, text: &str) -> (Vec<Object>, Vec<ConfigError>) {
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
        let is_policy = value.get("kind").and_then(Value::as_str) == Some("AuthorizationPolicy");
        let stand_in = is_policy.then(|| value.clone());
        match parse_object(file, doc, value) {
            Ok(object) => objects.push(object),
            Err(e) => {
                if let Some(value) = stand_in {
                    objects.push(Object::AuthorizationPolicy(policy_parse::fail_closed(&value, &e)));
                }
                errors.push(e);
            }
        }
    }
    (objects, errors)
}

/// Parses one document (document `doc` of `file`, for error messages).
pub fn parse_object(file: &Path, doc: usize, value: Value) -> Result<Object, ConfigError> {
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
            let inbound_udp = inbound_udp(file, doc, &describe, &raw.metadata.labels)?;
            Ok(Object::Namespace(Namespace { name: raw.metadata.name, dataplane_mode, use_waypoint, inbound_udp }))
        }
        "Pod" => {
            let raw: RawPod = deserialize(file, doc, &describe, value)?;
            let dataplane_mode = dataplane_mode(file, doc, &describe, &raw.metadata.labels)?;
            let inbound_udp = inbound_udp(file, doc, &describe, &raw.metadata.labels)?;
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
            let trust_domain = raw.metadata.annotations.get(TRUST_DOMAIN_ANNOTATION).cloned();
            if let Some(Err(reason)) = trust_domain.as_deref().map(check_trust_domain) {
                let field = format!("metadata.annotations.{TRUST_DOMAIN_ANNOTATION}");
                return Err(ConfigError::field(file, doc, &describe, &field, reason));
            }
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
                uid: raw.metadata.uid,
                service_account: raw.spec.service_account_name,
                trust_domain,
                node: raw.spec.node_name,
                labels: raw.metadata.labels,
                ips: raw.status.pod_ips.into_iter().map(|p| p.ip).collect(),
                netns,
                dataplane_mode,
                use_waypoint,
                inbound_udp,
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
        "AuthorizationPolicy" => Ok(Object::AuthorizationPolicy(policy_parse::policy(file, doc, &describe, value)?)),
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
        "TrustDomainFederation" => {
            let raw: RawFederation = deserialize(file, doc, &describe, value)?;
            federation(raw)
                .map(Object::TrustDomainFederation)
                .map_err(|(field, reason)| ConfigError::field(file, doc, &describe, &format!("spec.{field}"), reason))
        }
        "RequestAuthentication" => {
            Ok(Object::RequestAuthentication(policy_parse::request_authentication(file, doc, &describe, value)?))
        }
        _ => Err(ConfigError::UnknownKind { file: file.to_path_buf(), doc, kind }),
    }
}

/// A SPIFFE trust domain name: lowercase letters, digits, `.`, `-`, `_`.
fn check_trust_domain(name: &str) -> Result<(), String> {
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
    match name.is_empty() || !name.chars().all(valid) {
        true => Err(format!(
            "`{name}` is not a SPIFFE trust domain; use lowercase letters, digits, `.`, `-` and `_`, e.g. partner.example"
        )),
        false => Ok(()),
    }
}

/// Validates a TrustDomainFederation; on error, the field under `spec` and why.
fn federation(raw: RawFederation) -> Result<TrustDomainFederation, (&'static str, String)> {
    let spec = raw.spec;
    check_trust_domain(&spec.trust_domain).map_err(|reason| ("trustDomain", reason))?;
    let url = &spec.bundle_endpoint_url;
    if !url.strip_prefix("https://").is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/')) {
        return Err((
            "bundleEndpointURL",
            format!("`{url}` is not an https:// URL; bundle endpoints are served over TLS"),
        ));
    }
    if let Some(bundle) = &spec.trust_domain_bundle {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(bundle);
        if !parsed.as_ref().is_ok_and(|v| v["keys"].is_array()) {
            return Err(("trustDomainBundle", "is not a SPIFFE bundle: a JSON object with a `keys` array".into()));
        }
    }
    let profile = spec.bundle_endpoint_profile;
    let profile = match profile.kind.as_str() {
        "https_spiffe" => {
            let id = profile.endpoint_spiffe_id.ok_or((
                "bundleEndpointProfile.endpointSPIFFEID",
                "https_spiffe needs the endpoint's SPIFFE ID, e.g. spiffe://partner.example/ns/ambit-system/sa/ambit-ca".into(),
            ))?;
            let prefix = format!("spiffe://{}/", spec.trust_domain);
            if !id.starts_with(&prefix) {
                return Err((
                    "bundleEndpointProfile.endpointSPIFFEID",
                    format!(
                        "`{id}` is not in trust domain {}: the endpoint must be of the domain it serves",
                        spec.trust_domain
                    ),
                ));
            }
            if spec.trust_domain_bundle.is_none() {
                return Err((
                    "trustDomainBundle",
                    "https_spiffe needs a bundle to verify the endpoint with the first time; paste the foreign trust domain's SPIFFE bundle (curl its endpoint once)".into(),
                ));
            }
            BundleEndpointProfile::HttpsSpiffe { endpoint_spiffe_id: id }
        }
        "https_web" => {
            if profile.endpoint_spiffe_id.is_some() {
                return Err((
                    "bundleEndpointProfile.endpointSPIFFEID",
                    "only https_spiffe takes an endpoint SPIFFE ID".into(),
                ));
            }
            BundleEndpointProfile::HttpsWeb { ca_certificates: profile.ca_certificates }
        }
        other => {
            return Err((
                "bundleEndpointProfile.type",
                format!("`{other}` is not a profile; use https_spiffe or https_web"),
            ));
        }
    };
    Ok(TrustDomainFederation {
        name: raw.metadata.name,
        trust_domain: spec.trust_domain,
        bundle_endpoint_url: spec.bundle_endpoint_url,
        profile,
        trust_domain_bundle: spec.trust_domain_bundle,
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
    let choices = [("ambient", DataplaneMode::Ambient), ("none", DataplaneMode::None)];
    label_choice(file, doc, object, labels, DATAPLANE_MODE_LABEL, &choices, "a data-plane mode")
}

fn inbound_udp(
    file: &Path,
    doc: usize,
    object: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Option<InboundUdp>, ConfigError> {
    let choices = [("drop", InboundUdp::Drop), ("allow", InboundUdp::Allow)];
    label_choice(file, doc, object, labels, INBOUND_UDP_LABEL, &choices, "an inbound UDP mode")
}

/// The value of `label`, one of `choices` (`what` names them in errors).
fn label_choice<T: Copy>(
    file: &Path,
    doc: usize,
    object: &str,
    labels: &BTreeMap<String, String>,
    label: &str,
    choices: &[(&str, T)],
    what: &str,
) -> Result<Option<T>, ConfigError> {
    let Some(value) = labels.get(label) else { return Ok(None) };
    match choices.iter().find(|(name, _)| name == value) {
        Some((_, choice)) => Ok(Some(*choice)),
        None => {
            let names: Vec<String> = choices.iter().map(|(name, _)| format!("`{name}`")).collect();
            Err(ConfigError::field(
                file,
                doc,
                object,
                &format!("metadata.labels.{label}"),
                format!("`{value}` is not {what}; use {}", names.join(" or ")),
            ))
        }
    }
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
                use_waypoint: None,
                inbound_udp: None
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
                "pods.yaml: document 1: kind `Deployment` is not supported; use Namespace, Pod, Service, Gateway, PeerAuthentication, AuthorizationPolicy, RequestAuthentication or TrustDomainFederation"
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
}
