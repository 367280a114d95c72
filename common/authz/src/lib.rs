//! The authorization engine: Istio-compatible `AuthorizationPolicy`
//! (security.istio.io/v1 field names and semantics) evaluated on the
//! verified peer identity of each new connection, by the destination's
//! node tunnel, and on each request, by a waypoint.
//!
//! - `ambit_model` parses policies, rejecting anything the engine cannot
//!   enforce exactly (unknown fields, malformed principals, unknown `when`
//!   keys), so a mistake never widens access.
//! - [`PolicySet`] indexes policies by namespace and selector labels, so a
//!   decision looks only at the policies that apply to the destination.
//! - [`PolicySet::evaluate`] decides: any matching DENY denies; otherwise, if
//!   ALLOW policies apply, one must match; otherwise the connection is
//!   allowed. AUDIT marks; `istio.io/dry-run` policies are evaluated and
//!   reported but not enforced.
//! - [`lint`] finds policies that cannot do what they say.
//! - [`request`] is what a waypoint knows of an HTTP request; [`jwt`]
//!   verifies the end user's token for `RequestAuthentication`.
//!
//! The node tunnel sees L4 only. A rule that needs L7 (methods, paths, hosts,
//! request principals, `request.*` keys) fails closed both ways there: for
//! ALLOW it never matches, for DENY the L7 part counts as matched, so the
//! rule denies whatever its L4 part matches. A waypoint passes the HTTP
//! request ([`request::Request`]) and the same rules see all of it.
#![forbid(unsafe_code)]

pub mod jwt;
pub mod lint;
pub mod request;

use std::{collections::HashMap, fmt, net::IpAddr, sync::Arc};

use ambit_identity::Identity;
use ambit_model::{Action, Attribute, AuthorizationPolicy, Condition, Pod, ROOT_NAMESPACE, Rule, Scope, Values};

/// The connection (and, at a waypoint, the request) a decision is about.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    /// The peer's verified identity; `None` for a plaintext caller.
    pub peer: Option<Peer>,
    /// `None` only when an offline check was not told the address.
    pub src_ip: Option<IpAddr>,
    pub dst_ip: Option<IpAddr>,
    pub dst_port: Option<u16>,
    /// The HTTP request, at a waypoint; `None` in the node tunnel.
    pub request: Option<request::Request>,
}

/// A verified peer identity, split the ways policies refer to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The SPIFFE ID without `spiffe://`, e.g. `cluster.local/ns/shop/sa/web`.
    pub principal: String,
    /// Namespace and service account, when the ID has the `/ns/<ns>/sa/<sa>` form.
    pub namespace: Option<String>,
    pub service_account: Option<String>,
}

impl Peer {
    pub fn from_spiffe_id(id: &spiffe::SpiffeId) -> Self {
        let identity = Identity::from_spiffe_id(id);
        Self {
            principal: id.to_string().trim_start_matches("spiffe://").to_string(),
            namespace: identity.as_ref().map(|i| i.namespace.clone()),
            service_account: identity.map(|i| format!("{}/{}", i.namespace, i.service_account)),
        }
    }
}

impl From<&Identity> for Peer {
    fn from(identity: &Identity) -> Self {
        Self::from_spiffe_id(&identity.spiffe_id())
    }
}

