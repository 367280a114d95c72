//! `AuthorizationPolicy` YAML to [`AuthorizationPolicy`]. Strict on purpose:
//! an unknown field, an empty list or a malformed value is an error naming the
//! field, never something skipped, because a skipped field widens a rule.

use std::{collections::BTreeMap, path::Path};

use ipnet::IpNet;
use serde::{Deserialize, de::IgnoredAny};
use serde_yaml_ng::Value;

use crate::{
    Action, Attribute, AuthorizationPolicy, Condition, ConfigError, Jwks, JwtRule, PathMatch, RequestAuthentication,
    Rule, Scope, StringMatch, Values,
    document::{RawMetadata, deserialize},
};

/// Annotation that turns a policy into a dry run (Istio's name, so ported
/// policies keep it).
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// `when` keys the node tunnel evaluates.
pub const L4_KEYS: [&str; 5] =
    ["source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPolicy {
    #[serde(rename = "apiVersion")]
    _api_version: Option<IgnoredAny>,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    #[serde(rename = "status")]
    _status: Option<IgnoredAny>,
    metadata: RawMetadata,
    #[serde(default)]
    spec: RawSpec,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    selector: Option<RawSelector>,
    target_ref: Option<RawTargetRef>,
    #[serde(default)]
    target_refs: Vec<RawTargetRef>,
    action: Option<String>,
    provider: Option<Value>,
    rules: Option<Vec<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargetRef {
    #[serde(rename = "group")]
    _group: Option<IgnoredAny>,
    kind: String,
    name: String,
    #[serde(rename = "namespace")]
    _namespace: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    from: Option<Vec<RawFrom>>,
    to: Option<Vec<RawTo>>,
    when: Option<Vec<RawCondition>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrom {
    source: BTreeMap<String, Vec<Scalar>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTo {
    operation: BTreeMap<String, Vec<Scalar>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCondition {
    key: String,
    values: Option<Vec<Scalar>>,
    not_values: Option<Vec<Scalar>>,
}

/// Istio writes ports as strings; YAML authors often write numbers.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Number(i64),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Scalar::Text(s) => s,
            Scalar::Number(n) => n.to_string(),
        }
    }
}

/// How the values of a field are checked and stored.
#[derive(Clone, Copy)]
enum Kind {
    /// String patterns that must also be principals (`<td>/ns/<ns>/sa/<sa>`).
    Principal,
    /// String patterns (exact, `prefix*`, `*suffix`, `*`).
    Pattern,
    /// String patterns, compared lowercased.
    Host,
    ServiceAccount,
    Ip,
    Port,
    /// Path patterns and templates.
    Path,
}

/// Source fields: (name, attribute, kind, negated).
const SOURCE_FIELDS: [(&str, Attribute, Kind, bool); 12] = [
    ("principals", Attribute::Principal, Kind::Principal, false),
    ("notPrincipals", Attribute::Principal, Kind::Principal, true),
    ("namespaces", Attribute::Namespace, Kind::Pattern, false),
    ("notNamespaces", Attribute::Namespace, Kind::Pattern, true),
    ("serviceAccounts", Attribute::ServiceAccount, Kind::ServiceAccount, false),
    ("notServiceAccounts", Attribute::ServiceAccount, Kind::ServiceAccount, true),
    ("ipBlocks", Attribute::SourceIp, Kind::Ip, false),
    ("notIpBlocks", Attribute::SourceIp, Kind::Ip, true),
    ("requestPrincipals", Attribute::RequestPrincipal, Kind::Pattern, false),
    ("notRequestPrincipals", Attribute::RequestPrincipal, Kind::Pattern, true),
    ("remoteIpBlocks", Attribute::RemoteIp, Kind::Ip, false),
    ("notRemoteIpBlocks", Attribute::RemoteIp, Kind::Ip, true),
];

const OPERATION_FIELDS: [(&str, Attribute, Kind, bool); 8] = [
    ("ports", Attribute::DestinationPort, Kind::Port, false),
    ("notPorts", Attribute::DestinationPort, Kind::Port, true),
    ("hosts", Attribute::Host, Kind::Host, false),
    ("notHosts", Attribute::Host, Kind::Host, true),
    ("methods", Attribute::Method, Kind::Pattern, false),
    ("notMethods", Attribute::Method, Kind::Pattern, true),
    ("paths", Attribute::Path, Kind::Path, false),
    ("notPaths", Attribute::Path, Kind::Path, true),
];

/// One document's error context.
struct Ctx<'a> {
    file: &'a Path,
    doc: usize,
    object: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::field(self.file, self.doc, self.object, field, reason)
    }
}

