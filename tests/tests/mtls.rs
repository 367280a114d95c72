//! End-to-end tests of identity and the mTLS tunnel (HBONE) between pods:
//! what crosses the wire, who is rejected, rotation, pooling, services and
//! PeerAuthentication. Real agents, the real CA, real clients (curl,
//! iperf3, openssl s_client/s_server, tcpdump).

mod common;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use ambit_testbed::{Agent, Bed, wait_until};
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

const TD: &str = "spiffe://cluster.local";

fn spiffe(ns: &str, sa: &str) -> String {
    format!("{TD}/ns/{ns}/sa/{sa}")
}

/// Waits until `agent` holds a certificate for `identity`; returns its serial.
fn wait_certificate(agent: &Agent, identity: &str, nth: usize) -> String {
    let mut serial = String::new();
    wait_until(Duration::from_secs(20), &format!("certificate #{nth} for {identity}"), || {
        let obtained: Vec<String> = certificates(agent, identity);
        if let Some(s) = obtained.get(nth) {
            serial = s.clone();
            return Ok(true);
        }
        Ok(false)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_text()));
    serial
}

/// Field `field` of every log line of `agent` with `message` that `keep` accepts, in order.
fn logged(agent: &Agent, message: &str, field: &str, keep: impl Fn(&serde_json::Value) -> bool) -> Vec<String> {
    agent
        .lines()
        .iter()
        .filter(|l| l["message"] == message && keep(l))
        .map(|l| l[field].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Serials of the certificates `agent` obtained for `identity`, in order.
fn certificates(agent: &Agent, identity: &str) -> Vec<String> {
    logged(agent, "certificate obtained", "serial", |l| l["identity"] == identity)
}

/// Serials of the client certificates `agent` accepted on HBONE, in order.
fn accepted_serials(agent: &Agent) -> Vec<String> {
    logged(agent, "mTLS connection accepted", "peer_serial", |_| true)
}

fn rejections(agent: &Agent) -> Vec<String> {
    logged(agent, "HBONE connection rejected", "error", |_| true)
}

/// A bed with shop/client on n1 and shop/web on n2 serving `root`, both
/// agents up and both certificates issued.
fn client_and_web(bed: &mut Bed, big_bytes: usize) -> (Agent, Agent, String, String) {
    client_and_web_with(bed, big_bytes, &[])
}

/// [`client_and_web`], with more arguments for n1's agent.
fn client_and_web_with(bed: &mut Bed, big_bytes: usize, n1_args: &[&str]) -> (Agent, Agent, String, String) {
    bed.add_pod("n1", "shop", "client").unwrap();
    let web = bed.add_pod("n2", "shop", "web").unwrap();
    let mut n1 = bed.start_agent_with("n1", n1_args).unwrap();
    n1.wait_ready().unwrap();
    let n2 = agent(bed, "n2");
    wait_certificate(&n1, &spiffe("shop", "client"), 0);
    wait_certificate(&n2, &spiffe("shop", "web"), 0);
    let (root, sum) = web_root(bed, big_bytes);
    bed.http_server("shop/web", HTTP_PORT, &root, &bed.scratch().join("web.log")).unwrap();
    (n1, n2, format!("http://{}:{HTTP_PORT}", web.ip), sum)
}

#[test]
fn cross_node_traffic_is_mutual_tls_and_opaque_on_the_wire() {
    let Some(mut bed) = bed() else { return };
    let (n1, n2, base, big_sum) = client_and_web(&mut bed, BIG_FILE_BYTES);
    let web_ip = bed.pod("shop/web").ip.to_string();
    let marker = "AMBIT-CLEARTEXT-MARKER-4f2a9c";
    let www = bed.scratch().join("www");
    std::fs::write(www.join(format!("{marker}.txt")), format!("{marker}\n").repeat(1000)).unwrap();
    bed.iperf3_server("shop/web", IPERF_PORT).unwrap();

    // Watch the link between the nodes for the whole exchange.
    let wire = WireCapture::start(&bed, "between-nodes");

    let page = curl(&bed, "shop/client", &format!("{base}/{marker}.txt")).unwrap();
    assert!(page.starts_with(marker));
    assert_eq!(curl_sha256(&bed, "shop/client", &format!("{base}/big.bin")), big_sum);
    assert!(iperf3(&bed, "shop/client", &web_ip, false) > 1_000_000);
    assert!(iperf3(&bed, "shop/client", &web_ip, true) > 1_000_000);
    let (raw, lines) = wire.stop();
    assert!(raw.len() > BIG_FILE_BYTES, "the capture saw the transfers ({} bytes)", raw.len());
    assert!(!contains(&raw, marker.as_bytes()), "the payload marker crossed the wire in clear");
    assert!(lines.len() > 100, "{} packets", lines.len());
    let not_hbone: Vec<&String> = lines.iter().filter(|l| !l.contains(&format!("{web_ip}.15008"))).collect();
    assert!(
        not_hbone.is_empty(),
        "only HBONE (port 15008) crosses between the nodes: {:?}",
        &not_hbone[..not_hbone.len().min(5)]
    );

    // Each tunnel logged the verified identity of the other side.
    let dst = format!("{web_ip}:{HTTP_PORT}");
    for record in n1.connections().iter().filter(|c| c.dst_addr == dst) {
        assert!(record.mtls, "{record:?}");
        assert_eq!(record.src_identity, spiffe("shop", "client"));
        assert_eq!(record.dst_identity, spiffe("shop", "web"), "the server's verified SPIFFE ID, at the source");
    }
    let inbound: Vec<_> = n2.connections().into_iter().filter(|c| c.dst_addr == dst).collect();
    assert_eq!(inbound.len(), 2, "{inbound:?}");
    for record in inbound {
        assert!(record.mtls && record.error.is_none(), "{record:?}");
        assert_eq!(
            record.src_identity,
            spiffe("shop", "client"),
            "the client's verified SPIFFE ID, at the destination"
        );
        assert_eq!(record.src_workload, "shop/client");
    }
}

fn nix_kill(pid: u32) -> std::io::Result<()> {
    let status = Command::new("kill").args(["-INT", &pid.to_string()]).status()?;
    if status.success() { Ok(()) } else { Err(std::io::Error::other("kill failed")) }
}

/// Certificates a test makes itself: signed by the mesh's real root (read
/// from the CA's directory), or by a CA of its own.
struct Minter {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
}

impl Minter {
    fn mesh_root(bed: &Bed) -> Self {
        let key = KeyPair::from_pem(&std::fs::read_to_string(bed.ca_dir().join("root.key")).unwrap()).unwrap();
        let root = std::fs::read_to_string(bed.ca_dir().join("root.pem")).unwrap();
        Self { issuer: Issuer::from_ca_cert_pem(&root, key).unwrap(), dir: bed.scratch().to_path_buf() }
    }

    fn other_root(bed: &Bed) -> Self {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(TD.try_into().unwrap())];
        Self { issuer: Issuer::new(params, KeyPair::generate().unwrap()), dir: bed.scratch().to_path_buf() }
    }

    /// A leaf for `id`, valid from `not_before` to `not_after`; returns the
    /// certificate and key PEM files.
    fn leaf(&self, name: &str, id: &str, not_before: SystemTime, not_after: SystemTime) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_file, key_file) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}.key")));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }

    fn valid(&self, name: &str, id: &str) -> (PathBuf, PathBuf) {
        let now = SystemTime::now();
        self.leaf(name, id, now - Duration::from_secs(60), now + Duration::from_secs(3600))
    }
}