/// How one condition came out, for explanations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionTrace {
    pub field: String,
    pub matched: bool,
    pub note: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleTrace {
    pub index: usize,
    pub matched: bool,
    pub conditions: Vec<ConditionTrace>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyTrace {
    pub policy: String,
    pub action: Action,
    pub dry_run: bool,
    pub rules: Vec<RuleTrace>,
}

// Evaluation of the model's conditions, rules and policies; the model
// itself (`ambit-model`) knows nothing of connections.
trait ConditionEval {
    fn evaluate(&self, conn: &Connection, action: Action) -> (bool, String);
    fn absent_note(&self) -> String;
    fn ip_result(&self, ip: IpAddr) -> (bool, String);
    fn result(&self, hit: bool, value: &str) -> (bool, String);
}

trait RuleEval {
    fn matches(&self, conn: &Connection, action: Action, trace: Option<&mut Vec<ConditionTrace>>) -> bool;
}

trait PolicyEval {
    fn matching_rule(&self, conn: &Connection) -> Option<usize>;
    fn trace(&self, conn: &Connection) -> PolicyTrace;
}

impl ConditionEval for Condition {
    fn evaluate(&self, conn: &Connection, action: Action) -> (bool, String) {
        let unseen = |why: String| {
            // Fail closed: what the tunnel cannot see never grants access and
            // never spares a connection from a DENY.
            let matched = action == Action::Deny;
            (matched, format!("{why}; counts as {} for {action}", if matched { "matched" } else { "not matched" }))
        };
        if self.attribute.is_l7() && conn.request.is_none() {
            return unseen(format!("{} is L7, not visible to the node tunnel", self.attribute));
        }
        let request = conn.request.as_ref();
        let auth = request.and_then(|r| r.auth.as_ref());
        let values: Option<Vec<String>> = match &self.attribute {
            Attribute::SourceIp | Attribute::RemoteIp => match conn.src_ip {
                Some(ip) => return self.ip_result(ip),
                None => return unseen("source IP not given".into()),
            },
            Attribute::DestinationIp => match conn.dst_ip {
                Some(ip) => return self.ip_result(ip),
                None => return unseen("destination IP not given".into()),
            },
            Attribute::DestinationPort => match conn.dst_port {
                Some(port) => {
                    let hit = matches!(&self.values, Values::Ports(ports) if ports.contains(&port));
                    return self.result(hit, &port.to_string());
                }
                None => return unseen("destination port not given".into()),
            },
            Attribute::Principal => conn.peer.as_ref().map(|p| vec![p.principal.clone()]),
            Attribute::Namespace => conn.peer.as_ref().and_then(|p| p.namespace.clone()).map(|n| vec![n]),
            Attribute::ServiceAccount => conn.peer.as_ref().and_then(|p| p.service_account.clone()).map(|s| vec![s]),
            Attribute::Host => request.map(|r| {
                let full = r.host.clone();
                let bare = r.host_without_port().to_string();
                if bare == full { vec![full] } else { vec![full, bare] }
            }),
            Attribute::Method => request.map(|r| vec![r.method.clone()]),
            Attribute::Path => request.map(|r| vec![r.path.clone()]),
            Attribute::Header(name) => request.and_then(|r| {
                let found: Vec<String> = r
                    .headers
                    .get_all(name.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .map(str::to_string)
                    .collect();
                (!found.is_empty()).then_some(found)
            }),
            Attribute::RequestPrincipal => auth.map(|a| vec![a.principal.clone()]),
            Attribute::Claim(path) => request.and_then(|r| r.claim(path)),
            Attribute::Audience => auth.map(|a| a.audiences.clone()),
            Attribute::Presenter => auth.and_then(|a| a.presenter.clone()).map(|p| vec![p]),
            Attribute::Sni => None,
        };
        match values {
            // Absent (plaintext caller, no JWT, no such header): positive
            // matches fail, `not*` ones hold.
            None => (self.negated, self.absent_note()),
            Some(values) => {
                let hit = values.iter().any(|value| match &self.values {
                    Values::Strings(m) => m.iter().any(|m| m.matches(value)),
                    Values::Paths(m) => m.iter().any(|m| m.matches(value)),
                    _ => false,
                });
                self.result(hit, &values.join(","))
            }
        }
    }

    /// Says what is missing when the attribute has no value.
    fn absent_note(&self) -> String {
        match &self.attribute {
            Attribute::Principal | Attribute::Namespace | Attribute::ServiceAccount => {
                "caller has no verified identity (plaintext)".into()
            }
            Attribute::RequestPrincipal | Attribute::Audience | Attribute::Presenter => "no valid JWT".into(),
            other => format!("no {other}"),
        }
    }

    fn ip_result(&self, ip: IpAddr) -> (bool, String) {
        let ip = canonical(ip);
        let hit = matches!(&self.values, Values::Ips(nets) if nets.iter().any(|n| n.contains(&ip)));
        self.result(hit, &ip.to_string())
    }

    fn result(&self, hit: bool, value: &str) -> (bool, String) {
        let matched = hit != self.negated;
        let listed = if hit { "listed" } else { "not listed" };
        (matched, format!("{value} {listed}"))
    }
}

/// IPv4-mapped IPv6 addresses compare as IPv4, as policies write them.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl RuleEval for Rule {
    /// Whether the rule matches; with `trace`, every condition is evaluated
    /// and recorded (no short-circuit).
    fn matches(&self, conn: &Connection, action: Action, mut trace: Option<&mut Vec<ConditionTrace>>) -> bool {
        let explain = trace.is_some();
        let mut check = |condition: &Condition| {
            let (matched, note) = condition.evaluate(conn, action);
            if let Some(trace) = trace.as_deref_mut() {
                trace.push(ConditionTrace { field: condition.field.clone(), matched, note });
            }
            matched
        };
        let from = any_group(&self.from, explain, &mut check);
        if !from && !explain {
            return false;
        }
        let to = any_group(&self.to, explain, &mut check);
        if !to && !explain {
            return false;
        }
        let when = all_hold(&self.when, explain, &mut check);
        from && to && when
    }
}

/// All conditions hold (short-circuits unless explaining).
fn all_hold(conditions: &[Condition], explain: bool, check: &mut dyn FnMut(&Condition) -> bool) -> bool {
    let mut ok = true;
    for condition in conditions {
        ok &= check(condition);
        if !ok && !explain {
            break;
        }
    }
    ok
}

/// No groups, or one group whose conditions all hold.
fn any_group(groups: &[Vec<Condition>], explain: bool, check: &mut dyn FnMut(&Condition) -> bool) -> bool {
    let mut any = groups.is_empty();
    for group in groups {
        any |= all_hold(group, explain, check);
        if any && !explain {
            break;
        }
    }
    any
}

impl PolicyEval for AuthorizationPolicy {
    /// The index of the first matching rule.
    fn matching_rule(&self, conn: &Connection) -> Option<usize> {
        self.rules.iter().position(|rule| rule.matches(conn, self.action, None))
    }

    fn trace(&self, conn: &Connection) -> PolicyTrace {
        let rules = self
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let mut conditions = Vec::new();
                let matched = rule.matches(conn, self.action, Some(&mut conditions));
                RuleTrace { index, matched, conditions }
            })
            .collect();
        PolicyTrace { policy: self.id(), action: self.action, dry_run: self.dry_run, rules }
    }
}

