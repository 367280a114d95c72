//! ambit's test bed: simulated nodes and pods on one Linux machine.
//!
//! - a **fabric** netns holds a bridge joining the nodes (the "network
//!   between nodes"); each **node** is a netns with an uplink `eth0` on the
//!   fabric (10.100.0.N/24) and a pod bridge `cbr0` (10.244.N.1/24), routing to
//!   the other nodes' pod ranges;
//! - each **pod** is a netns with `eth0` (10.244.N.K/24) on its node's
//!   bridge, plus a cgroup of its own, so processes started "in the pod" have
//!   the pod's network and cgroup, as in Kubernetes;
//! - the run's cgroups sit under one directory made for the run,
//!   `<cgroup2>/ambit-<pid>-<n>/<node>/`, and each node's agent attaches its
//!   programs at its node's directory, never higher;
//! - the standalone configuration the agents read is written from the bed's
//!   model of namespaces and pods.
//!
//! Every name carries the run id (`<pid>-<n>`), so runs can coexist. Dropping
//! the [`Bed`] kills its processes and removes every netns and cgroup, also
//! when a test panics; [`leftovers`] finds anything a killed run left, and
//! [`Bed::new`] removes what dead runs left behind.
//!
//! Processes are placed in a pod with `pre_exec` (setns + cgroup.procs), the
//! only unsafe code here.

mod agent;
pub mod apiserver;
mod cleanup;
mod cluster;
mod prereq;
pub mod spire;

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub use agent::{Agent, ConnectionRecord, agent_binary};
pub use cleanup::{leftovers, remove_stale};
pub use cluster::{AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, CniFailure};
pub use prereq::{bed_or_skip, dual_stack_bed_or_skip, kubernetes_bed_or_skip, missing_prerequisites};

/// Prefix of every resource the bed creates.
pub const PREFIX: &str = "ambit-";
const DATAPLANE_MODE_LABEL: &str = "ambit.dev/dataplane-mode";

static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A simulated node.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    /// 1-based; picks the node's address ranges.
    pub index: u8,
    /// Name of the node's netns (for `ip -n`).
    pub netns: String,
    /// The node's address on the fabric.
    pub ip: Ipv4Addr,
    /// Where this node's agent attaches its cgroup programs.
    pub cgroup: PathBuf,
}

/// A simulated pod.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address, in a dual-stack bed ([`Bed::dual_stack`]).
    pub ip6: Option<Ipv6Addr>,
    pub service_account: String,
    /// Name of the pod's netns.
    pub netns: String,
    pub cgroup: PathBuf,
    /// Labels written into the pod's YAML.
    pub labels: BTreeMap<String, String>,
    /// The pod's uid in the API (Kubernetes mode).
    pub uid: Option<String>,
}

impl Pod {
    /// `namespace/name`, as the agent logs it.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// A command that will run inside this pod (its netns and cgroup).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        enter(&mut cmd, &self.netns_path(), Some(&self.cgroup)).expect("pod netns and cgroup exist");
        cmd
    }
}

/// A running `ambit-waypoint`; killed on drop.
pub struct Waypoint {
    child: Child,
    log: PathBuf,
}

impl Waypoint {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The access-log lines (one per request), parsed.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["message"] == "request")
            .collect()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The whole simulated cluster of one test.
pub struct Bed {
    run: String,
    run_cgroup: PathBuf,
    fabric: String,
    nodes: Vec<Node>,
    namespaces: BTreeMap<String, Option<String>>,
    pods: Vec<Pod>,
    dir: tempfile::TempDir,
    children: Mutex<Vec<Child>>,
    agent_binary: PathBuf,
    ca: Mutex<Option<Child>>,
    /// Kubernetes mode ([`Bed::kubernetes`]); standalone if `None`.
    kubernetes: Option<cluster::Kubernetes>,
    /// Nodes and pods have IPv6 addresses too ([`Bed::dual_stack`]).
    ipv6: bool,
    /// The plug-in CA directory ([`Bed::plug_in_ca`]); the CA's own root if `None`.
    cacerts: Option<PathBuf>,
    /// A second mesh on some of the nodes ([`Bed::add_peer_mesh`]).
    peer: Option<PeerMesh>,
    /// Nodes whose agents take their identities from a SPIRE agent's
    /// admin socket ([`Bed::use_spire`]).
    spire: BTreeMap<String, PathBuf>,
}

/// A second mesh in the bed, for federation: a trust domain, CA and
/// configuration directory of its own, on some of the nodes.
struct PeerMesh {
    trust_domain: String,
    nodes: Vec<String>,
    cacerts: Option<PathBuf>,
    ca: Mutex<Option<Child>>,
}

/// Which mesh of the bed a CA, configuration or agent belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Primary,
    Peer,
}

/// libfaketime (Debian's faketime), for agents on a skewed clock.
pub const FAKETIME_LIBRARY: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// Where the bed's certificate authority listens (on the fabric bridge).
pub const CA_ADDR: &str = "10.100.0.254:15012";
/// Where the peer mesh's certificate authority listens ([`Bed::add_peer_mesh`]).
pub const PEER_CA_ADDR: &str = "10.100.0.253:15012";
/// Leaf lifetime the bed's CA uses unless a test asks for another.
pub const DEFAULT_LEAF_TTL: &str = "1h";

