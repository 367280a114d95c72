//! `cargo xtask demo`: the main job of ambit, shown on one machine.
//!
//! Two simulated nodes, pods in an ambient namespace (`shop`) and a plain one
//! (`legacy`), the mesh's CA, one agent per node, real curl requests between
//! the pods, and for each request what each node's agent captured and how
//! it was carried (mTLS with both identities, or plain TCP). Then STRICT
//! mode for `shop`, an L4 AuthorizationPolicy in the node tunnel, and a
//! waypoint enforcing an L7 one per request. Everything is torn down at the
//! end or on Ctrl-C.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ambit_model::GATEWAY_NAME_LABEL;
use ambit_testbed::{Agent, Bed, ConnectionRecord, Waypoint, leftovers, missing_prerequisites, wait_until};
use anyhow::{Context as _, Result, bail};

use crate::{build_agent, root, setup};

const PORT: u16 = 8080;
const PAYLOAD_BYTES: usize = 1024 * 1024;
/// The `shop/cart` service's virtual IP (port 80, to the pods' 8080).
const CART_VIP: &str = "10.96.0.20";
/// The `shop/checkout` service's virtual IP; this service takes the waypoint.
const CHECKOUT_VIP: &str = "10.96.0.30";
const WAYPOINT_POD: &str = "shop/waypoint";

/// Admits only the frontend's identity to the cart pods.
const CART_CALLERS: &str = r#"apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {name: cart-callers, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
"#;

/// One request of the demo.
struct Step {
    from: &'static str,
    /// A pod (`namespace/name`) or the cart service.
    to: &'static str,
    story: &'static str,
}

const CART_SERVICE: &str = "service shop/cart";

const STEPS: &[Step] = &[
    Step {
        from: "shop/frontend",
        to: "shop/cart",
        story: "ambient to ambient, across nodes: mTLS tunnel (HBONE), both identities verified",
    },
    Step {
        from: "shop/frontend",
        to: "shop/checkout",
        story: "ambient to ambient, same node: mTLS too; one agent sees both ends",
    },
    Step { from: "shop/frontend", to: CART_SERVICE, story: "a service's virtual IP: sent to an endpoint over mTLS" },
    Step {
        from: "legacy/batch",
        to: "shop/cart",
        story: "plain to ambient: plaintext accepted (PERMISSIVE, the default) and counted",
    },
    Step {
        from: "shop/frontend",
        to: "legacy/reports",
        story: "ambient to plain: passed through as plain TCP, logged as such",
    },
    Step { from: "legacy/batch", to: "legacy/reports", story: "plain to plain: not touched" },
];

