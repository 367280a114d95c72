//! End-to-end tests of waypoint routing in the source tunnel: a service
//! that uses a waypoint is sent to the waypoint's pods over HBONE, never
//! around them, and a service without one keeps the pure L4 path.

mod common;

use std::time::Duration;

use ambit_testbed::Agent;
use common::*;

const SERVICE: &str = "http://10.96.0.10/index.html";

fn service(label: Option<&str>) -> String {
    let labels = label.map(|l| format!("\n  labels: {{ambit.dev/use-waypoint: {l}}}")).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop{labels}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {{app: web}}\n  ports:\n  - {{port: 80, targetPort: 8080}}\n"
    )
}

const GATEWAY: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wp\n  namespace: shop\n  labels: {ambit.dev/waypoint-for: service}\nspec:\n  gatewayClassName: ambit-waypoint\n";

/// Connections shop/client made that reached node 2's tunnel directly.
fn inbound_from_client(n2: &Agent) -> usize {
    n2.connections().iter().filter(|c| c.direction == "inbound" && c.src_workload == "shop/client").count()
}

#[test]
fn service_traffic_takes_its_waypoint_and_never_goes_around_it() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/client"), ("n2", "shop/web"), ("n2", "shop/wp")]).unwrap();
    bed.set_pod_label("shop/wp", "gateway.networking.k8s.io/gateway-name", Some("wp")).unwrap();
    bed.write_config("service.yaml", &service(None)).unwrap();
    let mut n1 = agent(&bed, "n1");
    let mut n2 = agent(&bed, "n2");
    wait_nodes_ready(&bed, &["n1", "n2"]);
    let (root, _) = web_root(&bed, 1024);
    bed.http_server("shop/web", HTTP_PORT, &root, &bed.scratch().join("web.log")).unwrap();
    assert!(
        !n2.lines().iter().any(|l| l["message"] == "pod enrolled" && l["pod"] == "shop/wp"),
        "a waypoint pod is never captured, even in an ambient namespace"
    );

    // No waypoint: the pure L4 path, straight to the endpoint.
    curl(&bed, "shop/client", SERVICE).unwrap();
    let direct = n1.wait_connections(1, |c| c.dst_service == "shop/web").unwrap();
    assert!(direct[0].mtls && direct[0].dst_workload == "shop/web" && direct[0].error.is_none(), "{direct:?}");
    n2.wait_connections(1, |c| c.direction == "inbound" && c.src_workload == "shop/client").unwrap();

    // The service uses waypoint wp, which has a pod but nothing listening on
    // its HBONE port: the connection fails closed, and nothing reaches web.
    bed.write_config("gateway.yaml", GATEWAY).unwrap();
    bed.write_config("service.yaml", &service(Some("wp"))).unwrap();
    n1.wait_applied(0).unwrap();
    assert!(curl(&bed, "shop/client", SERVICE).is_err(), "waypoint down: the request fails");
    let failed = n1.wait_connections(2, |c| c.dst_service == "shop/web").unwrap();
    assert_eq!(failed[1].dst_workload, "shop/wp", "{failed:?}");
    assert_eq!(failed[1].dst_identity, "spiffe://cluster.local/ns/shop/sa/wp");
    let error = failed[1].error.as_deref().unwrap();
    assert!(error.starts_with("waypoint shop/wp unreachable") && error.ends_with("not sent around it"), "{error}");

    // The waypoint's pod goes away: still closed, and the log says why.
    bed.set_pod_label("shop/wp", "gateway.networking.k8s.io/gateway-name", None).unwrap();
    n1.wait_applied(1).unwrap();
    assert!(curl(&bed, "shop/client", SERVICE).is_err(), "no waypoint pod: the request fails");
    let failed = n1.wait_connections(3, |c| c.dst_service == "shop/web").unwrap();
    assert!(failed[2].error.as_deref().unwrap().starts_with("waypoint shop/wp has no pod"), "{failed:?}");
    assert_eq!(inbound_from_client(&n2), 1, "nothing went around the waypoint");

    // Opting the service out restores the direct path.
    bed.write_config("service.yaml", &service(Some("none"))).unwrap();
    n1.wait_applied(2).unwrap();
    curl(&bed, "shop/client", SERVICE).unwrap();
    n2.wait_connections(2, |c| c.direction == "inbound" && c.src_workload == "shop/client").unwrap();
}

