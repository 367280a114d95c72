//! End-to-end tests of the data path: real kernel programs, real agents, real
//! network namespaces, and real clients (curl, iperf3, Python's socket API).
//!
//! Each test builds its own bed: nodes `n1` and `n2`, the ambient namespace
//! `shop`, and the plain namespace `legacy`.

use std::{collections::BTreeSet, time::Duration};

use ambit_testbed::{Agent, Bed, ConnectionRecord};
use anyhow::Context as _;
use serde_json::Value;

mod common;

use common::*;

fn involving(records: &[ConnectionRecord], ip: &str) -> Vec<ConnectionRecord> {
    records
        .iter()
        .filter(|r| r.src_addr.starts_with(&format!("{ip}:")) || r.dst_addr.starts_with(&format!("{ip}:")))
        .cloned()
        .collect()
}

#[test]
fn outbound_to_other_node_is_captured_and_delivered_intact() {
    let Some(mut bed) = bed() else { return };
    let client = bed.add_pod("n1", "shop", "client").unwrap();
    let web = bed.add_pod("n2", "legacy", "web").unwrap();
    let mut n1 = agent(&bed, "n1");
    let n2 = agent(&bed, "n2");
    n1.wait_pod_event("pod enrolled", "shop/client", 0).unwrap();

    let (root, big_sum) = web_root(&bed, BIG_FILE_BYTES);
    let access_log = bed.scratch().join("web-access.log");
    bed.http_server("legacy/web", HTTP_PORT, &root, &access_log).unwrap();
    bed.iperf3_server("legacy/web", IPERF_PORT).unwrap();
    let base = format!("http://{}:{HTTP_PORT}", web.ip);

    assert_eq!(curl(&bed, "shop/client", &format!("{base}/index.html")).unwrap(), "hello from the web pod\n");
    assert_eq!(curl_sha256(&bed, "shop/client", &format!("{base}/big.bin")), big_sum, "32 MiB arrives intact");
    let uploaded = iperf3(&bed, "shop/client", &web.ip.to_string(), false);
    let downloaded = iperf3(&bed, "shop/client", &web.ip.to_string(), true);
    assert!(uploaded > 1_000_000 && downloaded > 1_000_000, "iperf3 moved {uploaded} up, {downloaded} down");

    // An IPv6 socket dialling the IPv4-mapped address goes through connect6.
    let mapped = format!(
        "import socket; s = socket.socket(socket.AF_INET6); s.connect(('::ffff:{}', {HTTP_PORT})); \
         s.sendall(b'GET /index.html HTTP/1.0\\r\\n\\r\\n'); print(s.makefile('rb').read().decode())",
        web.ip
    );
    let reply = bed.run_ok("shop/client", "python3", &["-c", &mapped]).unwrap();
    assert!(reply.contains("hello from the web pod"), "{reply}");

    let dst = format!("{}:{HTTP_PORT}", web.ip);
    let http = n1.wait_connections(3, |c| c.dst_addr == dst && c.error.is_none()).unwrap();
    for record in &http {
        assert_eq!(record.direction, "outbound");
        assert_eq!(record.src_workload, "shop/client", "the agent names the source pod");
        assert_eq!(record.dst_workload, "legacy/web");
        assert!(record.src_addr.starts_with(&format!("{}:", client.ip)), "leaves from the pod's own IP: {record:?}");
    }
    assert!(http.iter().any(|r| r.bytes_received >= BIG_FILE_BYTES as u64), "{http:?}");
    let iperf_dst = format!("{}:{IPERF_PORT}", web.ip);
    let iperf = n1.wait_connections(4, |c| c.dst_addr == iperf_dst).unwrap();
    assert!(iperf.iter().map(|r| r.bytes_sent).sum::<u64>() >= uploaded, "{iperf:?}");
    assert!(iperf.iter().map(|r| r.bytes_received).sum::<u64>() >= downloaded, "{iperf:?}");

    // The web pod is not enrolled: node 2's agent saw nothing, and the server
    // saw the client pod's real address.
    assert!(n2.connections().is_empty(), "{:?}", n2.connections());
    let log = std::fs::read_to_string(&access_log).unwrap();
    assert!(log.lines().all(|l| l.starts_with(&client.ip.to_string())), "{log}");
}