impl Bed {
    /// Creates the fabric, the named nodes and the mesh's CA, with the
    /// default agent binary (`AMBIT_AGENT_BIN`, or the workspace's debug build).
    pub fn new(node_names: &[&str]) -> Result<Bed> {
        Self::with_agent(node_names, agent::agent_binary())
    }

    /// Like [`Bed::new`], running `agent_binary` for the agents and the CA.
    pub fn with_agent(node_names: &[&str], agent_binary: PathBuf) -> Result<Bed> {
        Self::create(node_names, agent_binary, false)
    }

    /// Like [`Bed::new`], dual-stack: every node and pod also has an IPv6
    /// address (`fd00:100::<node>`, `fd00:244:<node>::<k>`), pods list
    /// both in `podIPs`, and nodes route IPv6 between them.
    pub fn dual_stack(node_names: &[&str]) -> Result<Bed> {
        Self::create(node_names, agent::agent_binary(), true)
    }

    fn create(node_names: &[&str], agent_binary: PathBuf, ipv6: bool) -> Result<Bed> {
        if let Some(missing) = missing_prerequisites() {
            bail!("the test bed cannot run here: {missing}");
        }
        prereq::ensure_bpffs()?;
        remove_stale();
        let run = format!("{}-{}", std::process::id(), RUN_COUNTER.fetch_add(1, Ordering::SeqCst));
        let run_cgroup = prereq::cgroup2_mount()?.join(format!("{PREFIX}{run}"));
        std::fs::create_dir(&run_cgroup).with_context(|| format!("create {}", run_cgroup.display()))?;
        let dir = tempfile::Builder::new().prefix(&format!("{PREFIX}{run}-")).tempdir()?;
        std::fs::create_dir(dir.path().join("config"))?;
        let mut bed = Bed {
            fabric: format!("{PREFIX}{run}-fabric"),
            run,
            run_cgroup,
            nodes: Vec::new(),
            namespaces: BTreeMap::new(),
            pods: Vec::new(),
            dir,
            children: Mutex::new(Vec::new()),
            agent_binary,
            ca: Mutex::new(None),
            kubernetes: None,
            ipv6,
            cacerts: None,
            peer: None,
            spire: BTreeMap::new(),
        };
        ip(&["netns", "add", &bed.fabric])?;
        ip_in(&bed.fabric, &["link", "add", "br0", "type", "bridge"])?;
        let ca_ip = CA_ADDR.split(':').next().expect("ip:port");
        ip_in(&bed.fabric, &["addr", "add", &format!("{ca_ip}/24"), "dev", "br0"])?;
        ip_in(&bed.fabric, &["link", "set", "br0", "up"])?;
        ip_in(&bed.fabric, &["link", "set", "lo", "up"])?;
        std::fs::create_dir(bed.dir.path().join("tokens"))?;
        for name in node_names {
            bed.add_node(name)?;
        }
        bed.start_ca(DEFAULT_LEAF_TTL)?;
        for a in &bed.nodes {
            for b in bed.nodes.iter().filter(|b| b.index != a.index) {
                let range = format!("10.244.{}.0/24", b.index);
                ip_in(&a.netns, &["route", "add", &range, "via", &b.ip.to_string()])?;
            }
            // Pods reach the CA too (a waypoint obtains its own certificate).
            ip_in(&bed.fabric, &["route", "add", &format!("10.244.{}.0/24", a.index), "via", &a.ip.to_string()])?;
            if ipv6 {
                for b in bed.nodes.iter().filter(|b| b.index != a.index) {
                    let range = format!("fd00:244:{}::/64", b.index);
                    ip_in(&a.netns, &["-6", "route", "add", &range, "via", &format!("fd00:100::{}", b.index)])?;
                }
            }
        }
        Ok(bed)
    }

