//! The Kubernetes manifests in deploy/: they render with kubectl's
//! kustomize, pass Kubernetes 1.33's schemas with unknown fields refused
//! (kubernetes-validate bundles them, so this runs offline), keep the
//! promises the docs make (no node without an agent during a rollout, the
//! capabilities listed and no more), and pass only flags the binaries take.

use std::{path::Path, process::Command};

use ambit_testbed::agent_binary;
use serde::Deserialize as _;
use serde_json::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// `kubectl kustomize <dir>`, as objects.
fn render(dir: &str) -> (String, Vec<Value>) {
    let out = Command::new("kubectl").args(["kustomize", &format!("{DEPLOY}/{dir}")]).output().expect("run kubectl");
    assert!(out.status.success(), "kubectl kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let objects = serde_yaml_ng::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap()).collect();
    (text, objects)
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn every_kustomization_passes_the_kubernetes_1_33_schemas() {
    for dir in ["", "istio-crds-present", "examples/waypoint", "examples/spire"] {
        let (text, objects) = render(dir);
        assert!(!objects.is_empty(), "{dir}");
        let mut validate = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", "1.33.0", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run kubernetes-validate (cargo xtask setup installs it)");
        std::io::Write::write_all(validate.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
        let out = validate.wait_with_output().unwrap();
        let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "deploy/{dir}:\n{report}");
        println!("deploy/{dir}:\n{report}");
    }
}

#[test]
fn the_crds_are_optional_and_nothing_else_is() {
    let kinds = |objects: &[Value]| -> Vec<String> {
        let mut kinds: Vec<String> =
            objects.iter().map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"])).collect();
        kinds.sort();
        kinds
    };
    let (_, all) = render("");
    let (_, without) = render("istio-crds-present");
    let crds: Vec<String> = kinds(&all).into_iter().filter(|k| !kinds(&without).contains(k)).collect();
    assert_eq!(crds.len(), 3, "{crds:?}");
    assert!(crds.iter().all(|k| k.contains("CustomResourceDefinition") && k.contains("security.istio.io")), "{crds:?}");
}

#[test]
fn the_daemonset_keeps_its_promises() {
    let (_, objects) = render("");
    let ds = find(&objects, "DaemonSet", "ambit-agent");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    let agent = &spec["containers"][0];
    let mut caps: Vec<&str> = agent["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    caps.sort();
    assert_eq!(caps, ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"]);
    assert_eq!(agent["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(spec["containers"].as_array().unwrap().iter().all(|c| c["securityContext"]["privileged"].is_null()));
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
    let mount =
        |name: &str| agent["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap().clone();
    assert_eq!(mount("proc")["readOnly"], true, "/proc is read-only");
    let host_paths: Vec<&str> =
        spec["volumes"].as_array().unwrap().iter().filter_map(|v| v["hostPath"]["path"].as_str()).collect();
    for path in ["/sys/fs/bpf", "/proc", "/opt/cni/bin", "/etc/cni/net.d", "/var/run/netns"] {
        assert!(host_paths.contains(&path), "{path} in {host_paths:?}");
    }
    let token = spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "token").unwrap();
    assert_eq!(token["projected"]["sources"][0]["serviceAccountToken"]["audience"], "ambit-ca");
}

/// Each container's command line is one its binary accepts: clap refuses
/// an unknown flag before it prints the help.
#[test]
fn every_container_passes_only_flags_its_binary_takes() {
    let agent = agent_binary();
    let binaries = agent.parent().unwrap();
    let mut checked = 0;
    for dir in ["", "examples/waypoint", "examples/spire"] {
        let (_, objects) = render(dir);
        for object in objects.iter().filter(|o| matches!(o["kind"].as_str(), Some("DaemonSet" | "Deployment"))) {
            for container in object["spec"]["template"]["spec"]["containers"].as_array().unwrap() {
                let command = container["command"][0].as_str().unwrap();
                let args: Vec<String> = container["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().replace("$(", "").replace(')', ""))
                    .collect();
                let out = Command::new(binaries.join(command)).args(&args).arg("--help").output().unwrap();
                assert!(
                    out.status.success(),
                    "{} {command} {args:?}: {}",
                    object["metadata"]["name"],
                    String::from_utf8_lossy(&out.stderr)
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 7, "agent, installer, CA, waypoint; and the agent, installer and CA of the SPIRE example");
    assert!(Path::new(&binaries.join("ambit-cni")).exists());
}
