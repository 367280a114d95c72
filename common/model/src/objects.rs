//! The objects ambit acts on, in the shape of their Kubernetes resources,
//! validated: what every configuration source produces.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::Serialize;

use crate::{AuthorizationPolicy, RequestAuthentication};

/// Label on a Namespace (all its pods) or a Pod (that pod only).
pub const DATAPLANE_MODE_LABEL: &str = "ambit.dev/dataplane-mode";
/// Annotation on a Pod: path of its network namespace (the CNI's netns path).
pub const NETNS_ANNOTATION: &str = "ambit.dev/netns";
/// Annotation on a Pod of another mesh (standalone mode): the trust domain
/// its SPIFFE ID is in, one federated with this mesh (a
/// [`TrustDomainFederation`]). Pods without it are in this mesh's.
pub const TRUST_DOMAIN_ANNOTATION: &str = "ambit.dev/trust-domain";
/// Label on a Namespace or Service: send its service traffic through the
/// named waypoint (a Gateway of the same namespace); `none` opts a service out.
pub const USE_WAYPOINT_LABEL: &str = "ambit.dev/use-waypoint";
/// Label on a Gateway: which traffic its waypoint takes (`service`, the
/// default, `workload`, `all` or `none`).
pub const WAYPOINT_FOR_LABEL: &str = "ambit.dev/waypoint-for";
/// Label on a Pod: the Gateway it serves as a waypoint (Gateway API's name).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Label on a Namespace or a Pod (which wins): `drop` drops inbound UDP to
/// the pod, DNS replies excepted, while its PeerAuthentication is STRICT.
/// The mesh carries TCP only; this keeps UDP from being a plaintext way in.
pub const INBOUND_UDP_LABEL: &str = "ambit.dev/inbound-udp";
/// The only `gatewayClassName` ambit acts on.
pub const WAYPOINT_CLASS: &str = "ambit-waypoint";

/// Value of [`DATAPLANE_MODE_LABEL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DataplaneMode {
    /// Captured and tunnelled by the node agent.
    Ambient,
    /// Explicitly left alone (opt-out on a pod in an ambient namespace).
    None,
}

/// Value of [`INBOUND_UDP_LABEL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum InboundUdp {
    /// UDP reaches the pod's apps as it would without the mesh (the default).
    Allow,
    /// Dropped in the kernel for STRICT pods, except DNS replies (port 53).
    Drop,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: String,
    pub dataplane_mode: Option<DataplaneMode>,
    /// [`USE_WAYPOINT_LABEL`].
    pub use_waypoint: Option<String>,
    /// [`INBOUND_UDP_LABEL`].
    pub inbound_udp: Option<InboundUdp>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// The API server's uid for the pod (Kubernetes mode only): tells a pod
    /// from an earlier one of the same name.
    pub uid: Option<String>,
    pub service_account: String,
    /// [`TRUST_DOMAIN_ANNOTATION`]: None for this mesh's own pods.
    pub trust_domain: Option<String>,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub netns: Option<PathBuf>,
    pub dataplane_mode: Option<DataplaneMode>,
    /// [`USE_WAYPOINT_LABEL`]: its own traffic (addressed to the pod) goes
    /// through that waypoint if the waypoint takes workload traffic.
    pub use_waypoint: Option<String>,
    /// [`INBOUND_UDP_LABEL`]; overrides the namespace's.
    pub inbound_udp: Option<InboundUdp>,
    /// The file the pod came from, for error messages.
    pub source: PathBuf,
}

impl Pod {
    /// `namespace/name`, the way operators refer to a pod.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A Service: a virtual IP whose ports lead to the pods its selector picks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: IpAddr,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
    /// [`USE_WAYPOINT_LABEL`].
    pub use_waypoint: Option<String>,
}

impl Service {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
}

/// PeerAuthentication mode (security.istio.io/v1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum MtlsMode {
    /// Inherit from the enclosing scope.
    Unset,
    /// Plaintext and mTLS both accepted (the default).
    Permissive,
    /// Only mTLS accepted; plaintext is reset.
    Strict,
    /// The destination does not require mTLS (accepted as PERMISSIVE; see
    /// docs/ARCHITECTURE.md: ambit never downgrades ambient-to-ambient hops).
    Disable,
}

/// A PeerAuthentication: mesh-wide in the root namespace, namespace-wide
/// without a selector, per workload with one (and only then per port).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerAuthentication {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    pub port_modes: BTreeMap<u16, MtlsMode>,
}

/// Which traffic a waypoint takes ([`WAYPOINT_FOR_LABEL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

/// A Gateway of class [`WAYPOINT_CLASS`]: a waypoint, served by the pods
/// labelled with its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Gateway {
    pub namespace: String,
    pub name: String,
    pub waypoint_for: WaypointFor,
}

impl Gateway {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A trust domain federated with this mesh: its SPIFFE bundle is fetched
/// from its bundle endpoint (SPIFFE Trust Domain and Bundle spec, §5) and
/// kept current, and peers with IDs in it are verified with that bundle.
/// Cluster-wide: no namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TrustDomainFederation {
    pub name: String,
    pub trust_domain: String,
    /// `https://...`: where the foreign trust domain serves its bundle.
    pub bundle_endpoint_url: String,
    pub profile: BundleEndpointProfile,
    /// A SPIFFE bundle (JSON) to start from: with `https_spiffe`, the
    /// bundle the endpoint's own SVID is first verified with.
    pub trust_domain_bundle: Option<String>,
}

/// How the bundle endpoint is authenticated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BundleEndpointProfile {
    /// The endpoint presents an SVID with this ID, verified with the
    /// foreign trust domain's bundle: the last one fetched, or the
    /// `trustDomainBundle` at first.
    HttpsSpiffe { endpoint_spiffe_id: String },
    /// The endpoint presents a Web PKI certificate for its host name,
    /// verified with these roots (PEM), or the system's when absent.
    HttpsWeb { ca_certificates: Option<String> },
}

/// One parsed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
    RequestAuthentication(RequestAuthentication),
    Gateway(Gateway),
    TrustDomainFederation(TrustDomainFederation),
}

impl Object {
    /// Kind and `namespace/name` (the name alone for a Namespace): what
    /// must be unique across every source.
    pub fn key(&self) -> (&'static str, String) {
        match self {
            Object::Namespace(ns) => ("Namespace", ns.name.clone()),
            Object::Pod(pod) => ("Pod", pod.id()),
            Object::Service(svc) => ("Service", svc.id()),
            Object::PeerAuthentication(pa) => ("PeerAuthentication", format!("{}/{}", pa.namespace, pa.name)),
            Object::AuthorizationPolicy(ap) => ("AuthorizationPolicy", ap.id()),
            Object::RequestAuthentication(ra) => ("RequestAuthentication", format!("{}/{}", ra.namespace, ra.name)),
            Object::Gateway(gw) => ("Gateway", gw.id()),
            // One per trust domain, whatever the objects' names.
            Object::TrustDomainFederation(f) => ("TrustDomainFederation", f.trust_domain.clone()),
        }
    }
}
