//! End-to-end tests of waypoint routing in the source tunnel: a service
//! that uses a waypoint is sent to the waypoint's pods over HBONE, never
//! around them, and a service without one keeps the pure L4 path.

mod common;

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
    wait_applied(&n1, 0);
    assert!(curl(&bed, "shop/client", SERVICE).is_err(), "waypoint down: the request fails");
    let failed = n1.wait_connections(2, |c| c.dst_service == "shop/web").unwrap();
    assert_eq!(failed[1].dst_workload, "shop/wp", "{failed:?}");
    assert_eq!(failed[1].dst_identity, "spiffe://cluster.local/ns/shop/sa/wp");
    let error = failed[1].error.as_deref().unwrap();
    assert!(error.starts_with("waypoint shop/wp unreachable") && error.ends_with("not sent around it"), "{error}");

    // The waypoint's pod goes away: still closed, and the log says why.
    bed.set_pod_label("shop/wp", "gateway.networking.k8s.io/gateway-name", None).unwrap();
    wait_applied(&n1, 1);
    assert!(curl(&bed, "shop/client", SERVICE).is_err(), "no waypoint pod: the request fails");
    let failed = n1.wait_connections(3, |c| c.dst_service == "shop/web").unwrap();
    assert!(failed[2].error.as_deref().unwrap().starts_with("waypoint shop/wp has no pod"), "{failed:?}");
    assert_eq!(inbound_from_client(&n2), 1, "nothing went around the waypoint");

    // Opting the service out restores the direct path.
    bed.write_config("service.yaml", &service(Some("none"))).unwrap();
    wait_applied(&n1, 2);
    curl(&bed, "shop/client", SERVICE).unwrap();
    n2.wait_connections(2, |c| c.direction == "inbound" && c.src_workload == "shop/client").unwrap();
}

/// The JWT issuer of the payments test: a P-256 key, its JWKS file, and
/// tokens signed with it (or with a forger's key).
struct Issuer {
    key: jsonwebtoken::EncodingKey,
    forger: jsonwebtoken::EncodingKey,
}

impl Issuer {
    fn new(jwks_file: &std::path::Path) -> Issuer {
        use base64::Engine as _;
        let pair = |()| rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (real, forged) = (pair(()), pair(()));
        let point = real.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
            "x": b64(&point[1..33]), "y": b64(&point[33..65])}]});
        std::fs::write(jwks_file, jwks.to_string()).unwrap();
        let encoding =
            |k: &rcgen::KeyPair| jsonwebtoken::EncodingKey::from_ec_pem(k.serialize_pem().as_bytes()).unwrap();
        Issuer { key: encoding(&real), forger: encoding(&forged) }
    }

    fn token(&self, scope: &str, expires_in: i64, forged: bool) -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let claims = serde_json::json!({"iss": "https://issuer.example", "sub": "alice", "aud": "payments",
            "exp": now + expires_in, "scope": scope});
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, &claims, if forged { &self.forger } else { &self.key }).unwrap()
    }
}

const API: &str = "http://10.96.0.20";

fn payments_config(jwks: &std::path::Path, waypoint_for: &str) -> String {
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
    jwksUri: "file://{jwks}"
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
"#,
        jwks = jwks.display(),
    )
}

/// `curl` in `from`: the HTTP status (0 when the connection failed).
fn status(bed: &ambit_testbed::Bed, from: &str, args: &[&str]) -> u16 {
    let mut all = vec!["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"];
    all.extend_from_slice(args);
    let out = bed.run(from, "curl", &all).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

#[test]
fn the_waypoint_enforces_l7_policy_with_end_user_claims() {
    let Some(mut bed) = bed() else { return };
    bed.namespace("payments", true).unwrap();
    bed.add_pods(&[("n1", "shop/checkout"), ("n1", "shop/other"), ("n2", "payments/api"), ("n2", "payments/wp")])
        .unwrap();
    bed.set_pod_label("payments/wp", "gateway.networking.k8s.io/gateway-name", Some("wp")).unwrap();
    // Counts only once the waypoint takes workload traffic (below).
    bed.set_pod_label("payments/api", "ambit.dev/use-waypoint", Some("wp")).unwrap();
    let jwks = bed.scratch().join("jwks.json");
    let issuer = Issuer::new(&jwks);
    bed.write_config("payments.yaml", &payments_config(&jwks, "service")).unwrap();
    let mut n1 = agent(&bed, "n1");
    let mut n2 = agent(&bed, "n2");
    wait_nodes_ready(&bed, &["n1", "n2"]);
    let api_ip = bed.pod("payments/api").ip.to_string();
    bed.spawn("payments/api", env!("CARGO_BIN_EXE_ambit-bench"), &["http", "--listen", &format!("{api_ip}:8080")])
        .unwrap();
    bed.wait_listening("payments/api", 8080).unwrap();
    let mut waypoint = bed.start_waypoint("payments/wp").unwrap();

    let bearer = |token: &str| format!("Authorization: Bearer {token}");
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
    assert_eq!(post("shop/checkout", "/v1/..%2fadmin", &charge), 403);
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

    // The access log names both identities and the end user.
    let requests = waypoint.requests();
    let first = &requests[0];
    assert_eq!(first["status"], 200);
    assert_eq!(first["src_identity"], "spiffe://cluster.local/ns/shop/sa/checkout");
    assert_eq!(first["request_principal"], "https://issuer.example/alice");
    assert_eq!(first["dst_workload"], "payments/api");
    // Istio-style request metrics, by response code.
    let metrics = bed.run_ok("payments/wp", "curl", &["-sS", "http://127.0.0.1:15020/metrics"]).unwrap();
    let count = |code: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("ambit_requests_total{") && l.contains(&format!("response_code=\"{code}\"")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!((count("200"), count("403"), count("401"), count("400")), (55, 6, 2, 1), "{metrics}");
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
    wait_applied(&n1, 0);
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
