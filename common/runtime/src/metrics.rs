//! Prometheus metrics, named `ambit_*` and labelled like Istio's standard
//! TCP metrics (`reporter`, `source_workload`, `source_principal`,
//! `connection_security_policy`, `response_flags`, ...), so Istio's Grafana
//! boards adapt by changing the metric prefix. Labels never carry ports or
//! client IPs: cardinality stays bounded by workloads and identities.

use std::sync::Mutex;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Labels of the per-connection metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `source` (the agent of the calling pod) or `destination`.
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: String,
    /// `-`, `DENIED` or `CONNECT_FAILURE`.
    pub response_flags: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `outbound` (this agent dialled) or `inbound` (this agent accepted).
    pub direction: String,
    /// `ok` or `failed`.
    pub result: String,
}

/// Labels of authorization outcomes; bounded by the policies in force.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorizationLabels {
    /// `allow`, `deny`, `audit`, `dry_run_allow` or `dry_run_deny`.
    pub decision: String,
    /// `no_policy`, `allow_policy`, `deny_policy`, `no_allow_match`,
    /// `unknown_workload` or `audit_policy`.
    pub reason: String,
    /// `namespace/name` of the deciding policy, or `-`.
    pub policy: String,
}

/// Labels of the waypoint's request metrics (Istio's names; no end-user
/// principal, whose values are unbounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: String,
    pub source_principal: String,
    pub destination_service: String,
    pub response_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    pub name: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub connections_opened: Family<ConnectionLabels, Counter>,
    pub connections_closed: Family<ConnectionLabels, Counter>,
    pub sent_bytes: Family<ConnectionLabels, Counter>,
    pub received_bytes: Family<ConnectionLabels, Counter>,
    pub tls_handshakes: Family<DirectionLabels, Counter>,
    pub authorization_decisions: Family<AuthorizationLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram>,
    pub hbone_streams: Counter,
    /// Streams that rode an existing HTTP/2 connection (no handshake).
    pub hbone_pool_reuse: Counter,
    pub certificate_expiry: Family<IdentityLabels, Gauge>,
    pub certificate_issued: Family<IdentityLabels, Gauge>,
    pub certificate_renewal_failures: Family<IdentityLabels, Counter>,
    /// Kernel-side counters, copied from the per-CPU map at each scrape.
    pub capture_events: Family<NameLabels, Gauge>,
    /// Objects in the state store, by kind.
    pub state_objects: Family<NameLabels, Gauge>,
    pub enrolled_pods: Gauge,
    /// Pods this agent should capture but cannot (each retried).
    pub pods_not_enrolled: Gauge,
    /// 1 while the agent can write its state directory, 0 when it cannot.
    pub state_dir_writable: Gauge,
    /// Configuration errors in force (each file keeps its last good objects).
    pub config_errors: Gauge,
    /// Warning lines left out by a [`crate::logging::WarnLimiter`], by what
    /// they would have said.
    pub warnings_suppressed: Family<NameLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let metrics = Self {
            registry: Mutex::new(Registry::with_prefix("ambit")),
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            tls_handshakes: Family::default(),
            authorization_decisions: Family::default(),
            requests: Family::default(),
            // 0.5 ms to about 16 s.
            request_duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.5, 2.0, 16))),
            hbone_streams: Counter::default(),
            hbone_pool_reuse: Counter::default(),
            certificate_expiry: Family::default(),
            certificate_issued: Family::default(),
            certificate_renewal_failures: Family::default(),
            capture_events: Family::default(),
            state_objects: Family::default(),
            enrolled_pods: Gauge::default(),
            pods_not_enrolled: Gauge::default(),
            state_dir_writable: Gauge::default(),
            config_errors: Gauge::default(),
            warnings_suppressed: Family::default(),
        };
        {
            let mut r = metrics.registry.lock().expect("registry lock");
            r.register("tcp_connections_opened", "TCP connections opened", metrics.connections_opened.clone());
            r.register("tcp_connections_closed", "TCP connections closed", metrics.connections_closed.clone());
            r.register("tcp_sent_bytes", "Bytes sent from source to destination", metrics.sent_bytes.clone());
            r.register(
                "tcp_received_bytes",
                "Bytes sent from destination back to source",
                metrics.received_bytes.clone(),
            );
            r.register("tls_handshakes", "mTLS handshakes of HBONE connections", metrics.tls_handshakes.clone());
            r.register(
                "authorization_decisions",
                "Authorization outcomes of inbound connections, with the deciding policy",
                metrics.authorization_decisions.clone(),
            );
            r.register("requests", "HTTP requests a waypoint handled", metrics.requests.clone());
            r.register(
                "request_duration_milliseconds",
                "Time from request to response head at a waypoint",
                metrics.request_duration.clone(),
            );
            r.register("hbone_streams", "HBONE CONNECT streams opened", metrics.hbone_streams.clone());
            r.register(
                "hbone_pool_reuse",
                "HBONE streams opened on a pooled connection (no TLS handshake)",
                metrics.hbone_pool_reuse.clone(),
            );
            r.register(
                "certificate_expiry_timestamp_seconds",
                "When the current certificate of an identity expires (Unix time)",
                metrics.certificate_expiry.clone(),
            );
            r.register(
                "certificate_issued_timestamp_seconds",
                "When the current certificate of an identity became valid (Unix time); age = time() - this",
                metrics.certificate_issued.clone(),
            );
            r.register(
                "certificate_renewal_failures",
                "Failed attempts to obtain a certificate",
                metrics.certificate_renewal_failures.clone(),
            );
            r.register("capture_events", "Events counted by the kernel programs", metrics.capture_events.clone());
            r.register("state_objects", "Objects in the agent's state store", metrics.state_objects.clone());
            r.register("enrolled_pods", "Pods this agent captures", metrics.enrolled_pods.clone());
            r.register(
                "pods_not_enrolled",
                "Pods this agent should capture but cannot; the log's `cannot enrol pod` says why",
                metrics.pods_not_enrolled.clone(),
            );
            r.register(
                "state_dir_writable",
                "1 while the agent can write its state directory; 0 when it cannot (full or read-only): it keeps enforcing, but what it keeps there will not outlive a restart",
                metrics.state_dir_writable.clone(),
            );
            r.register(
                "config_errors",
                "Configuration errors in force; each failing file's last good version stands in for it",
                metrics.config_errors.clone(),
            );
            r.register(
                "warnings_suppressed",
                "Warning lines left out: one per source and reason is logged per 10 s, the rest counted here",
                metrics.warnings_suppressed.clone(),
            );
        }
        metrics
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().expect("registry lock")).expect("writing to a String cannot fail");
        out
    }

    pub fn identity(identity: &impl ToString) -> IdentityLabels {
        IdentityLabels { identity: identity.to_string() }
    }

    pub fn name(name: &str) -> NameLabels {
        NameLabels { name: name.to_string() }
    }

    pub fn authorization(&self, decision: &str, reason: &str, policy: &str) {
        self.authorization_decisions
            .get_or_create(&AuthorizationLabels {
                decision: decision.into(),
                reason: reason.into(),
                policy: policy.into(),
            })
            .inc();
    }

    pub fn handshake(&self, direction: &str, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.tls_handshakes
            .get_or_create(&DirectionLabels { direction: direction.into(), result: result.into() })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `ambit_*` name in the shipped alerting rules is a metric the agent exports.
    #[test]
    fn alert_rules_reference_exported_metrics() {
        let metrics = Metrics::new();
        let exposition = metrics.encode();
        let mut exported: Vec<String> = Vec::new();
        for line in exposition.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let mut parts = line.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            exported.push(if kind == "counter" { format!("{name}_total") } else { name.to_string() });
        }
        let rules =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/base/prometheus-alerts.yaml"))
                .unwrap();
        let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(&rules).expect("the rules file is valid YAML");
        let mut checked = 0;
        for group in rules["groups"].as_sequence().unwrap() {
            for rule in group["rules"].as_sequence().unwrap() {
                let expr = rule["expr"].as_str().unwrap();
                for word in
                    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("ambit_"))
                {
                    assert!(
                        exported.iter().any(|e| e == word),
                        "{:?} uses {word}, which is not exported",
                        rule["alert"]
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 6);
    }
}
