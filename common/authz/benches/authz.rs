//! Micro-benchmark of L4 authorization with 10,000 policies, run by
//! `cargo xtask bench`. Prints one JSON object.
//!
//! Two layouts: policies spread over 100 namespaces (the usual case), and all
//! 10,000 in the destination's own namespace, each selecting its own app
//! label (what the label index is for). Both include a mesh-wide DENY.

use std::{hint::black_box, time::Instant};

use ambit_authz::{Connection, Peer, PolicySet};
use ambit_identity::Identity;
use ambit_model::{Action, AuthorizationPolicy, Object, Pod, ROOT_NAMESPACE, Rule, Scope, parse_file};

const POLICIES: usize = 10_000;

fn policy(namespace: String, name: String, scope: Scope, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy { namespace, name, scope, action, rules, dry_run: false, broken: None }
}

/// A realistic rule: a principal and a port, parsed the way the agent does.
fn rule(principal: &str, port: u16) -> Rule {
    let text = format!(
        "kind: AuthorizationPolicy\nmetadata: {{name: x}}\nspec:\n  rules:\n  - from: [{{source: {{principals: [{principal}]}}}}]\n    to: [{{operation: {{ports: [\"{port}\"]}}}}]\n"
    );
    match parse_file(std::path::Path::new("bench.yaml"), &text).unwrap().remove(0) {
        Object::AuthorizationPolicy(p) => p.rules.into_iter().next().unwrap(),
        other => panic!("{other:?}"),
    }
}

fn layout(spread: bool) -> Vec<AuthorizationPolicy> {
    let mut policies = vec![policy(
        ROOT_NAMESPACE.into(),
        "deny-legacy".into(),
        Scope::Namespace,
        Action::Deny,
        vec![rule("cluster.local/ns/legacy/*", 22)],
    )];
    for i in 0..POLICIES - 1 {
        let namespace = if spread { format!("ns-{}", i % 100) } else { "ns-7".to_string() };
        let labels = [("app".to_string(), format!("app-{i}"))].into();
        let caller = format!("cluster.local/ns/ns-{}/sa/caller-{i}", (i + 1) % 100);
        policies.push(policy(
            namespace,
            format!("p{i}"),
            Scope::Selector(labels),
            Action::Allow,
            vec![rule(&caller, 8080)],
        ));
    }
    policies
}

fn main() {
    let iterations: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let destination = Pod {
        namespace: "ns-7".into(),
        name: "api".into(),
        uid: None,
        service_account: "api".into(),
        trust_domain: None,
        node: "n1".into(),
        labels: [("app".to_string(), "app-107".to_string())].into(),
        ips: vec!["10.244.1.5".parse().unwrap()],
        netns: None,
        dataplane_mode: None,
        use_waypoint: None,
        inbound_udp: None,
        source: "bench".into(),
    };
    let caller = Identity::new("cluster.local", "ns-8", "caller-107");
    let conn = Connection {
        peer: Some(Peer::from(&caller)),
        src_ip: Some("10.244.2.9".parse().unwrap()),
        dst_ip: Some("10.244.1.5".parse().unwrap()),
        dst_port: Some(8080),
        request: None,
    };
    let mut results = Vec::new();
    for (name, spread) in [("100_namespaces", true), ("one_namespace", false)] {
        let policies = layout(spread);
        let started = Instant::now();
        let set = PolicySet::new(policies);
        let build_ms = started.elapsed().as_secs_f64() * 1e3;
        assert!(set.evaluate(&destination, &conn).allows(), "the benchmark connection is allowed by p107");
        let started = Instant::now();
        for _ in 0..iterations {
            black_box(set.evaluate(black_box(&destination), black_box(&conn)));
        }
        let decision_ns = started.elapsed().as_secs_f64() * 1e9 / iterations as f64;
        results.push(format!(
            "\"{name}\": {{\"policies\": {POLICIES}, \"index_build_ms\": {build_ms:.1}, \"decision_ns\": {decision_ns:.0}, \"applicable\": {}}}",
            set.applicable(&destination).len()
        ));
    }
    println!("{{\"iterations\": {iterations}, {}}}", results.join(", "));
}