/// The policy and rule behind a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub policy: String,
    pub rule: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rule {}", self.policy, self.rule)
    }
}

/// Why a connection was allowed or denied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No ALLOW or DENY policy applies to the destination.
    NoPolicy,
    AllowedBy(RuleRef),
    DeniedBy(RuleRef),
    /// ALLOW policies apply and none matched.
    NoAllowMatched {
        policies: Vec<String>,
    },
    /// The destination is no longer in the configuration (fail closed).
    UnknownWorkload(String),
}

impl Reason {
    pub fn allows(&self) -> bool {
        matches!(self, Reason::NoPolicy | Reason::AllowedBy(_))
    }

    /// The matching rule, if one decided.
    pub fn rule(&self) -> Option<&RuleRef> {
        match self {
            Reason::AllowedBy(r) | Reason::DeniedBy(r) => Some(r),
            _ => None,
        }
    }

    /// A short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Reason::NoPolicy => "no_policy",
            Reason::AllowedBy(_) => "allow_policy",
            Reason::DeniedBy(_) => "deny_policy",
            Reason::NoAllowMatched { .. } => "no_allow_match",
            Reason::UnknownWorkload(_) => "unknown_workload",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NoPolicy => f.write_str("no ALLOW or DENY policy applies"),
            Reason::AllowedBy(r) => write!(f, "allowed by AuthorizationPolicy {r}"),
            Reason::DeniedBy(r) => write!(f, "denied by AuthorizationPolicy {r}"),
            Reason::NoAllowMatched { policies } => {
                write!(f, "denied: no rule of the ALLOW policies that apply ({}) matched", policies.join(", "))
            }
            Reason::UnknownWorkload(pod) => write!(f, "denied: {pod} is no longer in the configuration"),
        }
    }
}

/// An authorization decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    /// AUDIT rules that matched.
    pub audited: Vec<RuleRef>,
    /// What would have happened with the dry-run policies enforced, when
    /// any apply.
    pub dry_run: Option<Reason>,
}

impl Decision {
    pub fn allows(&self) -> bool {
        self.reason.allows()
    }
}

/// Every AuthorizationPolicy in force, indexed by namespace and selector
/// labels.
#[derive(Debug, Default)]
pub struct PolicySet {
    by_namespace: HashMap<String, NamespacePolicies>,
    /// Waypoint policies, under `namespace/Kind/name` of each target.
    by_target: HashMap<String, Vec<Arc<AuthorizationPolicy>>>,
    len: usize,
}

#[derive(Debug, Default)]
struct NamespacePolicies {
    /// Selector-less policies.
    whole: Vec<Arc<AuthorizationPolicy>>,
    /// Selector policies, under the first of their selector's labels.
    by_label: HashMap<(String, String), Vec<Arc<AuthorizationPolicy>>>,
}