#[test]
fn inbound_from_plain_pod_is_captured_with_original_destination() {
    let Some(mut bed) = bed() else { return };
    let caller = bed.add_pod("n1", "legacy", "caller").unwrap();
    let api = bed.add_pod("n2", "shop", "api").unwrap();
    let n1 = agent(&bed, "n1");
    let mut n2 = agent(&bed, "n2");
    n2.wait_pod_event("pod enrolled", "shop/api", 0).unwrap();
    let (root, big_sum) = web_root(&bed, BIG_FILE_BYTES);
    bed.http_server("shop/api", HTTP_PORT, &root, &bed.scratch().join("api.log")).unwrap();
    bed.iperf3_server("shop/api", IPERF_PORT).unwrap();

    let base = format!("http://{}:{HTTP_PORT}", api.ip);
    assert_eq!(curl(&bed, "legacy/caller", &format!("{base}/index.html")).unwrap(), "hello from the web pod\n");
    assert_eq!(curl_sha256(&bed, "legacy/caller", &format!("{base}/big.bin")), big_sum);
    let uploaded = iperf3(&bed, "legacy/caller", &api.ip.to_string(), false);
    assert!(uploaded > 1_000_000);

    let dst = format!("{}:{HTTP_PORT}", api.ip);
    let records = n2.wait_connections(2, |c| c.dst_addr == dst).unwrap();
    for record in &records {
        assert_eq!(record.direction, "inbound");
        assert_eq!(record.dst_workload, "shop/api", "original destination preserved: {record:?}");
        assert_eq!(record.src_workload, "legacy/caller");
        assert!(record.src_addr.starts_with(&format!("{}:", caller.ip)), "{record:?}");
        assert!(record.error.is_none(), "{record:?}");
    }
    assert!(records.iter().any(|r| r.bytes_received >= BIG_FILE_BYTES as u64));
    let iperf_dst = format!("{}:{IPERF_PORT}", api.ip);
    let iperf = n2.wait_connections(2, |c| c.dst_addr == iperf_dst).unwrap();
    assert!(iperf.iter().map(|r| r.bytes_sent).sum::<u64>() >= uploaded);
    assert!(n1.connections().is_empty(), "the caller is not enrolled: {:?}", n1.connections());
    // Delivered from the caller's own address: the app sees who called.
    let access = std::fs::read_to_string(bed.scratch().join("api.log")).unwrap();
    let sources: BTreeSet<&str> = access.lines().filter_map(|l| l.split(' ').next()).collect();
    assert_eq!(sources, BTreeSet::from([caller.ip.to_string().as_str()]), "{access}");
}

#[test]
fn plain_pods_are_not_touched() {
    let Some(mut bed) = bed() else { return };
    bed.add_pod("n1", "shop", "enrolled-a").unwrap();
    bed.add_pod("n2", "shop", "enrolled-b").unwrap();
    let a = bed.add_pod("n1", "legacy", "a").unwrap();
    let b = bed.add_pod("n2", "legacy", "b").unwrap();
    let mut n1 = agent(&bed, "n1");
    let mut n2 = agent(&bed, "n2");
    n1.wait_pod_event("pod enrolled", "shop/enrolled-a", 0).unwrap();
    n2.wait_pod_event("pod enrolled", "shop/enrolled-b", 0).unwrap();
    let (root, _) = web_root(&bed, 1024);
    let access_log = bed.scratch().join("b.log");
    bed.http_server("legacy/b", HTTP_PORT, &root, &access_log).unwrap();

    for _ in 0..5 {
        curl(&bed, "legacy/a", &format!("http://{}:{HTTP_PORT}/index.html", b.ip)).unwrap();
    }
    let log = std::fs::read_to_string(&access_log).unwrap();
    assert_eq!(log.lines().filter(|l| l.starts_with(&a.ip.to_string())).count(), 5, "{log}");
    for agent in [&mut n1, &mut n2] {
        let counters = stop_and_read_counters(agent);
        assert!(involving(&agent.connections(), &a.ip.to_string()).is_empty());
        assert!(involving(&agent.connections(), &b.ip.to_string()).is_empty());
        assert_eq!(counter(&counters, "connect4_captured"), 0, "{counters:?}");
        assert_eq!(counter(&counters, "inbound_steered"), 0, "{counters:?}");
    }
}

