//! Kubernetes mode in the test bed: the API server double (in the fabric
//! netns, where every node and the CA reach it), the CA in Kubernetes mode
//! (its root in a Secret, callers' tokens reviewed by the double), and pods
//! created through a real CNI chain: Debian's `loopback`, then its `bridge`
//! plugin with `host-local` IPAM, then `ambit-cni`, each run with the CNI environment
//! variables and the configuration on stdin, as a container runtime runs
//! them. No container runtime is needed: a pod is a netns, a cgroup named
//! after the pod's uid, and its object in the API.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{
    Bed, CA_ADDR, DEFAULT_LEAF_TTL, PREFIX, Pod,
    apiserver::{ApiServer, TokenOwner},
    enter, ip, wait_until,
};

/// Where the node agents run, and as whom.
pub const AGENT_NAMESPACE: &str = "ambit-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "ambit-agent";
/// The double's address on the fabric bridge (the CA's address, another port).
const API_PORT: u16 = 6443;
/// Debian's containernetworking-plugins.
const CNI_PLUGINS: &str = "/usr/lib/cni";
const AUDIENCE: &str = "ambit-ca";

/// The bed's Kubernetes: the double and what agents and the CA need to use it.
pub(crate) struct Kubernetes {
    pub(crate) api: ApiServer,
    kubeconfig: PathBuf,
    dir: PathBuf,
    /// How long each successful ambit-cni ADD took, start to exit.
    add_times: Mutex<Vec<Duration>>,
}

impl Kubernetes {
    /// The agent's arguments in Kubernetes mode.
    pub(crate) fn agent_args(&self, cmd: &mut Command, node: &str) {
        cmd.arg("--kubernetes")
            .arg("--cni-socket")
            .arg(self.cni_socket(node))
            .arg("--ca-root")
            .arg(self.root_file())
            .arg("--node-token-file")
            .arg(self.token_file(&format!("agent-{node}")))
            .env("KUBECONFIG", &self.kubeconfig);
    }

    /// The CA's arguments in Kubernetes mode.
    pub(crate) fn ca_args<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.arg("--kubernetes").arg("--dir").arg(self.dir.join("ca")).env("KUBECONFIG", &self.kubeconfig)
    }

    fn cni_socket(&self, node: &str) -> PathBuf {
        self.dir.join(format!("cni-{node}")).join("cni.sock")
    }

    fn root_file(&self) -> PathBuf {
        self.dir.join("root-cert.pem")
    }

    fn token_file(&self, owner: &str) -> PathBuf {
        self.dir.join("tokens").join(owner)
    }
}

/// A CNI plugin's failure: its exit status and the error object it printed.
#[derive(Debug)]
pub struct CniFailure {
    pub plugin: String,
    pub output: Value,
}

impl std::fmt::Display for CniFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI plugin {} failed: {}", self.plugin, self.output)
    }
}

impl std::error::Error for CniFailure {}

impl Bed {
    /// A bed in Kubernetes mode: the API server double in the fabric, a
    /// node-agent pod (and its projected token) per node, and the CA in
    /// Kubernetes mode. Agents started on it run with `--kubernetes`.
    pub fn kubernetes(node_names: &[&str]) -> Result<Bed> {
        Self::kubernetes_with_agent(node_names, crate::agent::agent_binary())
    }