impl PolicySet {
    pub fn new(policies: impl IntoIterator<Item = AuthorizationPolicy>) -> Self {
        let mut set = PolicySet::default();
        for policy in policies {
            let policy = Arc::new(policy);
            let entry = set.by_namespace.entry(policy.namespace.clone()).or_default();
            match &policy.scope {
                Scope::Namespace => entry.whole.push(policy.clone()),
                Scope::Selector(labels) => match labels.iter().next() {
                    Some((k, v)) => entry.by_label.entry((k.clone(), v.clone())).or_default().push(policy.clone()),
                    // An empty selector selects every workload of the namespace.
                    None => entry.whole.push(policy.clone()),
                },
                Scope::TargetRefs(targets) => {
                    for target in targets {
                        let key = format!("{}/{target}", policy.namespace);
                        set.by_target.entry(key).or_default().push(policy.clone());
                    }
                    continue;
                }
            }
            set.len += 1;
        }
        set
    }

    /// Policies the node tunnel enforces.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The policies that apply to `pod`: the root namespace's and its own.
    pub fn applicable(&self, pod: &Pod) -> Vec<Arc<AuthorizationPolicy>> {
        let mut found: Vec<Arc<AuthorizationPolicy>> = Vec::new();
        let mut namespaces = vec![ROOT_NAMESPACE];
        if pod.namespace != ROOT_NAMESPACE {
            namespaces.push(&pod.namespace);
        }
        for namespace in namespaces {
            let Some(policies) = self.by_namespace.get(namespace) else { continue };
            found.extend(policies.whole.iter().cloned());
            for (key, value) in &pod.labels {
                if let Some(candidates) = policies.by_label.get(&(key.clone(), value.clone())) {
                    found.extend(candidates.iter().filter(|p| p.applies_to(pod)).cloned());
                }
            }
        }
        found
    }

    /// Decides a connection to `pod`.
    pub fn evaluate(&self, pod: &Pod, conn: &Connection) -> Decision {
        decide(&self.applicable(pod), conn)
    }

    /// Decides a request at a waypoint: the policies that target any of
    /// `targets` (`namespace/Kind/name`, e.g. `shop/Gateway/wp`), plus the
    /// mesh-wide root-namespace ones without a selector.
    pub fn evaluate_targets(&self, targets: &[String], conn: &Connection) -> Decision {
        let mut policies: Vec<Arc<AuthorizationPolicy>> =
            self.by_namespace.get(ROOT_NAMESPACE).map(|root| root.whole.clone()).unwrap_or_default();
        for target in targets {
            for policy in self.by_target.get(target).into_iter().flatten() {
                if !policies.iter().any(|p| Arc::ptr_eq(p, policy)) {
                    policies.push(policy.clone());
                }
            }
        }
        decide(&policies, conn)
    }

    /// Every applicable policy with each rule's field-by-field outcome.
    pub fn explain(&self, pod: &Pod, conn: &Connection) -> (Decision, Vec<PolicyTrace>) {
        let policies = self.applicable(pod);
        (decide(&policies, conn), policies.iter().map(|p| p.trace(conn)).collect())
    }
}

/// DENY first; then, if ALLOW policies apply, one must match; otherwise allow.
fn decide(policies: &[Arc<AuthorizationPolicy>], conn: &Connection) -> Decision {
    let enforced = decide_with(policies.iter().filter(|p| !p.dry_run), conn);
    let audited = policies
        .iter()
        .filter(|p| p.action == Action::Audit && !p.dry_run)
        .filter_map(|p| p.matching_rule(conn).map(|rule| RuleRef { policy: p.id(), rule }))
        .collect();
    let dry_run = policies.iter().any(|p| p.dry_run).then(|| decide_with(policies.iter(), conn));
    Decision { reason: enforced, audited, dry_run }
}

fn decide_with<'a>(policies: impl Iterator<Item = &'a Arc<AuthorizationPolicy>> + Clone, conn: &Connection) -> Reason {
    for policy in policies.clone().filter(|p| p.action == Action::Deny) {
        if let Some(rule) = policy.matching_rule(conn) {
            return Reason::DeniedBy(RuleRef { policy: policy.id(), rule });
        }
    }
    let allow: Vec<&Arc<AuthorizationPolicy>> = policies.filter(|p| p.action == Action::Allow).collect();
    if allow.is_empty() {
        return Reason::NoPolicy;
    }
    for policy in &allow {
        if let Some(rule) = policy.matching_rule(conn) {
            return Reason::AllowedBy(RuleRef { policy: policy.id(), rule });
        }
    }
    Reason::NoAllowMatched { policies: allow.iter().map(|p| p.id()).collect() }
}

#[cfg(test)]
mod tests;