/// Parses one `AuthorizationPolicy` document.
pub fn policy(file: &Path, doc: usize, object: &str, value: Value) -> Result<AuthorizationPolicy, ConfigError> {
    let ctx = Ctx { file, doc, object };
    let raw: RawPolicy = deserialize(file, doc, object, value)?;
    let spec = raw.spec;
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => {
            return Err(ctx.err("spec.action", "CUSTOM (external authorization) is not supported; use ALLOW or DENY"));
        }
        Some(other) => {
            return Err(ctx.err("spec.action", format!("`{other}` is not an action; use ALLOW, DENY or AUDIT")));
        }
    };
    if spec.provider.is_some() {
        return Err(ctx.err("spec.provider", "a provider belongs to CUSTOM actions, which are not supported"));
    }
    let scope = scope(&ctx, spec.selector, spec.target_ref.into_iter().chain(spec.target_refs))?;
    let dry_run = match raw.metadata.annotations.get(DRY_RUN_ANNOTATION).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ctx.err(
                &format!("metadata.annotations.{DRY_RUN_ANNOTATION}"),
                format!("`{other}` is not a boolean; use \"true\" or \"false\""),
            ));
        }
    };
    let mut rules = Vec::new();
    for (index, raw_rule) in spec.rules.unwrap_or_default().into_iter().enumerate() {
        rules.push(rule(&ctx, index, raw_rule)?);
    }
    Ok(AuthorizationPolicy {
        namespace: raw.metadata.namespace.unwrap_or_else(|| "default".to_string()),
        name: raw.metadata.name,
        scope,
        action,
        rules,
        dry_run,
        broken: None,
    })
}

/// Selector, `targetRefs` (as `Kind/name`), or neither (the namespace).
/// The stand-in for an AuthorizationPolicy document that cannot be parsed
/// (`value`, refused with `error`): it denies all traffic to the workloads
/// the policy would have selected, or to its whole namespace when its
/// selector cannot be read, until the policy is fixed. A policy the author
/// meant to DENY, or to ALLOW only a few, must not silently do nothing.
/// A readable `istio.io/dry-run: "true"` is kept: that policy was never
/// to be enforced.
pub fn fail_closed(value: &Value, error: &ConfigError) -> AuthorizationPolicy {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let metadata = value.get("metadata");
    let spec = value.get("spec");
    let labels: Option<BTreeMap<String, String>> = spec
        .and_then(|s| s.get("selector"))
        .and_then(|s| s.get("matchLabels"))
        .and_then(|labels| serde_yaml_ng::from_value(labels.clone()).ok())
        .filter(|labels: &BTreeMap<String, String>| !labels.is_empty());
    let target_refs: Option<Vec<String>> =
        spec.and_then(|s| s.get("targetRefs")).and_then(Value::as_sequence).map(|refs| {
            refs.iter().filter_map(|r| Some(format!("{}/{}", text(r.get("kind"))?, text(r.get("name"))?))).collect()
        });
    let scope = match (spec.and_then(|s| s.get("selector")), labels, target_refs) {
        (None, _, Some(refs)) if !refs.is_empty() => Scope::TargetRefs(refs),
        (Some(_), Some(labels), _) => Scope::Selector(labels),
        _ => Scope::Namespace,
    };
    let dry_run = metadata
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        .and_then(Value::as_str)
        .is_some_and(|v| v == "true");
    AuthorizationPolicy {
        namespace: text(metadata.and_then(|m| m.get("namespace"))).unwrap_or_else(|| "default".to_string()),
        name: text(metadata.and_then(|m| m.get("name"))).unwrap_or_else(|| "<unnamed>".to_string()),
        scope,
        action: Action::Deny,
        rules: vec![Rule::default()],
        dry_run,
        broken: Some(error.to_string()),
    }
}

