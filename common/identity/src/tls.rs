//! mTLS with SPIFFE identities: rustls configurations whose verifiers read
//! the peer's SPIFFE ID, check the signature chain (webpki) against the
//! bundle of *that ID's* trust domain, this mesh's own or a federated one
//! ([`TrustStore`]), then the SPIFFE X.509-SVID rules, and, on the client
//! side, that the server is exactly the identity the caller expects. A peer
//! of a trust domain with no bundle here is refused.
//!
//! TLS 1.3 only, ALPN `h2`, as HBONE peers (ztunnel included) expect.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use anyhow::{Context as _, bail};
use rustls::{
    DigitallySignedStruct, DistinguishedName, Error as TlsError, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use spiffe::SpiffeId;

use crate::{
    Svid,
    svid::{check_chain, check_leaf},
};

pub const ALPN_H2: &[u8] = b"h2";

/// ring, with TLS 1.3 AES-128-GCM first: the suite the client lists first
/// is the one used, and `cargo xtask bench` measured AES-128-GCM 9-11%
/// faster than AES-256-GCM with both ring and aws-lc-rs (see
/// docs/benchmarks.md, "Crypto provider"). The other suites stay offered,
/// so peers that prefer them still connect.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: the rest keep ring's order.
    provider.cipher_suites.sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The trust bundle from the CA's root certificate file (`--ca-root`).
/// [`follow_bundle_file`] keeps it current.
pub fn load_bundle(path: &std::path::Path, trust_domain: &str) -> anyhow::Result<TrustBundle> {
    let pem = std::fs::read(path).with_context(|| format!("--ca-root {}: cannot read it", path.display()))?;
    let roots = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--ca-root {}: not PEM certificates", path.display()))?;
    if roots.is_empty() {
        bail!("--ca-root {}: holds no certificate; give the CA's root.pem", path.display());
    }
    for root in &roots {
        crate::svid::check_root(root).map_err(|e| anyhow::anyhow!("--ca-root {}: {e}", path.display()))?;
    }
    Ok(TrustBundle::new(trust_domain, &roots)?)
}

/// The trust anchors of one trust domain: the SPIFFE bundle, and the same
/// roots as the TLS library's trust store and client verifier.
#[derive(Clone)]
pub struct TrustBundle {
    pub trust_domain: String,
    bundle: Arc<spiffe::X509Bundle>,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("trust domain `{0}` is not valid: {1}")]
    TrustDomain(String, String),
    #[error("root certificate: {0}")]
    Root(String),
}

impl TrustBundle {
    pub fn new(trust_domain: &str, roots: &[CertificateDer<'static>]) -> Result<Self, BundleError> {
        let domain = spiffe::TrustDomain::new(trust_domain)
            .map_err(|e| BundleError::TrustDomain(trust_domain.to_string(), e.to_string()))?;
        let authorities: Vec<&[u8]> = roots.iter().map(|r| r.as_ref()).collect();
        let bundle = spiffe::X509Bundle::from_x509_authorities(domain, &authorities)
            .map_err(|e| BundleError::Root(e.to_string()))?;
        let mut store = RootCertStore::empty();
        for root in roots {
            store.add(root.clone()).map_err(|e| BundleError::Root(e.to_string()))?;
        }
        let roots = Arc::new(store);
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| BundleError::Root(e.to_string()))?;
        Ok(Self { trust_domain: trust_domain.to_string(), bundle: Arc::new(bundle), roots, client_verifier })
    }

    /// The SPIFFE bundle (trust domain and X.509 authorities).
    pub fn spiffe_bundle(&self) -> &spiffe::X509Bundle {
        &self.bundle
    }

    /// The trust anchors, DER.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        authorities(&self.bundle)
    }
}

/// The authorities of a SPIFFE bundle, DER.
pub fn authorities(bundle: &spiffe::X509Bundle) -> Vec<CertificateDer<'static>> {
    bundle.authorities().iter().map(|c| CertificateDer::from(c.as_bytes().to_vec())).collect()
}

