//! End-to-end tests of the same-node fast path: two ambient pods on one
//! node, their connection checked by the agent and joined in the kernel
//! (`ambit_splice`). Real agent, real kernel programs, real sockets; the
//! traffic tools are `ambit-bench`'s pattern writer and checker.

mod common;

use std::{
    fs::File,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use ambit_testbed::{Agent, Bed, ConnectionRecord};
use common::*;
use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_ambit-bench");
const PORT: u16 = 7000;

/// shop/client and shop/web on n1, with its agent; web's IP.
fn client_and_web(bed: &mut Bed) -> (Agent, String) {
    bed.add_pods(&[("n1", "shop/client"), ("n1", "shop/web")]).unwrap();
    let n1 = agent(bed, "n1");
    wait_nodes_ready(bed, &["n1"]);
    (n1, bed.pod("shop/web").ip.to_string())
}

/// Starts an `ambit-bench` server in `pod`, its output in the scratch dir.
fn server(bed: &Bed, pod: &str, name: &str, args: &[&str]) -> (Child, std::path::PathBuf) {
    let out = bed.scratch().join(format!("{name}.out"));
    let child = bed
        .pod(pod)
        .command(BENCH)
        .args(args)
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(bed.scratch().join(format!("{name}.err"))).unwrap())
        .spawn()
        .unwrap();
    bed.wait_listening(pod, PORT).unwrap();
    (child, out)
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The client's record of its connections to web (reporter: source).
fn outbound(n1: &mut Agent, n: usize) -> Vec<ConnectionRecord> {
    n1.wait_connections(n, |c| c.direction == "outbound" && c.dst_workload == "shop/web").unwrap()
}

/// Bytes the agent's sockets on `port` hold in `pod`'s kernel (`ss -tm`:
/// receive queue `r` and send queue `w`). Only the joined sockets count:
/// the one accepted on 15001 (client side), or the one connected to the
/// server's `port` (server side).
fn agent_socket_memory(bed: &Bed, pod: &str, port: u16) -> u64 {
    let out = bed.pod(pod).command("ss").args(["-tmnH"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local = fields.get(3).copied().unwrap_or_default();
        let peer = fields.get(4).copied().unwrap_or_default();
        let agent_side = local.ends_with(":15001") || peer.ends_with(&format!(":{port}"));
        let skmem = if line.contains("skmem:") {
            line.to_string()
        } else {
            lines.peek().map(|l| l.to_string()).unwrap_or_default()
        };
        if !agent_side {
            continue;
        }
        let field = |name: &str| -> u64 {
            skmem
                .split(['(', ',', ')'])
                .find_map(|f| f.strip_prefix(name).filter(|v| v.chars().all(|c| c.is_ascii_digit())))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        total += field("r") + field("w");
    }
    total
}

/// The first bytes of each side arrive first, whole and in order: both
/// apps write at once (the server speaks first too), so bytes are queued
/// on the agent's sockets while they are being joined. Every connection is
/// carried in the kernel and counted, and the half-close passes through.
#[test]
fn the_first_bytes_arrive_in_order_both_ways_and_are_counted() {
    let Some(mut bed) = bed() else { return };
    let (mut n1, web) = client_and_web(&mut bed);
    let to = format!("{web}:{PORT}");
    const SIZES: [u64; 4] = [1, 1000, 100_000, 4_000_000];
    let (mut srv, _) = server(
        &bed,
        "shop/web",
        "seq-1",
        &["sequence-server", "--listen", &format!("0.0.0.0:{PORT}"), "--bytes", "1000000"],
    );
    for round in 0..5 {
        for bytes in SIZES {
            let out =
                bed.run_ok("shop/client", BENCH, &["sequence-client", "--to", &to, "--bytes", &bytes.to_string()]);
            let out = out.unwrap_or_else(|e| panic!("round {round}, {bytes} bytes: {e:#}\n{}", n1.log_text()));
            let report = &json_lines(&out)[0];
            assert_eq!(report["read"], 1_000_000, "{out}");
        }
    }
    let _ = srv.kill();
    let records = outbound(&mut n1, 20);
    // A client that half-closes before its connection is joined is
    // relayed in user space (the kernel joins established sockets only);
    // one that writes 4 MB cannot have: the agent reads nothing before.
    for (i, record) in records.iter().enumerate() {
        if SIZES[i % SIZES.len()] == 4_000_000 {
            assert!(record.fast_path.starts_with("kernel"), "{record:?}");
        }
        assert!(record.mtls && record.decision == "allow" && record.error.is_none(), "{record:?}");
        assert_eq!(record.bytes_sent, SIZES[i % SIZES.len()], "{record:?}");
        assert_eq!(record.bytes_received, 1_000_000, "{record:?}");
    }
    // The destination reporter counts them too.
    let inbound = n1.wait_connections(20, |c| c.direction == "inbound" && c.dst_workload == "shop/web").unwrap();
    assert!(inbound.iter().all(|c| c.fast_path != "-" && c.src_identity.ends_with("/sa/client")), "{inbound:?}");
    let (_, metrics) = bed.admin_get("n1", "/metrics").unwrap();
    assert!(metrics.contains("ambit_tcp_received_bytes_total"), "{metrics}");
}

/// A fast writer and a reader that does not read: the kernel takes a
/// bounded amount (the buffers on the way), then the writer is held back
/// by TCP flow control; nothing is lost, and it all arrives in order once
/// the reader reads.
#[test]
fn a_slow_reader_holds_back_a_fast_writer_with_bounded_memory() {
    let Some(mut bed) = bed() else { return };
    let (mut n1, web) = client_and_web(&mut bed);
    let (mut sink, sink_out) = server(
        &bed,
        "shop/web",
        "sink",
        &["sink", "--listen", &format!("0.0.0.0:{PORT}"), "--rcvbuf", "65536", "--hold-ms", "6000"],
    );
    let flood = bed
        .pod("shop/client")
        .command(BENCH)
        .args(["flood", "--to", &format!("{web}:{PORT}"), "--sndbuf", "65536", "--seconds", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // While the writer is held: what the agent's joined sockets hold.
    let held = agent_socket_memory(&bed, "shop/client", PORT) + agent_socket_memory(&bed, "shop/web", PORT);
    let out = flood.wait_with_output().unwrap();
    let taken = json_lines(&String::from_utf8_lossy(&out.stdout))[0]["taken"].as_u64().unwrap();
    eprintln!("the writer's kernel took {taken} bytes; the agent's sockets held {held} bytes");
    // The writer's own send buffer (64 KiB, doubled), the two joined
    // sockets' 256 KiB buffers (doubled), the reader's 64 KiB (doubled):
    // about 1.3 MB. A path without a bound would take gigabytes in 3 s.
    assert!(taken < 3 * 1024 * 1024, "the writer parked {taken} bytes");
    assert!(held < 2 * 1024 * 1024, "the agent's sockets held {held} bytes");
    let started = Instant::now();
    let status = sink.wait().unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(bed.scratch().join("sink.err")).unwrap());
    let read = json_lines(&std::fs::read_to_string(&sink_out).unwrap())[0]["read"].as_u64().unwrap();
    assert_eq!(read, taken, "every byte taken arrives, in order");
    assert!(started.elapsed() < Duration::from_secs(15));
    // Past its budget the direction was handed to the agent, which moved
    // the rest once the reader read.
    let record = &outbound(&mut n1, 1)[0];
    assert_eq!((record.fast_path.as_str(), record.bytes_sent), ("kernel, then relay", taken), "{record:?}");
}

/// A policy change that denies an open fast-path connection cuts it, as
/// it does an HBONE one: both apps see a reset, and it is logged as revoked.
#[test]
fn revoking_access_cuts_a_fast_path_connection() {
    let Some(mut bed) = bed() else { return };
    let (mut n1, web) = client_and_web(&mut bed);
    bed.iperf3_server("shop/web", IPERF_PORT).unwrap();
    let mut transfer = bed
        .pod("shop/client")
        .command("iperf3")
        .args(["-c", &web, "-p", &IPERF_PORT.to_string(), "-t", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    bed.write_config(
        "deny.yaml",
        "apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/client]\n",
    )
    .unwrap();
    n1.wait_applied(0).unwrap();
    let denied = Instant::now();
    let status = transfer.wait().unwrap();
    assert!(!status.success(), "the open transfer is cut");
    assert!(denied.elapsed() < Duration::from_secs(5), "cut promptly: {:?}", denied.elapsed());
    // iperf3's two connections are both cut; when one is, iperf3 may
    // reset the other before its own revocation is handled.
    let revoked = |c: &ConnectionRecord| c.error.as_deref().is_some_and(|e| e.starts_with("access revoked: denied"));
    let cut = n1.wait_connections(1, |c| c.direction == "outbound" && c.decision == "deny" && revoked(c)).unwrap();
    assert!(cut[0].fast_path.starts_with("kernel"), "{cut:?}");
    let data = n1.wait_connections(1, |c| c.direction == "outbound" && c.bytes_sent > 10_000_000).unwrap();
    assert!(data[0].decision != "allow" && data[0].fast_path.starts_with("kernel"), "{data:?}");
    // A new connection is refused before it reaches the server.
    let refused =
        bed.run("shop/client", BENCH, &["sequence-client", "--to", &format!("{web}:{IPERF_PORT}"), "--bytes", "1"]);
    assert!(!refused.unwrap().status.success(), "a new connection is denied");
    let denied =
        n1.wait_connections(1, |c| c.direction == "outbound" && c.decision == "deny" && c.bytes_sent == 0).unwrap();
    assert!(denied[0].error.as_deref().unwrap_or_default().contains("deny-client"), "{denied:?}");
}
