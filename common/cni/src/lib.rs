//! The conversation between the `ambit-cni` plugin and the node agent.
//!
//! The plugin connects to the agent's Unix socket, writes one [`Request`]
//! as a JSON line and reads one [`Reply`] as a JSON line. The agent also
//! keeps [`CAPTURE_NAMESPACES_FILE`] next to its socket: what the plugin
//! falls back on while no agent answers.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Where the agent listens for the plugin, unless the plugin's
/// configuration says `agentSocket`.
pub const DEFAULT_SOCKET: &str = "/var/run/ambit/cni.sock";

/// The file, in the socket's directory, that lists the namespaces whose
/// pods are captured by default ([`CaptureNamespaces`]).
pub const CAPTURE_NAMESPACES_FILE: &str = "capture-namespaces.json";

/// How long the plugin waits for the agent's answer. Kubelet retries a
/// failed ADD, so a pod waits rather than starting uncaptured.
pub const ANSWER_TIMEOUT_SECS: u64 = 5;

/// The CNI operation the runtime asked the plugin for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
}

/// One pod sandbox, as the runtime described it to the plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`; runtimes that do not pass it leave it out.
    pub uid: Option<String>,
    /// `CNI_NETNS`, as the host sees it.
    pub netns: String,
    /// The pod's addresses, from the primary plugin's result.
    pub ips: Vec<IpAddr>,
}

impl Request {
    /// `namespace/name`, the way the agent names pods.
    pub fn pod_id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Reply {
    /// The pod is captured: its traffic goes through the mesh.
    Captured,
    /// The pod is not for the mesh (its namespace is not ambient, say).
    NotCaptured { reason: String },
    /// The pod should be captured and is not: the pod must not start.
    Failed { reason: String },
}

/// What the plugin decides by while no agent answers: a pod in one of
/// these namespaces must not start uncaptured, so its ADD fails and
/// kubelet retries; other pods start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureNamespaces {
    pub namespaces: Vec<String>,
}
