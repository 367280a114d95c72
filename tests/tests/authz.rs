//! End-to-end tests of L4 authorization in the destination's node tunnel:
//! real agents, real mTLS, real curl. Policies are written to the watched
//! configuration directory while the agents run.

mod common;

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use ambit_testbed::{Agent, Bed, ConnectionRecord};
use common::*;

const OTHER_PORT: u16 = 9090;

/// shop/client, shop/other (mTLS) and legacy/plain (plaintext) on n1;
/// shop/web on n2 serving HTTP on 8080 and 9090. Returns both agents and
/// web's IP.
fn callers_and_web(bed: &mut Bed) -> (Agent, Agent, String) {
    bed.add_pods(&[("n1", "shop/client"), ("n1", "shop/other"), ("n1", "legacy/plain"), ("n2", "shop/web")]).unwrap();
    let n1 = agent(bed, "n1");
    let n2 = agent(bed, "n2");
    wait_nodes_ready(bed, &["n1", "n2"]);
    let (root, _) = web_root(bed, 1024);
    for port in [HTTP_PORT, OTHER_PORT] {
        bed.http_server("shop/web", port, &root, &bed.scratch().join(format!("web-{port}.log"))).unwrap();
    }
    let ip = bed.pod("shop/web").ip.to_string();
    (n1, n2, ip)
}

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}"
    )
}

fn get(bed: &Bed, from: &str, ip: &str, port: u16) -> bool {
    curl(bed, from, &format!("http://{ip}:{port}/index.html")).is_ok()
}

/// The destination's records of connections from `from`, waiting for `n`.
fn records(n2: &mut Agent, n: usize, from: &str) -> Vec<ConnectionRecord> {
    n2.wait_connections(n, |c| c.src_workload == from && c.direction == "inbound").unwrap()
}

const ALLOW_CLIENT: &str =
    "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/client]\n";

