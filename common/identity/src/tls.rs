//! mTLS with SPIFFE identities: rustls configurations whose verifiers check
//! the signature chain against the trust bundle (webpki), then the SPIFFE
//! X.509-SVID rules and the trust domain, and, on the client side, that the
//! server is exactly the identity the caller expects.
//!
//! TLS 1.3 only, ALPN `h2`, as HBONE peers (ztunnel included) expect.

use std::sync::Arc;

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

use crate::{Svid, svid::check_chain_in};

pub const ALPN_H2: &[u8] = b"h2";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The trust bundle from the CA's root certificate file (`--ca-root`).
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
/// roots as the TLS library's trust store. Peers are validated against the
/// bundle of their own trust domain only, which is this one.
#[derive(Clone)]
pub struct TrustBundle {
    pub trust_domain: String,
    bundle: Arc<spiffe::X509Bundle>,
    roots: Arc<RootCertStore>,
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
        Ok(Self { trust_domain: trust_domain.to_string(), bundle: Arc::new(bundle), roots: Arc::new(store) })
    }

    /// The SPIFFE bundle (trust domain and X.509 authorities).
    pub fn spiffe_bundle(&self) -> &spiffe::X509Bundle {
        &self.bundle
    }

    /// The trust anchors, DER.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.bundle.authorities().iter().map(|c| CertificateDer::from(c.as_bytes().to_vec())).collect()
    }
}

/// Server side of an HBONE (or CA) connection: presents `svid`, and, with
/// `require_client`, requires and verifies the client's SVID.
pub fn server_config(
    svid: &Svid,
    bundle: &TrustBundle,
    require_client: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = if require_client {
        let inner = WebPkiClientVerifier::builder_with_provider(bundle.roots.clone(), provider)
            .build()
            .map_err(|e| TlsError::General(e.to_string()))?;
        builder.with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
            inner,
            trust_domain: bundle.trust_domain.clone(),
        }))
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(svid.chain.clone(), svid.key.clone_key())?;
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
    bundle: &TrustBundle,
    expected: SpiffeId,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier { bundle: bundle.clone(), expected, provider: provider.clone() });
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
    let verifier = WebPkiClientVerifier::builder_with_provider(bundle.roots.clone(), provider())
        .build()
        .map_err(|e| e.to_string())?;
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map(drop)
        .map_err(|e| format!("not signed by the trust bundle of {}: {e}", bundle.trust_domain))
}

/// The verified identity of a peer, from the certificates of a finished handshake.
pub fn peer_identity(certs: Option<&[CertificateDer<'static>]>, trust_domain: &str) -> Result<SpiffeId, String> {
    let certs = certs.ok_or("the peer presented no certificate")?;
    check_chain_in(certs, trust_domain).map_err(|e| e.to_string())
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
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
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
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        check_chain_in(&chain, &self.trust_domain).map_err(spiffe_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustBundle({}, {} roots)", self.trust_domain, self.roots.len())
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
        // The server is identified by its SPIFFE ID, not by a DNS name.
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.bundle.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let id = check_chain_in(&chain, &self.bundle.trust_domain).map_err(spiffe_error)?;
        if id != self.expected {
            return Err(spiffe_error(format!("server is {id}, expected {}", self.expected)));
        }
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
