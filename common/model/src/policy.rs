//! `AuthorizationPolicy` (security.istio.io/v1) as ambit enforces it: the
//! parsed policy, with no evaluation (that is `ambit-authz`).

use std::{collections::BTreeMap, fmt};

use ipnet::IpNet;
use jsonwebtoken::jwk::JwkSet;
use serde::Serialize;

use crate::{Pod, ROOT_NAMESPACE};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        })
    }
}

/// Which workloads a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Scope {
    /// Every workload of the policy's namespace (of the mesh, in the root namespace).
    Namespace,
    /// Workloads whose labels include all of these.
    Selector(BTreeMap<String, String>),
    /// Gateways or services (`kind/name`): enforced by waypoints, not by the node tunnel.
    TargetRefs(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    pub namespace: String,
    pub name: String,
    pub scope: Scope,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// `istio.io/dry-run: "true"`: evaluated and logged, never enforced.
    pub dry_run: bool,
    /// Why the written policy could not be parsed, when this is its
    /// fail-closed stand-in ([`crate::policy_parse::fail_closed`]): a DENY of
    /// everything for the workloads it would have selected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken: Option<String>,
}

impl AuthorizationPolicy {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the node tunnel enforces this policy for `pod`.
    pub fn applies_to(&self, pod: &Pod) -> bool {
        if self.namespace != pod.namespace && self.namespace != ROOT_NAMESPACE {
            return false;
        }
        match &self.scope {
            Scope::Namespace => true,
            Scope::Selector(labels) => labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v)),
            Scope::TargetRefs(_) => false,
        }
    }

    /// The L7 fields of each rule, as `(rule index, field path)`.
    pub fn l7_fields(&self) -> Vec<(usize, String)> {
        let mut found = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            for condition in rule.conditions() {
                if condition.attribute.is_l7() {
                    found.push((index, condition.field.clone()));
                }
            }
        }
        found
    }
}

/// One entry of `spec.rules`: `from` sources are ORed, `to` operations are
/// ORed, `when` conditions are ANDed, and the three are ANDed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Each source is a list of conditions that must all hold.
    pub from: Vec<Vec<Condition>>,
    pub to: Vec<Vec<Condition>>,
    pub when: Vec<Condition>,
}

impl Rule {
    fn conditions(&self) -> impl Iterator<Item = &Condition> {
        self.from.iter().flatten().chain(self.to.iter().flatten()).chain(&self.when)
    }
}

/// One field of a source, an operation or a `when` entry: its values are
/// ORed; a `not*` field (or `notValues`) holds when none of them matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Condition {
    /// Where it was written, e.g. `from[0].source.notPrincipals`.
    pub field: String,
    pub attribute: Attribute,
    pub negated: bool,
    pub values: Values,
}

/// What a condition looks at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Attribute {
    /// The peer's SPIFFE ID without `spiffe://`.
    Principal,
    /// The peer's namespace, from its SPIFFE ID.
    Namespace,
    /// `namespace/service-account`, from the peer's SPIFFE ID.
    ServiceAccount,
    SourceIp,
    DestinationIp,
    DestinationPort,
    // What follows is L7: only a waypoint sees it.
    /// `hosts`, compared lowercased.
    Host,
    Method,
    /// `paths`, against the normalized path.
    Path,
    /// `requestPrincipals`: `iss/sub` of a validated JWT.
    RequestPrincipal,
    /// `remoteIpBlocks` and `remote.ip`: the client as the waypoint sees it.
    RemoteIp,
    /// `request.headers[name]`, name lowercased.
    Header(String),
    /// `request.auth.claims[a][b]...`
    Claim(Vec<String>),
    /// `request.auth.audiences`
    Audience,
    /// `request.auth.presenter`
    Presenter,
    /// `connection.sni`: the SNI of TLS the app itself originated.
    Sni,
}

impl Attribute {
    /// Whether only an L7 proxy can evaluate it.
    pub fn is_l7(&self) -> bool {
        !matches!(
            self,
            Attribute::Principal
                | Attribute::Namespace
                | Attribute::ServiceAccount
                | Attribute::SourceIp
                | Attribute::DestinationIp
                | Attribute::DestinationPort
        )
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attribute::Principal => "principal",
            Attribute::Namespace => "namespace",
            Attribute::ServiceAccount => "service account",
            Attribute::SourceIp => "source IP",
            Attribute::DestinationIp => "destination IP",
            Attribute::DestinationPort => "port",
            Attribute::Host => "request host",
            Attribute::Method => "request method",
            Attribute::Path => "request path",
            Attribute::RequestPrincipal => "request principal",
            Attribute::RemoteIp => "remote IP",
            Attribute::Header(name) => return write!(f, "request.headers[{name}]"),
            Attribute::Claim(path) => return write!(f, "request.auth.claims[{}]", path.join("][")),
            Attribute::Audience => "request.auth.audiences",
            Attribute::Presenter => "request.auth.presenter",
            Attribute::Sni => "connection.sni",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Values {
    Strings(Vec<StringMatch>),
    Ips(Vec<IpNet>),
    Ports(Vec<u16>),
    Paths(Vec<PathMatch>),
}

/// Istio's string matching: exact, `prefix*`, `*suffix`, or `*` (present).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Present,
}

impl StringMatch {
    pub fn new(pattern: &str) -> Self {
        if pattern == "*" {
            StringMatch::Present
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_string())
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_string())
        } else {
            StringMatch::Exact(pattern.to_string())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Present => !value.is_empty(),
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(s) => f.write_str(s),
            StringMatch::Prefix(p) => write!(f, "{p}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Present => f.write_str("*"),
        }
    }
}

