//! Attacks on the mesh, end to end: each one must fail, and the test says
//! how it was stopped. (Issue 18's suite; more attacks join it.)

mod common;

use std::time::Duration;

use std::{net::SocketAddr, sync::Arc};

use ambit_identity::{Identity, IdentityProvider as _, Svid, ca_client::CaClient, tls};
use ambit_testbed::{Agent, Bed, CA_ADDR};
use common::*;
use serde_json::Value;

/// Attack 7, from a config author: a pod's configuration names the node's
/// own network namespace (the agent's) or the host's (`/proc/1/ns/net`) as
/// its netns: enrolling it would put the mesh's listeners and redirection
/// on the node itself. The agent takes named netns paths only
/// (`/run/netns/`, `/var/run/netns/`), refuses its own, says why, and keeps
/// refusing.
#[test]
fn a_pod_cannot_name_the_nodes_own_network_namespace() {
    let Some(bed) = bed() else { return };
    let mut n1 = agent(&bed, "n1");
    let node_netns = format!("/run/netns/{}", bed.node("n1").netns);
    for (name, path) in [("agents-netns", node_netns.as_str()), ("host-netns", "/proc/1/ns/net")] {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  annotations:\n    ambit.dev/netns: {path}\nspec:\n  nodeName: n1\n  serviceAccountName: {name}\nstatus:\n  podIPs:\n  - ip: 10.100.0.1\n"
        );
        bed.write_config(&format!("pod-shop-{name}.yaml"), &yaml).unwrap();
        let refused = n1
            .wait_for(&format!("{name} refused"), Duration::from_secs(10), |l| {
                l["message"] == "cannot enrol pod; will retry" && l["pod"] == format!("shop/{name}")
            })
            .unwrap();
        let error = refused["error"].as_str().unwrap();
        // A process's netns path is refused before it is opened; the node's
        // own netns, named like a pod's, once it is opened.
        let why =
            if name == "host-netns" { "not a named network namespace" } else { "the node's own network namespace" };
        assert!(error.contains(why), "{name}: {error}");
    }
    std::thread::sleep(Duration::from_secs(3));
    let dump: Value = serde_json::from_str(&bed.admin_get("n1", "/config_dump").unwrap().1).unwrap();
    assert_eq!(dump["enrolled"], serde_json::json!([]), "nothing enrolled: {}", dump["enrolled"]);
}

const STRICT_SHOP: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec:\n  mtls: {mode: STRICT}\n";

/// A bed with `shop/<name>` (STRICT, on n1, `labels` set) and the plain
/// pod `legacy/attacker` beside it, and n1's agent once it has enrolled
/// the shop pod.
fn strict_pod_and_attacker(name: &str, labels: &[(&str, &str)]) -> Option<(Bed, ambit_testbed::Pod, Agent)> {
    let mut bed = bed()?;
    let pod = bed.add_pod("n1", "shop", name).unwrap();
    bed.add_pod("n1", "legacy", "attacker").unwrap();
    for (key, value) in labels {
        bed.set_pod_label(&pod.id(), key, Some(value)).unwrap();
    }
    bed.write_config("peer-authentication.yaml", STRICT_SHOP).unwrap();
    let mut n1 = agent(&bed, "n1");
    n1.wait_pod_event("pod enrolled", &pod.id(), 0).unwrap();
    Some((bed, pod, n1))
}

/// A plaintext GET from `from` to `url`; true if the app answered.
fn plaintext_get(bed: &Bed, from: &str, url: &str) -> bool {
    bed.run(from, "curl", &["-g", "-sS", "--max-time", "5", "-o", "/dev/null", url]).unwrap().status.success()
}

/// The pod's IPv6 link-local address on eth0, once duplicate address
/// detection has finished with it.
fn link_local(bed: &Bed, pod: &str) -> String {
    let mut found = String::new();
    ambit_testbed::wait_until(Duration::from_secs(10), &format!("{pod} link-local address"), || {
        let out = bed.run_ok(pod, "ip", &["-6", "-j", "addr", "show", "dev", "eth0", "scope", "link"])?;
        let links: Value = serde_json::from_str(&out)?;
        let addresses = links[0]["addr_info"].as_array().cloned().unwrap_or_default();
        let addr = addresses.into_iter().find(|a| a["family"] == "inet6").unwrap_or_default();
        found = addr["local"].as_str().unwrap_or_default().to_string();
        Ok(!found.is_empty() && addr.get("tentative").is_none())
    })
    .unwrap();
    found
}