#[test]
fn agent_traffic_does_not_loop() {
    // Same node, both pods enrolled: the agent's own connections (outbound
    // to the server, then delivery to the app) pass the programs attached
    // above the agent's cgroup and must not be captured again.
    let Some(mut bed) = bed() else { return };
    let client = bed.add_pod("n1", "shop", "client").unwrap();
    let server = bed.add_pod("n1", "shop", "server").unwrap();
    let mut n1 = agent(&bed, "n1");
    n1.wait_pod_event("pod enrolled", "shop/server", 0).unwrap();
    n1.wait_pod_event("pod enrolled", "shop/client", 0).unwrap();
    wait_nodes_ready(&bed, &["n1"]);
    let (root, _) = web_root(&bed, 1024);
    bed.http_server("shop/server", HTTP_PORT, &root, &bed.scratch().join("server.log")).unwrap();

    for _ in 0..5 {
        curl(&bed, "shop/client", &format!("http://{}:{HTTP_PORT}/index.html", server.ip)).unwrap();
    }
    // Nothing listens on port 9: the failure must come back once, not loop.
    let refused =
        bed.run("shop/client", "curl", &["-sS", "--max-time", "10", &format!("http://{}:9/", server.ip)]).unwrap();
    assert!(!refused.status.success());

    let dst = format!("{}:{HTTP_PORT}", server.ip);
    n1.wait_connections(5, |c| c.direction == "outbound" && c.dst_addr == dst).unwrap();
    n1.wait_connections(5, |c| c.direction == "inbound" && c.dst_addr == dst).unwrap();
    let counters = stop_and_read_counters(&mut n1);
    assert_eq!(counter(&counters, "connect4_captured"), 6, "{counters:?}\n{}", n1.log_text());
    // Both pods are meshed and on this node: the agent applies the
    // destination's policy itself and joins its two sockets, so no HBONE
    // connection is made and nothing is steered to a listener.
    assert_eq!(counter(&counters, "inbound_steered"), 0, "{counters:?}");
    assert_eq!(counter(&counters, "hbone_steered"), 0, "same node, no tunnel: {counters:?}");
    let records = n1.connections();
    assert_eq!(records.iter().filter(|c| c.direction == "outbound").count(), 6, "{records:#?}");
    assert_eq!(records.iter().filter(|c| c.direction == "inbound").count(), 6, "{records:#?}");
    let served = records.iter().filter(|c| c.dst_addr == dst && c.decision == "allow");
    assert!(served.clone().count() == 10 && served.into_iter().all(|c| c.fast_path == "kernel"), "{records:#?}");
    let delivery_failure = records.iter().find(|c| c.direction == "inbound" && c.dst_addr.ends_with(":9")).unwrap();
    assert!(delivery_failure.error.as_deref().unwrap_or_default().contains("refused"), "{delivery_failure:?}");
    // On the fast path too, the app sees the client pod's address, not its own.
    let access = std::fs::read_to_string(bed.scratch().join("server.log")).unwrap();
    assert_eq!(access.lines().filter(|l| l.starts_with(&format!("{} - -", client.ip))).count(), 5, "{access}");
}