const API: &str = "http://10.96.0.20";

/// The payments namespace: service `api` behind waypoint `wp`, whose JWT
/// issuer publishes its keys at `jwks_uri`, and the charge policy.
fn payments_config(jwks_uri: &str, waypoint_for: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: payments
  labels: {{ambit.dev/use-waypoint: wp}}
spec:
  clusterIP: 10.96.0.20
  selector: {{app: api}}
  ports:
  - {{port: 80, targetPort: 8080}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: wp
  namespace: payments
  labels: {{ambit.dev/waypoint-for: {waypoint_for}}}
spec: {{gatewayClassName: ambit-waypoint}}
---
apiVersion: security.ambit.dev/v1
kind: RequestAuthentication
metadata: {{name: users, namespace: payments}}
spec:
  targetRefs: [{{kind: Gateway, name: wp}}]
  jwtRules:
  - issuer: https://issuer.example
    audiences: [payments]
    jwksUri: "{jwks_uri}"
---
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {{name: charge, namespace: payments}}
spec:
  targetRefs: [{{kind: Gateway, name: wp}}]
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/checkout]}}}}]
    to: [{{operation: {{methods: [POST], paths: [/v1/charge]}}}}]
    when:
    - key: "request.auth.claims[scope]"
      values: ["payments:charge"]
---
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {{name: only-through-the-waypoint, namespace: payments}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/payments/sa/wp]}}}}]
"#
    )
}

