//! The state store: what the agent, the waypoint and `ambit policy check`
//! act on, built from a configuration snapshot: which pods to enrol, where a
//! connection goes, whose identity an address has, which mTLS mode and
//! which policies apply. Read by the enrolment reconciler, the proxies, the
//! waypoint, and [`check`].
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use spiffe::SpiffeId;

use ambit_authz::{Connection, Decision, PolicySet, Reason};
use ambit_identity::{
    Identity,
    federation::{EndpointProfile, FederatedDomain},
};
use ambit_model::{
    BundleEndpointProfile, DataplaneMode, GATEWAY_NAME_LABEL, InboundUdp, MtlsMode, PeerAuthentication, Pod,
    ROOT_NAMESPACE, Service, Snapshot, WaypointFor,
};

pub mod check;

/// Where a captured connection is going, as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A service's virtual IP: one of its endpoints takes the connection.
    Service { service: String, endpoints: Vec<Endpoint> },
    /// A service whose traffic goes through a waypoint: the waypoint's pods
    /// (their HBONE addresses) take the connection, never the service's
    /// endpoints directly. No pods: the connection fails closed.
    /// `service` is `None` for traffic addressed to a pod (a waypoint for
    /// workload traffic).
    Waypoint { service: Option<String>, waypoint: String, endpoints: Vec<Endpoint> },
    /// A pod the mesh knows.
    Workload(Endpoint),
    /// Anything else: passed through as plain TCP.
    External,
}

/// A pod address a connection can be sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub workload: String,
    pub addr: SocketAddr,
    /// The identity to demand over HBONE; `None` for a pod outside the mesh.
    pub identity: Option<Identity>,
}

#[derive(Debug, Default)]
pub struct State {
    snapshot: Snapshot,
    trust_domain: String,
    workload_by_ip: HashMap<IpAddr, String>,
    policies: PolicySet,
}

impl State {
    pub fn new(snapshot: Snapshot, trust_domain: &str) -> Self {
        let workload_by_ip = snapshot.pods.values().flat_map(|pod| pod.ips.iter().map(|ip| (*ip, pod.id()))).collect();
        let policies = PolicySet::new(snapshot.authorization_policies.iter().cloned());
        Self { snapshot, trust_domain: trust_domain.to_string(), workload_by_ip, policies }
    }

    /// Everything in force, for `/config_dump`.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Objects by kind, for the state-store metrics.
    pub fn sizes(&self) -> [(&'static str, usize); 6] {
        [
            ("namespaces", self.snapshot.namespaces.len()),
            ("pods", self.snapshot.pods.len()),
            ("services", self.snapshot.services.len()),
            ("peer_authentications", self.snapshot.peer_authentications.len()),
            ("authorization_policies", self.snapshot.authorization_policies.len()),
            ("request_authentications", self.snapshot.request_authentications.len()),
        ]
    }

    /// Authorizes a connection to pod `pod_id` (`namespace/name`). A pod the
    /// state no longer knows is denied: nothing can say what applies to it.
    pub fn authorize(&self, pod_id: &str, conn: &Connection) -> Decision {
        match self.snapshot.pods.get(pod_id) {
            Some(pod) => self.policies.evaluate(pod, conn),
            None => {
                Decision { reason: Reason::UnknownWorkload(pod_id.to_string()), audited: Vec::new(), dry_run: None }
            }
        }
    }

    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// The trust domains federated with this mesh, as the agent follows them.
    pub fn federations(&self) -> Vec<FederatedDomain> {
        self.snapshot
            .federations
            .values()
            .map(|f| FederatedDomain {
                trust_domain: f.trust_domain.clone(),
                url: f.bundle_endpoint_url.clone(),
                profile: match &f.profile {
                    BundleEndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
                        EndpointProfile::HttpsSpiffe { endpoint_id: endpoint_spiffe_id.clone() }
                    }
                    BundleEndpointProfile::HttpsWeb { ca_certificates } => {
                        EndpointProfile::HttpsWeb { roots_pem: ca_certificates.clone() }
                    }
                },
                initial_bundle: f.trust_domain_bundle.clone(),
            })
            .collect()
    }