fn scope(
    ctx: &Ctx,
    selector: Option<RawSelector>,
    target_refs: impl IntoIterator<Item = RawTargetRef>,
) -> Result<Scope, ConfigError> {
    let target_refs: Vec<String> = target_refs.into_iter().map(|t| format!("{}/{}", t.kind, t.name)).collect();
    Ok(match (selector, target_refs.is_empty()) {
        (Some(_), false) => return Err(ctx.err("spec.selector", "set either selector or targetRefs, not both")),
        (Some(selector), true) => Scope::Selector(selector.match_labels),
        (None, false) => Scope::TargetRefs(target_refs),
        (None, true) => Scope::Namespace,
    })
}

fn rule(ctx: &Ctx, index: usize, raw: RawRule) -> Result<Rule, ConfigError> {
    let base = format!("spec.rules[{index}]");
    let mut rule = Rule::default();
    for (i, from) in raw.from.unwrap_or_default().into_iter().enumerate() {
        let at = format!("from[{i}].source");
        rule.from.push(fields(ctx, &base, &at, from.source, &SOURCE_FIELDS)?);
    }
    for (i, to) in raw.to.unwrap_or_default().into_iter().enumerate() {
        let at = format!("to[{i}].operation");
        rule.to.push(fields(ctx, &base, &at, to.operation, &OPERATION_FIELDS)?);
    }
    for (i, when) in raw.when.unwrap_or_default().into_iter().enumerate() {
        rule.when.extend(condition(ctx, &base, i, when)?);
    }
    Ok(rule)
}

fn fields(
    ctx: &Ctx,
    base: &str,
    at: &str,
    raw: BTreeMap<String, Vec<Scalar>>,
    known: &[(&str, Attribute, Kind, bool)],
) -> Result<Vec<Condition>, ConfigError> {
    if raw.is_empty() {
        return Err(ctx.err(
            &format!("{base}.{at}"),
            "empty: it would match everything; give at least one field, or drop the entry",
        ));
    }
    let mut conditions = Vec::new();
    for (name, values) in raw {
        let field = format!("{at}.{name}");
        let Some((_, attribute, kind, negated)) = known.iter().find(|(n, ..)| *n == name) else {
            let names: Vec<&str> = known.iter().map(|(n, ..)| *n).collect();
            return Err(ctx.err(&format!("{base}.{field}"), format!("unknown field; use one of {}", names.join(", "))));
        };
        let (attribute, kind, negated) = (attribute.clone(), *kind, *negated);
        let values = typed_values(ctx, &format!("{base}.{field}"), kind, values)?;
        conditions.push(Condition { field, attribute, negated, values });
    }
    Ok(conditions)
}

fn condition(ctx: &Ctx, base: &str, index: usize, raw: RawCondition) -> Result<Vec<Condition>, ConfigError> {
    let at = format!("when[{index}]");
    let (attribute, kind) = match raw.key.as_str() {
        "source.ip" => (Attribute::SourceIp, Kind::Ip),
        "source.namespace" => (Attribute::Namespace, Kind::Pattern),
        "source.principal" => (Attribute::Principal, Kind::Principal),
        "destination.ip" => (Attribute::DestinationIp, Kind::Ip),
        "destination.port" => (Attribute::DestinationPort, Kind::Port),
        "remote.ip" => (Attribute::RemoteIp, Kind::Ip),
        "connection.sni" => (Attribute::Sni, Kind::Host),
        "request.auth.principal" => (Attribute::RequestPrincipal, Kind::Pattern),
        "request.auth.audiences" => (Attribute::Audience, Kind::Pattern),
        "request.auth.presenter" => (Attribute::Presenter, Kind::Pattern),
        key => match request_key(key) {
            Some(attribute) => (attribute, Kind::Pattern),
            None => {
                return Err(ctx.err(
                    &format!("{base}.{at}.key"),
                    format!(
                        "unknown key `{key}`; use {}, remote.ip, connection.sni, request.headers[<name>], request.auth.principal, request.auth.audiences, request.auth.presenter or request.auth.claims[<name>]",
                        L4_KEYS.join(", ")
                    ),
                ));
            }
        },
    };
    if raw.values.is_none() && raw.not_values.is_none() {
        return Err(ctx.err(&format!("{base}.{at}"), "give `values`, `notValues` or both"));
    }
    let mut conditions = Vec::new();
    for (list, negated, name) in [(raw.values, false, "values"), (raw.not_values, true, "notValues")] {
        let Some(list) = list else { continue };
        let field = format!("{at}[{}].{name}", raw.key);
        let values = typed_values(ctx, &format!("{base}.{at}.{name}"), kind, list)?;
        conditions.push(Condition { field, attribute: attribute.clone(), negated, values });
    }
    Ok(conditions)
}