/// Every bundle this node trusts, by trust domain: the mesh's own (whose
/// roots change in a root rotation), and those of the trust domains
/// federated with it. Each handshake reads the bundles as they are then.
#[derive(Clone)]
pub struct TrustStore {
    trust_domain: String,
    bundles: Arc<RwLock<Arc<BTreeMap<String, TrustBundle>>>>,
    /// Moves on at every change, for those who pass the bundles on.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl TrustStore {
    /// A store with only the mesh's own bundle.
    pub fn new(local: TrustBundle) -> Self {
        let trust_domain = local.trust_domain.clone();
        let bundles = BTreeMap::from([(trust_domain.clone(), local)]);
        Self {
            trust_domain,
            bundles: Arc::new(RwLock::new(Arc::new(bundles))),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// The mesh's own bundle now.
    pub fn local(&self) -> TrustBundle {
        self.bundle_for(&self.trust_domain).expect("the mesh's own bundle is never removed")
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The bundle that verifies IDs of `trust_domain`; why there is none otherwise.
    pub fn bundle_for(&self, trust_domain: &str) -> Result<TrustBundle, String> {
        self.bundles.read().expect("trust store lock").get(trust_domain).cloned().ok_or_else(|| {
            format!(
                "trust domain {trust_domain} is not federated with this mesh ({}): no bundle to verify it with",
                self.trust_domain
            )
        })
    }

    /// Installs (or replaces) a bundle: the mesh's own, or a federated one.
    /// Trust domains that share a root can mint each other's IDs unless
    /// their intermediates name them: that is said, loudly.
    pub fn set(&self, bundle: TrustBundle) {
        let roots = bundle.roots();
        for (other, theirs) in self.bundles.read().expect("trust store lock").iter() {
            if *other != bundle.trust_domain && theirs.roots().iter().any(|root| roots.contains(root)) {
                tracing::error!(
                    trust_domain = %bundle.trust_domain,
                    shares_a_root_with = %other,
                    "two trust domains share a root: each one's CA can sign IDs of the other unless its intermediates name their trust domain (a spiffe:// URI SAN)"
                );
            }
        }
        self.change(|bundles| {
            bundles.insert(bundle.trust_domain.clone(), bundle);
        });
    }

    /// Drops a federated trust domain: its IDs are refused from the next handshake on.
    pub fn remove_foreign(&self, trust_domain: &str) {
        if trust_domain != self.trust_domain {
            self.change(|bundles| {
                bundles.remove(trust_domain);
            });
        }
    }

    fn change(&self, edit: impl FnOnce(&mut BTreeMap<String, TrustBundle>)) {
        let mut bundles = self.bundles.write().expect("trust store lock");
        let mut next = BTreeMap::clone(&bundles);
        edit(&mut next);
        *bundles = Arc::new(next);
        drop(bundles);
        self.changes.send_modify(|version| *version += 1);
    }

    /// Moves on at every change of the bundles.
    pub fn version(&self) -> u64 {
        *self.changes.borrow()
    }

    /// Wakes at every change of the bundles.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The federated bundles now.
    pub fn foreign(&self) -> BTreeMap<String, TrustBundle> {
        let bundles = self.bundles.read().expect("trust store lock").clone();
        bundles.iter().filter(|(td, _)| **td != self.trust_domain).map(|(td, b)| (td.clone(), b.clone())).collect()
    }
}

/// How often the root certificate file is read again.
const BUNDLE_FILE_POLL: std::time::Duration = std::time::Duration::from_secs(5);

/// Follows the mesh's root certificate file (a ConfigMap the CA keeps
/// current, or a file the operator replaces): new roots, e.g. during a
/// root rotation, apply to the next handshake; an unusable file is said
/// once and the roots in use stay.
pub async fn follow_bundle_file(path: std::path::PathBuf, trust: TrustStore) {
    let mut refused = None;
    loop {
        tokio::time::sleep(BUNDLE_FILE_POLL).await;
        match load_bundle(&path, trust.trust_domain()) {
            Ok(bundle) if bundle.roots() != trust.local().roots() => {
                tracing::info!(file = %path.display(), roots = bundle.roots().len(), "the mesh's roots changed");
                trust.set(bundle);
                refused = None;
            }
            Ok(_) => refused = None,
            Err(error) => {
                let reason = format!("{error:#}");
                if refused.as_ref() != Some(&reason) {
                    tracing::error!(error = %reason, "the root certificate file is unusable; the roots in use stay");
                    refused = Some(reason);
                }
            }
        }
    }
}

/// Server side of an HBONE connection: presents `svid`, and requires and
/// verifies the client's SVID against the bundle of its trust domain.
pub fn server_config(svid: &Svid, trust: &TrustStore) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = Arc::new(SpiffeClientVerifier { trust: trust.clone(), provider: provider() });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(svid.chain.clone(), svid.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A server that presents what `resolver` gives at each handshake and asks
/// for no client certificate: the CA, whose callers prove themselves with
/// tokens.
pub fn server_config_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Client side: presents `svid` (if any) and accepts only a server whose
/// SVID names `expected`.
pub fn client_config(
    svid: Option<&Svid>,
    trust: &TrustStore,
    expected: SpiffeId,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier { trust: trust.clone(), expected, provider: provider.clone() });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match svid {
        Some(svid) => builder.with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Checks that `chain` (leaf first) is signed by a root of `bundle` and is
/// valid now: what the CA client asks of every SVID it is given, before
/// using it. A CA, or anything speaking as one, cannot hand an agent a
/// certificate its peers would not trust.
pub fn verify_issued(bundle: &TrustBundle, chain: &[CertificateDer<'static>]) -> Result<(), String> {
    let (leaf, intermediates) = chain.split_first().ok_or("the chain is empty")?;
    bundle
        .client_verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map(drop)
        .map_err(|e| format!("not signed by the trust bundle of {}: {e}", bundle.trust_domain))
}

/// The identity of a peer, from the certificates of a handshake that a
/// verifier of this module has accepted (so its trust domain is trusted).
pub fn peer_identity(certs: Option<&[CertificateDer<'static>]>) -> Result<SpiffeId, String> {
    let certs = certs.ok_or("the peer presented no certificate")?;
    check_chain(certs).map_err(|e| e.to_string())
}

fn spiffe_error(e: impl std::fmt::Display) -> TlsError {
    TlsError::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(SpiffeRuleError(
        e.to_string(),
    )))))
}

#[derive(Debug)]
struct SpiffeRuleError(String);

impl std::fmt::Display for SpiffeRuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpiffeRuleError {}

#[derive(Debug)]
struct SpiffeClientVerifier {
    trust: TrustStore,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // SPIFFE peers pick their certificate by identity, not by CA name.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        // The ID names the trust domain whose bundle must have signed it.
        let id = check_leaf(end_entity).map_err(spiffe_error)?;
        let bundle = self.trust.bundle_for(id.trust_domain_name()).map_err(spiffe_error)?;
        bundle.client_verifier.verify_client_cert(end_entity, intermediates, now)?;
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        check_chain(&chain).map_err(spiffe_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    trust: TrustStore,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustBundle({}, {} roots)", self.trust_domain, self.roots.len())
    }
}

impl std::fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let foreign: Vec<String> = self.foreign().keys().cloned().collect();
        write!(f, "TrustStore({}, federated: {foreign:?})", self.trust_domain)
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        // The server is identified by its SPIFFE ID, not by a DNS name,
        // and verified with the bundle of the trust domain it is expected in.
        let id = check_leaf(end_entity).map_err(spiffe_error)?;
        if id != self.expected {
            return Err(spiffe_error(format!("server is {id}, expected {}", self.expected)));
        }
        let bundle = self.trust.bundle_for(id.trust_domain_name()).map_err(spiffe_error)?;
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &bundle.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        check_chain(&chain).map_err(spiffe_error)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Identity, ca::CertificateAuthority};

    fn svid_of(ca: &CertificateAuthority, identity: &Identity) -> Vec<CertificateDer<'static>> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        ca.issue(identity, &key, std::time::Duration::from_secs(600)).unwrap()
    }

    /// A peer is verified with the bundle of its own ID's trust domain:
    /// refused while that domain is not federated, accepted once it is,
    /// refused again when it goes; and a CA cannot vouch for another
    /// domain's IDs.
    #[test]
    fn peers_are_verified_with_the_bundle_of_their_trust_domain() {
        let (a, b) =
            (CertificateAuthority::create("a.example").unwrap(), CertificateAuthority::create("b.example").unwrap());
        let trust = TrustStore::new(TrustBundle::new("b.example", &b.roots()).unwrap());
        let verifier = SpiffeClientVerifier { trust: trust.clone(), provider: provider() };
        let verify = |chain: &[CertificateDer<'static>]| {
            verifier.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()).map(drop).map_err(|e| e.to_string())
        };
        let local = svid_of(&b, &Identity::new("b.example", "shop", "web"));
        let foreign = svid_of(&a, &Identity::new("a.example", "shop", "client"));
        assert!(verify(&local).is_ok());
        assert!(verify(&foreign).unwrap_err().contains("trust domain a.example is not federated"));

        trust.set(TrustBundle::new("a.example", &a.roots()).unwrap());
        assert!(verify(&foreign).is_ok());
        // B's CA signing an a.example ID: verified with A's bundle, so refused.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let forged = crate::signing::sign_leaf(
            &b.signing(),
            &Identity::new("a.example", "shop", "client"),
            &key,
            std::time::Duration::from_secs(600),
        )
        .unwrap();
        assert!(verify(&forged).is_err(), "another domain's CA vouched for an a.example ID");

        trust.remove_foreign("a.example");
        assert!(verify(&foreign).unwrap_err().contains("not federated"));
    }
}