/// Attack 1. An app listening on `[::]` (Go's, Java's and nginx's default)
/// in a STRICT pod, reached in plaintext by a plain pod on the same node:
/// through the pod's IPv6 link-local address, an IPv6 address the pod's
/// config does not list, and one added after the pod was enrolled. The
/// first two are steered to the pod's inbound listener and rejected as
/// plaintext (logged, counted); the last is dropped in the kernel (counted).
#[test]
fn plaintext_cannot_reach_a_strict_pod_through_any_of_its_addresses() {
    let Some(mut bed) = bed() else { return };
    let web = bed.add_pod("n1", "shop", "web").unwrap();
    bed.add_pod("n1", "legacy", "attacker").unwrap();
    for (pod, ip) in [("shop/web", "fd00:244:1::10/64"), ("legacy/attacker", "fd00:244:1::66/64")] {
        bed.run_ok(pod, "ip", &["addr", "add", ip, "dev", "eth0", "nodad"]).unwrap();
    }
    let web_link_local = link_local(&bed, "shop/web");
    // The attacker's own link-local address must be usable as a source too.
    link_local(&bed, "legacy/attacker");
    bed.write_config("peer-authentication.yaml", STRICT_SHOP).unwrap();
    let mut n1 = agent(&bed, "n1");
    n1.wait_pod_event("pod enrolled", "shop/web", 0).unwrap();
    let (root, _) = web_root(&bed, 1024);
    bed.http_server_at("shop/web", "::", HTTP_PORT, &root, &bed.scratch().join("web.log")).unwrap();
    // The same app over the listed address: rejected as always.
    assert!(!plaintext_get(&bed, "legacy/attacker", &format!("http://{}:{HTTP_PORT}/", web.ip)));
    let attempts =
        [format!("http://[{web_link_local}%25eth0]:{HTTP_PORT}/"), format!("http://[fd00:244:1::10]:{HTTP_PORT}/")];
    for url in &attempts {
        assert!(!plaintext_get(&bed, "legacy/attacker", url), "plaintext reached the STRICT pod's app at {url}");
    }
    let rejected = n1
        .wait_connections(3, |c| c.direction == "inbound" && c.error.as_deref().unwrap_or_default().contains("STRICT"))
        .unwrap();
    let v6: Vec<_> = rejected.iter().filter(|c| c.src_addr.starts_with('[')).collect();
    assert_eq!(v6.len(), 2, "both IPv6 attempts are logged as rejected plaintext: {rejected:#?}");

    // An address that appears after enrolment is not steered: dropped.
    bed.run_ok("shop/web", "ip", &["addr", "add", "fd00:244:1::11/64", "dev", "eth0", "nodad"]).unwrap();
    assert!(!plaintext_get(&bed, "legacy/attacker", &format!("http://[fd00:244:1::11]:{HTTP_PORT}/")));

    let served = std::fs::read_to_string(bed.scratch().join("web.log")).unwrap_or_default();
    assert!(served.lines().all(|l| !l.contains("GET")), "the app served nothing: {served}");
    let counters = stop_and_read_counters(&mut n1);
    assert_eq!(counter(&counters, "plaintext_rejected"), 3, "{counters:?}");
    assert!(counter(&counters, "inbound_no_listener") >= 1, "{counters:?}");
}

/// UDP is not carried by the mesh (as in Istio ambient). A STRICT pod can
/// opt in to dropping inbound UDP (`ambit.dev/inbound-udp: drop`): a plain
/// pod's datagram is dropped in the kernel and counted, while a DNS reply
/// (from port 53) still arrives.
#[test]
fn a_strict_pod_that_opts_in_drops_inbound_udp_but_dns_replies() {
    let Some((bed, web, mut n1)) = strict_pod_and_attacker("web", &[("ambit.dev/inbound-udp", "drop")]) else { return };
    let received = bed.scratch().join("udp.log");
    const RECEIVER: &str = "import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 5353))\nwhile True:\n    data, peer = s.recvfrom(2048)\n    open(sys.argv[1], 'a').write(f'{peer[1]} {data.decode()}\\n')\n";
    bed.spawn("shop/web", "python3", &["-c", RECEIVER, received.to_str().unwrap()]).unwrap();
    ambit_testbed::wait_until(Duration::from_secs(10), "UDP receiver", || {
        Ok(!bed.run_ok("shop/web", "ss", &["-Hlun", "sport = :5353"])?.trim().is_empty())
    })
    .unwrap();
    const SEND: &str = "import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', int(sys.argv[2])))\nfor _ in range(3):\n    s.sendto(sys.argv[3].encode(), (sys.argv[1], 5353))\n";
    for (port, text) in [("40000", "attack"), ("53", "dns-reply")] {
        bed.run_ok("legacy/attacker", "python3", &["-c", SEND, &web.ip.to_string(), port, text]).unwrap();
    }
    ambit_testbed::wait_until(Duration::from_secs(5), "the DNS reply", || {
        Ok(std::fs::read_to_string(&received).unwrap_or_default().contains("dns-reply"))
    })
    .unwrap();
    let log = std::fs::read_to_string(&received).unwrap();
    assert!(!log.contains("attack"), "UDP from a plain pod reached the app: {log}");
    let (_, status) = bed.ambit_status("n1").unwrap();
    assert!(status.contains("ambit.dev/inbound-udp=drop: 3 datagrams"), "{status}");
    let counters = stop_and_read_counters(&mut n1);
    assert_eq!(counter(&counters, "inbound_udp_dropped"), 3, "{counters:?}");
}

