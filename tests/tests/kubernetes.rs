//! Kubernetes mode against the API server double (no kube-apiserver can run
//! here; the double speaks its wire protocol): the CA, run as
//! `ambit-agent ca serve --kubernetes`, issues over its real HTTPS API only
//! what each caller's service-account token may have.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ambit_testbed::{
    agent_binary,
    apiserver::{ApiServer, TokenOwner},
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde_json::json;

/// Kills the process when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pod(namespace: &str, name: &str, service_account: &str, node: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node, "serviceAccountName": service_account, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running"},
    })
}

/// A kubeconfig that points at the double.
fn kubeconfig(dir: &Path, server: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster: {{server: \"{server}\"}}\n\
         users:\n- name: test\n  user: {{}}\ncontexts:\n- name: double\n  context: {{cluster: double, user: test}}\n\
         current-context: double\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A fresh P-256 key's certificate request, DER, base64.
fn csr(dir: &Path) -> String {
    let der = dir.join("csr.der");
    let status = Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=x"])
        .args(["-keyout", dir.join("key.pem").to_str().unwrap(), "-outform", "DER", "-out", der.to_str().unwrap()])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    STANDARD.encode(std::fs::read(der).unwrap())
}

/// POSTs an SVID request to the CA; returns the HTTP status and the body.
fn request_svid(ca: SocketAddr, dir: &Path, node: &str, token: &str, identity: &str) -> (u16, String) {
    let (namespace, service_account) = identity.split_once('/').unwrap();
    let body = json!({"node": node, "token": token, "namespace": namespace, "service_account": service_account, "csr": csr(dir)});
    let output = Command::new("curl")
        .args(["-sSk", "--http2", "--max-time", "20", "-H", "content-type: application/json"])
        .args(["--data-binary", &body.to_string(), "-w", "\n%{http_code}", &format!("https://{ca}/v1/svid")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or_default();
    (code.parse().unwrap_or(0), body.to_string())
}

#[test]
fn the_ca_issues_in_a_cluster_only_what_each_token_may_have() {
    let api = ApiServer::start().unwrap();
    let uid = |object: serde_json::Value| object["metadata"]["uid"].as_str().unwrap().to_string();
    let agent_pod = uid(api.put(pod("ambit-system", "agent-n1", "ambit-agent", "n1")).unwrap());
    let waypoint_pod = uid(api.put(pod("shop", "wp-1", "waypoint", "n1")).unwrap());
    api.put(pod("shop", "web-1", "web", "n1")).unwrap();
    api.put(pod("shop", "api-1", "api", "n2")).unwrap();
    let owner = |namespace: &str, account: &str, pod: &str, pod_uid: &str| TokenOwner {
        namespace: namespace.into(),
        service_account: account.into(),
        pod_name: pod.into(),
        pod_uid: pod_uid.into(),
        audiences: vec!["ambit-ca".into()],
    };
    api.add_token("agent-token", owner("ambit-system", "ambit-agent", "agent-n1", &agent_pod));
    api.add_token("waypoint-token", owner("shop", "waypoint", "wp-1", &waypoint_pod));

    let dir = tempfile::tempdir().unwrap();
    let listen = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let ca = Running(
        Command::new(agent_binary())
            .args(["ca", "serve", "--kubernetes", "--dir", dir.path().join("ca").to_str().unwrap()])
            .args(["--listen", &listen.to_string()])
            .env("KUBECONFIG", kubeconfig(dir.path(), &api.url()))
            .stderr(std::fs::File::create(dir.path().join("ca.log")).unwrap())
            .spawn()
            .expect("start ambit-agent ca serve"),
    );
    let started = Instant::now();
    while TcpStream::connect(listen).is_err() {
        assert!(started.elapsed() < Duration::from_secs(20), "the CA did not listen: {}", log(dir.path()));
        std::thread::sleep(Duration::from_millis(100));
    }
    let cases = [
        ("agent-token", "n1", "shop/web", 200, "a pod of the agent's node"),
        ("agent-token", "n1", "shop/api", 403, "a pod of another node"),
        ("agent-token", "n2", "shop/api", 403, "the agent speaks for its own node only"),
        ("waypoint-token", "n1", "shop/waypoint", 200, "a waypoint's own identity"),
        ("waypoint-token", "n1", "shop/web", 403, "a waypoint may have only its own identity"),
        ("a-forged-token", "n1", "shop/web", 401, "a token the API server never issued"),
    ];
    for (token, node, identity, expected, why) in cases {
        let (status, body) = request_svid(listen, dir.path(), node, token, identity);
        assert_eq!(status, expected, "{token} asks for {identity} on {node} ({why}): {body}\n{}", log(dir.path()));
    }
    drop(ca);
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("ca.log")).unwrap_or_default()
}