fn typed_values(ctx: &Ctx, field: &str, kind: Kind, raw: Vec<Scalar>) -> Result<Values, ConfigError> {
    if raw.is_empty() {
        return Err(ctx.err(field, "empty list: remove the field, or list at least one value"));
    }
    let strings: Vec<String> = raw.into_iter().map(Scalar::into_string).collect();
    let at = |i: usize| format!("{field}[{i}]");
    match kind {
        Kind::Ip => {
            let mut nets = Vec::new();
            for (i, s) in strings.iter().enumerate() {
                let net =
                    s.parse::<IpNet>().or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from)).map_err(|_| {
                        ctx.err(&at(i), format!("`{s}` is not an IP address or CIDR block (e.g. 10.0.0.0/8)"))
                    })?;
                nets.push(net);
            }
            Ok(Values::Ips(nets))
        }
        Kind::Port => {
            let mut ports = Vec::new();
            for (i, s) in strings.iter().enumerate() {
                let port = s.parse::<u16>().ok().filter(|p| *p > 0);
                ports.push(port.ok_or_else(|| ctx.err(&at(i), format!("`{s}` is not a port (1-65535)")))?);
            }
            Ok(Values::Ports(ports))
        }
        Kind::Path => {
            let mut paths = Vec::new();
            for (i, s) in strings.iter().enumerate() {
                if !s.contains('{') {
                    check_pattern(s).map_err(|reason| ctx.err(&at(i), reason))?;
                }
                paths.push(PathMatch::new(s).map_err(|reason| ctx.err(&at(i), reason))?);
            }
            Ok(Values::Paths(paths))
        }
        Kind::ServiceAccount => {
            for (i, s) in strings.iter().enumerate() {
                let valid = matches!(s.split_once('/'), Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/'));
                if !valid || s.contains('*') {
                    return Err(ctx.err(
                        &at(i),
                        format!("`{s}` is not a service account; write <namespace>/<name> (no wildcards)"),
                    ));
                }
            }
            Ok(Values::Strings(strings.iter().map(|s| StringMatch::Exact(s.clone())).collect()))
        }
        Kind::Principal | Kind::Pattern | Kind::Host => {
            let mut matches = Vec::new();
            for (i, s) in strings.iter().enumerate() {
                check_pattern(s).map_err(|reason| ctx.err(&at(i), reason))?;
                if matches!(kind, Kind::Principal) {
                    check_principal(s).map_err(|reason| ctx.err(&at(i), reason))?;
                }
                let s = if matches!(kind, Kind::Host) { s.to_ascii_lowercase() } else { s.clone() };
                matches.push(StringMatch::new(&s));
            }
            Ok(Values::Strings(matches))
        }
    }
}

/// `request.headers[<name>]` (name lowercased) or `request.auth.claims[a][b]...`.
fn request_key(key: &str) -> Option<Attribute> {
    if let Some(name) = key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
        let name = http::HeaderName::from_bytes(name.as_bytes()).ok()?;
        return Some(Attribute::Header(name.as_str().to_string()));
    }
    let path = key.strip_prefix("request.auth.claims[")?.strip_suffix(']')?;
    let keys: Vec<String> = path.split("][").map(str::to_string).collect();
    keys.iter().all(|k| !k.is_empty() && !k.contains(['[', ']'])).then_some(Attribute::Claim(keys))
}

/// Istio's wildcards: `*` alone, or leading, or trailing; nowhere else.
fn check_pattern(s: &str) -> Result<(), String> {
    let inner = s.strip_prefix('*').or_else(|| s.strip_suffix('*')).unwrap_or(s);
    if s.is_empty() {
        return Err("empty value; remove it".into());
    }
    if inner.contains('*') {
        return Err(format!("`{s}`: `*` may only stand alone, lead (`*suffix`) or trail (`prefix*`)"));
    }
    Ok(())
}