/// Attack 5. A pod is deleted and its IP handed to a new pod before the
/// agent has seen the deletion: for a moment both are enrolled with one
/// IP. Unenrolling the old pod must leave the new pod's steering alone, so
/// plaintext to the live STRICT pod is still rejected.
#[test]
fn unenrolling_a_pod_leaves_the_pod_that_reuses_its_ip_protected() {
    let Some((mut bed, old, mut n1)) = strict_pod_and_attacker("old", &[]) else { return };
    // The old pod's network goes away; its configuration is still there.
    bed.run_ok("shop/old", "ip", &["link", "del", "eth0"]).unwrap();
    bed.add_pod_at("n1", "shop", "new", Some(old.ip)).unwrap();
    n1.wait_pod_event("pod enrolled", "shop/new", 0).unwrap();
    std::fs::remove_file(bed.config_dir().join("pod-shop-old.yaml")).unwrap();
    n1.wait_pod_event("pod unenrolled", "shop/old", 0).unwrap();

    let (root, _) = web_root(&bed, 1024);
    bed.http_server("shop/new", HTTP_PORT, &root, &bed.scratch().join("new.log")).unwrap();
    assert!(
        !plaintext_get(&bed, "legacy/attacker", &format!("http://{}:{HTTP_PORT}/", old.ip)),
        "plaintext reached the new pod after the old one left"
    );
    let rejected = n1
        .wait_connections(1, |c| c.direction == "inbound" && c.error.as_deref().unwrap_or_default().contains("STRICT"))
        .unwrap();
    assert_eq!(rejected[0].dst_workload, "shop/new", "{rejected:?}");
    let counters = stop_and_read_counters(&mut n1);
    assert_eq!(counter(&counters, "plaintext_rejected"), 1, "{counters:?}");
}

/// Asks the CA, from node `node`'s own netns, for `identity` with the
/// token in `token_file`: what an attacker holding that token can mint.
fn mint(bed: &Bed, node: &str, token_file: &std::path::Path, identity: &Identity) -> Result<Svid, String> {
    let bundle = tls::load_bundle(&bed.ca_dir().join("root.pem"), "cluster.local").unwrap();
    let client =
        CaClient::new(CA_ADDR, node.to_string(), token_file.to_path_buf(), &tls::TrustStore::new(bundle)).unwrap();
    bed.in_netns(&bed.node(node).netns, || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(client.fetch(identity)).map_err(|e| format!("{e:#}"))
    })
    .unwrap()
}

/// An HBONE CONNECT to `target` through `pod_addr`'s port 15008, made from
/// node `node`'s own netns with `svid`: the response status, or why the
/// tunnel failed.
fn hbone_connect_from_node(
    bed: &Bed,
    node: &str,
    svid: &Svid,
    server: &Identity,
    target: SocketAddr,
) -> Result<u16, String> {
    let bundle = tls::load_bundle(&bed.ca_dir().join("root.pem"), "cluster.local").unwrap();
    let config = Arc::new(tls::client_config(Some(svid), &tls::TrustStore::new(bundle), server.spiffe_id()).unwrap());
    bed.in_netns(&bed.node(node).netns, || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let tcp = tokio::net::TcpStream::connect((target.ip(), 15008)).await.map_err(|e| e.to_string())?;
            let name = rustls::pki_types::ServerName::IpAddress(target.ip().into());
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| e.to_string())?;
            let (mut client, connection) = h2::client::handshake(tls).await.map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            let request = http::Request::connect(target.to_string()).body(()).unwrap();
            let (response, _stream) = client.send_request(request, false).map_err(|e| e.to_string())?;
            let response = tokio::time::timeout(Duration::from_secs(5), response)
                .await
                .map_err(|_| "no response".to_string())?
                .map_err(|e| e.to_string())?;
            Ok(response.status().as_u16())
        })
    })
    .unwrap()
}