/// A `paths` value: Istio's string forms, or a template with `{*}` (one
/// segment) and a trailing `{**}` (any number of segments, at least one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PathMatch {
    String(StringMatch),
    Template(Vec<TemplateSegment>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum TemplateSegment {
    Literal(String),
    /// `{*}`
    One,
    /// `{**}`, last only.
    Rest,
}

impl PathMatch {
    /// Parses a `paths` value; an error says what is wrong with it.
    pub fn new(pattern: &str) -> Result<Self, String> {
        if !pattern.contains('{') && !pattern.contains('}') {
            return Ok(PathMatch::String(StringMatch::new(pattern)));
        }
        if pattern.contains('*') && pattern.replace("{*}", "").replace("{**}", "").contains('*') {
            return Err(format!("`{pattern}`: a template cannot also use a `*` wildcard"));
        }
        let Some(rest) = pattern.strip_prefix('/') else {
            return Err(format!("`{pattern}`: a path template starts with `/`"));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::new();
        for (index, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "{*}" => TemplateSegment::One,
                "{**}" if index == parts.len() - 1 => TemplateSegment::Rest,
                "{**}" => return Err(format!("`{pattern}`: `{{**}}` may only be the last segment")),
                literal if literal.contains(['{', '}']) => {
                    return Err(format!("`{pattern}`: `{{*}}` and `{{**}}` must be whole segments"));
                }
                literal => TemplateSegment::Literal(literal.to_string()),
            });
        }
        Ok(PathMatch::Template(segments))
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::String(m) => m.matches(path),
            PathMatch::Template(template) => {
                let Some(rest) = path.strip_prefix('/') else { return false };
                let parts: Vec<&str> = rest.split('/').collect();
                let mut index = 0;
                for segment in template {
                    match segment {
                        TemplateSegment::Rest => {
                            return index < parts.len() && parts[index..].iter().all(|p| !p.is_empty());
                        }
                        TemplateSegment::One => {
                            if parts.get(index).is_none_or(|p| p.is_empty()) {
                                return false;
                            }
                        }
                        TemplateSegment::Literal(literal) => {
                            if parts.get(index) != Some(&literal.as_str()) {
                                return false;
                            }
                        }
                    }
                    index += 1;
                }
                index == parts.len()
            }
        }
    }
}

impl fmt::Display for PathMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathMatch::String(m) => m.fmt(f),
            PathMatch::Template(segments) => {
                for segment in segments {
                    match segment {
                        TemplateSegment::Literal(l) => write!(f, "/{l}")?,
                        TemplateSegment::One => f.write_str("/{*}")?,
                        TemplateSegment::Rest => f.write_str("/{**}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

/// A parsed `RequestAuthentication`: which workloads it covers (like an
/// AuthorizationPolicy's scope) and the issuers it accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestAuthentication {
    pub namespace: String,
    pub name: String,
    pub scope: Scope,
    pub rules: Vec<JwtRule>,
}

/// One issuer a waypoint accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JwtRule {
    pub issuer: String,
    /// Accepted `aud` values; empty: `aud` is not checked.
    pub audiences: Vec<String>,
    pub jwks: Jwks,
    /// `forwardOriginalToken`: the verified `Authorization` header goes
    /// upstream. Off by default (Istio's too), so the application never sees
    /// a bearer token it could replay.
    pub forward_original_token: bool,
}

/// Where an issuer's keys come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Jwks {
    /// Given inline (`jwks`).
    Loaded(JwkSet),
    /// At this URI (`jwksUri`), https:// or file://; the waypoint fetches and
    /// refreshes it. Nothing else reads it: the agent and the CA never open
    /// a path a policy names.
    Fetched(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_templates() {
        let cases = [
            ("/v1/{*}/charge", "/v1/acct/charge", true),
            ("/v1/{*}/charge", "/v1/a/b/charge", false),
            ("/v1/{*}/charge", "/v1//charge", false),
            ("/v1/{**}", "/v1/a/b/c", true),
            ("/v1/{**}", "/v1/a", true),
            ("/v1/{**}", "/v1", false),
            ("/v1/{**}", "/v2/a", false),
            ("/{*}", "/x", true),
            ("/v1/charge", "/v1/charge", true),
            ("/v1/*", "/v1/anything/else", true),
        ];
        for (pattern, path, want) in cases {
            assert_eq!(PathMatch::new(pattern).unwrap().matches(path), want, "{pattern} vs {path}");
        }
        for bad in ["/v1/{**}/x", "/v1/a{*}", "v1/{*}", "/v1/{*}*"] {
            assert!(PathMatch::new(bad).is_err(), "{bad}");
        }
    }
}
