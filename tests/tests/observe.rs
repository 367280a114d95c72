//! End-to-end tests of what operators see: Prometheus metrics after real
//! traffic, readiness, the certificates endpoint, and `ambit status`.

mod common;

use std::time::Duration;

use ambit_testbed::{Agent, Bed, wait_until};
use common::*;
use serde_json::Value;

/// shop/client on n1 and shop/web on n2 (serving), legacy/caller on n1; both agents up.
fn cluster(bed: &mut Bed) -> (Agent, Agent, String) {
    bed.add_pod("n1", "shop", "client").unwrap();
    bed.add_pod("n1", "legacy", "caller").unwrap();
    let web = bed.add_pod("n2", "shop", "web").unwrap();
    let n1 = agent(bed, "n1");
    let n2 = agent(bed, "n2");
    for (node, _) in [("n1", &n1), ("n2", &n2)] {
        wait_until(Duration::from_secs(20), &format!("{node} ready"), || {
            Ok(bed.admin_get(node, "/healthz/ready")?.0 == 200)
        })
        .unwrap();
    }
    let (root, _) = web_root(bed, 1024);
    bed.http_server("shop/web", HTTP_PORT, &root, &bed.scratch().join("web.log")).unwrap();
    (n1, n2, format!("http://{}:{HTTP_PORT}/index.html", web.ip))
}

/// The value of the first sample of `name` whose labels include all of `labels`.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let named = |l: &&str| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '));
    metrics.lines().filter(named).find_map(|line| {
        let (head, value) = line.rsplit_once(' ')?;
        labels.iter().all(|(k, v)| head.contains(&format!("{k}=\"{v}\""))).then(|| value.parse().ok())?
    })
}

#[test]
fn metrics_carry_istio_labels_for_mtls_and_plaintext_traffic() {
    let Some(mut bed) = bed() else { return };
    let (n1, _n2, url) = cluster(&mut bed);
    for _ in 0..3 {
        curl(&bed, "shop/client", &url).unwrap();
    }
    curl(&bed, "legacy/caller", &url).unwrap();

    let mut metrics = String::new();
    wait_until(Duration::from_secs(10), "connection metrics", || {
        metrics = bed.admin_get("n2", "/metrics")?.1;
        Ok(sample(&metrics, "ambit_tcp_connections_closed_total", &[("source_workload", "caller")]).is_some())
    })
    .unwrap();
    let mesh = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/client"),
        ("destination_workload", "web"),
        ("destination_principal", "spiffe://cluster.local/ns/shop/sa/web"),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ];
    assert_eq!(sample(&metrics, "ambit_tcp_connections_opened_total", &mesh), Some(3.0), "{metrics}");
    assert_eq!(sample(&metrics, "ambit_tcp_connections_closed_total", &mesh), Some(3.0));
    assert!(sample(&metrics, "ambit_tcp_received_bytes_total", &mesh).unwrap() > 3.0 * 20.0);
    let plain =
        [("source_workload", "caller"), ("source_principal", "unknown"), ("connection_security_policy", "none")];
    assert_eq!(sample(&metrics, "ambit_tcp_connections_opened_total", &plain), Some(1.0));
    assert!(
        sample(&metrics, "ambit_tls_handshakes_total", &[("direction", "inbound"), ("result", "ok")]).unwrap() >= 1.0
    );
    assert!(
        sample(
            &metrics,
            "ambit_certificate_expiry_timestamp_seconds",
            &[("identity", "spiffe://cluster.local/ns/shop/sa/web")]
        )
        .unwrap()
            > 1e9
    );
    assert_eq!(
        sample(&metrics, "ambit_capture_events", &[("name", "inbound_steered")]),
        Some(1.0),
        "the plaintext call"
    );
    assert_eq!(sample(&metrics, "ambit_state_objects", &[("name", "pods")]), Some(3.0));
    // Bounded cardinality: no addresses or ports in any label.
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        assert!(!line.contains("10.244.") && !line.contains(":8080"), "{line}");
    }

    let source = bed.admin_get("n1", "/metrics").unwrap().1;
    let out = [("reporter", "source"), ("source_workload", "client"), ("connection_security_policy", "mutual_tls")];
    assert_eq!(sample(&source, "ambit_tcp_connections_opened_total", &out), Some(3.0), "{source}");
    let reused = sample(&source, "ambit_hbone_pool_reuse_total", &[]).unwrap();
    let streams = sample(&source, "ambit_hbone_streams_total", &[]).unwrap();
    // Each proxy worker pools its own connections; one at a time, the
    // connections stay on the worker that accepted them unless it is busier.
    let started = n1.lines().into_iter().find(|l| l["message"] == "proxy workers started").unwrap();
    let workers = started["workers"].as_f64().unwrap();
    assert_eq!(streams, 3.0);
    assert!(
        (3.0 - workers.min(3.0)..=2.0).contains(&reused),
        "at most one handshake per worker, then pooled: {reused}"
    );
}

