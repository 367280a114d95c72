//! A snapshot: every object in force at one moment, as sources hand it on.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    AuthorizationPolicy, Gateway, Namespace, Object, PeerAuthentication, Pod, RequestAuthentication, Service,
    TrustDomainFederation, WaypointFor,
};

/// Every object currently in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Keyed by `namespace/name`.
    pub pods: BTreeMap<String, Pod>,
    /// Keyed by `namespace/name`.
    pub services: BTreeMap<String, Service>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// Keyed by `namespace/name`.
    pub gateways: BTreeMap<String, Gateway>,
    /// JWT rules, enforced by waypoints (public keys only).
    pub request_authentications: Vec<RequestAuthentication>,
    /// Keyed by trust domain.
    pub federations: BTreeMap<String, TrustDomainFederation>,
}

impl Snapshot {
    /// Adds `object`, replacing one of the same kind and name.
    pub fn insert(&mut self, object: Object) {
        match object {
            Object::Namespace(ns) => {
                self.namespaces.insert(ns.name.clone(), ns);
            }
            Object::Pod(pod) => {
                self.pods.insert(pod.id(), pod);
            }
            Object::Service(svc) => {
                self.services.insert(svc.id(), svc);
            }
            Object::Gateway(gw) => {
                self.gateways.insert(gw.id(), gw);
            }
            Object::PeerAuthentication(pa) => {
                replace(&mut self.peer_authentications, pa, |a, b| (&a.namespace, &a.name) == (&b.namespace, &b.name))
            }
            Object::AuthorizationPolicy(ap) => replace(&mut self.authorization_policies, ap, |a, b| a.id() == b.id()),
            Object::TrustDomainFederation(federation) => {
                self.federations.insert(federation.trust_domain.clone(), federation);
            }
            Object::RequestAuthentication(ra) => replace(&mut self.request_authentications, ra, |a, b| {
                (&a.namespace, &a.name) == (&b.namespace, &b.name)
            }),
        }
    }

    /// The waypoint (`namespace/name`) that traffic of `kind` to an object
    /// in `namespace` must take: the object's own label, else its
    /// namespace's; `none` opts out. A label naming a Gateway that does not
    /// exist still names it, so that traffic fails closed.
    pub fn waypoint_for(&self, namespace: &str, own_label: Option<&str>, kind: WaypointFor) -> Option<String> {
        let namespace_label = self.namespaces.get(namespace).and_then(|ns| ns.use_waypoint.as_deref());
        let name = own_label.or(namespace_label)?;
        if name == "none" {
            return None;
        }
        let id = format!("{namespace}/{name}");
        match self.gateways.get(&id).map(|gw| gw.waypoint_for) {
            Some(WaypointFor::None) => None,
            Some(WaypointFor::All) | None => Some(id),
            Some(takes) => (takes == kind).then_some(id),
        }
    }
}

/// Puts `item` in place of the one `same` finds, or at the end.
fn replace<T>(list: &mut Vec<T>, item: T, same: impl Fn(&T, &T) -> bool) {
    match list.iter_mut().find(|old| same(old, &item)) {
        Some(old) => *old = item,
        None => list.push(item),
    }
}
