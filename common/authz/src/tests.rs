//! Table-driven tests of L4 policy evaluation: every field and its `not*`
//! form against three callers, every match form, and the evaluation order.

use std::path::Path;

use ambit_model::{Object, parse_file};

use super::*;

/// The destination: pod shop/api, 10.0.0.5, labels app=api.
fn api_pod() -> Pod {
    Pod {
        namespace: "shop".into(),
        name: "api".into(),
        uid: None,
        service_account: "api".into(),
        trust_domain: None,
        node: "n1".into(),
        labels: [("app".to_string(), "api".to_string())].into(),
        ips: vec!["10.0.0.5".parse().unwrap()],
        netns: None,
        dataplane_mode: None,
        use_waypoint: None,
        inbound_udp: None,
        source: "pods.yaml".into(),
    }
}

fn to_api(peer: Option<&str>, src_ip: &str) -> Connection {
    Connection {
        peer: peer.map(|id| Peer::from_spiffe_id(&spiffe::SpiffeId::new(id).unwrap())),
        src_ip: Some(src_ip.parse().unwrap()),
        dst_ip: Some("10.0.0.5".parse().unwrap()),
        dst_port: Some(8080),
        request: None,
    }
}

/// The three callers every field is tried against.
fn callers() -> [(&'static str, Connection); 3] {
    [
        ("plaintext", to_api(None, "10.2.0.9")),
        ("matching mTLS", to_api(Some("spiffe://cluster.local/ns/shop/sa/web"), "10.0.0.1")),
        ("other mTLS", to_api(Some("spiffe://cluster.local/ns/legacy/sa/batch"), "10.1.0.2")),
    ]
}

/// Parses AuthorizationPolicy documents (`spec` bodies) in namespace shop.
fn policies(specs: &[&str]) -> PolicySet {
    let text: Vec<String> = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| format!("kind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: shop}}\nspec:\n{spec}"))
        .collect();
    let objects = parse_file(Path::new("authz.yaml"), &text.join("---\n")).unwrap();
    PolicySet::new(objects.into_iter().map(|o| match o {
        Object::AuthorizationPolicy(p) => p,
        other => panic!("{other:?}"),
    }))
}

/// Whether each caller is allowed by an ALLOW policy with one rule made of `rule`.
fn allowed_by_rule(rule: &str) -> [bool; 3] {
    let set = policies(&[&format!("  action: ALLOW\n  rules:\n  - {rule}\n")]);
    callers().map(|(_, conn)| set.evaluate(&api_pod(), &conn).allows())
}

#[test]
fn every_field_against_three_callers() {
    const WEB: &str = "cluster.local/ns/shop/sa/web";
    let cases: Vec<(String, [bool; 3])> = vec![
        (format!("from: [{{source: {{principals: [{WEB}]}}}}]"), [false, true, false]),
        (format!("from: [{{source: {{notPrincipals: [{WEB}]}}}}]"), [true, false, true]),
        ("from: [{source: {namespaces: [shop]}}]".into(), [false, true, false]),
        ("from: [{source: {notNamespaces: [shop]}}]".into(), [true, false, true]),
        ("from: [{source: {serviceAccounts: [shop/web]}}]".into(), [false, true, false]),
        ("from: [{source: {notServiceAccounts: [shop/web]}}]".into(), [true, false, true]),
        ("from: [{source: {ipBlocks: [10.0.0.0/24]}}]".into(), [false, true, false]),
        ("from: [{source: {notIpBlocks: [10.0.0.0/24]}}]".into(), [true, false, true]),
        ("from: [{source: {ipBlocks: [10.0.0.1]}}]".into(), [false, true, false]),
        ("to: [{operation: {ports: [\"8080\"]}}]".into(), [true, true, true]),
        ("to: [{operation: {ports: [\"9090\"]}}]".into(), [false, false, false]),
        ("to: [{operation: {notPorts: [\"8080\"]}}]".into(), [false, false, false]),
        ("to: [{operation: {notPorts: [9090]}}]".into(), [true, true, true]),
        ("when: [{key: source.ip, values: [10.0.0.1/32]}]".into(), [false, true, false]),
        ("when: [{key: source.ip, notValues: [10.0.0.1/32]}]".into(), [true, false, true]),
        ("when: [{key: source.namespace, values: [shop]}]".into(), [false, true, false]),
        ("when: [{key: source.namespace, notValues: [shop]}]".into(), [true, false, true]),
        (format!("when: [{{key: source.principal, values: [{WEB}]}}]"), [false, true, false]),
        (format!("when: [{{key: source.principal, notValues: [{WEB}]}}]"), [true, false, true]),
        ("when: [{key: destination.ip, values: [10.0.0.0/16]}]".into(), [true, true, true]),
        ("when: [{key: destination.ip, notValues: [10.0.0.5]}]".into(), [false, false, false]),
        ("when: [{key: destination.port, values: [\"8080\"]}]".into(), [true, true, true]),
        ("when: [{key: destination.port, notValues: [\"8080\"]}]".into(), [false, false, false]),
    ];
    for (rule, want) in cases {
        assert_eq!(allowed_by_rule(&rule), want, "{rule} (plaintext, matching mTLS, other mTLS)");
    }
}

