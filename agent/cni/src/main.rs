//! `ambit-cni`: a chained CNI plugin, run by the container runtime after the
//! primary plugin for every pod sandbox on the node.
//!
//! On ADD it tells the node agent the pod's namespace, name, uid, netns and
//! addresses (from the primary plugin's result) and waits for the answer: a
//! pod the agent should capture and cannot fails ADD, so it never starts
//! uncaptured and kubelet retries. While no agent answers, a pod in a
//! namespace the agent last listed as captured fails the same way, and
//! other pods start (docs/ARCHITECTURE.md, "Finding pods"). DEL is
//! idempotent and never fails; CHECK asks again; VERSION is answered here.
//! The primary plugin's result is passed on unchanged.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use ambit_cni_api::{
    ANSWER_TIMEOUT_SECS, CAPTURE_NAMESPACES_FILE, CaptureNamespaces, Command, DEFAULT_SOCKET, Reply, Request,
};
use serde::Deserialize;
use serde_json::{Value, json};

const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// CNI error codes (the CNI specification's well-known ones).
const INVALID_ENVIRONMENT: u32 = 4;
const DECODING_FAILURE: u32 = 6;
const INVALID_CONFIG: u32 = 7;
const TRY_AGAIN_LATER: u32 = 11;

/// The plugin's entry in the conflist.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    /// The agent's socket; [`DEFAULT_SOCKET`] if not given.
    agent_socket: Option<PathBuf>,
    prev_result: Option<Value>,
}

/// A failure, reported to the runtime as the CNI error object.
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: details.into() }
    }
}

