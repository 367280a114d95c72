//! From API objects to the documents the model parses: what ambit does not
//! read is dropped as objects arrive, and objects that are not for ambit
//! (unscheduled or finished pods, headless services, other classes'
//! Gateways) are left out before parsing.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use ambit_model::{
    DATAPLANE_MODE_LABEL, NETNS_ANNOTATION, TRUST_DOMAIN_ANNOTATION, USE_WAYPOINT_LABEL, WAYPOINT_CLASS,
};
use kube::api::DynamicObject;
use serde_json::{Map, Value, json};

/// Istio ambient's labels, honoured with `--istio-labels` for clusters
/// moving over from it; ambit's own label wins where both are set.
const ISTIO_LABELS: [(&str, &str); 2] =
    [("istio.io/dataplane-mode", DATAPLANE_MODE_LABEL), ("istio.io/use-waypoint", USE_WAYPOINT_LABEL)];

/// Which labels select ambit's behaviour.
#[derive(Clone, Copy, Debug, Default)]
pub struct Labels {
    /// Also honour `istio.io/dataplane-mode` and `istio.io/use-waypoint`.
    pub istio: bool,
}

/// Annotations ambit reads; the rest (kubectl's last applied
/// configuration, say) can be large and are dropped. A pod's network
/// namespace is never taken from the API: anyone who may edit a pod could
/// name another netns there (the host's, say); in a cluster the CNI plugin
/// reports it ([`PodNetwork`]).
/// The netns comes from the CNI report, and every pod of a cluster is in
/// the cluster's trust domain: a pod annotated otherwise would claim a
/// federated mesh's identity.
fn kept_annotation(key: &str) -> bool {
    (key.starts_with("ambit.dev/") && key != NETNS_ANNOTATION && key != TRUST_DOMAIN_ANNOTATION)
        || key == "istio.io/dry-run"
}

/// The fields of `data` (everything but the object's metadata) that ambit
/// reads, by kind: `None` keeps it all.
fn kept_fields(kind: &str) -> Option<&'static [(&'static str, &'static [&'static str])]> {
    match kind {
        "Namespace" => Some(&[]),
        "Pod" => Some(&[("spec", &["nodeName", "serviceAccountName"]), ("status", &["podIPs", "phase"])]),
        "Service" => Some(&[("spec", &["clusterIP", "ports", "selector"])]),
        _ => None,
    }
}

/// Drops what ambit does not read, so that a large cluster's objects fit
/// in the agent's memory.
pub fn keep_what_ambit_reads(kind: &str, object: &mut DynamicObject) {
    let metadata = &mut object.metadata;
    metadata.managed_fields = None;
    metadata.owner_references = None;
    metadata.finalizers = None;
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.retain(|key, _| kept_annotation(key));
    }
    let Some(kept) = kept_fields(kind) else { return };
    let mut data = Map::new();
    for (section, fields) in kept {
        let Some(Value::Object(found)) = object.data.get(*section) else { continue };
        let section_kept: Map<String, Value> = found
            .iter()
            .filter(|(key, _)| fields.contains(&key.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        data.insert(section.to_string(), Value::Object(section_kept));
    }
    object.data = Value::Object(data);
}

/// A pod of this node as its CNI ADD described it: where its network
/// namespace is, and its addresses before the API server has them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetwork {
    /// The pod the report was for; a pod of the same name with another uid
    /// is not given this network.
    pub uid: Option<String>,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
}

/// The CNI reports of this node's pods, by `namespace/name`.
pub type PodNetworks = BTreeMap<String, PodNetwork>;

/// The network `networks` holds for `object` (a pod), if it is this pod's.
pub fn network_of<'a>(networks: &'a PodNetworks, object: &DynamicObject) -> Option<&'a PodNetwork> {
    let id =
        format!("{}/{}", object.metadata.namespace.as_deref().unwrap_or_default(), object.metadata.name.as_deref()?);
    networks.get(&id).filter(|network| network.uid.is_none() || network.uid == object.metadata.uid)
}

/// The document the model parses for `object`, or `None` when the object
/// is not for ambit. A pod's `network`, if any, gives its netns and, until
/// the API server has them, its addresses.
pub fn to_model(
    kind: &str,
    object: &DynamicObject,
    labels: &Labels,
    network: Option<&PodNetwork>,
) -> Option<serde_yaml_ng::Value> {
    let mut data = object.data.clone();
    if let Some(network) = network {
        // Kubelet writes status.podIPs only after ADD has returned.
        let status = &mut data["status"];
        if status["podIPs"].as_array().is_none_or(|ips| ips.is_empty()) {
            status["podIPs"] = network.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
        }
    }
    let data = &data;
    let for_ambit = match kind {
        "Pod" => {
            let scheduled = data["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty());
            let finished = matches!(data["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
            let addressed = data["status"]["podIPs"].as_array().is_some_and(|ips| !ips.is_empty());
            scheduled && !finished && addressed
        }
        "Service" => data["spec"]["clusterIP"].as_str().is_some_and(|ip| !ip.is_empty() && ip != "None"),
        "Gateway" => data["spec"]["gatewayClassName"] == WAYPOINT_CLASS,
        _ => true,
    };
    if !for_ambit {
        return None;
    }
    let metadata = &object.metadata;
    let mut object_labels = metadata.labels.clone().unwrap_or_default();
    if labels.istio {
        for (istio, ambit) in ISTIO_LABELS {
            if let Some(value) = object_labels.get(istio).cloned() {
                object_labels.entry(ambit.to_string()).or_insert(value);
            }
        }
    }
    let mut annotations = metadata.annotations.clone().unwrap_or_default();
    if let Some(network) = network {
        annotations.insert(NETNS_ANNOTATION.to_string(), network.netns.display().to_string());
    }
    let mut document = json!({
        "kind": kind,
        "metadata": {
            "name": metadata.name,
            "namespace": metadata.namespace,
            "uid": metadata.uid,
            "labels": object_labels,
            "annotations": annotations,
        },
    });
    if let (Value::Object(document), Value::Object(data)) = (&mut document, data) {
        for (key, value) in data {
            document.insert(key.clone(), value.clone());
        }
    }
    serde_yaml_ng::to_value(&document).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_keeps_only_what_ambit_reads() {
        let mut pod: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web",
                "namespace": "shop",
                "labels": {"app": "web"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                    "ambit.dev/netns": "/proc/1/ns/net",
                    "ambit.dev/note": "kept",
                },
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}], "conditions": [{"type": "Ready"}]},
        }))
        .unwrap();
        keep_what_ambit_reads("Pod", &mut pod);
        assert!(pod.metadata.managed_fields.is_none());
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), ["ambit.dev/note"], "ambit's, and never a netns path");
        assert_eq!(
            pod.data,
            json!({"spec": {"nodeName": "n1", "serviceAccountName": "web"}, "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}]}})
        );
    }
}