    /// The identity a pod runs as: in this mesh's trust domain, or for a
    /// pod of a federated mesh, the one its annotation names.
    pub fn identity_of(&self, pod: &Pod) -> Identity {
        let trust_domain = pod.trust_domain.as_deref().unwrap_or(&self.trust_domain);
        Identity::new(trust_domain, &pod.namespace, &pod.service_account)
    }

    /// Resolves a captured connection's original destination.
    pub fn destination(&self, dst: SocketAddr) -> Destination {
        // A service address with an undeclared port matches no pod either: External.
        if let Some((svc, endpoints)) = self.service_endpoints(dst) {
            return match self.service_waypoint(svc) {
                Some(waypoint) => Destination::Waypoint {
                    service: Some(svc.id()),
                    endpoints: self.waypoint_endpoints(&waypoint, dst.is_ipv4()),
                    waypoint,
                },
                None => Destination::Service { service: svc.id(), endpoints },
            };
        }
        let Some(pod) = self.pod_at(dst.ip()) else { return Destination::External };
        match self.pod_waypoint(pod) {
            Some(waypoint) => {
                let endpoints = self.waypoint_endpoints(&waypoint, dst.is_ipv4());
                Destination::Waypoint { service: None, waypoint, endpoints }
            }
            None => Destination::Workload(self.endpoint(pod, dst)),
        }
    }

    fn pod_at(&self, ip: IpAddr) -> Option<&Pod> {
        self.snapshot.pods.get(self.workload_by_ip.get(&ip)?)
    }

    /// The waypoint a service's traffic takes, if any.
    fn service_waypoint(&self, svc: &Service) -> Option<String> {
        self.snapshot.waypoint_for(&svc.namespace, svc.use_waypoint.as_deref(), WaypointFor::Service)
    }

    /// The waypoint traffic addressed to a pod takes, if any; never for a
    /// waypoint's own pods.
    fn pod_waypoint(&self, pod: &Pod) -> Option<String> {
        if pod.labels.contains_key(GATEWAY_NAME_LABEL) {
            return None;
        }
        self.snapshot.waypoint_for(&pod.namespace, pod.use_waypoint.as_deref(), WaypointFor::Workload)
    }

    /// The service at `dst` and its endpoints on the target port, whatever
    /// waypoint it uses.
    fn service_endpoints(&self, dst: SocketAddr) -> Option<(&Service, Vec<Endpoint>)> {
        let service = self.snapshot.services.values().find(|s| s.cluster_ip == dst.ip())?;
        let port = service.ports.iter().find(|p| p.port == dst.port())?;
        let endpoints = self
            .endpoints(service)
            .flat_map(|pod| pod.ips.iter().filter(|ip| ip.is_ipv4() == dst.is_ipv4()).map(move |ip| (pod, *ip)))
            .map(|(pod, ip)| self.endpoint(pod, SocketAddr::new(ip, port.target_port)))
            .collect();
        Some((service, endpoints))
    }

    /// What the waypoint `gateway` (`namespace/name`) forwards a CONNECT to
    /// `addr` to: a service address that uses it (the service's endpoints,
    /// with the service's id), or the address of a pod that sends its
    /// workload traffic through it (that pod). `None` for any other target,
    /// one that another waypoint guards or none does: a waypoint serves only
    /// what sources must send through it, so that its L7 policy cannot be
    /// skipped by naming a pod, or another service, in the CONNECT.
    pub fn waypoint_target(&self, gateway: &str, addr: SocketAddr) -> Option<(Option<String>, Vec<Endpoint>)> {
        if let Some((service, endpoints)) = self.service_endpoints(addr) {
            let through_it = self.service_waypoint(service).is_some_and(|w| w == gateway);
            return through_it.then(|| (Some(service.id()), endpoints));
        }
        let pod = self.pod_at(addr.ip())?;
        let through_it = self.pod_waypoint(pod).is_some_and(|w| w == gateway);
        through_it.then(|| (None, vec![self.endpoint(pod, addr)]))
    }