    /// Like [`Bed::kubernetes`], running `agent_binary` for the agents and the CA.
    pub fn kubernetes_with_agent(node_names: &[&str], agent_binary: PathBuf) -> Result<Bed> {
        let mut bed = Bed::with_agent(node_names, agent_binary)?;
        bed.stop_ca()?;
        let ca_ip: Ipv4Addr = CA_ADDR.split(':').next().expect("ip:port").parse()?;
        let fabric = Path::new("/run/netns").join(&bed.fabric);
        let api = ApiServer::start_in(&fabric, SocketAddr::new(ca_ip.into(), API_PORT))?;
        let dir = bed.dir.path().join("kubernetes");
        std::fs::create_dir_all(dir.join("tokens"))?;
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        api.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": AGENT_NAMESPACE}}))?;
        api.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}))?;
        let kubernetes = Kubernetes { api, kubeconfig, dir, add_times: Mutex::default() };
        for node in bed.nodes.clone() {
            let name = format!("ambit-agent-{}", node.name);
            let pod = kubernetes.api.put(json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": AGENT_NAMESPACE, "labels": {"app": "ambit-agent"}},
                "spec": {"nodeName": node.name, "serviceAccountName": AGENT_SERVICE_ACCOUNT, "hostNetwork": true},
                "status": {"phase": "Running", "podIPs": [{"ip": node.ip.to_string()}]},
            }))?;
            kubernetes.project_token(&format!("agent-{}", node.name), AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, &pod)?;
        }
        bed.kubernetes = Some(kubernetes);
        bed.start_ca(DEFAULT_LEAF_TTL)?;
        let kubernetes = bed.kubernetes.as_ref().expect("set above");
        let root = kubernetes.root_file();
        wait_until(Duration::from_secs(10), "the CA to publish its root", || {
            let published = kubernetes.api.get("configmaps", Some(AGENT_NAMESPACE), "ambit-root-cert");
            match published.as_ref().and_then(|cm| cm["data"]["root-cert.pem"].as_str()) {
                Some(pem) => std::fs::write(&root, pem).map(|()| true).map_err(Into::into),
                None => Ok(false),
            }
        })
        .with_context(|| format!("CA log:\n{}", std::fs::read_to_string(bed.ca_log()).unwrap_or_default()))?;
        Ok(bed)
    }

    /// The API server double of a bed made with [`Bed::kubernetes`].
    pub fn api(&self) -> &ApiServer {
        &self.kube().api
    }

    /// How long each successful `ambit-cni` ADD took, from the plugin's
    /// start to its exit: for a captured pod, the time from ADD to capture.
    pub fn cni_add_times(&self) -> Vec<Duration> {
        self.kube().add_times.lock().expect("add times lock").clone()
    }

    /// The mesh's root certificate, as the CA published it.
    pub fn root_cert(&self) -> PathBuf {
        self.kube().root_file()
    }

    /// The projected token of `node`'s agent.
    pub fn agent_token_file(&self, node: &str) -> PathBuf {
        self.kube().token_file(&format!("agent-{node}"))
    }

    /// Runs `f` on a thread inside the fabric netns (where the CA and the
    /// API server listen), and returns what it returns.
    pub fn in_fabric<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.in_netns(&self.fabric, f)
    }

    /// Runs `f` on a thread inside the netns named `netns` (a node's, say:
    /// where an attacker on the node network stands).
    pub fn in_netns<T: Send>(&self, netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = std::fs::File::open(Path::new("/run/netns").join(netns))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<T> {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("enter netns {netns}"))?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the thread in netns {netns} panicked"))?
        })
    }

    fn kube(&self) -> &Kubernetes {
        self.kubernetes.as_ref().expect("a bed made with Bed::kubernetes")
    }

    /// Declares a namespace through the API, ambient or not.
    pub fn api_namespace(&self, name: &str, ambient: bool) -> Result<()> {
        let labels = if ambient { json!({"ambit.dev/dataplane-mode": "ambient"}) } else { json!({}) };
        self.api()
            .put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}))?;
        Ok(())
    }

    /// A pod created the way kubelet does it: its object (scheduled on
    /// `node`, no address yet), its sandbox (netns and a cgroup named after
    /// its uid), the CNI chain's ADD, and then its address in its status.
    /// A failed ADD leaves the sandbox for [`Bed::cni_add`] to retry.
    pub fn add_cni_pod(&mut self, node: &str, namespace: &str, name: &str) -> Result<Pod> {
        let node = self.node(node).clone();
        let object = self.api().put(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
            "spec": {"nodeName": node.name, "serviceAccountName": name, "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Pending"},
        }))?;
        let uid = object["metadata"]["uid"].as_str().context("the double gave the pod no uid")?.to_string();
        let netns = format!("{PREFIX}{}-{namespace}-{name}", self.run);
        ip(&["netns", "add", &netns])?;
        let cgroup = node.cgroup.join(format!("pod{uid}"));
        std::fs::create_dir(&cgroup)?;
        let pod = Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            node: node.name.clone(),
            ip: Ipv4Addr::UNSPECIFIED,
            ip6: None,
            service_account: name.to_string(),
            netns,
            cgroup,
            labels: [("app".to_string(), name.to_string())].into(),
            uid: Some(uid),
        };
        // The sandbox's process, as the pause container is: what the
        // agent finds in /proc after a restart.
        let mut sandbox = pod.command("sleep");
        sandbox.arg("infinity").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        self.children.lock().expect("children lock").push(sandbox.spawn().context("start the pod's sandbox process")?);
        self.pods.push(pod.clone());
        self.cni_add(&pod.id())
    }

    /// Runs the CNI chain's ADD for a pod of [`Bed::add_cni_pod`]; on
    /// success writes its address into the pod's status, as kubelet does.
    /// The error is a [`CniFailure`] when a plugin refused.
    pub fn cni_add(&mut self, id: &str) -> Result<Pod> {
        let pod = self.pod(id).clone();
        // Runtimes bring up the pod's loopback first (containerd's own
        // network, CRI-O's `loopback` plugin).
        let loopback = json!({"cniVersion": "1.0.0", "name": "lo", "type": "loopback"});
        self.run_plugin("loopback", "ADD", &pod, loopback)?;
        let bridge = self.run_plugin("bridge", "ADD", &pod, self.bridge_conf(&pod.node))?;
        let address = bridge["ips"][0]["address"].as_str().context("bridge returned no address")?;
        let ip: Ipv4Addr = address.split('/').next().unwrap_or_default().parse()?;
        let mut chained = self.ambit_cni_conf(&pod.node);
        chained["prevResult"] = bridge.clone();
        let started = Instant::now();
        let result = self.run_plugin("ambit-cni", "ADD", &pod, chained);
        let result = match result {
            Ok(result) => {
                self.kube().add_times.lock().expect("add times lock").push(started.elapsed());
                result
            }
            Err(error) => {
                // As a runtime does when a plugin of the chain fails: DEL.
                self.run_plugin("bridge", "DEL", &pod, self.bridge_conf(&pod.node)).ok();
                return Err(error);
            }
        };
        if result["ips"] != bridge["ips"] {
            bail!("ambit-cni changed the result: {result} from {bridge}");
        }
        let status = json!({"status": {"phase": "Running", "podIPs": [{"ip": ip.to_string()}]}});
        if !self.api().patch_status("pods", Some(&pod.namespace), &pod.name, &status) {
            bail!("pod {id} is gone from the API");
        }
        let stored = self.pods.iter_mut().find(|p| p.id() == id).expect("the pod");
        stored.ip = ip;
        Ok(stored.clone())
    }

    /// Deletes a pod the way kubelet does: the CNI chain's DEL, in reverse
    /// order, then the sandbox, then its object.
    pub fn delete_cni_pod(&mut self, id: &str) -> Result<()> {
        let pod = self.pod(id).clone();
        self.run_plugin("ambit-cni", "DEL", &pod, self.ambit_cni_conf(&pod.node))?;
        self.run_plugin("bridge", "DEL", &pod, self.bridge_conf(&pod.node))?;
        if let Ok(pids) = std::fs::read_to_string(pod.cgroup.join("cgroup.procs")) {
            for pid in pids.lines() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        ip(&["netns", "del", &pod.netns])?;
        let _ = std::fs::remove_dir(&pod.cgroup);
        self.api().remove("pods", Some(&pod.namespace), &pod.name);
        self.pods.retain(|p| p.id() != id);
        Ok(())
    }

    /// Projects a service-account token for `pod` (an API object) into a
    /// file named `owner`, as kubelet does, and returns the file.
    pub fn project_token(&self, owner: &str, pod: &Value) -> Result<PathBuf> {
        let namespace = pod["metadata"]["namespace"].as_str().context("the pod's namespace")?;
        let account = pod["spec"]["serviceAccountName"].as_str().context("the pod's service account")?;
        self.kube().project_token(owner, namespace, account, pod)
    }

    fn bridge_conf(&self, node: &str) -> Value {
        let index = self.node(node).index;
        json!({
            "cniVersion": "1.0.0",
            "name": "bed",
            "type": "bridge",
            "bridge": "cbr0",
            "isGateway": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{
                    "subnet": format!("10.244.{index}.0/24"),
                    "rangeStart": format!("10.244.{index}.10"),
                    "rangeEnd": format!("10.244.{index}.250"),
                    "gateway": format!("10.244.{index}.1"),
                }]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.kube().dir.join(format!("ipam-{node}")),
            },
        })
    }

    fn ambit_cni_conf(&self, node: &str) -> Value {
        json!({"cniVersion": "1.0.0", "name": "bed", "type": "ambit-cni", "agentSocket": self.kube().cni_socket(node)})
    }

    /// Runs one plugin of the chain, inside the pod's node (the plugin's
    /// "host"), with the CNI environment and `conf` on stdin.
    fn run_plugin(&self, plugin: &str, command: &str, pod: &Pod, conf: Value) -> Result<Value> {
        let binary = match plugin {
            "ambit-cni" => self.agent_binary.with_file_name("ambit-cni"),
            other => Path::new(CNI_PLUGINS).join(other),
        };
        let uid = pod.uid.as_deref().unwrap_or_default();
        let cni_path = format!("{CNI_PLUGINS}:{}", self.agent_binary.parent().unwrap_or(Path::new(".")).display());
        let mut cmd = Command::new(&binary);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", uid)
            .env("CNI_NETNS", pod.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={uid}",
                    pod.namespace, pod.name
                ),
            )
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        enter(&mut cmd, &Path::new("/run/netns").join(&self.node(&pod.node).netns), None)?;
        let mut child = cmd.spawn().with_context(|| format!("run {}", binary.display()))?;
        child.stdin.take().expect("piped").write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        let output: Value = match String::from_utf8_lossy(&out.stdout).trim() {
            "" => Value::Null,
            text => serde_json::from_str(text).with_context(|| format!("{plugin} {command} printed {text:?}"))?,
        };
        if !out.status.success() {
            return Err(CniFailure { plugin: plugin.to_string(), output }.into());
        }
        Ok(output)
    }
}

impl Kubernetes {
    /// Registers a token bound to `pod` with the double and writes it to a file.
    fn project_token(&self, owner: &str, namespace: &str, account: &str, pod: &Value) -> Result<PathBuf> {
        let token = format!("token-{owner}-{}", pod["metadata"]["uid"].as_str().unwrap_or_default());
        self.api.add_token(
            &token,
            TokenOwner {
                namespace: namespace.to_string(),
                service_account: account.to_string(),
                pod_name: pod["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                pod_uid: pod["metadata"]["uid"].as_str().unwrap_or_default().to_string(),
                audiences: vec![AUDIENCE.to_string()],
            },
        );
        let file = self.token_file(owner);
        std::fs::write(&file, token)?;
        Ok(file)
    }
}