#[test]
fn every_match_form() {
    let cases = [
        ("cluster.local/ns/shop/sa/web", [false, true, false]),
        ("cluster.local/ns/shop/*", [false, true, false]),
        ("*/sa/web", [false, true, false]),
        ("*", [false, true, true]),
        ("cluster.local/ns/shop/sa/we", [false, false, false]),
    ];
    for (pattern, want) in cases {
        assert_eq!(allowed_by_rule(&format!("from: [{{source: {{principals: [\"{pattern}\"]}}}}]")), want, "{pattern}");
    }
    for (pattern, want) in [("sh*", [false, true, false]), ("*acy", [false, false, true]), ("*", [false, true, true])] {
        assert_eq!(allowed_by_rule(&format!("from: [{{source: {{namespaces: [\"{pattern}\"]}}}}]")), want, "{pattern}");
    }
}

#[test]
fn values_or_fields_and_sources_or() {
    // Two values of one field: either.
    assert_eq!(allowed_by_rule("from: [{source: {namespaces: [shop, legacy]}}]"), [false, true, true]);
    // Two fields of one source: both.
    assert_eq!(allowed_by_rule("from: [{source: {namespaces: [shop], ipBlocks: [10.1.0.0/16]}}]"), [false; 3]);
    // Two sources: either.
    assert_eq!(
        allowed_by_rule("from: [{source: {namespaces: [shop]}}, {source: {ipBlocks: [10.1.0.0/16]}}]"),
        [false, true, true]
    );
    // from, to and when: all.
    assert_eq!(
        allowed_by_rule("{from: [{source: {namespaces: [shop]}}], to: [{operation: {ports: [\"9090\"]}}]}"),
        [false; 3]
    );
}

fn decide(set: &PolicySet) -> [Decision; 3] {
    callers().map(|(_, conn)| set.evaluate(&api_pod(), &conn))
}

fn verdicts(set: &PolicySet) -> [bool; 3] {
    decide(set).map(|d| d.allows())
}

#[test]
fn empty_rule_matches_everything_and_no_rules_never_match() {
    assert_eq!(verdicts(&policies(&["  rules: [{}]\n"])), [true; 3]);
    let no_rules = decide(&policies(&["  action: ALLOW\n"]));
    assert_eq!(no_rules[1].reason, Reason::NoAllowMatched { policies: vec!["shop/p0".into()] });
    assert_eq!(verdicts(&policies(&["  action: DENY\n"])), [true; 3], "a DENY without rules denies nothing");
}

