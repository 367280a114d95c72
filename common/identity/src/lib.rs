//! Workload identity: SPIFFE IDs, X.509-SVIDs, the providers that issue
//! them behind one seam ([`IdentityProvider`]), and the certificate manager
//! that keeps one per local identity.
//!
//! - [`svid`]: the SPIFFE X.509-SVID rules, checked on every certificate
//!   the agent holds or is shown;
//! - [`tls`]: rustls configurations whose verifiers apply those rules
//!   during the handshake: everything here that speaks mTLS (the CA, its
//!   client, HBONE, the waypoint) uses them;
//! - [`ca`]: the embedded certificate authority (issuance, bundle, tokens);
//! - [`signing`]: what it signs with: a root it created, or a plug-in
//!   intermediate from the user's PKI (Istio's `cacerts` layout), checked
//!   as a whole;
//! - [`ca_server`] / [`ca_client`]: the CA as a service, and the provider
//!   the agent uses to reach it;
//! - [`manager`]: per-identity cache, refresh at half-life, backoff;
//! - [`federation`]: the SPIFFE bundle endpoint, and following the bundles
//!   of federated trust domains;
//! - [`spire`]: SPIRE as the provider, through its Delegated Identity API.
#![forbid(unsafe_code)]

pub mod ca;
pub mod ca_client;
pub mod ca_server;
pub mod federation;
pub mod manager;
pub mod signing;
pub mod spire;
pub mod svid;
pub mod tls;

#[cfg(test)]
mod plugged_tests;

use std::{
    fmt,
    future::Future,
    pin::Pin,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use spiffe::SpiffeId;

/// A workload identity, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// Parses a SPIFFE ID of the `/ns/<ns>/sa/<sa>` form.
    pub fn from_spiffe_id(id: &SpiffeId) -> Option<Self> {
        let mut segments = id.path().strip_prefix('/')?.split('/');
        match (segments.next(), segments.next(), segments.next(), segments.next(), segments.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) if !ns.is_empty() && !sa.is_empty() => {
                Some(Self::new(id.trust_domain_name(), ns, sa))
            }
            _ => None,
        }
    }

    pub fn spiffe_id(&self) -> SpiffeId {
        SpiffeId::new(self.to_string()).expect("namespace and service account names are valid path segments")
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

/// An X.509-SVID with its private key.
#[derive(Debug)]
pub struct Svid {
    pub identity: Identity,
    /// Leaf first, then any intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Serial number, hex.
    pub serial: String,
}

impl Svid {
    /// Checks an issued chain against the SPIFFE rules and the identity it
    /// was issued for, and reads its validity and serial.
    pub fn from_chain(
        identity: &Identity,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        trust_domain: &str,
    ) -> Result<Svid, String> {
        let id = svid::check_chain_in(&chain, trust_domain).map_err(|e| e.to_string())?;
        if id != identity.spiffe_id() {
            return Err(format!("issued for {id}, not {identity}"));
        }
        // The spiffe crate's own X509Svid checks (chain and key) must agree.
        let chain_der: Vec<u8> = chain.iter().flat_map(|c| c.as_ref().iter().copied()).collect();
        if let PrivateKeyDer::Pkcs8(pkcs8) = &key {
            spiffe::X509Svid::parse_from_der(&chain_der, pkcs8.secret_pkcs8_der()).map_err(|e| e.to_string())?;
        }
        let (_, cert) = x509_parser::parse_x509_certificate(chain[0].as_ref()).map_err(|e| e.to_string())?;
        let at = |t: x509_parser::time::ASN1Time| UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
        Ok(Svid {
            identity: identity.clone(),
            not_before: at(cert.validity().not_before),
            not_after: at(cert.validity().not_after),
            serial: cert.raw_serial_as_string().replace(':', ""),
            chain,
            key,
        })
    }

    /// The point at which the certificate manager renews: half its lifetime.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + lifetime / 2
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.not_after
    }
}

/// Why an identity could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate authority at {addr} is unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("the certificate authority refused to issue {identity}: {reason}")]
    Refused { identity: String, reason: String },
    #[error("the certificate authority returned an invalid SVID for {identity}: {reason}")]
    InvalidSvid { identity: String, reason: String },
    #[error("generating a key or request failed: {0}")]
    Crypto(String),
    #[error("cannot read the token for the certificate authority from {path}: {reason}")]
    Token { path: String, reason: String },
    #[error(
        "the certificate authority issued {identity} valid from {not_before} to {not_after}, which does not \
         include this node's time; check the clocks (NTP) of the CA and this node"
    )]
    NotValidNow { identity: String, not_before: String, not_after: String },
}

pub type ProviderFuture<'a> = Pin<Box<dyn Future<Output = Result<Svid, IdentityError>> + Send + 'a>>;

/// What a pushing provider says about an identity.
pub enum SvidUpdate {
    /// A new SVID, to use from now on.
    Issued(Svid),
    /// The provider no longer issues this identity (why): the current
    /// certificate must not be used any more.
    Revoked(String),
}

pub type SvidStream = Pin<Box<dyn futures::Stream<Item = Result<SvidUpdate, IdentityError>> + Send>>;
pub type SubscribeFuture<'a> = Pin<Box<dyn Future<Output = Result<SvidStream, IdentityError>> + Send + 'a>>;

/// Issues SVIDs: the embedded CA (through [`ca_client::CaClient`]), the
/// default, or SPIRE ([`spire::SpireProvider`]), without the tunnel noticing.
pub trait IdentityProvider: Send + Sync {
    /// Obtains a fresh SVID for `identity`.
    fn fetch<'a>(&'a self, identity: &'a Identity) -> ProviderFuture<'a>;

    /// A provider that pushes each SVID as it issues one (SPIRE) returns
    /// the stream of its updates; the certificate manager then follows it
    /// instead of asking [`Self::fetch`] at half-life.
    fn subscribe<'a>(&'a self, _identity: &'a Identity) -> Option<SubscribeFuture<'a>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_through_spiffe_id() {
        let id = Identity::new("cluster.local", "shop", "cart");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(Identity::from_spiffe_id(&id.spiffe_id()), Some(id));
        for other in
            ["spiffe://td/ns/shop", "spiffe://td/ns/shop/sa/cart/extra", "spiffe://td/sa/x/ns/y", "spiffe://td"]
        {
            assert_eq!(Identity::from_spiffe_id(&SpiffeId::new(other).unwrap()), None, "{other}");
        }
    }
}