/// Attack 2, from a compromised waypoint and a compromised node.
/// - The waypoint's CA token, stolen, obtains the waypoint's identity and
///   nothing else: frontend's identity, of a pod on the same node, is refused.
/// - A certificate for frontend (what a compromised node can mint),
///   presented from the node's own address rather than from frontend's pod,
///   passes nothing: the backend's tunnel refuses it before any policy,
///   logs it and counts it, although an ALLOW policy admits frontend.
#[test]
fn a_stolen_credential_mints_no_other_identity_and_works_only_from_its_pod() {
    let Some(mut bed) = bed() else { return };
    bed.add_pod("n1", "shop", "frontend").unwrap();
    bed.add_pod("n1", "shop", "waypoint").unwrap();
    bed.set_pod_label("shop/waypoint", "gateway.networking.k8s.io/gateway-name", Some("waypoint")).unwrap();
    let backend = bed.add_pod("n2", "shop", "backend").unwrap();
    bed.write_config(
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: frontend-only, namespace: shop}\nspec:\n  selector: {matchLabels: {app: backend}}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/frontend]\n",
    )
    .unwrap();
    let _n1 = agent(&bed, "n1");
    let mut n2 = agent(&bed, "n2");
    wait_nodes_ready(&bed, &["n1", "n2"]);
    let (root, _) = web_root(&bed, 1024);
    bed.http_server("shop/backend", HTTP_PORT, &root, &bed.scratch().join("backend.log")).unwrap();
    let url = format!("http://{}:{HTTP_PORT}/index.html", backend.ip);
    curl(&bed, "shop/frontend", &url).expect("frontend, from its own pod, is admitted");

    let frontend = Identity::new("cluster.local", "shop", "frontend");
    let waypoint_token = bed.scratch().join("stolen-waypoint-token");
    std::fs::write(&waypoint_token, bed.ca_token("n1", Some("shop/waypoint")).unwrap()).unwrap();
    mint(&bed, "n1", &waypoint_token, &Identity::new("cluster.local", "shop", "waypoint")).expect("its own identity");
    let refused = mint(&bed, "n1", &waypoint_token, &frontend).map(drop).unwrap_err();
    assert!(refused.contains("obtains that identity only"), "{refused}");
    let ca_log = std::fs::read_to_string(bed.ca_log()).unwrap();
    assert!(ca_log.contains("obtains that identity only"), "the CA logs the refusal: {ca_log}");

    let minted = mint(&bed, "n1", &bed.node_token_file("n1"), &frontend).expect("n1 runs frontend");
    let backend_id = Identity::new("cluster.local", "shop", "backend");
    let target = SocketAddr::new(backend.ip.into(), HTTP_PORT);
    let outcome = hbone_connect_from_node(&bed, "n1", &minted, &backend_id, target);
    assert!(outcome.is_err() || outcome == Ok(401), "frontend's identity from the node's address got {outcome:?}");
    let rejected = n2
        .wait_for("the rejection", Duration::from_secs(10), |l| {
            l["message"] == "HBONE connection rejected"
                && l["src_addr"].as_str().is_some_and(|a| a.starts_with("10.100.0.1:"))
        })
        .unwrap();
    assert!(rejected["error"].as_str().unwrap().contains("no pod's address"), "{rejected}");
    let counters = stop_and_read_counters(&mut n2);
    assert_eq!(counter(&counters, "mtls_rejected"), 1, "{counters:?}");
}

/// Resident memory of a process, in kB.
fn rss_kb(pid: u32) -> u64 {
    ambit_testbed::proc_status(pid, "VmRSS:").unwrap()
}