pub fn run(hold: bool) -> Result<()> {
    setup::run()?;
    let agent_binary = build_agent(false)?;
    if let Some(missing) = missing_prerequisites() {
        bail!("the demo needs {missing}");
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("install the Ctrl-C handler")?;
    let check = || {
        if interrupted.load(Ordering::SeqCst) {
            bail!("interrupted by Ctrl-C; the cluster was torn down")
        } else {
            Ok(())
        }
    };

    heading("ambit demo: eBPF capture, per-pod identities and mTLS between pods");
    let mut bed = Bed::with_agent(&["node-1", "node-2"], agent_binary)?;
    bed.namespace("shop", true)?;
    bed.namespace("legacy", false)?;
    bed.add_pods(&[
        ("node-1", "shop/frontend"),
        ("node-1", "shop/checkout"),
        ("node-1", "legacy/batch"),
        ("node-2", "shop/cart"),
        ("node-2", "legacy/reports"),
        ("node-2", WAYPOINT_POD),
    ])?;
    // Labelled before any agent starts, so the waypoint pod is never captured:
    // it terminates HBONE itself.
    bed.set_pod_label(WAYPOINT_POD, GATEWAY_NAME_LABEL, Some("waypoint"))?;
    bed.write_config(
        "service-cart.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: cart, namespace: shop}}\nspec:\n  clusterIP: {CART_VIP}\n  selector: {{app: cart}}\n  ports:\n  - {{port: 80, targetPort: {PORT}}}\n"
        ),
    )?;
    describe_cluster(&bed);
    check()?;

    let www = bed.scratch().join("www");
    std::fs::create_dir(&www)?;
    std::fs::write(www.join("payload"), vec![b'x'; PAYLOAD_BYTES])?;
    std::fs::create_dir(www.join("api"))?;
    std::fs::write(www.join("api/items"), "[\"socks\", \"hat\"]\n")?;
    for server in ["shop/cart", "shop/checkout", "legacy/reports"] {
        bed.http_server(server, PORT, &www, &bed.scratch().join(format!("{}.log", server.replace('/', "-"))))?;
    }

    println!("\nStarting one ambit-agent per node (each attaches its programs to its node's cgroup)...");
    let mut agents = Vec::new();
    for node in ["node-1", "node-2"] {
        let mut agent = bed.start_agent(node)?;
        agent.wait_ready()?;
        agents.push(agent);
    }
    for (agent, pods) in agents.iter_mut().zip([&["shop/frontend", "shop/checkout"][..], &["shop/cart"][..]]) {
        for pod in pods {
            agent.wait_pod_event("pod enrolled", pod, 0)?;
            let p = bed.pod(pod);
            let identity = format!("spiffe://cluster.local/ns/{}/sa/{}", p.namespace, p.service_account);
            let line = agent.wait_for(&format!("certificate for {identity}"), Duration::from_secs(20), |l| {
                l["message"] == "certificate obtained" && l["identity"] == identity.as_str()
            })?;
            let serial: String = line["serial"].as_str().unwrap_or_default().chars().take(8).collect();
            println!(
                "  {} agent enrolled {pod}; the mesh CA issued it {identity} (serial {serial}..., valid {} s)",
                agent.node, line["valid_for_secs"]
            );
        }
    }
    check()?;

    heading("Traffic: real curl requests from inside the pods (1 MiB each)");
    for (index, step) in STEPS.iter().enumerate() {
        check()?;
        send(&bed, &mut agents, index + 1, step)?;
    }

    heading("Zero trust, next step: PeerAuthentication STRICT for namespace shop");
    bed.write_config(
        "peer-authentication.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec:\n  mtls: {mode: STRICT}\n",
    )?;
    agents[1].wait_applied(0)?;
    println!("(written to the configuration directory; the agents apply it without a restart)");
    send(
        &bed,
        &mut agents,
        STEPS.len() + 1,
        &Step { from: "legacy/batch", to: "shop/cart", story: "plain to ambient under STRICT: reset" },
    )?;
    send(
        &bed,
        &mut agents,
        STEPS.len() + 2,
        &Step {
            from: "shop/frontend",
            to: "shop/cart",
            story: "ambient to ambient under STRICT: still fine, it is mTLS",
        },
    )?;

    check()?;
    heading("Authorization at L4: an AuthorizationPolicy admits only the frontend to cart");
    bed.write_config("authorization-cart.yaml", CART_CALLERS)?;
    agents[1].wait_applied(1)?;
    println!("(ALLOW for the pods labelled app=cart, from principal cluster.local/ns/shop/sa/frontend only;");
    println!(" node-2's tunnel checks it against each new connection's verified peer certificate)");
    let allowed = send(
        &bed,
        &mut agents,
        STEPS.len() + 3,
        &Step {
            from: "shop/frontend",
            to: "shop/cart",
            story: "the admitted identity: allowed, and the log names the rule that decided",
        },
    )?;
    let inbound = allowed.inbound()?;
    if allowed.status != Some(200) || inbound.decision != "allow" || inbound.policy != "shop/cart-callers rule 0" {
        bail!("the frontend was not admitted by shop/cart-callers: {inbound:?}");
    }
    let denied = send(
        &bed,
        &mut agents,
        STEPS.len() + 4,
        &Step {
            from: "shop/checkout",
            to: "shop/cart",
            story: "another ambient pod: a valid certificate, but not admitted, so reset",
        },
    )?;
    if denied.status.is_some() || denied.inbound()?.decision != "deny" {
        bail!("shop/checkout reached shop/cart despite shop/cart-callers: {:?}", denied.inbound()?);
    }

    check()?;
    heading("Authorization at L7: a waypoint for service checkout admits GET /api/* only");
    bed.write_config("waypoint-checkout.yaml", &checkout_waypoint())?;
    // node-1's agent must know the service takes the waypoint before the
    // first request; node-2's, before the waypoint's own connections.
    for agent in &agents {
        agent.wait_applied(2)?;
    }
    let mut waypoint = bed.start_waypoint(WAYPOINT_POD, &[])?;
    println!("(Gateway shop/waypoint, class ambit-waypoint, served by ambit-waypoint in pod {WAYPOINT_POD} on node-2;");
    println!(" service shop/checkout ({CHECKOUT_VIP}) is labelled ambit.dev/use-waypoint=waypoint; policy");
    println!(" shop/checkout-api-reads targets the Gateway: ALLOW methods [GET] on paths [/api/*])");
    let calls = [
        ("GET", "/api/items", 200, "allowed method and path: the waypoint forwards it to a checkout pod over mTLS"),
        ("POST", "/api/items", 403, "another method: the waypoint answers 403 itself, nothing reaches checkout"),
        ("GET", "/payload", 403, "another path: 403 too"),
    ];
    for (offset, (method, path, want, story)) in calls.into_iter().enumerate() {
        check()?;
        through_waypoint(&bed, &waypoint, STEPS.len() + 5 + offset, method, path, want, story)?;
    }
    waypoint.stop();

    heading("Counters, per node (kernel programs' per-CPU map, and the proxies)");
    for agent in &mut agents {
        let status = agent.stop()?;
        for line in agent
            .lines()
            .iter()
            .filter(|l| matches!(l["message"].as_str(), Some("kernel capture counters" | "proxy counters")))
        {
            println!(
                "  {} {}: {}",
                agent.node,
                line["message"].as_str().unwrap_or_default(),
                line["counters"].as_str().unwrap_or_default()
            );
        }
        println!("  {} agent exited: {status}", agent.node);
    }
    keep_logs(&agents, &waypoint)?;

    if hold {
        println!("\nThe cluster stays up until Ctrl-C. Run a command in a pod with, e.g.:");
        let pod = bed.pod("shop/frontend");
        println!("  ip netns exec {} curl http://{}:{PORT}/", pod.netns, bed.pod("legacy/reports").ip);
        println!("(the agents have stopped, so traffic is no longer captured)");
        while !interrupted.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!("\nTearing down the network namespaces and cgroups...");
    let run = format!("{}{}", ambit_testbed::PREFIX, bed.run_id());
    drop(waypoint);
    drop(agents);
    drop(bed);
    // Only this run's: another run (tests, say) may be up at the same time.
    let left: Vec<String> = leftovers().into_iter().filter(|l| l.contains(&run)).collect();
    if !left.is_empty() {
        bail!("the demo left these behind:\n  {}", left.join("\n  "));
    }
    println!("Done. Nothing is left behind: `ip netns list` shows no ambit-* entries.");
    Ok(())
}

fn heading(text: &str) {
    println!("\n{text}\n{}", "=".repeat(text.len()));
}

fn describe_cluster(bed: &Bed) {
    println!("Cluster, built from network namespaces, veth pairs and bridges on this machine:");
    for node in bed.nodes() {
        println!("  {}  (node IP {})", node.name, node.ip);
        for pod in bed.pods().iter().filter(|p| p.node == node.name) {
            let mode = match (pod.labels.contains_key(GATEWAY_NAME_LABEL), pod.namespace == "shop") {
                (true, _) => "waypoint (not captured)",
                (false, true) => "ambient",
                (false, false) => "plain",
            };
            println!("    {:<16} {:<12} {mode}", pod.id(), pod.ip.to_string());
        }
    }
    println!("Namespace `shop` carries the label ambit.dev/dataplane-mode=ambient; `legacy` does not.");
    println!("Configuration (standalone YAML the agents watch): {}", bed.config_dir().display());
}

/// What one request of [`send`] gave: curl's HTTP status (`None` when no
/// response came back) and the records the agents logged for it.
struct Sent {
    status: Option<u16>,
    records: Vec<ConnectionRecord>,
}

impl Sent {
    /// The destination tunnel's record: the one that carries the
    /// authorization decision.
    fn inbound(&self) -> Result<&ConnectionRecord> {
        self.records.iter().find(|r| r.direction == "inbound").context("no agent logged the inbound side")
    }
}

fn send(bed: &Bed, agents: &mut [Agent], index: usize, step: &Step) -> Result<Sent> {
    let src = bed.pod(step.from).clone();
    let (url, dst_pod, target) = if step.to == CART_SERVICE {
        (format!("http://{CART_VIP}/payload"), bed.pod("shop/cart").clone(), format!("{CART_VIP}:80 ({CART_SERVICE})"))
    } else {
        let dst = bed.pod(step.to).clone();
        (format!("http://{}:{PORT}/payload", dst.ip), dst, format!("{}:{PORT}", step.to))
    };
    println!("\n{index}. {} -> {target}\n   {}", step.from, step.story);
    let seen_before: Vec<usize> = agents.iter().map(|a| a.connections().len()).collect();
    let status = curl(bed, step.from, &[&url])?;
    // Which agents should report it: the source's for an ambient source,
    // the destination's for an ambient destination.
    let mut expected = vec![0usize; agents.len()];
    for (pod, ambient) in [(&src, src.namespace == "shop"), (&dst_pod, dst_pod.namespace == "shop")] {
        if ambient {
            let node = agents.iter().position(|a| a.node == pod.node).expect("agent per node");
            expected[node] += 1;
        }
    }
    let mut sent = Sent { status, records: Vec::new() };
    for ((agent, before), want) in agents.iter_mut().zip(seen_before).zip(expected) {
        if want == 0 {
            continue;
        }
        let records = agent.wait_connections(before + want, |_| true)?;
        for record in &records[before..] {
            print_record(&agent.node, record);
            sent.records.push(record.clone());
        }
    }
    if sent.records.is_empty() {
        println!("   no agent saw it: neither pod is enrolled, so the kernel programs left it alone");
    }
    Ok(sent)
}

/// Runs curl in pod `from` with `args` (the URL last) and prints what came
/// back; returns the HTTP status, `None` when no response came back.
fn curl(bed: &Bed, from: &str, args: &[&str]) -> Result<Option<u16>> {
    let mut all =
        vec!["-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", "--max-time", "20"];
    all.extend_from_slice(args);
    let output = bed.run(from, "curl", &all)?;
    if !output.status.success() {
        println!("   curl: failed ({})", String::from_utf8_lossy(&output.stderr).trim());
        return Ok(None);
    }
    let result = String::from_utf8_lossy(&output.stdout).to_string();
    let parts: Vec<&str> = result.split_whitespace().collect();
    let seconds: f64 = parts.get(2).and_then(|t| t.parse().ok()).unwrap_or_default();
    println!(
        "   curl: HTTP {}, {} received in {:.1} ms",
        parts.first().unwrap_or(&"?"),
        bytes(parts.get(1).and_then(|b| b.parse().ok()).unwrap_or_default()),
        seconds * 1000.0
    );
    Ok(parts.first().and_then(|code| code.parse().ok()))
}

/// The checkout service, which takes waypoint `waypoint`; that waypoint's
/// Gateway; and the L7 policy it enforces.
fn checkout_waypoint() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: checkout
  namespace: shop
  labels: {{ambit.dev/use-waypoint: waypoint}}
spec:
  clusterIP: {CHECKOUT_VIP}
  selector: {{app: checkout}}
  ports:
  - {{port: 80, targetPort: {PORT}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: shop
  labels: {{ambit.dev/waypoint-for: service}}
spec: {{gatewayClassName: ambit-waypoint}}
---
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {{name: checkout-api-reads, namespace: shop}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}]
  action: ALLOW
  rules:
  - to: [{{operation: {{methods: [GET], paths: [/api/*]}}}}]
"#
    )
}

/// One request from the frontend to the checkout service, which its node
/// tunnel hands to the waypoint; fails unless both curl and the waypoint's
/// log say `want`.
fn through_waypoint(
    bed: &Bed,
    waypoint: &Waypoint,
    index: usize,
    method: &str,
    path: &str,
    want: u16,
    story: &str,
) -> Result<()> {
    let url = format!("http://{CHECKOUT_VIP}{path}");
    println!("\n{index}. shop/frontend -> {method} {url} (service shop/checkout)\n   {story}");
    let before = waypoint.requests().len();
    let status = curl(bed, "shop/frontend", &["-X", method, &url])?;
    wait_until(Duration::from_secs(10), "the waypoint's request log line", || Ok(waypoint.requests().len() > before))
        .with_context(|| waypoint.log_text())?;
    let line = &waypoint.requests()[before];
    let field = |key: &str| match &line[key] {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    println!(
        "   waypoint log: request method={} path={} status={} src_identity={} dst_workload={} policy={}",
        field("method"),
        field("path"),
        field("status"),
        field("src_identity"),
        field("dst_workload"),
        field("policy")
    );
    if line["reason"] != "-" {
        println!("      reason={}", field("reason"));
    }
    if status != Some(want) || line["status"] != want {
        bail!("{method} {path} through the waypoint: expected HTTP {want}, got {status:?}; log line {line}");
    }
    Ok(())
}

fn print_record(node: &str, r: &ConnectionRecord) {
    let named =
        |addr: &str, workload: &str| if workload == "-" { addr.to_string() } else { format!("{addr} ({workload})") };
    println!(
        "   {node} agent, {:<8}  {} -> {}  sent {}, received {}",
        r.direction,
        named(&r.src_addr, &r.src_workload),
        named(&r.dst_addr, &r.dst_workload),
        bytes(r.bytes_sent),
        bytes(r.bytes_received)
    );
    let security = if r.mtls && r.fast_path != "-" {
        // Both pods on one node: the agent checked both identities itself.
        format!("same node, no tunnel ({}): {} -> {}", r.fast_path, r.src_identity, r.dst_identity)
    } else if r.mtls {
        format!("mTLS: {} -> {}", r.src_identity, r.dst_identity)
    } else {
        "plain TCP (no mTLS)".to_string()
    };
    match &r.error {
        None => println!("      {security}"),
        Some(error) => println!("      {security}; refused: {error}"),
    }
    // The verdict as logged, where there was more to it than a plain allow.
    match (r.decision.as_str(), r.policy.as_str()) {
        ("allow", "-") => {}
        (decision, "-") => println!("      decision={decision}"),
        (decision, policy) => println!("      decision={decision} policy={policy}"),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1024 * 1024 => format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0)),
        n if n >= 1024 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Copies the agents' and the waypoint's logs out of the bed before it is removed.
fn keep_logs(agents: &[Agent], waypoint: &Waypoint) -> Result<()> {
    let dir = root().join("target/demo");
    std::fs::create_dir_all(&dir)?;
    for agent in agents {
        let to = dir.join(format!("agent-{}.log", agent.node));
        std::fs::copy(agent.log_path(), &to)?;
        println!("  {} agent log (JSON lines): {}", agent.node, to.display());
    }
    let to = dir.join("waypoint.log");
    std::fs::write(&to, waypoint.log_text())?;
    println!("  waypoint log (JSON lines): {}", to.display());
    Ok(())
}