#[test]
fn readiness_waits_for_the_certificates_of_local_pods() {
    let Some(mut bed) = bed() else { return };
    bed.add_pod("n1", "shop", "client").unwrap();
    bed.stop_ca().unwrap();
    let mut n1 = bed.start_agent("n1").unwrap();
    n1.wait_ready().unwrap();
    n1.wait_pod_event("pod enrolled", "shop/client", 0).unwrap();
    let (code, body) = bed.admin_get("n1", "/healthz/ready").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("shop/client: no valid certificate"), "{body}");
    bed.start_ca(ambit_testbed::DEFAULT_LEAF_TTL).unwrap();
    wait_until(Duration::from_secs(20), "ready once the CA answers", || {
        Ok(bed.admin_get("n1", "/healthz/ready")?.0 == 200)
    })
    .unwrap();
}

fn cert_of(bed: &Bed, node: &str, identity: &str) -> Value {
    let certs: Value = serde_json::from_str(&bed.admin_get(node, "/certs").unwrap().1).unwrap();
    certs["identities"].as_array().unwrap().iter().find(|c| c["identity"] == identity).cloned().unwrap_or(Value::Null)
}

#[test]
fn certs_endpoint_shows_a_rotation_and_config_dump_has_no_keys() {
    let Some(mut bed) = bed() else { return };
    bed.start_ca("4s").unwrap();
    bed.add_pod("n1", "shop", "client").unwrap();
    let _n1 = agent(&bed, "n1");
    let identity = "spiffe://cluster.local/ns/shop/sa/client";
    let mut first = Value::Null;
    wait_until(Duration::from_secs(20), "a certificate", || {
        first = cert_of(&bed, "n1", identity);
        Ok(first["serial"].is_string())
    })
    .unwrap();
    assert!(first["chain"][0].as_str().unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(first["not_after"].as_u64().unwrap() - first["not_before"].as_u64().unwrap() <= 5);
    wait_until(
        Duration::from_secs(10),
        "a rotation",
        || Ok(cert_of(&bed, "n1", identity)["serial"] != first["serial"]),
    )
    .unwrap();

    let dump = bed.admin_get("n1", "/config_dump").unwrap().1;
    let parsed: Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(parsed["enrolled"][0]["pod"], "shop/client");
    assert_eq!(parsed["state"]["pods"]["shop/client"]["service_account"], "client");
    let certs = bed.admin_get("n1", "/certs").unwrap().1;
    for text in [&dump, &certs] {
        assert!(!text.contains("PRIVATE KEY"), "no private keys are served");
    }
}

#[test]
fn status_cli_reports_pods_plaintext_callers_and_a_certificate_past_80_percent() {
    let Some(mut bed) = bed() else { return };
    bed.start_ca("10s").unwrap();
    let (_n1, _n2, url) = cluster(&mut bed);
    curl(&bed, "legacy/caller", &url).unwrap();
    curl(&bed, "shop/client", &url).unwrap();

    let (code, healthy) = bed.ambit_status("n2").unwrap();
    assert_eq!(code, 0, "{healthy}");
    assert!(healthy.contains("READY") && healthy.contains("shop") && healthy.contains("web"), "{healthy}");
    assert!(healthy.contains("spiffe://cluster.local/ns/shop/sa/web"), "{healthy}");
    assert!(
        healthy.contains("legacy/caller") && healthy.contains("-> shop/web"),
        "plaintext caller listed:\n{healthy}"
    );
    assert!(healthy.contains("mutual_tls 1") && healthy.contains("none 1"), "{healthy}");
    assert!(healthy.contains("UDP\n  not carried by the mesh"), "UDP is said to be outside the mesh:\n{healthy}");

    // Renewal blocked: the certificate ages past 80% of its 11 s lifetime.
    bed.stop_ca().unwrap();
    let mut warned = String::new();
    wait_until(Duration::from_secs(15), "the renewal warning", || {
        let (code, out) = bed.ambit_status("n2")?;
        warned = out;
        Ok(code == 2 && warned.contains("WARNING: past 80% of its lifetime without renewal"))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{warned}"));
    assert!(warned.contains("failed attempts"), "{warned}");
}