#[test]
fn allow_one_principal_then_edit_then_break_the_file() {
    let Some(mut bed) = bed() else { return };
    let (_n1, mut n2, web) = callers_and_web(&mut bed);
    assert!(get(&bed, "shop/other", &web, HTTP_PORT), "no policy: allowed\n{}", n2.log_text());

    bed.write_config("authz.yaml", &policy("only-client", ALLOW_CLIENT)).unwrap();
    n2.wait_applied(0).unwrap();
    assert!(get(&bed, "shop/client", &web, HTTP_PORT), "the allowed principal passes");
    assert!(!get(&bed, "shop/other", &web, HTTP_PORT), "another mTLS pod is reset");
    assert!(!get(&bed, "legacy/plain", &web, HTTP_PORT), "a plaintext pod is reset");

    let client = records(&mut n2, 1, "shop/client");
    assert!(client[0].mtls && client[0].decision == "allow", "{client:?}");
    assert_eq!(client[0].policy, "shop/only-client rule 0");
    let other = records(&mut n2, 2, "shop/other");
    assert!(other[1].mtls && other[1].decision == "deny", "{other:?}");
    assert!(other[1].error.as_deref().unwrap().contains("no rule of the ALLOW policies that apply (shop/only-client)"));
    let plain = records(&mut n2, 1, "legacy/plain");
    assert!(!plain[0].mtls && plain[0].decision == "deny", "{plain:?}");
    let (_, metrics) = bed.admin_get("n2", "/metrics").unwrap();
    let denials = metrics
        .lines()
        .find(|l| l.starts_with("ambit_authorization_decisions_total{decision=\"deny\",reason=\"no_allow_match\""))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(denials.ends_with(" 2"), "{denials}");

    // Edit: now only shop/other may call. No restart. A transfer shop/client
    // started before the edit is cut too.
    bed.iperf3_server("shop/web", IPERF_PORT).unwrap();
    let mut transfer = bed
        .pod("shop/client")
        .command("iperf3")
        .args(["-c", &web, "-p", &IPERF_PORT.to_string(), "-t", "20", "-b", "10M"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    bed.write_config("authz.yaml", &policy("only-client", &ALLOW_CLIENT.replace("sa/client", "sa/other"))).unwrap();
    n2.wait_applied(1).unwrap();
    let edited = Instant::now();
    let status = transfer.wait().unwrap();
    assert!(!status.success(), "the open transfer is cut");
    assert!(edited.elapsed() < Duration::from_secs(5), "cut promptly: {:?}", edited.elapsed());
    let cut = records(&mut n2, 3, "shop/client");
    let data = cut.iter().max_by_key(|c| c.bytes_sent).unwrap();
    assert!(data.decision == "deny" && data.bytes_sent > 100_000, "{cut:?}");
    assert!(data.error.as_deref().unwrap().starts_with("access revoked: denied: no rule"), "{cut:?}");
    // Every connection has ended: each label set counts as many closed as
    // opened, the cut one included (closed with the labels it opened with).
    let (_, metrics) = bed.admin_get("n2", "/metrics").unwrap();
    let series = |name: &str| -> Vec<String> {
        let mut found: Vec<String> = metrics.lines().filter_map(|l| l.strip_prefix(name)).map(str::to_string).collect();
        found.sort();
        found
    };
    let opened = series("ambit_tcp_connections_opened_total");
    assert!(opened.iter().any(|l| l.contains("source_workload=\"client\"")), "{metrics}");
    assert_eq!(opened, series("ambit_tcp_connections_closed_total"), "{metrics}");
    assert!(get(&bed, "shop/other", &web, HTTP_PORT), "the edit admits shop/other");
    assert!(!get(&bed, "shop/client", &web, HTTP_PORT), "the edit shuts out shop/client");

    // A broken edit: the error names file, object and field; the last good
    // policy stays in force.
    let broken = ALLOW_CLIENT.replace("cluster.local/ns/shop/sa/client", "spiffe://cluster.local/ns/shop/sa/client");
    bed.write_config("authz.yaml", &policy("only-client", &broken)).unwrap();
    n2.wait_applied(2).unwrap();
    let errors: Vec<String> = n2
        .lines()
        .iter()
        .filter(|l| l["message"].as_str().unwrap_or_default().starts_with("configuration error"))
        .map(|l| l["error"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("authz.yaml")
            && errors[0].contains("AuthorizationPolicy shop/only-client")
            && errors[0].contains("spec.rules[0].from[0].source.principals[0]")
            && errors[0].contains("without `spiffe://`"),
        "{}",
        errors[0]
    );
    assert!(get(&bed, "shop/other", &web, HTTP_PORT), "last good policy: shop/other still allowed");
    assert!(!get(&bed, "shop/client", &web, HTTP_PORT), "last good policy: shop/client still denied");
    // legacy/plain passed PERMISSIVE but not authorization: not admitted.
    let counters = stop_and_read_counters(&mut n2);
    assert_eq!(counter(&counters, "plaintext_accepted"), 0, "{counters:?}");
}

#[test]
fn deny_on_a_port_overrides_allow_and_dry_run_only_reports() {
    let Some(mut bed) = bed() else { return };
    let (_n1, mut n2, web) = callers_and_web(&mut bed);
    let deny_port = "  action: DENY\n  rules:\n  - to:\n    - operation: {ports: [\"9090\"]}\n";
    let dry_deny_other = "apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: maybe-deny-other\n  namespace: shop\n  annotations: {istio.io/dry-run: \"true\"}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/other]}}]\n";
    let l7_allow = "  action: ALLOW\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n";
    let allow_both = ALLOW_CLIENT.replace(
        "[cluster.local/ns/shop/sa/client]",
        "[cluster.local/ns/shop/sa/client, cluster.local/ns/shop/sa/other]",
    );
    let config = [
        policy("allow-callers", &allow_both),
        policy("deny-9090", deny_port),
        dry_deny_other.to_string(),
        policy("needs-waypoint", l7_allow),
    ]
    .join("---\n");
    bed.write_config("authz.yaml", &config).unwrap();
    n2.wait_applied(0).unwrap();

    assert!(get(&bed, "shop/client", &web, HTTP_PORT), "ALLOW admits 8080");
    assert!(!get(&bed, "shop/client", &web, OTHER_PORT), "DENY on 9090 wins over the ALLOW");
    let client = records(&mut n2, 2, "shop/client");
    assert_eq!(client[0].policy, "shop/allow-callers rule 0");
    assert_eq!((client[1].decision.as_str(), client[1].policy.as_str()), ("deny", "shop/deny-9090 rule 0"));

    // Dry run: shop/other passes, and the log says what would have happened.
    assert!(get(&bed, "shop/other", &web, HTTP_PORT), "a dry-run DENY is not enforced");
    records(&mut n2, 1, "shop/other");
    let closed = n2.lines().into_iter().find(|l| l["src_workload"] == "shop/other" && l["direction"] == "inbound");
    assert_eq!(closed.unwrap()["dry_run"], "denied by AuthorizationPolicy shop/maybe-deny-other rule 0");

    // The ALLOW policy with an L7 field is warned about once, naming the field.
    let warnings: Vec<String> = n2
        .lines()
        .iter()
        .filter(|l| l["message"] == "authorization policy" && l["warning"].as_str().unwrap().contains("needs-waypoint"))
        .map(|l| l["warning"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("`to[0].operation.methods` is L7") && warnings[0].contains("never matches"));
}
