//! `ambit policy lint`: policies that load but cannot do what they say.
//! Parse errors (malformed principals, unknown `when` keys, unknown fields)
//! are reported by the configuration loader; these are the warnings on top.

use std::fmt;

use ambit_model::{
    Action, Attribute, Condition, Scope, Snapshot, StringMatch, USE_WAYPOINT_LABEL, Values, WaypointFor,
};

/// A warning about one policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "warning: {}", self.message)
    }
}

/// Warnings for every policy in `snapshot`, in a stable order.
pub fn lint(snapshot: &Snapshot, trust_domain: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    for policy in &snapshot.authorization_policies {
        let mut warn = |what: String| {
            findings
                .push(Finding { message: format!("AuthorizationPolicy {} ({}): {what}", policy.id(), policy.action) })
        };
        if let Scope::TargetRefs(targets) = &policy.scope {
            for target in targets.iter().filter(|t| !waypoint_enforces(snapshot, &policy.namespace, t)) {
                warn(format!(
                    "targets {target}, which no waypoint serves (no such Gateway, or a Service without {USE_WAYPOINT_LABEL}): it has no effect there"
                ));
            }
            continue;
        }
        if let Scope::Selector(labels) = &policy.scope {
            let selected = snapshot.pods.values().filter(|pod| policy.applies_to(pod)).count();
            if selected == 0 {
                let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                warn(format!("its selector ({}) selects no pod", labels.join(", ")));
            }
        }
        if policy.rules.is_empty() {
            warn(match policy.action {
                Action::Allow => "has no rules, so it never matches: every connection to the workloads it selects is denied; use `rules: [{}]` to allow all".into(),
                _ => "has no rules, so it never matches and has no effect".into(),
            });
        }
        for (index, field) in policy.l7_fields() {
            let effect = match policy.action {
                Action::Deny => {
                    "the L7 part counts as matched, so the rule denies every connection its L4 fields match"
                }
                _ => "the rule never matches",
            };
            warn(format!(
                "rule {index}: `{field}` is L7, which the node tunnel cannot see; {effect} (fails closed). Target a waypoint with targetRefs, or drop the field"
            ));
        }
        for (index, rule) in policy.rules.iter().enumerate() {
            for condition in rule.from.iter().flatten().chain(&rule.when) {
                if let Some(td) = foreign_trust_domain(condition, trust_domain)
                    && !snapshot.federations.contains_key(&td)
                {
                    warn(format!(
                        "rule {index}: `{}` names trust domain `{td}`, which is neither this mesh's (`{trust_domain}`) nor federated with it (no TrustDomainFederation): that value never matches",
                        condition.field
                    ));
                }
            }
            let groups = rule.from.iter().chain(&rule.to).chain(std::iter::once(&rule.when));
            if let Some(attribute) = groups.clone().find_map(|g| contradiction(g)) {
                warn(format!(
                    "rule {index}: lists the same {attribute} values as required and as excluded: the rule never matches"
                ));
            }
        }
    }
    findings
}

/// Whether a waypoint enforces policies that target `target` (`Kind/name`).
fn waypoint_enforces(snapshot: &Snapshot, namespace: &str, target: &str) -> bool {
    let id = |name: &str| format!("{namespace}/{name}");
    match target.split_once('/') {
        Some(("Gateway", name)) => snapshot.gateways.contains_key(&id(name)),
        Some(("Service", name)) => snapshot.services.get(&id(name)).is_some_and(|svc| {
            snapshot.waypoint_for(namespace, svc.use_waypoint.as_deref(), WaypointFor::Service).is_some()
        }),
        _ => false,
    }
}

/// A principal value whose trust domain (written without wildcards) is not ours.
fn foreign_trust_domain(condition: &Condition, trust_domain: &str) -> Option<String> {
    if condition.attribute != Attribute::Principal || condition.negated {
        return None;
    }
    let Values::Strings(values) = &condition.values else { return None };
    values.iter().find_map(|value| {
        let text = match value {
            StringMatch::Exact(s) | StringMatch::Prefix(s) => s,
            _ => return None,
        };
        let td = text.split('/').next()?;
        (text.contains('/') && td != trust_domain).then(|| td.to_string())
    })
}

/// An attribute whose every required exact value is also excluded in the same group.
fn contradiction(group: &[Condition]) -> Option<String> {
    group.iter().filter(|c| !c.negated).find_map(|required| {
        let excluded: Vec<&Values> =
            group.iter().filter(|c| c.negated && c.attribute == required.attribute).map(|c| &c.values).collect();
        let all_excluded = match &required.values {
            Values::Strings(values) => values.iter().all(|v| {
                matches!(v, StringMatch::Exact(_))
                    && excluded.iter().any(|e| matches!(e, Values::Strings(ex) if ex.contains(v)))
            }),
            Values::Ports(ports) => {
                ports.iter().all(|p| excluded.iter().any(|e| matches!(e, Values::Ports(ex) if ex.contains(p))))
            }
            Values::Ips(nets) => {
                nets.iter().all(|n| excluded.iter().any(|e| matches!(e, Values::Ips(ex) if ex.contains(n))))
            }
            Values::Paths(_) => false,
        };
        all_excluded.then(|| required.attribute.to_string())
    })
}