    fn add_node(&mut self, name: &str) -> Result<()> {
        let index = u8::try_from(self.nodes.len() + 1)?;
        let netns = format!("{PREFIX}{}-{name}", self.run);
        let node_ip = Ipv4Addr::new(10, 100, 0, index);
        let cgroup = self.run_cgroup.join(name);
        std::fs::create_dir(&cgroup)?;
        ip(&["netns", "add", &netns])?;
        let uplink = format!("n{index}");
        ip_in(&self.fabric, &["link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        ip_in(&self.fabric, &["link", "set", &uplink, "master", "br0", "up"])?;
        ip_in(&netns, &["addr", "add", &format!("{node_ip}/24"), "dev", "eth0"])?;
        ip_in(&netns, &["link", "set", "eth0", "up"])?;
        ip_in(&netns, &["link", "set", "lo", "up"])?;
        ip_in(&netns, &["link", "add", "cbr0", "type", "bridge"])?;
        ip_in(&netns, &["addr", "add", &format!("10.244.{index}.1/24"), "dev", "cbr0"])?;
        ip_in(&netns, &["link", "set", "cbr0", "up"])?;
        run_ok(Command::new("ip").args(["netns", "exec", &netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]))?;
        if self.ipv6 {
            ip_in(&netns, &["addr", "add", &format!("fd00:100::{index}/64"), "dev", "eth0", "nodad"])?;
            ip_in(&netns, &["addr", "add", &format!("fd00:244:{index}::1/64"), "dev", "cbr0", "nodad"])?;
            run_ok(Command::new("ip").args([
                "netns",
                "exec",
                &netns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.forwarding=1",
            ]))?;
        }
        // The node's CA token; the first call also creates the CA's token secret.
        let token = self.ca_token(name, None)?;
        std::fs::write(self.node_token_file(name), token)?;
        self.nodes.push(Node { name: name.to_string(), index, netns, ip: node_ip, cgroup });
        Ok(())
    }

    /// The CA's directory: `root.pem` is the mesh's trust anchor, unless
    /// the CA is a plug-in one.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// From the next [`Bed::start_ca`] on, the CA signs with the plug-in
    /// intermediate in `cacerts` (Istio's layout), and agents and waypoints
    /// started after that trust its `root-cert.pem`.
    pub fn plug_in_ca(&mut self, cacerts: &Path) {
        self.cacerts = Some(cacerts.to_path_buf());
    }

    /// `node`'s agents started from now on take their identities from the
    /// SPIRE agent at `socket` instead of the CA.
    pub fn use_spire(&mut self, node: &str, socket: &Path) {
        self.spire.insert(node.to_string(), socket.to_path_buf());
    }

    /// The roots the primary mesh's agents and waypoints are given (`--ca-root`).
    pub fn trust_anchors(&self) -> PathBuf {
        self.mesh_anchors(Side::Primary)
    }

    /// A CA token from `ambit-agent ca token`: node `node`'s, or with
    /// `identity` (`namespace/service-account`) a waypoint's.
    pub fn ca_token(&self, node: &str, identity: Option<&str>) -> Result<String> {
        self.mesh_ca_token(self.side_of(node), node, identity)
    }

    /// The file a waypoint in `pod` presents to the CA: its own token.
    pub fn waypoint_token_file(&self, pod: &str) -> PathBuf {
        self.dir.path().join("tokens").join(pod.replace('/', "-"))
    }

    pub fn node_token_file(&self, node: &str) -> PathBuf {
        self.dir.path().join("tokens").join(node)
    }

    /// The CA's log (issuances and refusals).
    pub fn ca_log(&self) -> PathBuf {
        self.dir.path().join("ca.log")
    }

    /// Starts the CA (in the fabric netns, reachable from every node),
    /// issuing leaves that live `leaf_ttl` (e.g. "1h", "6s").
    pub fn start_ca(&self, leaf_ttl: &str) -> Result<()> {
        self.start_ca_with(leaf_ttl, &[])
    }

    /// Like [`Bed::start_ca`], with extra `ambit-agent ca serve` arguments.
    pub fn start_ca_with(&self, leaf_ttl: &str, args: &[&str]) -> Result<()> {
        self.stop_ca()?;
        *self.ca.lock().expect("ca lock") = Some(self.launch_ca(Side::Primary, leaf_ttl, args)?);
        Ok(())
    }

    fn launch_ca(&self, side: Side, leaf_ttl: &str, args: &[&str]) -> Result<Child> {
        let (addr, log, name) = match side {
            Side::Primary => (CA_ADDR, self.ca_log(), "ca"),
            Side::Peer => (PEER_CA_ADDR, self.peer_ca_log(), "peer-ca"),
        };
        let cgroup = self.run_cgroup.join(name);
        if !cgroup.exists() {
            std::fs::create_dir(&cgroup)?;
        }
        let log_file = File::options().create(true).append(true).open(&log)?;
        let mut cmd = Command::new(&self.agent_binary);
        cmd.args(["ca", "serve", "--log-format", "json", "--listen", addr, "--leaf-ttl", leaf_ttl]);
        match (&self.kubernetes, side) {
            (Some(kubernetes), Side::Primary) => kubernetes.ca_args(&mut cmd),
            _ => cmd.arg("--dir").arg(self.mesh_ca_dir(side)).arg("--config-dir").arg(self.mesh_config_dir(side)),
        };
        if let Some(cacerts) = self.mesh_cacerts(side) {
            cmd.arg("--cacerts-dir").arg(cacerts);
        }
        if side == Side::Peer {
            cmd.arg("--trust-domain").arg(&self.peer_mesh().trust_domain);
        }
        cmd.args(args).stdin(Stdio::null()).stdout(log_file.try_clone()?).stderr(log_file);
        enter(&mut cmd, &Path::new("/run/netns").join(&self.fabric), Some(&cgroup))?;
        let child = cmd.spawn().context("start the CA")?;
        let filter = format!("src {addr}");
        let fabric = self.fabric.clone();
        wait_until(Duration::from_secs(10), "the CA to listen", || {
            let out = Command::new("ip").args(["netns", "exec", &fabric, "ss", "-Hltn", &filter]).output()?;
            Ok(!out.stdout.is_empty())
        })
        .with_context(|| format!("CA log:\n{}", std::fs::read_to_string(&log).unwrap_or_default()))?;
        Ok(child)
    }

    /// Adds a second mesh, trust domain `trust_domain`, made of `nodes`
    /// (which have no pods yet): its own CA (at [`PEER_CA_ADDR`], signing
    /// with the plug-in `cacerts` if given, started with
    /// [`Bed::start_peer_ca`]), configuration directory and agents. Each
    /// mesh's configuration lists every pod, the other mesh's annotated
    /// with its trust domain.
    pub fn add_peer_mesh(&mut self, trust_domain: &str, nodes: &[&str], cacerts: Option<&Path>) -> Result<()> {
        if self.pods.iter().any(|p| nodes.contains(&p.node.as_str())) {
            bail!("add the peer mesh before the pods of its nodes");
        }
        self.peer = Some(PeerMesh {
            trust_domain: trust_domain.to_string(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            cacerts: cacerts.map(Path::to_path_buf),
            ca: Mutex::new(None),
        });
        std::fs::create_dir_all(self.mesh_config_dir(Side::Peer))?;
        let ca_ip = PEER_CA_ADDR.split(':').next().expect("ip:port");
        ip_in(&self.fabric, &["addr", "add", &format!("{ca_ip}/24"), "dev", "br0"])?;
        for node in nodes {
            let token = self.mesh_ca_token(Side::Peer, node, None)?;
            std::fs::write(self.node_token_file(node), token)?;
        }
        let namespaces: Vec<(String, Option<String>)> = self.namespaces.clone().into_iter().collect();
        for (name, mode) in namespaces {
            self.set_namespace_mode(&name, mode.as_deref())?;
        }
        Ok(())
    }

    fn peer_mesh(&self) -> &PeerMesh {
        self.peer.as_ref().expect("the bed has a peer mesh (Bed::add_peer_mesh)")
    }

    /// Starts (or restarts) the peer mesh's CA, with extra `ca serve` arguments.
    pub fn start_peer_ca(&self, leaf_ttl: &str, args: &[&str]) -> Result<()> {
        self.stop_peer_ca()?;
        let child = self.launch_ca(Side::Peer, leaf_ttl, args)?;
        *self.peer_mesh().ca.lock().expect("peer ca lock") = Some(child);
        Ok(())
    }

    /// Stops the peer mesh's CA (as an outage would).
    pub fn stop_peer_ca(&self) -> Result<()> {
        if let Some(mut ca) = self.peer_mesh().ca.lock().expect("peer ca lock").take() {
            ca.kill()?;
            ca.wait()?;
        }
        Ok(())
    }

    pub fn peer_ca_log(&self) -> PathBuf {
        self.dir.path().join("peer-ca.log")
    }

    /// The mesh `node` belongs to.
    fn side_of(&self, node: &str) -> Side {
        match &self.peer {
            Some(peer) if peer.nodes.iter().any(|n| n == node) => Side::Peer,
            _ => Side::Primary,
        }
    }

    fn mesh_ca_dir(&self, side: Side) -> PathBuf {
        match side {
            Side::Primary => self.ca_dir(),
            Side::Peer => self.dir.path().join("peer-ca"),
        }
    }

    fn mesh_config_dir(&self, side: Side) -> PathBuf {
        match side {
            Side::Primary => self.config_dir(),
            Side::Peer => self.dir.path().join("peer-config"),
        }
    }

    fn mesh_cacerts(&self, side: Side) -> Option<&Path> {
        match side {
            Side::Primary => self.cacerts.as_deref(),
            Side::Peer => self.peer_mesh().cacerts.as_deref(),
        }
    }

    fn mesh_anchors(&self, side: Side) -> PathBuf {
        match self.mesh_cacerts(side) {
            Some(cacerts) => cacerts.join("root-cert.pem"),
            None => self.mesh_ca_dir(side).join("root.pem"),
        }
    }

    fn mesh_ca_token(&self, side: Side, node: &str, identity: Option<&str>) -> Result<String> {
        let mut cmd = Command::new(&self.agent_binary);
        cmd.args(["ca", "token", "--node", node, "--dir"]).arg(self.mesh_ca_dir(side));
        if let Some(identity) = identity {
            cmd.args(["--identity", identity]);
        }
        let token = cmd.output().context("run `ambit-agent ca token`")?;
        if !token.status.success() {
            bail!("ambit-agent ca token failed: {}", String::from_utf8_lossy(&token.stderr));
        }
        Ok(String::from_utf8(token.stdout)?)
    }

    /// A command that will run in the fabric netns, where the nodes' uplinks
    /// meet on bridge `br0`: the place to watch the wire between nodes.
    /// The state directory of `node`'s agent: per node and run, so agents
    /// of one node, one after the other, share it.
    pub fn state_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("state-{node}"))
    }

    /// Where `node`'s agents pin the capture (`--bpf-dir`): per node and
    /// run; removed with the run.
    pub fn bpf_dir(&self, node: &str) -> PathBuf {
        Path::new(cleanup::BPF_FS).join(format!("{PREFIX}{}", self.run)).join(node)
    }

    /// Runs `ambit-agent uninstall` for `node`'s agent directories.
    pub fn uninstall(&self, node: &str) -> Result<Output> {
        let mut cmd = Command::new(&self.agent_binary);
        cmd.arg("uninstall").arg("--bpf-dir").arg(self.bpf_dir(node)).arg("--state-dir").arg(self.state_dir(node));
        cmd.output().context("run ambit-agent uninstall")
    }

    /// The name of the fabric's netns (where the CA listens).
    pub fn fabric_netns(&self) -> &str {
        &self.fabric
    }

    pub fn fabric_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        enter(&mut cmd, &Path::new("/run/netns").join(&self.fabric), None).expect("fabric netns exists");
        cmd
    }

