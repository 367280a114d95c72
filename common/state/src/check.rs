//! `ambit policy check`: the decision the destination's tunnel would make
//! for a described connection, with the rule that made it and how every
//! field of every applicable rule came out. Offline, on the same files the
//! agent reads.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use ambit_authz::{Connection, Decision, Peer, PolicyTrace};
use ambit_identity::Identity;
use ambit_model::MtlsMode;

use crate::State;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    #[error(
        "--from `{0}`: not a SPIFFE ID (spiffe://...), an IP address or a pod (namespace/name) of the configuration"
    )]
    From(String),
    #[error("--to `{0}`: not a pod (namespace/name[:port]) or IP:port of a pod in the configuration")]
    To(String),
    #[error("--to `{0}`: `{1}` is not a port (1-65535)")]
    Port(String, String),
}

/// The caller as the destination's tunnel would see it.
#[derive(Debug)]
struct Caller {
    describe: String,
    peer: Option<Peer>,
    ip: Option<IpAddr>,
}

/// The outcome of a check, printable for a person.
#[derive(Debug)]
pub struct CheckReport {
    caller: String,
    destination: String,
    note: Option<String>,
    /// PeerAuthentication STRICT refuses a plaintext caller before any policy.
    strict_refusal: bool,
    decision: Decision,
    traces: Vec<PolicyTrace>,
}

impl CheckReport {
    pub fn allows(&self) -> bool {
        !self.strict_refusal && self.decision.allows()
    }
}

/// Evaluates a connection `from` -> `to` against the state's policies.
pub fn check(state: &State, from: &str, to: &str) -> Result<CheckReport, CheckError> {
    let caller = caller(state, from)?;
    let (pod_id, ip, port) = destination(state, to)?;
    let pod = state.snapshot().pods.get(&pod_id).expect("destination resolved from the snapshot");
    let conn =
        Connection { peer: caller.peer.clone(), src_ip: caller.ip, dst_ip: Some(ip), dst_port: port, request: None };
    let (decision, traces) = state.policies().explain(pod, &conn);
    let note = match (state.is_ambient(pod), port) {
        (false, _) => Some(format!("{pod_id} is not in ambient mode: no ambit tunnel enforces policies for it")),
        (true, None) => Some("no port given: rules on ports count as not seen (fails closed); add :PORT".to_string()),
        _ => None,
    };
    let strict_refusal = caller.peer.is_none()
        && state.is_ambient(pod)
        && port.is_some_and(|port| state.mtls_mode(&pod_id, port) == MtlsMode::Strict);
    let destination = match port {
        Some(port) => format!("{pod_id} {}", SocketAddr::new(ip, port)),
        None => format!("{pod_id} {ip}"),
    };
    Ok(CheckReport { caller: caller.describe, destination, note, strict_refusal, decision, traces })
}

fn caller(state: &State, from: &str) -> Result<Caller, CheckError> {
    if from.starts_with("spiffe://") {
        let id = spiffe::SpiffeId::new(from).map_err(|_| CheckError::From(from.to_string()))?;
        return Ok(Caller { describe: format!("{from} (mTLS)"), peer: Some(Peer::from_spiffe_id(&id)), ip: None });
    }
    let pod = match from.parse::<IpAddr>() {
        Ok(ip) => match state.workload_at(ip) {
            Some(id) => state.snapshot().pods.get(id),
            None => return Ok(Caller { describe: format!("{ip} (plaintext, not a pod)"), peer: None, ip: Some(ip) }),
        },
        Err(_) => state.snapshot().pods.get(from),
    };
    let pod = pod.ok_or_else(|| CheckError::From(from.to_string()))?;
    let ip = pod.ips.first().copied();
    let ip_text = ip.map(|ip| ip.to_string()).unwrap_or_default();
    if state.is_ambient(pod) {
        let identity: Identity = state.identity_of(pod);
        let describe = format!("{} {ip_text} ({identity}, mTLS)", pod.id());
        Ok(Caller { describe, peer: Some(Peer::from(&identity)), ip })
    } else {
        Ok(Caller { describe: format!("{} {ip_text} (plaintext: not in ambient mode)", pod.id()), peer: None, ip })
    }
}