/// Attack 4, from a config author: a RequestAuthentication whose key sets
/// are "files" the mesh must not read: a secret of the node, an endless
/// device, and a FIFO (which blocks whoever opens it) inside the key-set
/// directory. No agent opens any of them; the waypoint refuses each with
/// the reason, stays small and keeps answering.
#[test]
fn a_policy_cannot_make_the_mesh_read_any_path() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/api"), ("n1", "shop/wp")]).unwrap();
    bed.set_pod_label("shop/wp", "gateway.networking.k8s.io/gateway-name", Some("wp")).unwrap();
    let jwks_dir = bed.scratch().join("jwks");
    std::fs::create_dir(&jwks_dir).unwrap();
    let fifo = jwks_dir.join("fifo.json");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR).unwrap();
    let rules: String =
        [("a", "/etc/shadow".to_string()), ("b", "/dev/zero".to_string()), ("c", fifo.display().to_string())]
            .iter()
            .map(|(issuer, path)| format!("  - {{issuer: https://{issuer}.example, jwksUri: \"file://{path}\"}}\n"))
            .collect();
    bed.write_config(
        "hostile.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wp, namespace: shop}}\nspec: {{gatewayClassName: ambit-waypoint}}\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: hostile, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Gateway, name: wp}}]\n  jwtRules:\n{rules}"
        ),
    )
    .unwrap();
    let n1 = agent(&bed, "n1");
    let waypoint = bed.start_waypoint("shop/wp", &["--jwks-dir", jwks_dir.to_str().unwrap()]).unwrap();
    let mut refusals = Vec::new();
    ambit_testbed::wait_until(Duration::from_secs(15), "three refusals", || {
        refusals = waypoint
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["message"].as_str().is_some_and(|m| m.starts_with("JWKS fetch failed")))
            .map(|l| format!("{} {}", l["uri"], l["error"]))
            .collect();
        Ok(["shadow", "zero", "fifo"].iter().all(|name| refusals.iter().any(|r| r.contains(name))))
    })
    .unwrap();
    for (name, reason) in
        [("shadow", "outside --jwks-dir"), ("zero", "outside --jwks-dir"), ("fifo", "not a regular file")]
    {
        assert!(refusals.iter().any(|r| r.contains(name) && r.contains(reason)), "{name}: {refusals:#?}");
    }
    assert!(rss_kb(waypoint.pid()) < 64 * 1024, "the waypoint stays small: {} kB", rss_kb(waypoint.pid()));
    assert!(rss_kb(n1.pid()) < 64 * 1024, "the agent stays small: {} kB", rss_kb(n1.pid()));
    assert_eq!(bed.admin_get("n1", "/healthz/ready").unwrap().0, 200, "the agent keeps answering");
    assert!(!n1.log_text().contains("shadow") || !n1.log_text().contains("cannot read"), "the agent opened nothing");
}

/// Attack 6, from a meshed client: requests the waypoint and the app could
/// read differently. Each is refused, or rewritten so both read the same.
#[test]
fn the_waypoint_and_the_app_see_the_same_request() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/client"), ("n2", "shop/app"), ("n2", "shop/wp")]).unwrap();
    bed.set_pod_label("shop/wp", "gateway.networking.k8s.io/gateway-name", Some("wp")).unwrap();
    let issuer = Issuer::new();
    issuer.publish(&bed.scratch().join("jwks.json"), &["k1"]);
    let config = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: app, namespace: shop, labels: {{ambit.dev/use-waypoint: wp}}}}
spec:
  clusterIP: 10.96.0.30
  selector: {{app: app}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: wp, namespace: shop}}