#[test]
fn enrol_and_unenrol_at_run_time() {
    let Some(mut bed) = bed() else { return };
    bed.set_namespace_mode("shop", None).unwrap();
    bed.add_pod("n1", "shop", "app").unwrap();
    let web = bed.add_pod("n2", "legacy", "web").unwrap();
    let mut n1 = agent(&bed, "n1");
    let (root, _) = web_root(&bed, 1024);
    bed.http_server("legacy/web", HTTP_PORT, &root, &bed.scratch().join("web.log")).unwrap();
    let url = format!("http://{}:{HTTP_PORT}/index.html", web.ip);
    let captured = |agent: &Agent| agent.connections().iter().filter(|c| c.src_workload == "shop/app").count();

    curl(&bed, "shop/app", &url).unwrap();
    assert_eq!(captured(&n1), 0, "namespace not ambient yet");

    assert_eq!(delivery_routing(&bed, "shop/app"), (false, false), "not enrolled yet");
    bed.set_namespace_mode("shop", Some("ambient")).unwrap();
    n1.wait_pod_event("pod enrolled", "shop/app", 0).unwrap();
    curl(&bed, "shop/app", &url).unwrap();
    n1.wait_connections(1, |c| c.src_workload == "shop/app").unwrap();
    assert_eq!(delivery_routing(&bed, "shop/app"), (true, true), "routing for deliveries set up at enrolment");

    // A broken edit is reported with file and field; capture goes on.
    bed.write_config(
        "namespace-shop.yaml",
        "kind: Namespace\nmetadata:\n  name: shop\n  labels:\n    ambit.dev/dataplane-mode: ambiant\n",
    )
    .unwrap();
    let error = n1
        .wait_for("configuration error", Duration::from_secs(10), |l| {
            l["message"].as_str().unwrap_or("").starts_with("configuration error")
        })
        .unwrap();
    let text = error["error"].as_str().unwrap();
    assert!(
        text.contains("namespace-shop.yaml") && text.contains("metadata.labels.ambit.dev/dataplane-mode"),
        "{text}"
    );
    curl(&bed, "shop/app", &url).unwrap();
    n1.wait_connections(2, |c| c.src_workload == "shop/app").unwrap();
    assert_eq!(gauge(&bed, "n1", "ambit_config_errors"), "1", "the broken file is reported until it is fixed");

    // A new service account means a new enrolment in the same netns: the
    // old one's cleanup must not undo the new one's routing.
    bed.set_pod_service_account("shop/app", "app-v2").unwrap();
    n1.wait_pod_event("pod enrolled", "shop/app", 1).unwrap();
    // In the same pass: the old listeners are closed before the new ones
    // bind, so there is no window without capture and no retry.
    let failed: Vec<_> = n1.lines().into_iter().filter(|l| l["message"] == "cannot enrol pod; will retry").collect();
    assert!(failed.is_empty(), "{failed:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(delivery_routing(&bed, "shop/app"), (true, true), "routing kept across re-enrolment");

    // The pod's own label opts it out.
    bed.set_namespace_mode("shop", Some("ambient")).unwrap();
    bed.set_pod_label("shop/app", "ambit.dev/dataplane-mode", Some("none")).unwrap();
    n1.wait_pod_event("pod unenrolled", "shop/app", 1).unwrap();
    assert_eq!(gauge(&bed, "n1", "ambit_config_errors"), "0", "fixed");
    curl(&bed, "shop/app", &url).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(captured(&n1), 2, "opted-out pod is not captured: {:?}", n1.connections());
    assert_eq!(delivery_routing(&bed, "shop/app"), (false, false), "the pod's netns is left as it was");
}

/// Whether a pod's netns has the agent's routing for deliveries: the rule
/// for delivery-marked packets, and `tcp_fwmark_accept` on.
fn delivery_routing(bed: &Bed, pod: &str) -> (bool, bool) {
    let rules = bed.run_ok(pod, "ip", &["rule", "show"]).unwrap();
    let accept = bed.run_ok(pod, "cat", &["/proc/sys/net/ipv4/tcp_fwmark_accept"]).unwrap();
    (rules.contains("lookup 15006"), accept.trim() == "1")
}

#[test]
fn two_hundred_concurrent_connections_through_one_pod() {
    let Some(mut bed) = bed() else { return };
    bed.add_pod("n1", "shop", "client").unwrap();
    let web = bed.add_pod("n2", "shop", "web").unwrap();
    let mut n1 = agent(&bed, "n1");
    let mut n2 = agent(&bed, "n2");
    n1.wait_pod_event("pod enrolled", "shop/client", 0).unwrap();
    n2.wait_pod_event("pod enrolled", "shop/web", 0).unwrap();
    let file_bytes = 256 * 1024;
    let (root, sum) = web_root(&bed, file_bytes);
    bed.http_server("shop/web", HTTP_PORT, &root, &bed.scratch().join("web.log")).unwrap();

    let out_dir = bed.scratch().join("parallel");
    std::fs::create_dir(&out_dir).unwrap();
    let url = format!("http://{}:{HTTP_PORT}/big.bin?n=[1-200]", web.ip);
    let output = format!("{}/#1", out_dir.display());
    bed.run_ok(
        "shop/client",
        "curl",
        &[
            "-sS",
            "--fail",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "200",
            "--max-time",
            "60",
            "-o",
            &output,
            &url,
        ],
    )
    .context("200 parallel downloads")
    .unwrap();
    for n in 1..=200 {
        assert_eq!(sha256(&out_dir.join(n.to_string())), sum, "download {n}");
    }
    let dst = format!("{}:{HTTP_PORT}", web.ip);
    let outbound = n1.wait_connections(200, |c| c.dst_addr == dst).unwrap();
    assert!(outbound.iter().all(|c| c.error.is_none() && c.bytes_received >= file_bytes as u64));
    let inbound = n2.wait_connections(200, |c| c.dst_addr == dst).unwrap();
    assert!(inbound.iter().all(|c| c.error.is_none() && c.src_workload == "shop/client"));
}

#[test]
fn agent_refuses_to_start_without_a_cgroup_v2_directory() {
    let Some(bed) = bed() else { return };
    let not_a_cgroup = bed.scratch().to_path_buf();
    let mut agent = bed.start_agent_attached_at("n1", &not_a_cgroup, &[]).unwrap();
    let status = agent.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(!status.success());
    let log = agent.log_text();
    assert!(log.contains("this node cannot run ambit") && log.contains("must be a cgroup v2 directory"), "{log}");
}

#[test]
fn connection_churn_outlasts_the_server_pods_port_range() {
    // Every delivery leaves a TIME_WAIT in the server pod (the agent closes
    // first, like the client did). With the pod's port range cut to 500,
    // a thousand and more short connections from one client must all pass:
    // deliveries reuse TIME_WAIT tuples, as the client's own kernel does.
    let Some(mut bed) = bed() else { return };
    let client = bed.add_pod("n1", "shop", "client").unwrap();
    let server = bed.add_pod("n1", "shop", "server").unwrap();
    // Read by the agent at enrolment: deliveries take their ports from it.
    bed.run_ok("shop/server", "sysctl", &["-qw", "net.ipv4.ip_local_port_range=40000 40499"]).unwrap();
    let mut n1 = agent(&bed, "n1");
    n1.wait_pod_event("pod enrolled", "shop/server", 0).unwrap();
    n1.wait_pod_event("pod enrolled", "shop/client", 0).unwrap();
    let tool = env!("CARGO_BIN_EXE_ambit-bench");
    let echo = format!("{}:7000", server.ip);
    bed.spawn("shop/server", tool, &["echo", "--listen", &echo]).unwrap();
    bed.wait_listening("shop/server", 7000).unwrap();
    // Enrolment comes before the certificates; without them the client's
    // first connections are refused (fail closed), which is not under test.
    wait_nodes_ready(&bed, &["n1"]);

    let report = bed.run_ok("shop/client", tool, &["connrate", "--to", &echo, "--seconds", "3"]).unwrap();
    let report: Value = serde_json::from_str(report.trim()).unwrap();
    let rate = report["connections_per_sec"].as_f64().unwrap();
    assert!(rate * 3.0 > 1000.0, "well past the 500 ports: {report}");
    let errors: Vec<_> = n1.connections().into_iter().filter_map(|c| c.error).take(3).collect();
    assert_eq!(report["failed"], 0, "{report} {errors:?}");
    let time_wait = bed.run_ok("shop/server", "ss", &["-Htan", "state", "time-wait"]).unwrap();
    assert!(time_wait.lines().all(|l| l.contains(&client.ip.to_string())), "delivered from the client's address");
}

/// Dual-stack pods (IPv4 and IPv6 in `podIPs`): a client dials the
/// server's IPv6 address, the source tunnel captures it and carries it over
/// HBONE on IPv6, and the app sees the client pod's own IPv6 address. The
/// IPv4 path of the same pods keeps working alongside.
#[test]
fn dual_stack_pods_tunnel_ipv6_and_apps_see_the_client_address() {
    let Some(mut bed) = ambit_testbed::dual_stack_bed_or_skip(&["n1", "n2"]) else { return };
    bed.namespace("shop", true).unwrap();
    let client = bed.add_pod("n1", "shop", "client").unwrap();
    let web = bed.add_pod("n2", "shop", "web").unwrap();
    let _n1 = agent(&bed, "n1");
    let mut n2 = agent(&bed, "n2");
    wait_nodes_ready(&bed, &["n1", "n2"]);
    let (root, _) = web_root(&bed, 1024);
    let log = bed.scratch().join("web.log");
    bed.http_server_at("shop/web", "::", HTTP_PORT, &root, &log).unwrap();
    let (client6, web6) = (client.ip6.unwrap(), web.ip6.unwrap());

    curl(&bed, "shop/client", &format!("http://[{web6}]:{HTTP_PORT}/index.html")).unwrap();
    curl(&bed, "shop/client", &format!("http://{}:{HTTP_PORT}/index.html", web.ip)).unwrap();
    let records = n2.wait_connections(2, |c| c.direction == "inbound" && c.src_workload == "shop/client").unwrap();
    let over_v6 = records.iter().find(|c| c.dst_addr == format!("[{web6}]:{HTTP_PORT}")).expect("the IPv6 connection");
    assert!(over_v6.mtls && over_v6.src_identity == "spiffe://cluster.local/ns/shop/sa/client", "{over_v6:?}");
    assert!(over_v6.src_addr.starts_with(&format!("[{client6}]:")), "{over_v6:?}");
    let access = std::fs::read_to_string(&log).unwrap();
    assert!(
        access.lines().any(|l| l.starts_with(&format!("{client6} - -"))),
        "the app sees the client's IPv6: {access}"
    );
    assert!(access.lines().any(|l| l.starts_with(&format!("::ffff:{} - -", client.ip))), "and its IPv4: {access}");
}
