//! The state store: what the agent acts on, built from a configuration
//! snapshot. Read by the enrolment reconciler and by the proxies (to name the
//! workload behind an address in logs).

use std::{collections::HashMap, net::IpAddr};

use crate::{
    config::{DataplaneMode, Pod, Snapshot},
    identity::Identity,
};

#[derive(Debug, Default)]
pub struct State {
    snapshot: Snapshot,
    trust_domain: String,
    workload_by_ip: HashMap<IpAddr, String>,
}

impl State {
    pub fn new(snapshot: Snapshot, trust_domain: &str) -> Self {
        let workload_by_ip = snapshot.pods.values().flat_map(|pod| pod.ips.iter().map(|ip| (*ip, pod.id()))).collect();
        Self { snapshot, trust_domain: trust_domain.to_string(), workload_by_ip }
    }

    /// The identity a pod runs as.
    pub fn identity_of(&self, pod: &Pod) -> Identity {
        Identity::new(&self.trust_domain, &pod.namespace, &pod.service_account)
    }

    /// The ambient pod behind `ip` and the identity it must prove, if the
    /// address belongs to the mesh.
    pub fn meshed_workload(&self, ip: IpAddr) -> Option<(String, Identity)> {
        let pod = self.snapshot.pods.get(self.workload_by_ip.get(&ip)?)?;
        self.is_ambient(pod).then(|| (pod.id(), self.identity_of(pod)))
    }

    /// `namespace/name` of the pod that owns `ip`, if the mesh knows it.
    pub fn workload_at(&self, ip: IpAddr) -> Option<&str> {
        self.workload_by_ip.get(&ip).map(String::as_str)
    }

    /// Whether a pod is in ambient mode: its own label decides if it has one
    /// (`none` opts out, `ambient` opts in); otherwise its namespace's label.
    pub fn is_ambient(&self, pod: &Pod) -> bool {
        match pod.dataplane_mode {
            Some(mode) => mode == DataplaneMode::Ambient,
            None => self
                .snapshot
                .namespaces
                .get(&pod.namespace)
                .is_some_and(|ns| ns.dataplane_mode == Some(DataplaneMode::Ambient)),
        }
    }

    /// The ambient pods scheduled on `node`.
    pub fn pods_to_enrol<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.snapshot.pods.values().filter(move |pod| pod.node == node && self.is_ambient(pod))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Namespace;

    fn pod(ns: &str, name: &str, node: &str, mode: Option<DataplaneMode>) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            service_account: "default".into(),
            node: node.into(),
            labels: Default::default(),
            ips: vec![format!("10.0.0.{}", name.len()).parse().unwrap()],
            netns: None,
            dataplane_mode: mode,
            source: "pods.yaml".into(),
        }
    }

    #[test]
    fn enrolment_follows_namespace_then_pod_label() {
        let mut snapshot = Snapshot::default();
        for (name, mode) in [("shop", Some(DataplaneMode::Ambient)), ("legacy", None)] {
            snapshot.namespaces.insert(name.into(), Namespace { name: name.into(), dataplane_mode: mode });
        }
        for p in [
            pod("shop", "a", "n1", None),                              // ambient via namespace
            pod("shop", "bb", "n1", Some(DataplaneMode::None)),        // opted out
            pod("legacy", "ccc", "n1", None),                          // plain namespace
            pod("legacy", "dddd", "n1", Some(DataplaneMode::Ambient)), // opted in
            pod("shop", "eeeee", "n2", None),                          // other node
            pod("nowhere", "ffffff", "n1", None),                      // namespace not declared
        ] {
            snapshot.pods.insert(p.id(), p);
        }
        let state = State::new(snapshot, "cluster.local");
        let enrolled: Vec<String> = state.pods_to_enrol("n1").map(Pod::id).collect();
        assert_eq!(enrolled, vec!["legacy/dddd", "shop/a"]);
        assert_eq!(state.workload_at("10.0.0.5".parse().unwrap()), Some("shop/eeeee"));
        assert_eq!(state.workload_at("10.9.9.9".parse().unwrap()), None);
        let (id, identity) = state.meshed_workload("10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(
            (id.as_str(), identity.to_string().as_str()),
            ("shop/a", "spiffe://cluster.local/ns/shop/sa/default")
        );
        assert_eq!(state.meshed_workload("10.0.0.3".parse().unwrap()), None, "plain pods are outside the mesh");
        let (id, identity) = state.meshed_workload("10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(
            (id.as_str(), identity.to_string().as_str()),
            ("shop/a", "spiffe://cluster.local/ns/shop/sa/default")
        );
        assert_eq!(state.meshed_workload("10.0.0.3".parse().unwrap()), None, "plain pods are outside the mesh");
    }
}