/// Dials `target` (ip:port) from `pod` with openssl, presenting `cert`.
fn present(bed: &Bed, pod: &str, target: &str, (cert, key): &(PathBuf, PathBuf)) {
    let _ = bed
        .pod(pod)
        .command("timeout")
        .args(["10", "openssl", "s_client", "-quiet", "-alpn", "h2", "-connect", target, "-cert"])
        .arg(cert)
        .arg("-key")
        .arg(key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[test]
fn untrusted_expired_and_misused_client_certificates_are_rejected() {
    let Some(mut bed) = bed() else { return };
    bed.add_pod("n1", "legacy", "attacker").unwrap();
    let (_n1, mut n2, _, _) = client_and_web(&mut bed, 1024);
    let target = format!("{}:15008", bed.pod("shop/web").ip);
    let client_id = spiffe("shop", "client");
    let now = SystemTime::now();

    let cases: Vec<(&str, (PathBuf, PathBuf), &str)> = vec![
        ("another CA", Minter::other_root(&bed).valid("foreign", &client_id), "UnknownIssuer"),
        (
            "an expired certificate",
            Minter::mesh_root(&bed).leaf(
                "expired",
                &client_id,
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            ),
            "certificate expired",
        ),
        // A genuine certificate of shop/client, used from another pod's address.
        ("a stolen identity", Minter::mesh_root(&bed).valid("stolen", &client_id), "the address of a pod running as"),
    ];
    for (i, (case, cert, reason)) in cases.iter().enumerate() {
        present(&bed, "legacy/attacker", &target, cert);
        wait_until(Duration::from_secs(10), case, || Ok(rejections(&n2).len() > i))
            .unwrap_or_else(|e| panic!("{case}: {e:#}\n{}", n2.log_text()));
        let logged = &rejections(&n2)[i];
        assert!(logged.contains(reason), "{case}: rejected for `{logged}`, expected `{reason}`");
    }
    assert!(accepted_serials(&n2).is_empty(), "none of them got a tunnel");
    let counters = stop_and_read_counters(&mut n2);
    assert_eq!(counter(&counters, "mtls_rejected"), 3, "{counters:?}");
}

/// `openssl s_server` on `pod`'s port 15008 with a genuine certificate of
/// `identity` (ALPN h2), which completes TLS and then never says a word.
fn silent_tls_server(bed: &Bed, pod: &str, identity: &str) -> std::process::Child {
    let name = identity.rsplit('/').next().unwrap();
    let (cert, key) = Minter::mesh_root(bed).valid(name, identity);
    let s_server = bed
        .pod(pod)
        .command("openssl")
        .args(["s_server", "-quiet", "-alpn", "h2", "-accept", "15008", "-cert"])
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    bed.wait_listening(pod, 15008).unwrap();
    s_server
}

#[test]
fn a_server_with_an_unexpected_identity_is_rejected() {
    let Some(mut bed) = bed() else { return };
    bed.add_pod("n1", "shop", "client").unwrap();
    // shop/fake is ambient and runs as shop/fake, but node n2 has no agent:
    // an impostor answers on its HBONE port with a genuine certificate of
    // another identity.
    let fake = bed.add_pod("n2", "shop", "fake").unwrap();
    let mut n1 = agent(&bed, "n1");
    wait_certificate(&n1, &spiffe("shop", "client"), 0);
    let mut s_server = silent_tls_server(&bed, "shop/fake", &spiffe("shop", "impostor"));

    let failed = curl(&bed, "shop/client", &format!("http://{}:{HTTP_PORT}/", fake.ip));
    let _ = s_server.kill();
    let _ = s_server.wait();
    assert!(failed.is_err(), "the client must not reach the impostor");
    let records = n1.wait_connections(1, |c| c.dst_workload == "shop/fake").unwrap();
    let error = records[0].error.clone().unwrap_or_default();
    assert!(
        error.contains(&format!("server is {}", spiffe("shop", "impostor"))) && error.contains(&spiffe("shop", "fake")),
        "{error}"
    );
}

/// Accepts TCP on :15008 and never says a word: a frozen agent, as far as
/// its peers can tell.
const SILENT_LISTENER: &str = "import socket\n\
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
s.bind(('0.0.0.0', 15008)); s.listen(64); held = []\n\
while True: held.append(s.accept())";

/// Connects to argv[1]:15008, sends nothing, and prints the seconds until
/// the other side closes.
const SILENT_CALLER: &str = "import socket, sys, time\n\
s = socket.create_connection((sys.argv[1], 15008)); t = time.monotonic()\n\
try:\n    while s.recv(4096): pass\nexcept OSError: pass\n\
print(time.monotonic() - t)";

/// Seconds `curl` in `from` took to fail on `url`; panics if it succeeded.
fn seconds_to_fail(bed: &Bed, from: &str, url: &str) -> f64 {
    let started = std::time::Instant::now();
    let out = bed.run(from, "curl", &["-sS", "--max-time", "40", url]).unwrap();
    assert!(!out.status.success(), "{url} must fail");
    started.elapsed().as_secs_f64()
}

#[test]
fn peers_that_accept_and_then_say_nothing_are_given_up_on_in_bounded_time() {
    let Some(mut bed) = bed() else { return };
    bed.add_pods(&[("n1", "shop/client"), ("n1", "legacy/prober"), ("n2", "shop/fake")]).unwrap();
    // n2 has no agent: shop/fake's :15008 is whatever the test puts there.
    let mut n1 = agent(&bed, "n1");
    wait_certificate(&n1, &spiffe("shop", "client"), 0);
    let url = format!("http://{}:{HTTP_PORT}/", bed.pod("shop/fake").ip);

    // A caller that says nothing to n1's HBONE port is closed after the
    // handshake timeout (10 s), while a destination that says nothing
    // fails the outbound connection after the same timeout.
    let client_ip = bed.pod("shop/client").ip.to_string();
    let mut prober = bed.pod("legacy/prober").command("python3");
    prober.args(["-c", SILENT_CALLER, &client_ip]);
    let listener = bed.spawn("shop/fake", "python3", &["-c", SILENT_LISTENER]).unwrap();
    bed.wait_listening("shop/fake", 15008).unwrap();
    let (silent_caller, outbound) = std::thread::scope(|scope| {
        let caller = scope.spawn(move || prober.output().unwrap());
        let outbound = seconds_to_fail(&bed, "shop/client", &url);
        (caller.join().unwrap(), outbound)
    });
    let closed_after: f64 = String::from_utf8_lossy(&silent_caller.stdout).trim().parse().unwrap_or_else(|_| {
        panic!("{}{}", String::from_utf8_lossy(&silent_caller.stdout), String::from_utf8_lossy(&silent_caller.stderr))
    });
    assert!((9.5..15.0).contains(&closed_after), "silent caller closed after {closed_after} s");
    let refused = logged(&n1, "HBONE connection rejected", "error", |_| true);
    assert!(refused.iter().any(|e| e.contains("no mTLS handshake within 10s")), "{refused:?}");
    assert!((9.5..15.0).contains(&outbound), "outbound failed after {outbound} s");
    let records = n1.wait_connections(1, |c| c.dst_workload == "shop/fake").unwrap();
    let error = records[0].error.clone().unwrap_or_default();
    assert!(error.contains("did not finish the mTLS and HTTP/2 handshakes within 10s"), "{error}");

    // Past TLS (a genuine certificate of shop/fake) but no answer to
    // CONNECT: the stream fails after the response timeout (15 s), and the
    // silent connection leaves the pool instead of trapping the next stream.
    nix_kill(listener).unwrap();
    wait_until(Duration::from_secs(5), "the silent listener to go", || {
        Ok(bed.run_ok("shop/fake", "ss", &["-Hltn", "sport = :15008"])?.trim().is_empty())
    })
    .unwrap();
    let mut s_server = silent_tls_server(&bed, "shop/fake", &spiffe("shop", "fake"));
    let unanswered = seconds_to_fail(&bed, "shop/client", &url);
    let records = n1.wait_connections(2, |c| c.dst_workload == "shop/fake").unwrap();
    let error = records[1].error.clone().unwrap_or_default();
    assert!(error.contains("did not answer CONNECT within 15s"), "{error}");
    assert!((14.5..20.0).contains(&unanswered), "CONNECT given up after {unanswered} s");
    let to_fake = format!("( dport = :15008 and dst {} )", bed.pod("shop/fake").ip);
    wait_until(Duration::from_secs(5), "the silent connection to close", || {
        let established = bed.run_ok("shop/client", "ss", &["-Htn", "state", "established", &to_fake])?;
        Ok(established.trim().is_empty())
    })
    .unwrap();
    let _ = s_server.kill();
    let _ = s_server.wait();
}

#[test]
fn certificates_rotate_under_open_connections_and_survive_a_ca_outage() {
    let Some(mut bed) = bed() else { return };
    bed.start_ca("4s").unwrap();
    let (mut n1, n2, base, _) = client_and_web(&mut bed, 1024);
    let client_id = spiffe("shop", "client");

    let first = n1
        .lines()
        .into_iter()
        .find(|l| l["message"] == "certificate obtained" && l["identity"] == client_id.as_str())
        .unwrap();
    assert!(first["valid_for_secs"].as_u64().unwrap() <= 5, "the CA issues 4 s certificates: {first}");

    // One connection carrying data for 8 s: several rotations happen under it.
    bed.iperf3_server("shop/web", IPERF_PORT).unwrap();
    let web_ip = bed.pod("shop/web").ip.to_string();
    let started = std::time::Instant::now();
    let report = bed
        .run_ok("shop/client", "iperf3", &["-c", &web_ip, "-p", &IPERF_PORT.to_string(), "-t", "8", "-b", "50M", "-J"])
        .unwrap();
    let took = started.elapsed();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap();
    assert!(received > 40_000_000, "the long connection kept working: {received} bytes in {took:?}");
    let obtained = certificates(&n1, &client_id);
    assert!(
        obtained.len() >= 3,
        "rotated during the {took:?} connection: {obtained:?}\nCA log:\n{}\nagent log:\n{}",
        std::fs::read_to_string(bed.ca_log()).unwrap_or_default(),
        n1.log_text()
    );

    // A new connection after a rotation presents the new certificate.
    let before = accepted_serials(&n2).len();
    let latest = wait_certificate(&n1, &client_id, obtained.len());
    curl(&bed, "shop/client", &format!("{base}/index.html")).unwrap();
    let accepted = accepted_serials(&n2);
    assert!(accepted.len() > before, "a new TLS connection was made: {accepted:?}");
    let newest = accepted.last().unwrap();
    assert!(newest == &latest || certificates(&n1, &client_id).contains(newest), "{newest} vs {latest}");
    assert!(!obtained[..obtained.len() - 1].contains(newest), "new connections do not use retired certificates");

    // CA outage: traffic goes on with the current certificate until it expires.
    let serial = wait_certificate(&n1, &client_id, certificates(&n1, &client_id).len());
    bed.stop_ca().unwrap();
    curl(&bed, "shop/client", &format!("{base}/index.html")).expect("works while the certificate is valid");
    n1.wait_for("renewal failure reported", Duration::from_secs(10), |l| {
        l["message"] == "certificate renewal failed; the current certificate stays in use until it expires"
            && l["serial"] == serial.as_str()
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert!(curl(&bed, "shop/client", &format!("{base}/index.html")).is_err(), "fails closed once it has expired");
    let failure = n1.connections().into_iter().last().unwrap();
    assert!(failure.error.unwrap_or_default().contains("no valid certificate"));

    // Both ends' certificates expired during the outage: both must be renewed.
    bed.start_ca("4s").unwrap();
    let web_id = spiffe("shop", "web");
    wait_certificate(&n1, &client_id, certificates(&n1, &client_id).len());
    wait_certificate(&n2, &web_id, certificates(&n2, &web_id).len());
    curl(&bed, "shop/client", &format!("{base}/index.html")).expect("recovers when the CA is back");
}

#[test]
fn a_thousand_short_connections_share_a_few_tls_handshakes() {
    let Some(mut bed) = bed() else { return };
    let (mut n1, n2, base, _) = client_and_web(&mut bed, 1024);
    // HTTP/1.0 (Python's server) closes after each response: 1000 TCP connections.
    bed.run_ok("shop/client", "curl", &["-sS", "--fail", "-o", "/dev/null", &format!("{base}/index.html?n=[1-1000]")])
        .unwrap();
    let dst = format!("{}:{HTTP_PORT}", bed.pod("shop/web").ip);
    let mut n2 = n2;
    n2.wait_connections(1000, |c| c.dst_addr == dst && c.mtls).unwrap();
    let counters = stop_and_read_counters(&mut n1);
    let (handshakes, streams) = (counter(&counters, "hbone_handshakes"), counter(&counters, "hbone_streams"));
    assert!(streams >= 1000, "{counters:?}");
    assert!(handshakes * 100 <= streams, "{handshakes} handshakes for {streams} connections");
    assert_eq!(accepted_serials(&n2).len() as u64, handshakes, "the destination saw as many TLS connections");
}

#[test]
fn connections_opened_together_share_one_tls_handshake_per_worker() {
    let Some(mut bed) = bed() else { return };
    let (mut n1, n2, base, _) = client_and_web(&mut bed, 1024);
    // 24 connections at once into an empty pool: on each proxy worker the
    // first one dials and the others wait for its connection and share it.
    let urls = format!("{base}/index.html?n=[1-24]");
    bed.run_ok(
        "shop/client",
        "curl",
        &["-sS", "--fail", "--parallel", "--parallel-immediate", "--parallel-max", "24", "-o", "/dev/null", &urls],
    )
    .unwrap();
    let mut n2 = n2;
    let dst = format!("{}:{HTTP_PORT}", bed.pod("shop/web").ip);
    n2.wait_connections(24, |c| c.dst_addr == dst && c.mtls).unwrap();
    // Both ends of the pooled connections probe them once idle (`ss -o`
    // shows the keepalive timer when no retransmission is pending), so a
    // peer that vanished without a FIN is found.
    for (pod, filter) in [("shop/client", "( dport = :15008 )"), ("shop/web", "( sport = :15008 )")] {
        wait_until(Duration::from_secs(5), &format!("{pod}: keepalive timers"), || {
            let timers = bed.run_ok(pod, "ss", &["-Htno", "state", "established", filter])?;
            Ok(!timers.is_empty() && timers.lines().all(|l| l.contains("timer:(keepalive")))
        })
        .unwrap();
    }
    let started = n1.lines().into_iter().find(|l| l["message"] == "proxy workers started").unwrap();
    let workers = started["workers"].as_u64().unwrap();
    let counters = stop_and_read_counters(&mut n1);
    let (handshakes, streams) = (counter(&counters, "hbone_handshakes"), counter(&counters, "hbone_streams"));
    assert_eq!(streams, 24, "{counters:?}");
    assert!(handshakes <= workers, "{handshakes} handshakes for 24 streams opened together on {workers} workers");
    assert_eq!(accepted_serials(&n2).len() as u64, handshakes, "the destination saw as many TLS connections");
}

#[test]
fn pooled_connections_close_when_idle() {
    let Some(mut bed) = bed() else { return };
    let (mut n1, _n2, base, _) = client_and_web_with(&mut bed, 1024, &["--hbone-idle-timeout", "1s"]);
    let tunnels = || {
        let established = ["-Htn", "state", "established", "( dport = :15008 )"];
        bed.run_ok("shop/client", "ss", &established).unwrap().lines().count()
    };
    let url = format!("{base}/index.html");
    for round in 1..=2 {
        bed.run_ok("shop/client", "curl", &["-sS", "--fail", "-o", "/dev/null", &url]).unwrap();
        assert_eq!(tunnels(), 1, "round {round}: the connection stays pooled after its stream");
        // Unused for one to two timeouts, it is closed.
        wait_until(Duration::from_secs(10), "the idle connection closed", || Ok(tunnels() == 0)).unwrap();
    }
    let counters = stop_and_read_counters(&mut n1);
    assert_eq!(counter(&counters, "hbone_handshakes"), 2, "the second request dialled again: {counters:?}");
}

#[test]
fn service_traffic_is_balanced_over_endpoints_on_both_nodes_over_mtls() {
    let Some(mut bed) = bed() else { return };
    bed.add_pod("n1", "shop", "client").unwrap();
    for (node, name) in [("n1", "web-a"), ("n2", "web-b"), ("n2", "web-c")] {
        bed.add_pod(node, "shop", name).unwrap();
        bed.set_pod_label(&format!("shop/{name}"), "app", Some("web")).unwrap();
    }
    bed.write_config(
        "service-web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: 8080}\n",
    )
    .unwrap();
    let mut n1 = agent(&bed, "n1");
    let n2 = agent(&bed, "n2");
    wait_certificate(&n1, &spiffe("shop", "client"), 0);
    wait_certificate(&n1, &spiffe("shop", "web-a"), 0);
    wait_certificate(&n2, &spiffe("shop", "web-b"), 0);
    wait_certificate(&n2, &spiffe("shop", "web-c"), 0);
    let (root, _) = web_root(&bed, 1024);
    for name in ["web-a", "web-b", "web-c"] {
        bed.http_server(&format!("shop/{name}"), HTTP_PORT, &root, &bed.scratch().join(format!("{name}.log"))).unwrap();
    }

    for _ in 0..30 {
        assert_eq!(curl(&bed, "shop/client", "http://10.96.0.10/index.html").unwrap(), "hello from the web pod\n");
    }
    let records = n1.wait_connections(30, |c| c.dst_service == "shop/web").unwrap();
    for name in ["web-a", "web-b", "web-c"] {
        let served: Vec<_> = records.iter().filter(|r| r.dst_workload == format!("shop/{name}")).collect();
        assert!(served.len() >= 5, "{name} served {} of 30", served.len());
        for r in served {
            assert!(r.mtls && r.dst_identity == spiffe("shop", name), "{r:?}");
            assert!(r.dst_addr.ends_with(":8080"), "sent to the target port: {r:?}");
        }
    }

    // A denial is the destination's policy, not a failed endpoint: the
    // source asks no other endpoint, and reports the connection denied.
    bed.write_config(
        "authz.yaml",
        "apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-client, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/client]\n",
    )
    .unwrap();
    n1.wait_applied(0).unwrap();
    n2.wait_applied(0).unwrap();
    assert!(curl(&bed, "shop/client", "http://10.96.0.10/index.html").is_err(), "denied");
    let outbound = n1.wait_connections(31, |c| c.dst_service == "shop/web" && c.direction == "outbound").unwrap();
    assert_eq!(outbound[30].decision, "deny", "{:?}", outbound[30]);
    let denials = |agent: &Agent| agent.connections().into_iter().filter(|c| c.decision == "deny").count();
    let (at_n1, at_n2) = (denials(&n1) - 1, denials(&n2));
    assert_eq!(at_n1 + at_n2, 1, "one endpoint was asked and refused: {at_n1} on n1, {at_n2} on n2");
}

fn write_peer_authentication(bed: &Bed, yaml: &str) {
    bed.write_config("peer-authentication.yaml", yaml).unwrap();
}

#[test]
fn strict_rejects_plaintext_and_permissive_counts_it() {
    let Some(mut bed) = bed() else { return };
    bed.add_pod("n1", "legacy", "caller").unwrap();
    let (_n1, mut n2, base, _) = client_and_web(&mut bed, 1024);
    let url = format!("{base}/index.html");

    // PERMISSIVE (the default): plaintext is accepted, logged and counted.
    curl(&bed, "legacy/caller", &url).unwrap();
    let plain = n2.wait_connections(1, |c| c.src_workload == "legacy/caller").unwrap();
    assert!(!plain[0].mtls && plain[0].error.is_none() && plain[0].src_identity == "-", "{plain:?}");

    write_peer_authentication(
        &bed,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec:\n  mtls: {mode: STRICT}\n",
    );
    n2.wait_applied(0).unwrap();
    assert!(curl(&bed, "legacy/caller", &url).is_err(), "STRICT resets plaintext");
    let rejected = n2.wait_connections(2, |c| c.src_workload == "legacy/caller").unwrap();
    assert!(rejected[1].error.as_deref().unwrap_or_default().contains("STRICT"), "{rejected:?}");
    curl(&bed, "shop/client", &url).expect("mTLS still passes under STRICT");

    // A port-level override on the workload admits plaintext on that port.
    write_peer_authentication(
        &bed,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec:\n  mtls: {mode: STRICT}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: web-port, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    \"8080\": {mode: PERMISSIVE}\n",
    );
    n2.wait_applied(1).unwrap();
    curl(&bed, "legacy/caller", &url).expect("port-level PERMISSIVE");

    let counters = stop_and_read_counters(&mut n2);
    assert_eq!(counter(&counters, "plaintext_accepted"), 2, "{counters:?}");
    assert_eq!(counter(&counters, "plaintext_rejected"), 1, "{counters:?}");
}