    /// A command that will run in a node's netns (where its agent runs).
    pub fn node_command(&self, node: &str, program: &str) -> Command {
        let mut cmd = Command::new(program);
        enter(&mut cmd, &Path::new("/run/netns").join(&self.node(node).netns), None).expect("node netns exists");
        cmd
    }

    /// GET from a node agent's admin endpoint (127.0.0.1:15020 in the
    /// node's netns): the HTTP status and the body.
    pub fn admin_get(&self, node: &str, path: &str) -> Result<(u16, String)> {
        let url = format!("http://127.0.0.1:15020{path}");
        let out = self.node_command(node, "curl").args(["-sS", "-w", "\n%{http_code}", &url]).output()?;
        if !out.status.success() {
            bail!("GET {url} on {node}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
        Ok((code.trim().parse()?, body.to_string()))
    }

    /// Runs `ambit status` against a node's agent: its exit code and output.
    pub fn ambit_status(&self, node: &str) -> Result<(i32, String)> {
        let cli = self.agent_binary.with_file_name("ambit");
        let out = self.node_command(node, cli.to_str().context("CLI path is UTF-8")?).arg("status").output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        ))
    }

    /// The CA's process id, while it runs.
    pub fn ca_pid(&self) -> Option<u32> {
        self.ca.lock().expect("ca lock").as_ref().map(Child::id)
    }