spec: {{gatewayClassName: ambit-waypoint}}
---
apiVersion: security.ambit.dev/v1
kind: RequestAuthentication
metadata: {{name: users, namespace: shop}}
spec:
  targetRefs: [{{kind: Gateway, name: wp}}]
  jwtRules: [{{issuer: https://issuer.example, jwksUri: "file://{jwks}"}}]
---
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: shop}}
spec:
  targetRefs: [{{kind: Gateway, name: wp}}]
  action: DENY
  rules:
  - to: [{{operation: {{hosts: [admin.example]}}}}]
  - to: [{{operation: {{paths: [/admin, /admin/*]}}}}]
"#,
        jwks = bed.scratch().join("jwks.json").display()
    );
    bed.write_config("app.yaml", &config).unwrap();
    let _n1 = agent(&bed, "n1");
    let _n2 = agent(&bed, "n2");
    wait_nodes_ready(&bed, &["n1", "n2"]);
    // The app answers with the request line and the headers it received.
    const ECHO: &str = "import http.server, sys\nclass Echo(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        body = (self.requestline + '\\n' + str(self.headers)).encode()\n        self.send_response(200)\n        self.send_header('content-length', str(len(body)))\n        self.end_headers()\n        self.wfile.write(body)\n    def log_message(self, *args):\n        pass\nhttp.server.ThreadingHTTPServer((sys.argv[1], 8080), Echo).serve_forever()\n";
    let app_ip = bed.pod("shop/app").ip.to_string();
    bed.spawn("shop/app", "python3", &["-c", ECHO, &app_ip]).unwrap();
    bed.wait_listening("shop/app", 8080).unwrap();
    let scratch = bed.scratch().to_str().unwrap().to_string();
    let waypoint = bed.start_waypoint("shop/wp", &["--jwks-dir", &scratch]).unwrap();
    ambit_testbed::wait_until(Duration::from_secs(10), "the JWKS read", || {
        Ok(waypoint.log_text().contains("JWKS fetched"))
    })
    .unwrap();

    let get = |args: &[&str]| -> (u16, String) {
        let mut all = vec!["-sS", "--path-as-is", "--max-time", "10", "-w", "\n%{http_code}"];
        all.extend_from_slice(args);
        let out = bed.run_ok("shop/client", "curl", &all).unwrap();
        let (body, code) = out.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_lowercase())
    };
    let url = |path: &str| format!("http://10.96.0.30{path}");
    assert_eq!(get(&[&url("/ok")]).0, 200, "{}", waypoint.log_text());
    // Two hosts: the policy would read one, the app perhaps the other
    // (curl sends one Host only, so this request is written by hand).
    const TWO_HOSTS: &str = "import socket\ns = socket.create_connection(('10.96.0.30', 80), timeout=10)\ns.sendall(b'GET / HTTP/1.1\\r\\nHost: public.example\\r\\nHost: admin.example\\r\\nConnection: close\\r\\n\\r\\n')\nprint(s.recv(4096).decode().split('\\r\\n')[0])\n";
    let status_line = bed.run_ok("shop/client", "python3", &["-c", TWO_HOSTS]).unwrap();
    assert!(status_line.starts_with("HTTP/1.1 400"), "{status_line}");
    // A trailing dot names the same host.
    assert_eq!(get(&["-H", "Host: admin.example.", &url("/")]).0, 403);
    // Path parameters and escaped slashes that frameworks route to /admin.
    for path in ["/admin;x=1", "/%2Fadmin", "/x/..%2Fadmin", "/x%5C..%5Cadmin"] {
        assert_eq!(get(&[&url(path)]).0, 400, "{path}");
    }
    assert_eq!(get(&[&url("/admin")]).0, 403);
    // The verified token stays at the waypoint; the client's own claims
    // about its address are replaced by the address the waypoint saw.
    let token = issuer.token("read", 300, false);
    let (code, seen) = get(&[
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-H",
        "X-Forwarded-For: 6.6.6.6",
        "-H",
        "Forwarded: for=6.6.6.6",
        &url("/echo"),
    ]);
    assert_eq!(code, 200, "{seen}");
    let client_ip = bed.pod("shop/client").ip.to_string();
    assert!(!seen.contains("authorization:"), "the bearer token reached the app: {seen}");
    assert!(seen.contains(&format!("x-forwarded-for: {client_ip}")), "{seen}");
    assert!(!seen.contains("6.6.6.6"), "the client's forged address reached the app: {seen}");
    let refused = waypoint.requests().into_iter().filter(|r| r["status"] == 400).count();
    assert_eq!(refused, 5, "each refusal is logged: {:#?}", waypoint.requests());
}

/// Attack 10, from a config author's mistake: a new policy file whose
/// restrictive ALLOW (db admits shop/api only) has a typo. The policy must
/// not silently do nothing: db denies everyone until it is fixed, the
/// file's other policy still loads, the error is reported and counted, and
/// `ambit policy check` exits 1 with the error on stdout.
#[test]
fn a_policy_that_cannot_be_parsed_fails_closed() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/client"), ("n2", "shop/db"), ("n2", "shop/web")]).unwrap();
    let mut n2 = agent(&bed, "n2");
    let _n1 = agent(&bed, "n1");
    wait_nodes_ready(&bed, &["n1", "n2"]);
    let (root, _) = web_root(&bed, 1024);
    for pod in ["shop/db", "shop/web"] {
        bed.http_server(pod, HTTP_PORT, &root, &bed.scratch().join(format!("{}.log", pod.replace('/', "-")))).unwrap();
    }
    let url = |pod: &str| format!("http://{}:{HTTP_PORT}/index.html", bed.pod(pod).ip);
    curl(&bed, "shop/client", &url("shop/db")).expect("no policy yet");

    let broken_allow = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-api, namespace: shop}\nspec:\n  selector: {matchLabels: {app: db}}\n  action: ALLOW\n  rules: [{from: [{source: {principal: [cluster.local/ns/shop/sa/api]}}]}]\n";
    let deny_web = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-client-to-web, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]\n";
    bed.write_config("policies.yaml", &format!("{broken_allow}---\n{deny_web}")).unwrap();
    n2.wait_applied(0).unwrap();
    assert!(curl(&bed, "shop/client", &url("shop/db")).is_err(), "the broken policy's workloads are closed");
    assert!(curl(&bed, "shop/client", &url("shop/web")).is_err(), "the file's other policy is in force");
    let denied = n2.wait_connections(1, |c| c.dst_workload == "shop/db" && c.decision == "deny").unwrap();
    assert_eq!(denied[0].policy, "shop/only-api rule 0", "{denied:?}");
    assert_eq!(gauge(&bed, "n2", "ambit_config_errors"), "1", "counted");
    let errors = n2
        .lines()
        .into_iter()
        .filter(|l| l["message"].as_str().is_some_and(|m| m.starts_with("configuration error")))
        .count();
    assert!(errors >= 1, "logged");

    let cli = ambit_testbed::agent_binary().with_file_name("ambit");
    let check = std::process::Command::new(cli)
        .args(["policy", "check", "--config"])
        .arg(bed.config_dir())
        .args(["--from", "shop/client", "--to", "shop/db:8080"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("error:") && stdout.contains("principal"), "the error is on stdout: {stdout}");
    assert!(stdout.contains("DENY"), "{stdout}");
}

/// A CA impostor: it holds a genuine serving certificate of the mesh's CA
/// (issued by the mesh's root, as a stolen CA serving key would give), so
/// agents accept the TLS handshake, but it signs every request with a root
/// of its own. Speaks the CA's real wire protocol (HTTP/2 over TLS,
/// `POST /v1/svid`), on the CA's address, in the fabric netns.
fn impostor_ca(bed: &Bed) {
    use ambit_identity::{
        ca::CertificateAuthority,
        ca_server::{CA_NAMESPACE, CA_SERVICE_ACCOUNT, SvidRequest, SvidResponse},
    };
    use base64::{Engine as _, engine::general_purpose::STANDARD};
    let genuine = CertificateAuthority::load_or_create(&bed.ca_dir(), "cluster.local").unwrap();
    let own_root = CertificateAuthority::create("cluster.local").unwrap();
    let serving = Identity::new("cluster.local", CA_NAMESPACE, CA_SERVICE_ACCOUNT);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let chain = genuine.issue(&serving, &key, Duration::from_secs(3600)).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let svid = Svid::from_chain(&serving, chain, key, "cluster.local").unwrap();
    // The CA asks for no client certificate: callers present tokens.
    let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(svid.chain.clone(), svid.key.clone_key())
        .unwrap();
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let own_root = Arc::new(own_root);
    let fabric = std::fs::File::open(format!("/run/netns/{}", bed.fabric_netns())).unwrap();
    let (listening, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(&fabric, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(CA_ADDR).await.unwrap();
            listening.send(()).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, own_root) = (acceptor.clone(), own_root.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let Ok(mut conn) = h2::server::handshake(tls).await else { return };
                    while let Some(Ok((request, mut respond))) = conn.accept().await {
                        let mut body = request.into_body();
                        let mut bytes = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            bytes.extend_from_slice(&chunk);
                        }
                        let asked: SvidRequest = serde_json::from_slice(&bytes).unwrap();
                        let identity = Identity::new("cluster.local", &asked.namespace, &asked.service_account);
                        let csr = STANDARD.decode(&asked.csr).unwrap();
                        let leaf = own_root.issue_for_request(&identity, &csr, Duration::from_secs(3600)).unwrap();
                        let chain = vec![STANDARD.encode(&leaf[0]), STANDARD.encode(&own_root.roots()[0])];
                        let answer = serde_json::to_vec(&SvidResponse { chain }).unwrap();
                        let response = http::Response::builder().status(200).body(()).unwrap();
                        let mut send = respond.send_response(response, false).unwrap();
                        let _ = send.send_data(answer.into(), true);
                    }
                });
            }
        });
    });
    ready.recv().unwrap();
}

/// Attack 8, from an impostor speaking as the CA: every certificate it
/// hands out is signed by its own root. The agent checks each issued chain
/// against the trust bundle before using it: it refuses them, says why,
/// counts the failures, and its pod is never served with a certificate
/// its peers would not trust.
#[test]
fn an_agent_uses_no_certificate_its_trust_bundle_does_not_sign() {
    let Some(mut bed) = bed() else { return };
    bed.add_pod("n1", "shop", "web").unwrap();
    bed.stop_ca().unwrap();
    impostor_ca(&bed);
    let mut n1 = bed.start_agent("n1").unwrap();
    let refused = n1
        .wait_for("the refusal", Duration::from_secs(20), |l| {
            l["message"].as_str().is_some_and(|m| m.starts_with("no valid certificate"))
        })
        .unwrap();
    assert!(refused["error"].as_str().unwrap().contains("not signed by the trust bundle"), "{refused}");
    assert_ne!(bed.admin_get("n1", "/healthz/ready").unwrap().0, 200, "no usable certificate, not ready");
    let (_, metrics) = bed.admin_get("n1", "/metrics").unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("ambit_certificate_renewal_failures_total{") && !l.ends_with(" 0")),
        "counted: {metrics}"
    );
}

/// Attack 9, from a plain pod: a flood of refused plaintext connections
/// and of failed handshakes. Every one is counted, but each source and
/// reason gets one warning line per 10 s; the rest are counted as
/// suppressed, so a flood cannot fill the node's disk or log pipeline.
#[test]
fn a_flood_of_refusals_logs_one_line_per_source_and_reason() {
    let Some((bed, web, mut n1)) = strict_pod_and_attacker("web", &[]) else { return };
    wait_nodes_ready(&bed, &["n1"]);
    const FLOOD: &str = "import socket, sys\nfor port, n, payload in ((8080, 200, b''), (15008, 50, b'not TLS at all\\r\\n\\r\\n')):\n    for _ in range(n):\n        try:\n            s = socket.create_connection((sys.argv[1], port), timeout=5)\n            s.sendall(payload)\n            s.recv(64)\n            s.close()\n        except OSError:\n            pass\n";
    bed.run_ok("legacy/attacker", "python3", &["-c", FLOOD, &web.ip.to_string()]).unwrap();
    ambit_testbed::wait_until(Duration::from_secs(10), "every refusal counted", || {
        let (_, metrics) = bed.admin_get("n1", "/metrics")?;
        Ok(metrics.contains("ambit_warnings_suppressed_total{name=\"plaintext_rejected\"} 199")
            && metrics.contains("ambit_warnings_suppressed_total{name=\"hbone_rejected\"} 49"))
    })
    .unwrap();
    let lines = n1.lines();
    let logged = |message: &str| lines.iter().filter(|l| l["message"] == message).count();
    assert_eq!(logged("connection failed"), 1, "one line for 200 refused plaintext connections");
    assert_eq!(logged("HBONE connection rejected"), 1, "one line for 50 failed handshakes");
    let counters = stop_and_read_counters(&mut n1);
    assert_eq!(counter(&counters, "plaintext_rejected"), 200, "{counters:?}");
    assert_eq!(counter(&counters, "mtls_rejected"), 50, "{counters:?}");
}

/// Attack 3, from anywhere that reaches the CA, with no credential: ten
/// connections, each asking for 150 streams that never end (1,500 in
/// all), each with 12 KiB of headers. The CA grants 16 per connection, resets each after 10 s, and its
/// memory stays flat; an agent starting meanwhile obtains its certificates.
#[test]
fn a_slow_client_cannot_grow_the_ca() {
    let Some(mut bed) = bed() else { return };
    bed.add_pod("n1", "shop", "web").unwrap();
    let ca = bed.ca_pid().unwrap();
    let before = rss_kb(ca);
    let mut n1 = bed.start_agent("n1").unwrap();
    let bundle = tls::load_bundle(&bed.ca_dir().join("root.pem"), "cluster.local").unwrap();
    let ca_id = Identity::new("cluster.local", "ambit-system", "ambit-ca").spiffe_id();
    let config = Arc::new(tls::client_config(None, &tls::TrustStore::new(bundle), ca_id).unwrap());
    let (reset, during) = bed
        .in_netns(&bed.node("n2").netns, || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let mut held = Vec::new();
                for _ in 0..10 {
                    let tcp = tokio::net::TcpStream::connect(CA_ADDR).await.unwrap();
                    let name = rustls::pki_types::ServerName::try_from("10.100.0.254").unwrap();
                    let tls = tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await.unwrap();
                    let (client, connection) = h2::client::handshake(tls).await.unwrap();
                    tokio::spawn(connection);
                    for _ in 0..150 {
                        // Past the CA's limit, the client queues the stream.
                        let mut ready = client.clone().ready().await.unwrap();
                        let request = http::Request::post("https://10.100.0.254/v1/svid")
                            .header("x-padding", "p".repeat(12 * 1024))
                            .body(())
                            .unwrap();
                        held.push(ready.send_request(request, false).unwrap());
                    }
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                let during = rss_kb(ca);
                // The streams the CA took are reset at its 10 s deadline;
                // the rest were refused at once or never opened.
                let started = tokio::time::Instant::now();
                let mut endings = tokio::task::JoinSet::new();
                for (response, _body) in held {
                    endings.spawn(async move {
                        let ended = tokio::time::timeout(Duration::from_secs(12), response).await;
                        (started.elapsed(), matches!(ended, Ok(Err(_))))
                    });
                }
                let mut reset_at_deadline = 0;
                while let Some(Ok((after, reset))) = endings.join_next().await {
                    if reset && after >= Duration::from_secs(6) {
                        reset_at_deadline += 1;
                    }
                }
                (reset_at_deadline, during)
            })
        })
        .unwrap();
    n1.wait_ready().unwrap();
    wait_nodes_ready(&bed, &["n1"]);
    println!("CA RSS: {before} kB before, {during} kB with 1,500 streams asked; {reset} reset at the deadline");
    assert!((1..=160).contains(&reset), "16 streams per connection at most, each reset at 10 s: {reset} reset");
    // Unbounded, 1,500 such streams grow it by about 48 MB.
    assert!(during < before + 16 * 1024, "the CA grew from {before} kB to {during} kB");
}