/// `(pod id, pod IP, port)` of `namespace/name[:port]` or `IP:port`.
fn destination(state: &State, to: &str) -> Result<(String, IpAddr, Option<u16>), CheckError> {
    if let Ok(addr) = to.parse::<SocketAddr>() {
        let id = state.workload_at(addr.ip()).ok_or_else(|| CheckError::To(to.to_string()))?;
        return Ok((id.to_string(), addr.ip(), Some(addr.port())));
    }
    let (id, port) = match to.rsplit_once(':') {
        Some((id, port_text)) => {
            let port = port_text.parse::<u16>().ok().filter(|p| *p > 0);
            (id, Some(port.ok_or_else(|| CheckError::Port(to.to_string(), port_text.to_string()))?))
        }
        None => (to, None),
    };
    let pod = state.snapshot().pods.get(id).ok_or_else(|| CheckError::To(to.to_string()))?;
    let ip = *pod.ips.first().ok_or_else(|| CheckError::To(to.to_string()))?;
    Ok((pod.id(), ip, port))
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", if self.allows() { "ALLOW" } else { "DENY" })?;
        writeln!(f, "  from: {}", self.caller)?;
        writeln!(f, "  to:   {}", self.destination)?;
        if self.strict_refusal {
            writeln!(f, "  why:  plaintext rejected: PeerAuthentication mode is STRICT (before any policy)")?;
        } else {
            writeln!(f, "  why:  {}", self.decision.reason)?;
        }
        for rule in &self.decision.audited {
            writeln!(f, "  audit: {rule}")?;
        }
        if let Some(dry_run) = &self.decision.dry_run {
            writeln!(f, "  dry-run: {dry_run}")?;
        }
        if let Some(note) = &self.note {
            writeln!(f, "  note: {note}")?;
        }
        if self.traces.is_empty() {
            return writeln!(f, "\nNo AuthorizationPolicy applies to the destination.");
        }
        writeln!(f, "\nPolicies that apply to the destination:")?;
        for policy in &self.traces {
            let dry = if policy.dry_run { ", dry-run" } else { "" };
            writeln!(f, "  {} ({}{dry})", policy.policy, policy.action)?;
            if policy.rules.is_empty() {
                writeln!(f, "    no rules: never matches")?;
            }
            for rule in &policy.rules {
                writeln!(f, "    rule {}: {}", rule.index, if rule.matched { "matches" } else { "does not match" })?;
                if rule.conditions.is_empty() {
                    writeln!(f, "      (empty rule: matches every connection)")?;
                }
                for c in &rule.conditions {
                    let mark = if c.matched { "match" } else { "fail " };
                    writeln!(f, "      {mark} {}: {}", c.field, c.note)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use ambit_model::{Snapshot, parse_file};

    const CONFIG: &str = r#"
kind: Namespace
metadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}
---
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIPs: [{ip: 10.244.1.3}]}
---
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIPs: [{ip: 10.244.2.3}]}
---
kind: Pod
metadata: {name: plain, namespace: legacy}
spec: {nodeName: n1}
status: {podIPs: [{ip: 10.244.1.9}]}
---
kind: AuthorizationPolicy
metadata: {name: web-callers, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
    to: [{operation: {ports: ["8080"]}}]
"#;

    fn state() -> State {
        let mut snapshot = Snapshot::default();
        for object in parse_file(Path::new("c.yaml"), CONFIG).unwrap() {
            snapshot.insert(object);
        }
        State::new(snapshot, "cluster.local")
    }

    #[test]
    fn pod_to_pod_is_explained_field_by_field() {
        let report = check(&state(), "shop/client", "shop/web:8080").unwrap();
        assert!(report.allows());
        let text = report.to_string();
        assert!(text.starts_with("ALLOW\n  from: shop/client 10.244.1.3 (spiffe://cluster.local/ns/shop/sa/client, mTLS)\n  to:   shop/web 10.244.2.3:8080\n  why:  allowed by AuthorizationPolicy shop/web-callers rule 0\n"), "{text}");
        assert!(text.contains("match from[0].source.principals: cluster.local/ns/shop/sa/client listed"), "{text}");

        let other_port = check(&state(), "spiffe://cluster.local/ns/shop/sa/client", "10.244.2.3:9090").unwrap();
        assert!(!other_port.allows());
        assert!(other_port.to_string().contains("fail  to[0].operation.ports: 9090 not listed"), "{other_port}");
    }

    #[test]
    fn plaintext_callers_and_missing_ports() {
        let plain = check(&state(), "legacy/plain", "shop/web:8080").unwrap();
        assert!(!plain.allows());
        assert!(
            plain.to_string().contains("fail  from[0].source.principals: caller has no verified identity (plaintext)"),
            "{plain}"
        );
        let by_ip = check(&state(), "192.0.2.7", "shop/web").unwrap();
        let text = by_ip.to_string();
        assert!(text.contains("192.0.2.7 (plaintext, not a pod)") && text.contains("no port given"), "{text}");
    }

    #[test]
    fn unknown_endpoints_say_what_is_accepted() {
        assert_eq!(check(&state(), "shop/nobody", "shop/web").unwrap_err(), CheckError::From("shop/nobody".into()));
        assert_eq!(check(&state(), "shop/client", "10.9.9.9:80").unwrap_err(), CheckError::To("10.9.9.9:80".into()));
        assert!(matches!(check(&state(), "shop/client", "shop/web:http"), Err(CheckError::Port(..))));
    }
}
