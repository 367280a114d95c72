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
    for node in ["n1", "n2"] {
        ambit_testbed::wait_until(std::time::Duration::from_secs(20), "certificates", || {
            Ok(bed.admin_get(node, "/healthz/ready")?.0 == 200)
        })
        .unwrap();
    }
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