fn main() -> ExitCode {
    let mut stdin = String::new();
    let result = std::io::stdin()
        .read_to_string(&mut stdin)
        .map_err(|e| CniError::new(DECODING_FAILURE, "cannot read the network configuration", e.to_string()))
        .and_then(|_| run(&stdin, &|name| std::env::var(name).ok()));
    match result {
        Ok(output) => {
            if let Some(output) = output {
                println!("{output}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            let version = serde_json::from_str::<Value>(&stdin)
                .ok()
                .and_then(|conf| conf["cniVersion"].as_str().map(str::to_string))
                .unwrap_or_else(|| "1.0.0".to_string());
            println!(
                "{}",
                json!({"cniVersion": version, "code": error.code, "msg": error.msg, "details": error.details})
            );
            ExitCode::FAILURE
        }
    }
}

/// What the plugin prints for `stdin` and the environment `env`.
fn run(stdin: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Value>, CniError> {
    let command = env("CNI_COMMAND")
        .ok_or_else(|| CniError::new(INVALID_ENVIRONMENT, "CNI_COMMAND is not set", "run by a container runtime"))?;
    if command == "VERSION" {
        return Ok(Some(json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS})));
    }
    let conf: NetConf = serde_json::from_str(stdin)
        .map_err(|e| CniError::new(DECODING_FAILURE, "cannot parse the network configuration", e.to_string()))?;
    let command = match command.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        other => {
            return Err(CniError::new(
                INVALID_ENVIRONMENT,
                format!("unknown CNI_COMMAND {other}"),
                "ADD, DEL, CHECK or VERSION",
            ));
        }
    };
    let socket = conf.agent_socket.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let pass_on = || {
        let mut result = conf.prev_result.clone().unwrap_or_else(|| json!({}));
        result["cniVersion"] = json!(conf.cni_version);
        result
    };
    let args = pod_args(&env("CNI_ARGS").unwrap_or_default());
    let (Some(namespace), Some(name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) else {
        // Not a Kubernetes pod: nothing for the mesh.
        return Ok((command == Command::Add).then(pass_on));
    };
    let ips = match (&conf.prev_result, command) {
        (Some(result), _) => result_ips(result)?,
        (None, Command::Del) => Vec::new(),
        (None, _) => {
            return Err(CniError::new(
                INVALID_CONFIG,
                "ambit-cni has no prevResult",
                "chain it after the primary plugin in the conflist, as the last plugin",
            ));
        }
    };
    let request = Request {
        command,
        namespace: namespace.clone(),
        name: name.clone(),
        uid: args.get("K8S_POD_UID").cloned(),
        netns: env("CNI_NETNS").unwrap_or_default(),
        ips,
    };
    let pod = request.pod_id();
    match (command, ask_agent(&socket, &request)) {
        (Command::Del, _) => Ok(None),
        (_, Ok(Reply::Captured | Reply::NotCaptured { .. })) => Ok((command == Command::Add).then(pass_on)),
        (_, Ok(Reply::Failed { reason })) => Err(CniError::new(
            TRY_AGAIN_LATER,
            format!("the ambit agent cannot capture pod {pod}"),
            format!("{reason}; kubelet retries the sandbox"),
        )),
        (_, Err(unreachable)) => match captured_namespaces(&socket.with_file_name(CAPTURE_NAMESPACES_FILE)) {
            Ok(namespaces) if !namespaces.contains(namespace) => {
                eprintln!("ambit-cni: {unreachable}; pod {pod} starts: namespace {namespace} is not captured");
                Ok((command == Command::Add).then(pass_on))
            }
            Ok(_) => Err(CniError::new(
                TRY_AGAIN_LATER,
                format!("no ambit agent answers for pod {pod}, whose namespace is captured"),
                format!("{unreachable}; the pod starts once the agent on this node is ready"),
            )),
            Err(e) => Err(CniError::new(
                TRY_AGAIN_LATER,
                format!("no ambit agent answers for pod {pod}"),
                format!("{unreachable}; without the agent's list of captured namespaces ({e}), every pod waits for it"),
            )),
        },
    }
}

/// `K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;...` as a map.
fn pod_args(cni_args: &str) -> HashMap<String, String> {
    cni_args
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

/// The addresses in a CNI result (`ips[].address`, in CIDR notation).
fn result_ips(result: &Value) -> Result<Vec<IpAddr>, CniError> {
    let entries = result["ips"].as_array().map(Vec::as_slice).unwrap_or_default();
    entries
        .iter()
        .map(|entry| {
            let address = entry["address"].as_str().unwrap_or_default();
            address.split('/').next().unwrap_or_default().parse().map_err(|_| {
                CniError::new(DECODING_FAILURE, "prevResult.ips[].address is not an address in CIDR notation", address)
            })
        })
        .collect()
}

/// Sends `request` to the agent and reads its reply.
fn ask_agent(socket: &Path, request: &Request) -> Result<Reply, String> {
    let unreachable = |e: std::io::Error| format!("the ambit agent's socket {}: {e}", socket.display());
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    let timeout = Some(Duration::from_secs(ANSWER_TIMEOUT_SECS));
    stream.set_read_timeout(timeout).map_err(unreachable)?;
    stream.set_write_timeout(timeout).map_err(unreachable)?;
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(unreachable)?;
    serde_json::from_str(&answer).map_err(|e| format!("the ambit agent's answer {answer:?}: {e}"))
}

/// The namespaces the agent last said it captures.
fn captured_namespaces(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let listed: CaptureNamespaces = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(listed.namespaces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn version_lists_the_spec_versions() {
        let out = run("", &env(&[("CNI_COMMAND", "VERSION")])).ok().flatten().unwrap();
        assert_eq!(out["supportedVersions"].as_array().unwrap().len(), SUPPORTED_VERSIONS.len());
    }

    #[test]
    fn pods_of_no_kubernetes_namespace_pass_unchanged() {
        let conf = r#"{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni","prevResult":{"ips":[{"address":"10.1.0.5/24"}]}}"#;
        let out = run(conf, &env(&[("CNI_COMMAND", "ADD"), ("CNI_ARGS", "IgnoreUnknown=1")])).ok().flatten().unwrap();
        assert_eq!(out, json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]}));
    }

    #[test]
    fn add_without_prev_result_says_how_to_chain_it() {
        let conf = r#"{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni"}"#;
        let vars = &[("CNI_COMMAND", "ADD"), ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web")];
        let Err(error) = run(conf, &env(vars)) else { panic!("ADD without prevResult passed") };
        assert_eq!(error.code, INVALID_CONFIG);
        assert!(error.details.contains("chain it after the primary plugin"), "{}", error.details);
    }

    #[test]
    fn addresses_come_from_the_primary_result() {
        let result = json!({"ips": [{"address": "10.1.0.5/24"}, {"address": "fd00::5/64"}]});
        assert_eq!(
            result_ips(&result).ok().unwrap(),
            ["10.1.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]
        );
        assert!(result_ips(&json!({"ips": [{"address": "nonsense"}]})).is_err());
    }
}