    /// Stops the CA (as an outage would).
    pub fn stop_ca(&self) -> Result<()> {
        if let Some(mut ca) = self.ca.lock().expect("ca lock").take() {
            ca.kill()?;
            ca.wait()?;
        }
        Ok(())
    }

    pub fn run_id(&self) -> &str {
        &self.run
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn pod(&self, id: &str) -> &Pod {
        self.pods.iter().find(|p| p.id() == id).unwrap_or_else(|| panic!("no pod {id}"))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The standalone configuration directory the agents watch.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// A scratch directory that lives as long as the bed.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// Declares a namespace; `ambient` sets its data-plane-mode label.
    pub fn namespace(&mut self, name: &str, ambient: bool) -> Result<()> {
        self.set_namespace_mode(name, ambient.then_some("ambient"))
    }

    /// Sets (or removes, with `None`) a namespace's data-plane-mode label and
    /// rewrites its configuration file.
    pub fn set_namespace_mode(&mut self, name: &str, mode: Option<&str>) -> Result<()> {
        self.namespaces.insert(name.to_string(), mode.map(str::to_string));
        let labels = match mode {
            Some(mode) => format!("\n  labels:\n    {DATAPLANE_MODE_LABEL}: {mode}"),
            None => String::new(),
        };
        let yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n");
        self.write_config(&format!("namespace-{name}.yaml"), &yaml)?;
        if self.peer.is_some() {
            self.write_peer_config(&format!("namespace-{name}.yaml"), &yaml)?;
        }
        Ok(())
    }

    /// Creates a pod on `node` in `namespace` (declared before), with its
    /// netns, address, cgroup and configuration file.
    pub fn add_pod(&mut self, node: &str, namespace: &str, name: &str) -> Result<Pod> {
        self.add_pod_at(node, namespace, name, None)
    }

    /// Like [`Bed::add_pod`], with the address `address` if given (an
    /// address an earlier pod had: IP reuse).
    pub fn add_pod_at(&mut self, node: &str, namespace: &str, name: &str, address: Option<Ipv4Addr>) -> Result<Pod> {
        if !self.namespaces.contains_key(namespace) {
            bail!("declare namespace {namespace} before adding pods to it");
        }
        let node = self.node(node).clone();
        let k = self.pods.iter().filter(|p| p.node == node.name).count() + 2;
        let netns = format!("{PREFIX}{}-{namespace}-{name}", self.run);
        let pod = Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            node: node.name.clone(),
            ip: match address {
                Some(address) => address,
                None => Ipv4Addr::new(10, 244, node.index, u8::try_from(k)?),
            },
            ip6: self.ipv6.then(|| Ipv6Addr::new(0xfd00, 0x244, u16::from(node.index), 0, 0, 0, 0, k as u16)),
            service_account: name.to_string(),
            netns: netns.clone(),
            cgroup: node.cgroup.join(format!("pod-{namespace}-{name}")),
            labels: BTreeMap::from([("app".to_string(), name.to_string())]),
            uid: None,
        };
        std::fs::create_dir(&pod.cgroup)?;
        ip(&["netns", "add", &netns])?;
        let host_side = format!("vp{k}");
        ip_in(&node.netns, &["link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        ip_in(&node.netns, &["link", "set", &host_side, "master", "cbr0", "up"])?;
        ip_in(&netns, &["addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"])?;
        ip_in(&netns, &["link", "set", "eth0", "up"])?;
        ip_in(&netns, &["link", "set", "lo", "up"])?;
        ip_in(&netns, &["route", "add", "default", "via", &format!("10.244.{}.1", node.index)])?;
        if let Some(ip6) = pod.ip6 {
            ip_in(&netns, &["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
            ip_in(&netns, &["-6", "route", "add", "default", "via", &format!("fd00:244:{}::1", node.index)])?;
        }
        self.pods.push(pod.clone());
        self.write_pod(&pod)?;
        Ok(pod)
    }

    /// Creates several pods, each given as (node, `namespace/name`).
    pub fn add_pods(&mut self, pods: &[(&str, &str)]) -> Result<()> {
        for (node, id) in pods {
            let (namespace, name) = id.split_once('/').with_context(|| format!("`{id}` is not namespace/name"))?;
            self.add_pod(node, namespace, name)?;
        }
        Ok(())
    }

    /// Sets or removes a label on a pod and rewrites its configuration file.
    pub fn set_pod_label(&mut self, id: &str, key: &str, value: Option<&str>) -> Result<()> {
        self.update_pod(id, |pod| match value {
            Some(v) => {
                pod.labels.insert(key.to_string(), v.to_string());
            }
            None => {
                pod.labels.remove(key);
            }
        })
    }

    /// Changes a pod's service account and rewrites its configuration file.
    pub fn set_pod_service_account(&mut self, id: &str, service_account: &str) -> Result<()> {
        self.update_pod(id, |pod| pod.service_account = service_account.to_string())
    }

    fn update_pod(&mut self, id: &str, change: impl FnOnce(&mut Pod)) -> Result<()> {
        let pod = self.pods.iter_mut().find(|p| p.id() == id).with_context(|| format!("no pod {id}"))?;
        change(pod);
        let pod = pod.clone();
        self.write_pod(&pod)
    }

    /// Adds `count` pods to `node` that exist only to be enrolled: each is
    /// a netns holding its address on a veth pair of its own, with no path anywhere,
    /// so a thousand of them cost the bed little (benchmarks of enrolment).
    /// They are named `<prefix>-<i>`, use `accounts` service accounts in
    /// turn, and are declared in one configuration file, `file`; returns
    /// their ids.
    pub fn add_enrolment_only_pods(
        &mut self,
        node: &str,
        namespace: &str,
        prefix: &str,
        count: usize,
        accounts: usize,
        file: &str,
    ) -> Result<Vec<String>> {
        let node = self.node(node).clone();
        let mut documents = Vec::with_capacity(count);
        let mut ids = Vec::with_capacity(count);
        for i in 0..count {
            let name = format!("{prefix}-{i}");
            let netns = format!("{PREFIX}{}-{namespace}-{name}", self.run);
            let pod = Pod {
                namespace: namespace.to_string(),
                name: name.clone(),
                node: node.name.clone(),
                ip: Ipv4Addr::new(10, 200 + node.index, u8::try_from(i / 250)?, u8::try_from(i % 250 + 1)?),
                ip6: None,
                service_account: format!("{prefix}-sa-{}", i % accounts.max(1)),
                netns: netns.clone(),
                cgroup: node.cgroup.clone(),
                labels: BTreeMap::from([("app".to_string(), prefix.to_string())]),
                uid: None,
            };
            ip(&["netns", "add", &netns])?;
            let setup = format!(
                "link add d0 type veth peer name d1\naddr add {}/32 dev d0\nlink set d0 up\nlink set d1 up\nlink set lo up\n",
                pod.ip
            );
            run_with_input(Command::new("ip").args(["-n", &netns, "-batch", "-"]), &setup)?;
            documents.push(pod_yaml(&pod, None));
            ids.push(pod.id());
            self.pods.push(pod);
        }
        self.write_config(file, &documents.join("---\n"))?;
        Ok(ids)
    }

    /// Writes the pod into each mesh's configuration; the other mesh's
    /// pods carry their trust domain.
    fn write_pod(&self, pod: &Pod) -> Result<()> {
        let file = format!("pod-{}-{}.yaml", pod.namespace, pod.name);
        let Some(peer) = &self.peer else {
            return self.write_config(&file, &pod_yaml(pod, None));
        };
        let (for_primary, for_peer) = match self.side_of(&pod.node) {
            Side::Primary => (None, Some("cluster.local")),
            Side::Peer => (Some(peer.trust_domain.as_str()), None),
        };
        self.write_config(&file, &pod_yaml(pod, for_primary))?;
        self.write_peer_config(&file, &pod_yaml(pod, for_peer))
    }

    /// Writes a file into the configuration directory atomically (a hidden
    /// temporary file, then a rename), as a careful operator would.
    pub fn write_config(&self, file: &str, contents: &str) -> Result<()> {
        write_atomically(&self.config_dir(), file, contents)
    }

    /// Like [`Bed::write_config`], into the peer mesh's configuration.
    pub fn write_peer_config(&self, file: &str, contents: &str) -> Result<()> {
        write_atomically(&self.mesh_config_dir(Side::Peer), file, contents)
    }

    /// Removes a file from the peer mesh's configuration.
    pub fn remove_peer_config(&self, file: &str) -> Result<()> {
        Ok(std::fs::remove_file(self.mesh_config_dir(Side::Peer).join(file))?)
    }

    /// Starts the agent of `node`: inside the node's netns, in a cgroup
    /// below the one it attaches to (so its own sockets meet its programs,
    /// as on a real node), logging JSON to a file.
    pub fn start_agent(&self, node: &str) -> Result<Agent> {
        self.start_agent_with(node, &[])
    }

    /// Like [`Bed::start_agent`], with more command-line arguments.
    pub fn start_agent_with(&self, node: &str, args: &[&str]) -> Result<Agent> {
        self.start_agent_attached_at(node, &self.node(node).cgroup, args)
    }

    /// Like [`Bed::start_agent_with`], with another `--cgroup` (to test bad ones).
    pub fn start_agent_attached_at(&self, node: &str, attach: &Path, args: &[&str]) -> Result<Agent> {
        self.start_agent_in(node, attach, args, &[])
    }

    /// Starts `node`'s agent with its wall clock off by `skew` (libfaketime's
    /// offset syntax: `+30s`, `-1m`), as on a node whose clock drifted;
    /// timers (the monotonic clock) are left alone.
    pub fn start_agent_skewed(&self, node: &str, skew: &str) -> Result<Agent> {
        let env = [
            ("LD_PRELOAD", FAKETIME_LIBRARY),
            ("FAKETIME", skew),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("FAKETIME_DONT_RESET", "1"),
        ];
        self.start_agent_in(node, &self.node(node).cgroup, &[], &env)
    }

    fn start_agent_in(&self, node: &str, attach: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Agent> {
        let node = self.node(node);
        let cgroup = node.cgroup.join("agent");
        if !cgroup.exists() {
            std::fs::create_dir(&cgroup)?;
        }
        let mut cmd = Command::new(&self.agent_binary);
        let side = self.side_of(&node.name);
        match (&self.kubernetes, side) {
            (Some(kubernetes), Side::Primary) => {
                cmd.args(["--ca-addr", CA_ADDR]);
                kubernetes.agent_args(&mut cmd, &node.name)
            }
            _ => {
                cmd.arg("--config-dir").arg(self.mesh_config_dir(side));
                match self.spire.get(&node.name) {
                    Some(socket) => cmd.arg("--spire-admin-socket").arg(socket),
                    None => cmd
                        .args(["--ca-addr", if side == Side::Peer { PEER_CA_ADDR } else { CA_ADDR }])
                        .arg("--ca-root")
                        .arg(self.mesh_anchors(side))
                        .arg("--node-token-file")
                        .arg(self.node_token_file(&node.name)),
                };
                if side == Side::Peer {
                    cmd.arg("--trust-domain").arg(&self.peer_mesh().trust_domain);
                }
            }
        }
        cmd.args(args).envs(env.iter().copied());
        cmd.arg("--bpf-dir").arg(self.bpf_dir(&node.name));
        Agent::start(cmd, node, &cgroup, attach, self.dir.path(), &self.state_dir(&node.name))
    }

    /// Starts `ambit-waypoint` (built next to the agent binary) in a waypoint
    /// pod, with the CA access of the pod's node and extra `args`, logging
    /// JSON to a file.
    pub fn start_waypoint(&self, pod: &str, args: &[&str]) -> Result<Waypoint> {
        let p = self.pod(pod);
        let binary = self.agent_binary.with_file_name("ambit-waypoint");
        let log = self.dir.path().join(format!("waypoint-{}.log", pod.replace('/', "-")));
        let token_file = self.waypoint_token_file(pod);
        std::fs::write(&token_file, self.ca_token(&p.node, Some(&format!("{}/{}", p.namespace, p.service_account)))?)?;
        let mut cmd = p.command(binary.to_str().context("UTF-8 path")?);
        cmd.args(["--pod", pod, "--log-format", "json", "--ca-addr", CA_ADDR, "--config-dir"])
            .arg(self.config_dir())
            .arg("--ca-root")
            .arg(self.trust_anchors())
            .arg("--ca-token-file")
            .arg(&token_file)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let child = cmd.spawn().with_context(|| format!("start {} in {pod}", binary.display()))?;
        let waypoint = Waypoint { child, log };
        wait_until(Duration::from_secs(20), &format!("waypoint {pod} ready"), || {
            Ok(waypoint.log_text().contains("waypoint ready"))
        })
        .with_context(|| waypoint.log_text())?;
        Ok(waypoint)
    }

    /// Starts a long-running process in a pod and returns its pid; the bed
    /// kills it on drop.
    pub fn spawn(&self, pod: &str, program: &str, args: &[&str]) -> Result<u32> {
        let mut cmd = self.pod(pod).command(program);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("start {program} in {pod}"))?;
        let pid = child.id();
        self.children.lock().expect("children lock").push(child);
        Ok(pid)
    }

    /// Runs a command in a pod to completion.
    pub fn run(&self, pod: &str, program: &str, args: &[&str]) -> Result<Output> {
        let output = self
            .pod(pod)
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {program} in {pod}"))?;
        Ok(output)
    }

    /// Runs a command in a pod and returns its stdout; fails on a non-zero exit.
    pub fn run_ok(&self, pod: &str, program: &str, args: &[&str]) -> Result<String> {
        let output = self.run(pod, program, args)?;
        if !output.status.success() {
            bail!(
                "{program} {args:?} in {pod} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts a threaded HTTP file server (Python's http.server, with a
    /// listen backlog large enough for hundreds of concurrent clients) in a
    /// pod, serving `dir` on `port`, and waits until it listens. `log`
    /// receives its access log, which names each client's address.
    pub fn http_server(&self, pod: &str, port: u16, dir: &Path, log: &Path) -> Result<()> {
        self.http_server_at(pod, &self.pod(pod).ip.to_string(), port, dir, log)
    }

    /// Like [`Bed::http_server`], bound to `bind`: `::` listens on every
    /// address of both families, as Go, Java and nginx servers do by default.
    pub fn http_server_at(&self, pod: &str, bind: &str, port: u16, dir: &Path, log: &Path) -> Result<()> {
        self.python_http_server(pod, bind, port, dir, log, "HTTP/1.0")
    }

    /// Like [`Bed::http_server`], speaking HTTP/1.1: connections stay open
    /// between requests (keep-alive) until the client closes them.
    pub fn http_keepalive_server(&self, pod: &str, port: u16, dir: &Path, log: &Path) -> Result<()> {
        self.python_http_server(pod, "0.0.0.0", port, dir, log, "HTTP/1.1")
    }

    fn python_http_server(
        &self,
        pod: &str,
        bind: &str,
        port: u16,
        dir: &Path,
        log: &Path,
        protocol: &str,
    ) -> Result<()> {
        const SERVER: &str = "import functools, http.server, socket, sys\n\
            class Server(http.server.ThreadingHTTPServer):\n    request_queue_size = 1024\n\
            \x20   address_family = socket.AF_INET6 if ':' in sys.argv[2] else socket.AF_INET\n\
            class Handler(http.server.SimpleHTTPRequestHandler):\n    protocol_version = sys.argv[4]\n\
            handler = functools.partial(Handler, directory=sys.argv[3])\n\
            Server((sys.argv[2], int(sys.argv[1])), handler).serve_forever()\n";
        let p = self.pod(pod);
        let mut cmd = p.command("python3");
        cmd.args(["-c", SERVER, &port.to_string(), bind])
            .arg(dir)
            .arg(protocol)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log)?);
        self.children.lock().expect("children lock").push(cmd.spawn()?);
        self.wait_listening(pod, port)
    }

    /// Starts an iperf3 server in a pod and waits until it listens.
    pub fn iperf3_server(&self, pod: &str, port: u16) -> Result<()> {
        self.spawn(pod, "iperf3", &["-s", "-p", &port.to_string()])?;
        self.wait_listening(pod, port)
    }

    /// Waits until something in the pod listens on TCP `port` (checked with
    /// `ss` inside the pod, so the check itself makes no connection).
    pub fn wait_listening(&self, pod: &str, port: u16) -> Result<()> {
        let filter = format!("sport = :{port}");
        wait_until(Duration::from_secs(10), &format!("{pod} listening on {port}"), || {
            Ok(!self.run_ok(pod, "ss", &["-Hltn", &filter])?.trim().is_empty())
        })
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = self.stop_ca();
        if self.peer.is_some() {
            let _ = self.stop_peer_ca();
        }
        for mut child in self.children.lock().map(|mut c| std::mem::take(&mut *c)).unwrap_or_default() {
            let _ = child.kill();
            let _ = child.wait();
        }
        cleanup::remove_run(&self.run);
    }
}

/// A pod's configuration file (standalone mode); `trust_domain` for a pod
/// of another mesh.
fn pod_yaml(pod: &Pod, trust_domain: Option<&str>) -> String {
    let labels: String = pod.labels.iter().map(|(k, v)| format!("\n    {k}: {v}")).collect();
    let trust_domain = trust_domain.map(|td| format!("\n    ambit.dev/trust-domain: {td}")).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:{labels}\n  annotations:\n    ambit.dev/netns: {netns}{trust_domain}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\nstatus:\n  podIPs:\n  - ip: {ip}\n{ip6}",
        name = pod.name,
        ns = pod.namespace,
        netns = pod.netns_path().display(),
        node = pod.node,
        sa = pod.service_account,
        ip = pod.ip,
        ip6 = pod.ip6.map(|ip6| format!("  - ip: {ip6}\n")).unwrap_or_default(),
    )
}

fn write_atomically(dir: &Path, file: &str, contents: &str) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, dir.join(file))?;
    Ok(())
}

/// A figure of `/proc/<pid>/status` in kB, e.g. `VmRSS:` (resident now)
/// or `VmHWM:` (the peak).
pub fn proc_status(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{key} in /proc/{pid}/status"))
}

/// Polls `check` until it returns true, failing after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            match last_error {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Makes `cmd` start inside a netns and, if given, a cgroup. The fds are
/// opened here and only used by raw syscalls after fork. The process gets a
/// process group of its own, so a Ctrl-C at the terminal reaches only the
/// bed's owner, which then tears everything down in order.
fn enter(cmd: &mut Command, netns: &Path, cgroup: Option<&Path>) -> Result<()> {
    cmd.process_group(0);
    let netns_fd = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    let procs = cgroup
        .map(|c| OpenOptions::new().write(true).open(c.join("cgroup.procs")))
        .transpose()
        .context("open cgroup.procs")?;
    // SAFETY: the closure runs in the child between fork and exec. It only
    // makes two syscalls (write to cgroup.procs, setns) on fds opened before
    // the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                // "0" moves the writing process itself.
                nix::unistd::write(procs, b"0")?;
            }
            nix::sched::setns(&netns_fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(())
        });
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run_ok(Command::new("ip").args(args))
}

fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    run_ok(Command::new("ip").arg("-n").arg(netns).args(args))
}

/// Runs `cmd` with `input` on its stdin, failing with its stderr.
fn run_with_input(cmd: &mut Command, input: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("{cmd:?} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let output = cmd.stdin(Stdio::null()).output().with_context(|| format!("run {cmd:?}"))?;
    if !output.status.success() {
        bail!("{cmd:?} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}