#[test]
fn deny_beats_allow_and_no_allow_means_allow() {
    let set = policies(&["  rules: [{}]\n", "  action: DENY\n  rules: [{from: [{source: {namespaces: [shop]}}]}]\n"]);
    let decisions = decide(&set);
    assert_eq!(decisions[1].reason, Reason::DeniedBy(RuleRef { policy: "shop/p1".into(), rule: 0 }));
    assert_eq!(decisions[2].reason, Reason::AllowedBy(RuleRef { policy: "shop/p0".into(), rule: 0 }));
    // Only a DENY that does not match: default allow.
    let deny_only = policies(&["  action: DENY\n  rules: [{from: [{source: {namespaces: [nowhere]}}]}]\n"]);
    assert!(decide(&deny_only).iter().all(|d| d.reason == Reason::NoPolicy));
    assert!(decide(&policies(&[])).iter().all(|d| d.reason == Reason::NoPolicy));
}

#[test]
fn dry_run_is_reported_not_enforced() {
    let dry = "kind: AuthorizationPolicy\nmetadata:\n  name: dry\n  namespace: shop\n  annotations: {istio.io/dry-run: \"true\"}\nspec:\n  action: DENY\n  rules: [{from: [{source: {namespaces: [shop]}}]}]\n";
    let Object::AuthorizationPolicy(policy) = parse_file(Path::new("a.yaml"), dry).unwrap().remove(0) else { panic!() };
    let decisions = decide(&PolicySet::new([policy]));
    assert!(decisions.iter().all(|d| d.allows()), "dry-run never enforces");
    assert_eq!(decisions[1].dry_run, Some(Reason::DeniedBy(RuleRef { policy: "shop/dry".into(), rule: 0 })));
    assert_eq!(decisions[2].dry_run, Some(Reason::NoPolicy));
    assert_eq!(decide(&policies(&["  rules: [{}]\n"]))[0].dry_run, None, "no dry-run policy, no dry-run result");
}

#[test]
fn audit_marks_without_deciding() {
    let set = policies(&["  action: AUDIT\n  rules: [{from: [{source: {namespaces: [shop]}}]}]\n"]);
    let decisions = decide(&set);
    assert!(decisions.iter().all(|d| d.reason == Reason::NoPolicy));
    assert_eq!(decisions[1].audited, vec![RuleRef { policy: "shop/p0".into(), rule: 0 }]);
    assert!(decisions[0].audited.is_empty() && decisions[2].audited.is_empty());
}

#[test]
fn l7_fields_fail_closed_both_ways() {
    // ALLOW: a rule with an L7 field never matches, whatever else it says.
    assert_eq!(allowed_by_rule("to: [{operation: {methods: [GET]}}]"), [false; 3]);
    assert_eq!(allowed_by_rule("from: [{source: {requestPrincipals: [\"*\"]}}]"), [false; 3]);
    assert_eq!(allowed_by_rule("when: [{key: \"request.auth.claims[scope]\", values: [x]}]"), [false; 3]);
    // ...but another rule of the same policy still can.
    let set =
        policies(&["  rules:\n  - to: [{operation: {paths: [/admin]}}]\n  - from: [{source: {namespaces: [shop]}}]\n"]);
    assert_eq!(verdicts(&set), [false, true, false]);
    // DENY: the L7 part counts as matched, the L4 part still decides.
    let deny = policies(&[
        "  rules: [{}]\n",
        "  action: DENY\n  rules:\n  - from: [{source: {namespaces: [shop]}}]\n    to: [{operation: {methods: [DELETE]}}]\n",
    ]);
    assert_eq!(verdicts(&deny), [true, false, true]);
    let deny_all =
        policies(&["  rules: [{}]\n", "  action: DENY\n  rules: [{to: [{operation: {hosts: [a.example]}}]}]\n"]);
    assert_eq!(verdicts(&deny_all), [false; 3]);
    let deny_header =
        policies(&["  action: DENY\n  rules: [{when: [{key: \"request.headers[x-debug]\", notValues: [\"1\"]}]}]\n"]);
    assert_eq!(verdicts(&deny_header), [false; 3]);
}