    /// The HBONE addresses of a waypoint's pods, with the identity each must prove.
    fn waypoint_endpoints(&self, waypoint: &str, ipv4: bool) -> Vec<Endpoint> {
        let Some(gateway) = self.snapshot.gateways.get(waypoint) else { return Vec::new() };
        self.snapshot
            .pods
            .values()
            .filter(|pod| {
                pod.namespace == gateway.namespace && pod.labels.get(GATEWAY_NAME_LABEL) == Some(&gateway.name)
            })
            .flat_map(|pod| pod.ips.iter().filter(move |ip| ip.is_ipv4() == ipv4).map(move |ip| (pod, *ip)))
            .map(|(pod, ip)| Endpoint {
                workload: pod.id(),
                addr: SocketAddr::new(ip, ambit_abi::HBONE_PORT),
                identity: Some(self.identity_of(pod)),
            })
            .collect()
    }

    fn endpoint(&self, pod: &Pod, addr: SocketAddr) -> Endpoint {
        Endpoint { workload: pod.id(), addr, identity: self.is_ambient(pod).then(|| self.identity_of(pod)) }
    }

    /// The pods a service selects (an empty selector selects none, as in Kubernetes).
    fn endpoints<'a>(&'a self, service: &'a Service) -> impl Iterator<Item = &'a Pod> + 'a {
        self.snapshot.pods.values().filter(move |pod| {
            pod.namespace == service.namespace
                && !service.selector.is_empty()
                && service.selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
        })
    }

    /// The identity of whichever pod owns `ip`, ambient or not: a peer
    /// presenting an SVID from that address must hold that identity.
    pub fn identity_at(&self, ip: IpAddr) -> Option<Identity> {
        Some(self.identity_of(self.pod_at(ip)?))
    }

    /// The source of an HBONE stream from `peer`, which proved `peer_id`:
    /// the address its `forwarded: for=` header names, if that is a pod
    /// running as `peer_id`, else the peer itself. A peer cannot have its
    /// connections logged and counted as another workload's.
    pub fn source_of(&self, peer: SocketAddr, forwarded: Option<IpAddr>, peer_id: &SpiffeId) -> SocketAddr {
        forwarded
            .filter(|ip| self.identity_at(*ip).is_some_and(|id| id.spiffe_id() == *peer_id))
            .map_or(peer, |ip| SocketAddr::new(ip, peer.port()))
    }

    /// The PeerAuthentication mode in force for plaintext arriving at `port`
    /// of pod `pod_id`: workload (port first), then namespace, then mesh;
    /// PERMISSIVE when nothing says otherwise.
    pub fn mtls_mode(&self, pod_id: &str, port: u16) -> MtlsMode {
        let Some(pod) = self.snapshot.pods.get(pod_id) else { return MtlsMode::Permissive };
        let selects = |pa: &&PeerAuthentication| {
            pa.namespace == pod.namespace
                && pa.selector.as_ref().is_some_and(|sel| sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
        };
        let policies = &self.snapshot.peer_authentications;
        let workload = policies.iter().find(selects);
        let candidates = [
            workload.and_then(|pa| pa.port_modes.get(&port).copied()),
            workload.map(|pa| pa.mode),
            namespace_wide(policies, &pod.namespace),
            namespace_wide(policies, ROOT_NAMESPACE),
        ];
        candidates.into_iter().flatten().find(|m| *m != MtlsMode::Unset).unwrap_or(MtlsMode::Permissive)
    }

    /// Whether inbound UDP to the pod is dropped: it opted in
    /// ([`ambit_model::INBOUND_UDP_LABEL`], the pod's label over its
    /// namespace's) and its PeerAuthentication mode is STRICT.
    pub fn drops_inbound_udp(&self, pod: &Pod) -> bool {
        let namespace = self.snapshot.namespaces.get(&pod.namespace).and_then(|ns| ns.inbound_udp);
        pod.inbound_udp.or(namespace) == Some(InboundUdp::Drop) && self.mtls_mode(&pod.id(), 0) == MtlsMode::Strict
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

    /// The ambient pods scheduled on `node`. Waypoint pods are left out
    /// even in an ambient namespace: they speak HBONE themselves, and
    /// capturing them would send waypoint traffic to a waypoint again.
    pub fn pods_to_enrol<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.snapshot
            .pods
            .values()
            .filter(move |pod| pod.node == node && self.is_ambient(pod) && !pod.labels.contains_key(GATEWAY_NAME_LABEL))
    }
}