/// A principal is a SPIFFE ID without its scheme: `<td>/ns/<ns>/sa/<sa>`.
fn check_principal(s: &str) -> Result<(), String> {
    if s.starts_with("spiffe://") {
        return Err(format!(
            "`{s}`: write principals without `spiffe://`, e.g. `{}`",
            s.trim_start_matches("spiffe://")
        ));
    }
    if s.contains('*') {
        return Ok(());
    }
    let parts: Vec<&str> = s.split('/').collect();
    let valid = parts.len() == 5 && parts[1] == "ns" && parts[3] == "sa" && parts.iter().all(|p| !p.is_empty());
    if !valid {
        return Err(format!("`{s}` is not a principal; write <trust-domain>/ns/<namespace>/sa/<service-account>"));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRequestAuthentication {
    #[serde(rename = "apiVersion")]
    _api_version: Option<IgnoredAny>,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    #[serde(rename = "status")]
    _status: Option<IgnoredAny>,
    metadata: RawMetadata,
    #[serde(default)]
    spec: RawRequestAuthenticationSpec,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRequestAuthenticationSpec {
    selector: Option<RawSelector>,
    #[serde(default)]
    target_refs: Vec<RawTargetRef>,
    #[serde(default)]
    jwt_rules: Vec<RawJwtRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawJwtRule {
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    /// The JWKS itself, as a JSON string (Istio's `jwks`).
    jwks: Option<String>,
    /// https:// URL or `file:///path` of a JWKS.
    jwks_uri: Option<String>,
    #[serde(default)]
    forward_original_token: bool,
}

/// A `jwksUri` the waypoint can fetch: https with a host (keys are never
/// fetched in plaintext, where anyone on the path could swap them), or an
/// absolute file path without `..`, which the waypoint reads only under its
/// `--jwks-dir`.
fn jwks_uri(uri: &str) -> Result<String, String> {
    if let Some(path) = uri.strip_prefix("file://") {
        let path = Path::new(path);
        if !path.is_absolute() || path.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(format!(
                "`{uri}`: give an absolute path without `..`, e.g. file:///etc/ambit/jwks/issuer.json"
            ));
        }
        return Ok(uri.to_string());
    }
    let parsed: http::Uri = uri.parse().map_err(|e| format!("`{uri}` is not a URI: {e}"))?;
    match (parsed.scheme_str(), parsed.host()) {
        (Some("https"), Some(_)) => Ok(uri.to_string()),
        (Some("http"), _) => Err(format!("`{uri}`: keys are fetched over https only; use https://")),
        _ => Err(format!("`{uri}`: give an https:// URL, or file:///path to a JWKS file")),
    }
}

/// Parses one `RequestAuthentication` document. An inline key set is read
/// now, so a broken one is an error here, not a 401 later; https:// and
/// file:// key sets are the waypoint's to fetch.
pub fn request_authentication(
    file: &Path,
    doc: usize,
    object: &str,
    value: Value,
) -> Result<RequestAuthentication, ConfigError> {
    let ctx = Ctx { file, doc, object };
    let raw: RawRequestAuthentication = deserialize(file, doc, object, value)?;
    let scope = scope(&ctx, raw.spec.selector, raw.spec.target_refs)?;
    let mut rules = Vec::new();
    for (index, rule) in raw.spec.jwt_rules.into_iter().enumerate() {
        let at = format!("spec.jwtRules[{index}]");
        if rule.issuer.is_empty() {
            return Err(ctx.err(&format!("{at}.issuer"), "give the issuer, exactly as tokens carry it in `iss`"));
        }
        let (text, field) = match (rule.jwks, rule.jwks_uri) {
            (Some(_), Some(_)) => return Err(ctx.err(&at, "set either jwks or jwksUri, not both")),
            (Some(text), None) => (text, format!("{at}.jwks")),
            (None, Some(uri)) => {
                let jwks = Jwks::Fetched(jwks_uri(&uri).map_err(|fix| ctx.err(&format!("{at}.jwksUri"), fix))?);
                rules.push(JwtRule {
                    issuer: rule.issuer,
                    audiences: rule.audiences,
                    jwks,
                    forward_original_token: rule.forward_original_token,
                });
                continue;
            }
            (None, None) => {
                return Err(
                    ctx.err(&at, "give the issuer's keys: `jwks` (inline JSON) or `jwksUri` (https:// or file://)")
                );
            }
        };
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&text)
            .map_err(|e| ctx.err(&field, format!("not a JWKS (`{{\"keys\": [...]}}`): {e}")))?;
        if jwks.keys.is_empty() {
            return Err(ctx.err(&field, "the key set is empty: no token could ever verify"));
        }
        let jwks = Jwks::Loaded(jwks);
        rules.push(JwtRule {
            issuer: rule.issuer,
            audiences: rule.audiences,
            jwks,
            forward_original_token: rule.forward_original_token,
        });
    }
    Ok(RequestAuthentication {
        namespace: raw.metadata.namespace.unwrap_or_else(|| "default".to_string()),
        name: raw.metadata.name,
        scope,
        rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Object, parse_file};

    fn parse(spec: &str) -> Result<AuthorizationPolicy, String> {
        let text = format!(
            "apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n{spec}"
        );
        match parse_file(Path::new("authz.yaml"), &text) {
            Ok(mut objects) => match objects.remove(0) {
                Object::AuthorizationPolicy(p) => Ok(p),
                other => panic!("{other:?}"),
            },
            Err(errors) => Err(errors[0].to_string()),
        }
    }

    #[test]
    fn full_policy_parses() {
        let policy = parse(
            "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/shop/sa/*\"], notIpBlocks: [10.0.0.0/8, 192.0.2.1]}\n    to:\n    - operation: {ports: [\"8080\", 9090]}\n    when:\n    - {key: source.namespace, values: [shop], notValues: [legacy]}\n",
        )
        .unwrap();
        assert_eq!(policy.action, Action::Deny);
        assert_eq!(policy.scope, Scope::Selector([("app".to_string(), "web".to_string())].into()));
        let rule = &policy.rules[0];
        assert_eq!(rule.from[0].len(), 2);
        assert_eq!(rule.to[0][0].values, Values::Ports(vec![8080, 9090]));
        assert_eq!(rule.when.len(), 2, "values and notValues are two conditions");
        assert_eq!(rule.when[1].field, "when[0][source.namespace].notValues");
        assert!(rule.when[1].negated);
    }

    #[test]
    fn defaults_and_dry_run() {
        let policy = parse("  {}\n").unwrap();
        assert_eq!(
            (policy.action, policy.scope, policy.rules.len(), policy.dry_run),
            (Action::Allow, Scope::Namespace, 0, false)
        );
        let text = "kind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: shop\n  annotations: {istio.io/dry-run: \"true\"}\nspec: {action: DENY, rules: [{}]}\n";
        let Object::AuthorizationPolicy(p) = &parse_file(Path::new("a.yaml"), text).unwrap()[0] else { panic!() };
        assert!(p.dry_run);
        assert_eq!(p.rules, vec![Rule::default()]);
    }

    #[test]
    fn bad_input_names_the_field_and_the_fix() {
        let cases = [
            ("  action: PERMIT\n", "spec.action", "use ALLOW, DENY or AUDIT"),
            ("  action: CUSTOM\n", "spec.action", "not supported"),
            (
                "  rules:\n  - from:\n    - source: {principal: [x]}\n",
                "spec.rules[0].from[0].source.principal",
                "unknown field",
            ),
            ("  rules:\n  - from:\n    - source: {}\n", "spec.rules[0].from[0].source", "would match everything"),
            ("  rules:\n  - from:\n    - source: {principals: []}\n", "principals", "empty list"),
            (
                "  rules:\n  - from:\n    - source: {principals: [\"spiffe://cluster.local/ns/a/sa/b\"]}\n",
                "spec.rules[0].from[0].source.principals[0]",
                "without `spiffe://`",
            ),
            (
                "  rules:\n  - from:\n    - source: {principals: [\"ns/a/sa/b\"]}\n",
                "principals[0]",
                "<trust-domain>/ns/",
            ),
            ("  rules:\n  - from:\n    - source: {namespaces: [\"a*b\"]}\n", "namespaces[0]", "may only stand alone"),
            (
                "  rules:\n  - from:\n    - source: {serviceAccounts: [\"shop\"]}\n",
                "serviceAccounts[0]",
                "<namespace>/<name>",
            ),
            ("  rules:\n  - from:\n    - source: {ipBlocks: [\"10.0.0.0/33\"]}\n", "ipBlocks[0]", "not an IP address"),
            (
                "  rules:\n  - to:\n    - operation: {ports: [\"http\"]}\n",
                "spec.rules[0].to[0].operation.ports[0]",
                "not a port",
            ),
            (
                "  rules:\n  - when:\n    - {key: source.user, values: [x]}\n",
                "spec.rules[0].when[0].key",
                "unknown key `source.user`",
            ),
            ("  rules:\n  - when:\n    - {key: source.ip}\n", "spec.rules[0].when[0]", "give `values`"),
            (
                "  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Service, name: a}]\n",
                "spec.selector",
                "not both",
            ),
            ("  selector: {matchExpressions: []}\n", "spec.selector", "unknown field"),
            ("  rules:\n  - form: []\n", "spec.rules[0]", "unknown field `form`"),
        ];
        for (spec, field, fix) in cases {
            let error = parse(spec).unwrap_err();
            assert!(error.contains("AuthorizationPolicy shop/p"), "{error}");
            assert!(error.contains(field) && error.contains(fix), "{spec:?}: {error}");
        }
        let annotated =
            "kind: AuthorizationPolicy\nmetadata:\n  name: p\n  annotations: {istio.io/dry-run: yes}\nspec: {}\n";
        let errors = parse_file(Path::new("a.yaml"), annotated).unwrap_err();
        assert!(errors[0].to_string().contains("metadata.annotations.istio.io/dry-run"), "{}", errors[0]);
    }

    #[test]
    fn l7_fields_are_kept_and_reported() {
        let policy = parse(
            "  rules:\n  - to:\n    - operation: {methods: [GET], ports: [\"80\"]}\n    when:\n    - {key: \"request.headers[x-user]\", values: [a]}\n",
        )
        .unwrap();
        assert_eq!(
            policy.l7_fields(),
            vec![
                (0, "to[0].operation.methods".to_string()),
                (0, "when[0][request.headers[x-user]].values".to_string())
            ]
        );
    }

    #[test]
    fn request_authentication_reads_keys_and_names_bad_fields() {
        let jwks = r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis", "y": "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE", "kid": "k1"}]}"#;
        let doc = |rule: &str| {
            format!(
                "kind: RequestAuthentication\nmetadata: {{name: jwt, namespace: payments}}\nspec:\n  targetRefs: [{{kind: Gateway, name: waypoint}}]\n  jwtRules:\n  - {rule}\n"
            )
        };
        let parse = |rule: &str| parse_file(Path::new("authn.yaml"), &doc(rule));
        let inline = format!("{{issuer: https://issuer.example, audiences: [payments], jwks: '{jwks}'}}");
        let Object::RequestAuthentication(ra) = parse(&inline).unwrap().remove(0) else { panic!() };
        assert_eq!(ra.scope, Scope::TargetRefs(vec!["Gateway/waypoint".into()]));
        assert_eq!(ra.rules[0].issuer, "https://issuer.example");
        assert!(matches!(&ra.rules[0].jwks, Jwks::Loaded(set) if set.keys.len() == 1));
        // Key sets at a URI are the waypoint's to fetch: parsing opens nothing,
        // not even a path that exists.
        for uri in ["https://i.example:8443/keys", "file:///etc/shadow"] {
            let Object::RequestAuthentication(ra) =
                parse(&format!("{{issuer: https://i.example, jwksUri: \"{uri}\"}}")).unwrap().remove(0)
            else {
                panic!()
            };
            assert_eq!(ra.rules[0].jwks, Jwks::Fetched(uri.into()), "fetched by the waypoint");
        }
        let cases = [
            ("{issuer: https://i.example}", "spec.jwtRules[0]", "give the issuer's keys"),
            ("{issuer: https://i.example, jwksUri: \"http://i.example/jwks\"}", "jwksUri", "https only"),
            ("{issuer: https://i.example, jwksUri: \"ldap://i.example/jwks\"}", "jwksUri", "give an https:// URL"),
            ("{issuer: https://i.example, jwksUri: \"file://jwks.json\"}", "jwksUri", "absolute path"),
            ("{issuer: https://i.example, jwksUri: \"file:///etc/ambit/../shadow\"}", "jwksUri", "without `..`"),
            ("{issuer: https://i.example, jwks: '{\"keys\": []}'}", "spec.jwtRules[0].jwks", "empty"),
            ("{issuer: https://i.example, jwks: 'nope'}", "jwks", "not a JWKS"),
            ("{issuer: https://i.example, jwks: 'x', fromHeaders: []}", "spec", "unknown field `fromHeaders`"),
        ];
        for (rule, field, want) in cases {
            let error = parse(rule).unwrap_err()[0].to_string();
            assert!(
                error.contains("RequestAuthentication payments/jwt") && error.contains(field) && error.contains(want),
                "{rule}: {error}"
            );
        }
    }
}