#[test]
fn scope_selector_root_namespace_and_target_refs() {
    let text = "kind: AuthorizationPolicy\nmetadata: {name: mesh, namespace: ambit-system}\nspec: {action: DENY, rules: [{from: [{source: {namespaces: [legacy]}}]}]}\n---\nkind: AuthorizationPolicy\nmetadata: {name: other-app, namespace: shop}\nspec: {selector: {matchLabels: {app: db}}}\n---\nkind: AuthorizationPolicy\nmetadata: {name: other-ns, namespace: legacy}\nspec: {}\n---\nkind: AuthorizationPolicy\nmetadata: {name: waypoint, namespace: shop}\nspec: {targetRefs: [{kind: Service, name: api}]}\n---\nkind: AuthorizationPolicy\nmetadata: {name: mine, namespace: shop}\nspec: {selector: {matchLabels: {app: api}}, rules: [{}]}\n";
    let set = PolicySet::new(parse_file(Path::new("a.yaml"), text).unwrap().into_iter().map(|o| match o {
        Object::AuthorizationPolicy(p) => p,
        other => panic!("{other:?}"),
    }));
    assert_eq!(set.len(), 4, "the targetRefs policy is for waypoints");
    let applicable: Vec<String> = set.applicable(&api_pod()).iter().map(|p| p.id()).collect();
    assert_eq!(applicable, vec!["ambit-system/mesh", "shop/mine"]);
    assert_eq!(verdicts(&set), [true, true, false], "the mesh-wide DENY of legacy applies");
}

#[test]
fn explain_reports_every_condition() {
    let set = policies(&["  rules:\n  - from: [{source: {namespaces: [shop], ipBlocks: [10.9.0.0/16]}}]\n"]);
    let (decision, traces) = set.explain(&api_pod(), &callers()[1].1);
    assert!(!decision.allows());
    let rule = &traces[0].rules[0];
    assert!(!rule.matched);
    let fields: Vec<(&str, bool)> = rule.conditions.iter().map(|c| (c.field.as_str(), c.matched)).collect();
    assert_eq!(fields, vec![("from[0].source.ipBlocks", false), ("from[0].source.namespaces", true)]);
    assert_eq!(rule.conditions[0].note, "10.0.0.1 not listed");
}

#[test]
fn index_finds_the_few_policies_among_many() {
    let many: Vec<AuthorizationPolicy> = (0..10_000)
        .map(|i| AuthorizationPolicy {
            namespace: format!("ns-{}", i % 100),
            name: format!("p{i}"),
            scope: Scope::Selector([("app".to_string(), format!("app-{i}"))].into()),
            action: Action::Allow,
            rules: vec![Rule::default()],
            dry_run: false,
            broken: None,
        })
        .collect();
    let set = PolicySet::new(many);
    let mut pod = api_pod();
    pod.namespace = "ns-7".into();
    pod.labels = [("app".to_string(), "app-107".to_string())].into();
    let found: Vec<String> = set.applicable(&pod).iter().map(|p| p.id()).collect();
    assert_eq!(found, vec!["ns-7/p107"]);
}

/// A request from shop/web (matching mTLS) as a waypoint sees it.
fn request(method: &str, path: &str, auth: Option<serde_json::Value>) -> Connection {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-env", "prod".parse().unwrap());
    let auth = auth.map(|claims| request::RequestAuth {
        principal: format!("{}/{}", claims["iss"].as_str().unwrap(), claims["sub"].as_str().unwrap()),
        audiences: vec![claims["aud"].as_str().unwrap().to_string()],
        presenter: claims["azp"].as_str().map(str::to_string),
        claims,
        forward_token: false,
    });
    Connection {
        request: Some(request::Request {
            method: method.into(),
            host: "api.example:8443".into(),
            path: path.into(),
            headers,
            auth,
        }),
        ..callers()[1].1.clone()
    }
}

fn token(scope: &str) -> Option<serde_json::Value> {
    Some(serde_json::json!({
        "iss": "https://issuer.example", "sub": "user-1", "aud": "payments", "azp": "checkout-ui",
        "scope": scope, "org": {"team": "payments"},
    }))
}