/// `curl` in `from`: the HTTP status (0 when the connection failed).
fn status(bed: &ambit_testbed::Bed, from: &str, args: &[&str]) -> u16 {
    let mut all = vec!["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"];
    all.extend_from_slice(args);
    let out = bed.run(from, "curl", &all).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

/// `Authorization` header with a bearer token.
fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// The payments bed: shop/checkout and shop/other on n1, the api pod
/// (serving HTTP on 8080, labelled to use wp) and the waypoint pod wp on
/// n2, plus `extra` pods;
/// the configuration of [`payments_config`] with the issuer's keys at the
/// URI `jwks_uri` returns; both agents ready.
struct Payments {
    bed: ambit_testbed::Bed,
    n1: Agent,
    n2: Agent,
    api_ip: String,
}

fn payments(extra: &[(&str, &str)], jwks_uri: impl FnOnce(&ambit_testbed::Bed) -> String) -> Option<Payments> {
    let mut bed = bed()?;
    bed.namespace("payments", true).unwrap();
    let mut pods = vec![("n1", "shop/checkout"), ("n1", "shop/other"), ("n2", "payments/api"), ("n2", "payments/wp")];
    pods.extend_from_slice(extra);
    bed.add_pods(&pods).unwrap();
    bed.set_pod_label("payments/wp", "gateway.networking.k8s.io/gateway-name", Some("wp")).unwrap();
    // Counts only once the waypoint takes workload traffic.
    bed.set_pod_label("payments/api", "ambit.dev/use-waypoint", Some("wp")).unwrap();
    let uri = jwks_uri(&bed);
    bed.write_config("payments.yaml", &payments_config(&uri, "service")).unwrap();
    let n1 = agent(&bed, "n1");
    let n2 = agent(&bed, "n2");
    wait_nodes_ready(&bed, &["n1", "n2"]);
    let api_ip = bed.pod("payments/api").ip.to_string();
    bed.spawn("payments/api", env!("CARGO_BIN_EXE_ambit-bench"), &["http", "--listen", &format!("{api_ip}:8080")])
        .unwrap();
    bed.wait_listening("payments/api", 8080).unwrap();
    Some(Payments { bed, n1, n2, api_ip })
}

#[test]
fn the_waypoint_enforces_l7_policy_with_end_user_claims() {
    let issuer = Issuer::new();
    let mut jwks = String::new();
    let Some(Payments { bed, mut n1, mut n2, api_ip }) = payments(&[], |bed| {
        issuer.publish(&bed.scratch().join("jwks.json"), &["k1"]);
        jwks = format!("file://{}", bed.scratch().join("jwks.json").display());
        jwks.clone()
    }) else {
        return;
    };
    let scratch = bed.scratch().to_str().unwrap().to_string();
    let mut waypoint = bed.start_waypoint("payments/wp", &["--jwks-dir", &scratch]).unwrap();
    // The key set is a file: the waypoint reads it, neither agent does.
    ambit_testbed::wait_until(Duration::from_secs(10), "the JWKS read", || {
        Ok(waypoint.log_text().contains("JWKS fetched"))
    })
    .unwrap();

    let charge = issuer.token("payments:charge read", 300, false);
    let post = |from: &str, path: &str, token: &str| {
        status(&bed, from, &["--path-as-is", "-X", "POST", "-H", &bearer(token), &format!("{API}{path}")])
    };
    assert_eq!(post("shop/checkout", "/v1/charge", &charge), 200, "{}", waypoint.log_text());
    assert_eq!(post("shop/checkout", "/v1/charge", &issuer.token("read", 300, false)), 403, "without the scope");
    assert_eq!(post("shop/checkout", "/v1/charge", &issuer.token("payments:charge", -120, false)), 401, "expired");
    assert_eq!(post("shop/checkout", "/v1/charge", &issuer.token("payments:charge", 300, true)), 401, "forged");
    assert_eq!(post("shop/other", "/v1/charge", &charge), 403, "another service account");
    let get = status(&bed, "shop/checkout", &["-H", &bearer(&charge), &format!("{API}/v1/charge")]);
    assert_eq!(get, 403, "GET on the same path");
    // Paths are normalized before the policy sees them.
    assert_eq!(post("shop/checkout", "/v1/%63harge", &charge), 200);
    assert_eq!(post("shop/checkout", "/v1/./charge", &charge), 200);
    assert_eq!(post("shop/checkout", "/v1//charge", &charge), 403, "slashes are not merged by default");
    assert_eq!(post("shop/checkout", "/v1/..%2fadmin", &charge), 400, "an escaped slash is refused by default");
    assert_eq!(post("shop/checkout", "/v1/%00", &charge), 400);
    // HTTP/2 with prior knowledge, on the same stream kinds.
    let h2 = status(
        &bed,
        "shop/checkout",
        &["--http2-prior-knowledge", "-X", "POST", "-H", &bearer(&charge), &format!("{API}/v1/charge")],
    );
    assert_eq!(h2, 200);
    // A 403 leaves the connection usable: the next request on it passes.
    let pair = bed
        .run_ok(
            "shop/checkout",
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{num_connects}\n",
                "-H",
                &bearer(&charge),
                &format!("{API}/v1/charge"),
                "--next",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{num_connects}\n",
                "-X",
                "POST",
                "-H",
                &bearer(&charge),
                &format!("{API}/v1/charge"),
            ],
        )
        .unwrap();
    assert_eq!(pair, "403 1\n200 0\n", "the second request rides the same connection");
    // h2load: HTTP/2 (prior knowledge), 50 requests over 2 connections.
    let body = bed.scratch().join("charge.json");
    std::fs::write(&body, "{}").unwrap();
    let h2load = bed
        .run_ok(
            "shop/checkout",
            "h2load",
            &[
                "-n",
                "50",
                "-c",
                "2",
                "-m",
                "5",
                "-d",
                body.to_str().unwrap(),
                "-H",
                &bearer(&charge),
                &format!("{API}/v1/charge"),
            ],
        )
        .unwrap();
    assert!(h2load.contains("50 succeeded") && h2load.contains("50 2xx"), "{h2load}");

    // The access log names both identities, the end user and the deciding rule.
    let requests = waypoint.requests();
    let first = &requests[0];
    assert_eq!(first["status"], 200);
    assert_eq!(first["src_identity"], "spiffe://cluster.local/ns/shop/sa/checkout");
    assert_eq!(first["request_principal"], "https://issuer.example/alice");
    assert_eq!(first["dst_workload"], "payments/api");
    assert_eq!(first["policy"], "payments/charge rule 0", "the log names the rule that decided");
    // Istio-style request metrics, by response code.
    let metrics = bed.run_ok("payments/wp", "curl", &["-sS", "http://127.0.0.1:15020/metrics"]).unwrap();
    let count = |code: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("ambit_requests_total{") && l.contains(&format!("response_code=\"{code}\"")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!((count("200"), count("403"), count("401"), count("400")), (55, 5, 2, 2), "{metrics}");
    assert!(metrics.contains("ambit_request_duration_milliseconds_bucket{"), "{metrics}");
    // mTLS on both hops: client -> waypoint (n1's log), waypoint -> api (n2's log).
    let to_waypoint = n1.wait_connections(1, |c| c.dst_service == "payments/api").unwrap();
    assert!(to_waypoint[0].mtls && to_waypoint[0].dst_workload == "payments/wp", "{to_waypoint:?}");
    assert_eq!(to_waypoint[0].dst_identity, "spiffe://cluster.local/ns/payments/sa/wp");
    // The waypoint keeps its upstream connections pooled, so n2 has logged
    // their mTLS handshakes (the closing records come when they close).
    let from_waypoint = n2
        .lines()
        .into_iter()
        .filter(|l| l["message"] == "mTLS connection accepted" && l["dst_workload"] == "payments/api")
        .map(|l| l["src_identity"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert!(!from_waypoint.is_empty(), "{}", n2.log_text());
    assert!(from_waypoint.iter().all(|id| id == "spiffe://cluster.local/ns/payments/sa/wp"), "{from_waypoint:?}");

    // Bypass: straight to the api pod is refused by its L4 policy.
    assert_eq!(status(&bed, "shop/checkout", &["-X", "POST", &format!("http://{api_ip}:8080/v1/charge")]), 0);
    let checkout = "spiffe://cluster.local/ns/shop/sa/checkout";
    let bypass = n2.wait_connections(1, |c| c.src_identity == checkout && c.dst_workload == "payments/api").unwrap();
    assert_eq!(bypass[0].decision, "deny", "{bypass:?}");

    // A waypoint for all traffic also takes traffic addressed to the pod.
    bed.write_config("payments.yaml", &payments_config(&jwks, "all")).unwrap();
    n1.wait_applied(0).unwrap();
    let direct_url = format!("http://{api_ip}:8080/v1/charge");
    let to_pod = |token: &str| status(&bed, "shop/checkout", &["-X", "POST", "-H", &bearer(token), &direct_url]);
    assert_eq!(to_pod(&charge), 200, "{}", waypoint.log_text());
    assert_eq!(to_pod(&issuer.token("read", 300, false)), 403, "L7 policy on pod-addressed traffic");
    let served = waypoint.requests().into_iter().rev().find(|r| r["status"] == 200).unwrap();
    assert_eq!((served["dst_service"].as_str(), served["dst_workload"].as_str()), (Some("-"), Some("payments/api")));

    // Waypoint down: requests fail, and nothing goes around it.
    waypoint.stop();
    // A fallback would reach the api pod's tunnel as the client itself.
    let reached = |n2: &ambit_testbed::Agent| n2.connections().iter().filter(|c| c.src_identity == checkout).count();
    let before = reached(&n2);
    assert_eq!(post("shop/checkout", "/v1/charge", &charge), 0, "fails closed");
    let failed = n1.wait_connections(1, |c| c.dst_service == "payments/api" && c.error.is_some()).unwrap();
    assert!(
        failed.last().unwrap().error.as_deref().unwrap().contains("waypoint payments/wp unreachable"),
        "{failed:?}"
    );
    assert_eq!(reached(&n2), before, "no direct fallback");
}

/// A key server for the issuer: Python's HTTP server over TLS, serving the
/// JWKS directory, in pod `legacy/keys` (not in the mesh).
const KEY_SERVER: &str = r#"
import functools, http.server, ssl, sys
ip, root, cert, key = sys.argv[1:5]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
server = http.server.ThreadingHTTPServer((ip, 8443), handler)
tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
tls.load_cert_chain(cert, key)
server.socket = tls.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// Writes a CA and a server certificate for `ip` signed by it; returns the
/// CA file, and the server's certificate and key files.
fn key_server_tls(dir: &std::path::Path, ip: std::net::IpAddr) -> [std::path::PathBuf; 3] {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.clone().self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::IpAddress(ip)];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let files = [dir.join("idp-ca.pem"), dir.join("idp.pem"), dir.join("idp.key")];
    for (file, pem) in files.iter().zip([ca_cert.pem(), leaf_cert.pem(), leaf_key.serialize_pem()]) {
        std::fs::write(file, pem).unwrap();
    }
    files
}

#[test]
fn https_key_sets_are_fetched_cached_and_refreshed() {
    let issuer = Issuer::new();
    let mut key_server = None;
    let Some(Payments { bed, n1, n2, .. }) = payments(&[("n1", "legacy/keys")], |bed| {
        let idp = bed.pod("legacy/keys").ip;
        let keys_dir = bed.scratch().join("idp");
        std::fs::create_dir(&keys_dir).unwrap();
        issuer.publish(&keys_dir.join("jwks.json"), &["k1"]);
        let [ca, cert, key] = key_server_tls(bed.scratch(), idp.into());
        let script = bed.scratch().join("key-server.py");
        std::fs::write(&script, KEY_SERVER).unwrap();
        key_server = Some((keys_dir, ca, cert, key, script));
        format!("https://{idp}:8443/jwks.json")
    }) else {
        return;
    };
    let (keys_dir, ca, cert, key, script) = key_server.unwrap();
    let [ca, cert, key, script] = [&ca, &cert, &key, &script].map(|p| p.to_str().unwrap().to_string());
    let start_key_server = || {
        let idp = bed.pod("legacy/keys").ip.to_string();
        bed.spawn("legacy/keys", "python3", &[&script, &idp, keys_dir.to_str().unwrap(), &cert, &key]).unwrap();
        bed.wait_listening("legacy/keys", 8443).unwrap();
    };
    let stop_key_server = || {
        let killed = std::process::Command::new("pkill").args(["-f", &script]).status().unwrap();
        assert!(killed.success(), "the key server was running");
    };
    let post = |path: &str, token: &str| {
        status(&bed, "shop/checkout", &["--path-as-is", "-X", "POST", "-H", &bearer(token), &format!("{API}{path}")])
    };
    let until = |what: &str, path: &str, token: &str, want: u16, waypoint: &ambit_testbed::Waypoint| {
        ambit_testbed::wait_until(std::time::Duration::from_secs(15), what, || Ok(post(path, token) == want))
            .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", waypoint.log_text(), n2.log_text()));
    };
    let (k1, k2) = (issuer.signed_by("k1", "payments:charge"), issuer.signed_by("k2", "payments:charge"));

    // The key server is down when the waypoint starts: the issuer's tokens
    // are refused (never accepted unchecked), and the fetch is retried.
    let waypoint = bed.start_waypoint("payments/wp", &["--jwks-ca", &ca, "--jwks-refresh", "1h"]).unwrap();
    assert_eq!(post("/v1/charge", &k1), 401, "{}\n{}", waypoint.log_text(), n1.log_text());
    assert!(
        waypoint.log_text().contains("JWKS fetch failed; tokens of this issuer are refused until a fetch succeeds")
    );
    start_key_server();
    until("the keys fetched on retry", "/v1/charge", &k1, 200, &waypoint);

    // The issuer rotates to k2: the first k2 token names a key the cached
    // set lacks, which fetches the set again at once (at most every 5 s).
    std::thread::sleep(std::time::Duration::from_secs(5));
    issuer.publish(&keys_dir.join("jwks.json"), &["k2"]);
    assert_eq!(post("/v1/charge", &k2), 200, "{}", waypoint.log_text());
    assert_eq!(post("/v1/charge", &k1), 401, "k1 is gone from the fetched set");

    // Key server down: the cached keys stay in use.
    stop_key_server();
    assert_eq!(post("/v1/charge", &k2), 200, "cached keys");
    drop(waypoint);

    // A short refresh: a key the issuer withdraws stops working within one
    // refresh, without a restart. Slash merging is on for this waypoint.
    start_key_server();
    let waypoint =
        bed.start_waypoint("payments/wp", &["--jwks-ca", &ca, "--jwks-refresh", "2s", "--merge-slashes"]).unwrap();
    until("k2 accepted", "/v1/charge", &k2, 200, &waypoint);
    assert_eq!(post("/v1//charge", &k2), 200, "//charge merges to /charge");
    issuer.publish(&keys_dir.join("jwks.json"), &["k1"]);
    until("k2 withdrawn on refresh", "/v1/charge", &k2, 401, &waypoint);
    assert_eq!(post("/v1/charge", &k1), 200);
    let fetched = waypoint.log_text().matches("JWKS fetched").count();
    assert!(fetched >= 2, "refreshed: {fetched} fetches\n{}", waypoint.log_text());
}