/// The mode of the selector-less PeerAuthentication in `namespace`, if any.
fn namespace_wide(policies: &[PeerAuthentication], namespace: &str) -> Option<MtlsMode> {
    policies.iter().find(|pa| pa.namespace == namespace && pa.selector.is_none()).map(|pa| pa.mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_model::Namespace;

    fn pod(ns: &str, name: &str, node: &str, mode: Option<DataplaneMode>) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            uid: None,
            service_account: "default".into(),
            trust_domain: None,
            node: node.into(),
            labels: Default::default(),
            ips: vec![format!("10.0.0.{}", name.len()).parse().unwrap()],
            netns: None,
            dataplane_mode: mode,
            use_waypoint: None,
            inbound_udp: None,
            source: "pods.yaml".into(),
        }
    }

    #[test]
    fn enrolment_follows_namespace_then_pod_label() {
        let mut snapshot = Snapshot::default();
        for (name, mode) in [("shop", Some(DataplaneMode::Ambient)), ("legacy", None)] {
            snapshot.namespaces.insert(
                name.into(),
                Namespace { name: name.into(), dataplane_mode: mode, use_waypoint: None, inbound_udp: None },
            );
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
        let Destination::Workload(a) = state.destination("10.0.0.1:80".parse().unwrap()) else { panic!() };
        assert_eq!(a.identity.unwrap().to_string(), "spiffe://cluster.local/ns/shop/sa/default");
        let Destination::Workload(plain) = state.destination("10.0.0.3:80".parse().unwrap()) else { panic!() };
        assert_eq!(plain.identity, None, "plain pods are outside the mesh");
        assert_eq!(state.destination("192.0.2.1:80".parse().unwrap()), Destination::External);
    }

    fn web_pod(name: &str, ip: &str, app: &str) -> Pod {
        let mut p = pod("shop", name, "n1", None);
        p.ips = vec![ip.parse().unwrap()];
        p.service_account = name.into();
        p.labels.insert("app".into(), app.into());
        p
    }

    fn shop_state(peer_authentications: Vec<PeerAuthentication>) -> State {
        let mut snapshot = Snapshot::default();
        snapshot.namespaces.insert(
            "shop".into(),
            Namespace {
                name: "shop".into(),
                dataplane_mode: Some(DataplaneMode::Ambient),
                use_waypoint: None,
                inbound_udp: None,
            },
        );
        for p in
            [web_pod("web-1", "10.1.0.1", "web"), web_pod("web-2", "10.1.0.2", "web"), web_pod("db", "10.1.0.3", "db")]
        {
            snapshot.pods.insert(p.id(), p);
        }
        snapshot.services.insert(
            "shop/web".into(),
            Service {
                namespace: "shop".into(),
                name: "web".into(),
                cluster_ip: "10.96.0.10".parse().unwrap(),
                ports: vec![ambit_model::ServicePort { port: 80, target_port: 8080 }],
                selector: [("app".to_string(), "web".to_string())].into(),
                use_waypoint: None,
            },
        );
        snapshot.peer_authentications = peer_authentications;
        State::new(snapshot, "cluster.local")
    }

    #[test]
    fn service_vip_resolves_to_selected_endpoints_on_the_target_port() {
        let state = shop_state(vec![]);
        let Destination::Service { service, endpoints } = state.destination("10.96.0.10:80".parse().unwrap()) else {
            panic!()
        };
        assert_eq!(service, "shop/web");
        let addrs: Vec<String> = endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, vec!["10.1.0.1:8080", "10.1.0.2:8080"]);
        assert_eq!(endpoints[0].identity.as_ref().unwrap().to_string(), "spiffe://cluster.local/ns/shop/sa/web-1");
        assert_eq!(state.destination("10.96.0.10:81".parse().unwrap()), Destination::External, "undeclared port");
    }

    fn pa(namespace: &str, selector: Option<&str>, mode: MtlsMode, ports: &[(u16, MtlsMode)]) -> PeerAuthentication {
        PeerAuthentication {
            namespace: namespace.into(),
            name: "pa".into(),
            selector: selector.map(|app| [("app".to_string(), app.to_string())].into()),
            mode,
            port_modes: ports.iter().copied().collect(),
        }
    }

    #[test]
    fn peer_authentication_precedence() {
        use MtlsMode::*;
        let cases: Vec<(&str, Vec<PeerAuthentication>, u16, MtlsMode)> = vec![
            ("nothing: permissive", vec![], 8080, Permissive),
            ("mesh-wide strict", vec![pa(ROOT_NAMESPACE, None, Strict, &[])], 8080, Strict),
            (
                "namespace beats mesh",
                vec![pa(ROOT_NAMESPACE, None, Strict, &[]), pa("shop", None, Permissive, &[])],
                8080,
                Permissive,
            ),
            (
                "workload beats namespace",
                vec![pa("shop", None, Permissive, &[]), pa("shop", Some("web"), Strict, &[])],
                8080,
                Strict,
            ),
            ("port beats workload", vec![pa("shop", Some("web"), Strict, &[(8080, Permissive)])], 8080, Permissive),
            ("other port keeps workload", vec![pa("shop", Some("web"), Strict, &[(9090, Permissive)])], 8080, Strict),
            ("unset inherits", vec![pa("shop", None, Strict, &[]), pa("shop", Some("web"), Unset, &[])], 8080, Strict),
            ("other workload's selector", vec![pa("shop", Some("db"), Strict, &[])], 8080, Permissive),
            ("other namespace", vec![pa("legacy", None, Strict, &[])], 8080, Permissive),
            ("disable", vec![pa("shop", None, Disable, &[])], 8080, Disable),
        ];
        for (name, policies, port, want) in cases {
            assert_eq!(shop_state(policies).mtls_mode("shop/web-1", port), want, "{name}");
        }
    }

    #[test]
    fn the_forwarded_source_is_believed_only_for_the_peer_identitys_pods() {
        let mut state = shop_state(vec![]);
        state.snapshot.pods.get_mut("shop/web-2").unwrap().service_account = "web-1".into();
        let state = State::new(state.snapshot, "cluster.local");
        let peer: SocketAddr = "10.1.0.1:40000".parse().unwrap();
        let web_1 = state.identity_at(peer.ip()).unwrap().spiffe_id();
        let cases = [
            (None, "10.1.0.1", "no header: the peer"),
            (Some("10.1.0.1"), "10.1.0.1", "the peer's own address"),
            (Some("10.1.0.2"), "10.1.0.2", "another pod running as the peer's identity"),
            (Some("10.1.0.3"), "10.1.0.1", "a pod running as someone else"),
            (Some("192.0.2.7"), "10.1.0.1", "an address the mesh does not know"),
        ];
        for (forwarded, want, case) in cases {
            let source = state.source_of(peer, forwarded.map(|ip| ip.parse().unwrap()), &web_1);
            assert_eq!(source, SocketAddr::new(want.parse().unwrap(), 40000), "{case}");
        }
    }

    #[test]
    fn identity_at_covers_every_pod() {
        let state = shop_state(vec![]);
        assert_eq!(state.identity_at("10.1.0.3".parse().unwrap()).unwrap().service_account, "db");
        assert_eq!(state.identity_at("10.9.9.9".parse().unwrap()), None);
    }

    #[test]
    fn waypoint_routing_follows_labels_and_fails_closed() {
        use ambit_model::Gateway;
        let gateway = |waypoint_for| Gateway { namespace: "shop".into(), name: "wp".into(), waypoint_for };
        let with = |service_label: Option<&str>, ns_label: Option<&str>, gw: Option<Gateway>, wp_pod: bool| {
            let mut state = shop_state(vec![]);
            state.snapshot.services.get_mut("shop/web").unwrap().use_waypoint = service_label.map(str::to_string);
            state.snapshot.namespaces.get_mut("shop").unwrap().use_waypoint = ns_label.map(str::to_string);
            if let Some(gw) = gw {
                state.snapshot.gateways.insert(gw.id(), gw);
            }
            if wp_pod {
                let mut pod = web_pod("wp-1", "10.1.0.9", "wp");
                pod.labels.insert(GATEWAY_NAME_LABEL.into(), "wp".into());
                state.snapshot.pods.insert(pod.id(), pod);
            }
            State::new(state.snapshot, "cluster.local").destination("10.96.0.10:80".parse().unwrap())
        };
        let via = |d: Destination| match d {
            Destination::Waypoint { waypoint, endpoints, .. } => {
                Some((waypoint, endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>()))
            }
            _ => None,
        };
        let wp = Some(gateway(WaypointFor::Service));
        assert_eq!(via(with(None, None, wp.clone(), true)), None, "no label: pure L4");
        assert_eq!(
            via(with(Some("wp"), None, wp.clone(), true)),
            Some(("shop/wp".into(), vec!["10.1.0.9:15008".into()]))
        );
        assert_eq!(via(with(None, Some("wp"), wp.clone(), true)).unwrap().0, "shop/wp", "namespace label");
        assert_eq!(via(with(Some("none"), Some("wp"), wp.clone(), true)), None, "service opts out");
        assert_eq!(
            via(with(Some("wp"), None, wp.clone(), false)),
            Some(("shop/wp".into(), vec![])),
            "no pod: fails closed"
        );
        assert_eq!(
            via(with(Some("wp"), None, None, true)),
            Some(("shop/wp".into(), vec![])),
            "no Gateway: fails closed"
        );
        assert_eq!(
            via(with(Some("wp"), None, Some(gateway(WaypointFor::Workload)), true)),
            None,
            "workload-only waypoint"
        );
        assert_eq!(via(with(Some("wp"), None, Some(gateway(WaypointFor::All)), true)).unwrap().0, "shop/wp");

        // Traffic addressed to a pod takes a waypoint for workloads (or all).
        let to_pod = |takes| {
            let mut state = shop_state(vec![]);
            state.snapshot.pods.get_mut("shop/db").unwrap().use_waypoint = Some("wp".into());
            state.snapshot.gateways.insert("shop/wp".into(), gateway(takes));
            via(State::new(state.snapshot, "cluster.local").destination("10.1.0.3:5432".parse().unwrap()))
        };
        assert_eq!(to_pod(WaypointFor::Service), None, "a service waypoint leaves pod traffic alone");
        assert_eq!(to_pod(WaypointFor::Workload), Some(("shop/wp".into(), vec![])));
        assert_eq!(to_pod(WaypointFor::All).unwrap().0, "shop/wp");

        // A waypoint forwards only what is sent through it.
        let targets = |takes, addr: &str| {
            let mut state = shop_state(vec![]);
            state.snapshot.services.get_mut("shop/web").unwrap().use_waypoint = Some("wp".into());
            state.snapshot.pods.get_mut("shop/db").unwrap().use_waypoint = Some("wp".into());
            state.snapshot.gateways.insert("shop/wp".into(), gateway(takes));
            let state = State::new(state.snapshot, "cluster.local");
            let target = |gw: &str| state.waypoint_target(gw, addr.parse().unwrap()).map(|(service, _)| service);
            (target("shop/wp"), target("shop/other"))
        };
        let cases = [
            (WaypointFor::Service, "10.96.0.10:80", Some(Some("shop/web".to_string())), "a service that uses it"),
            (WaypointFor::Service, "10.1.0.3:5432", None, "a pod, to a service waypoint"),
            (WaypointFor::Service, "10.1.0.2:8080", None, "a pod of a service that uses it"),
            (WaypointFor::Workload, "10.1.0.3:5432", Some(None), "a pod that uses it for workloads"),
            (WaypointFor::Workload, "10.96.0.10:80", None, "a service, to a workload waypoint"),
            (WaypointFor::All, "10.1.0.3:5432", Some(None), "a pod, to a waypoint for all"),
            (WaypointFor::All, "10.9.9.9:80", None, "an address the mesh does not know"),
        ];
        for (takes, addr, want, case) in cases {
            assert_eq!(targets(takes, addr), (want, None), "{case}: {addr}");
        }

        let mut snapshot = shop_state(vec![]).snapshot;
        let mut pod = web_pod("wp-1", "10.1.0.9", "wp");
        pod.labels.insert(GATEWAY_NAME_LABEL.into(), "wp".into());
        snapshot.pods.insert(pod.id(), pod);
        let state = State::new(snapshot, "cluster.local");
        assert!(!state.pods_to_enrol("n1").any(|p| p.name == "wp-1"), "waypoint pods are not captured");
    }
}