#[test]
fn l7_fields_at_a_waypoint() {
    let jwt = || request("POST", "/v1/charge", token("payments:charge read"));
    let cases: Vec<(&str, Connection, bool)> = vec![
        ("to: [{operation: {methods: [POST]}}]", jwt(), true),
        ("to: [{operation: {methods: [GET]}}]", jwt(), false),
        ("to: [{operation: {notMethods: [GET]}}]", jwt(), true),
        ("to: [{operation: {hosts: [API.Example]}}]", jwt(), true),
        ("to: [{operation: {hosts: [\"api.example:8443\"]}}]", jwt(), true),
        ("to: [{operation: {hosts: [\"*.example\"]}}]", jwt(), true),
        ("to: [{operation: {notHosts: [api.example]}}]", jwt(), false),
        ("to: [{operation: {paths: [/v1/charge]}}]", jwt(), true),
        ("to: [{operation: {paths: [\"/v1/*\"]}}]", jwt(), true),
        ("to: [{operation: {paths: [\"/v1/{*}\"]}}]", jwt(), true),
        ("to: [{operation: {paths: [\"/{**}\"]}}]", jwt(), true),
        ("to: [{operation: {paths: [/v1/refund]}}]", jwt(), false),
        ("to: [{operation: {notPaths: [\"/admin/{**}\"]}}]", jwt(), true),
        ("from: [{source: {requestPrincipals: [https://issuer.example/user-1]}}]", jwt(), true),
        ("from: [{source: {requestPrincipals: [\"*\"]}}]", request("POST", "/v1/charge", None), false),
        ("from: [{source: {notRequestPrincipals: [\"*\"]}}]", request("POST", "/v1/charge", None), true),
        ("from: [{source: {remoteIpBlocks: [10.0.0.0/24]}}]", jwt(), true),
        ("when: [{key: \"request.headers[X-Env]\", values: [prod]}]", jwt(), true),
        ("when: [{key: \"request.headers[x-missing]\", notValues: [\"*\"]}]", jwt(), true),
        ("when: [{key: \"request.auth.claims[scope]\", values: [\"payments:charge\"]}]", jwt(), true),
        ("when: [{key: \"request.auth.claims[scope]\", values: [\"payments:refund\"]}]", jwt(), false),
        ("when: [{key: \"request.auth.claims[org][team]\", values: [payments]}]", jwt(), true),
        ("when: [{key: request.auth.audiences, values: [payments]}]", jwt(), true),
        ("when: [{key: request.auth.presenter, values: [checkout-ui]}]", jwt(), true),
        ("when: [{key: request.auth.principal, values: [\"https://issuer.example/*\"]}]", jwt(), true),
        ("when: [{key: connection.sni, values: [\"*\"]}]", jwt(), false),
    ];
    for (rule, conn, want) in cases {
        let set = policies(&[&format!("  rules:\n  - {rule}\n")]);
        assert_eq!(set.evaluate(&api_pod(), &conn).allows(), want, "{rule}");
    }
}

#[test]
fn the_charge_policy_of_the_waypoint_issue() {
    let set = policies(&[
        "  rules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]\n    to: [{operation: {methods: [POST], paths: [/v1/charge]}}]\n    when: [{key: \"request.auth.claims[scope]\", values: [\"payments:charge\"]}]\n",
    ]);
    let allowed = |conn: &Connection| set.evaluate(&api_pod(), conn).allows();
    assert!(allowed(&request("POST", "/v1/charge", token("payments:charge"))));
    assert!(!allowed(&request("POST", "/v1/charge", token("read"))), "without the scope");
    assert!(!allowed(&request("POST", "/v1/charge", None)), "without a token");
    assert!(!allowed(&request("GET", "/v1/charge", token("payments:charge"))), "GET");
    let mut other = request("POST", "/v1/charge", token("payments:charge"));
    other.peer = callers()[2].1.peer.clone();
    assert!(!allowed(&other), "another service account");
}
