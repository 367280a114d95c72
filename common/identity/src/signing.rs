//! What the CA signs with: a key, the certificates between its leaves and
//! the trust anchors, and the anchors themselves. Either a root the CA
//! created (the embedded default), or a plug-in intermediate from the
//! user's own PKI, in Istio's `cacerts` layout:
//!
//! - `ca-cert.pem`: the certificate the CA signs with (an intermediate);
//! - `ca-key.pem`: its private key (PKCS#8);
//! - `cert-chain.pem`: `ca-cert.pem` first, then each certificate above it,
//!   optionally ending with the root;
//! - `root-cert.pem`: the root(s) agents trust (more than one during a root
//!   rotation).
//!
//! A plug-in chain is checked as a whole before it is used: a bad or
//! mismatched file is a start-up error, or a reload that is refused, never
//! a CA that issues certificates its peers reject.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::{certificate::X509Certificate, prelude::FromDer as _, public_key::PublicKey};

use crate::{Identity, svid, tls};

/// Lifetime of a root the CA creates.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A created root starts this far in the past, so that nodes whose clock
/// lags the CA's accept the first leaves it signs.
const ROOT_BACKDATE: Duration = Duration::from_secs(3600);

/// The files of a plug-in CA directory.
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const PLUGGED_FILES: [&str; 4] = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT];

/// Why a plug-in CA directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("plug-in CA {}: {reason}", path.display())]
pub struct PluggedError {
    /// The file (or directory) at fault.
    pub path: PathBuf,
    pub reason: String,
}

/// Why a leaf could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(
        "the signing chain expired at {at}; put a new intermediate in the plug-in CA directory (the CA reloads it)"
    )]
    ChainExpired { at: String },
    #[error("{0} is not a valid URI")]
    InvalidId(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Whether `dir` holds a plug-in CA: true with all four files, false with
/// none (or no directory); an error names the missing files otherwise.
pub fn plugged_files_present(dir: &Path) -> Result<bool, PluggedError> {
    let missing: Vec<&str> = PLUGGED_FILES.iter().copied().filter(|file| !dir.join(file).exists()).collect();
    match missing.len() {
        0 => Ok(true),
        n if n == PLUGGED_FILES.len() => Ok(false),
        _ => Err(PluggedError {
            path: dir.to_path_buf(),
            reason: format!("{} missing; a plug-in CA needs all of {}", missing.join(", "), PLUGGED_FILES.join(", ")),
        }),
    }
}

pub struct SigningChain {
    pub(crate) issuer: Issuer<'static, KeyPair>,
    /// The signing certificate and those above it, up to and not including
    /// the root; empty when a root signs.
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    /// The root that issued the top of the chain.
    anchor: CertificateDer<'static>,
    /// When every certificate between a leaf and its root is valid: leaves
    /// are kept inside it.
    valid_from: SystemTime,
    valid_until: SystemTime,
    /// The plug-in directory, or None for a root the CA created.
    plugged: Option<PathBuf>,
}

impl SigningChain {
    /// A new self-signed root, ECDSA P-256.
    pub fn create_root(trust_domain: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "ambit");
        name.push(DnType::CommonName, format!("ambit root CA for {trust_domain}"));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let now = SystemTime::now();
        params.not_before = (now - ROOT_BACKDATE).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        params.serial_number = Some(random_serial());
        let root = params.self_signed(&key)?.der().clone();
        Self::from_root(root, key).map_err(|_| rcgen::Error::CouldNotParseCertificate)
    }

    /// A root and its key, as the embedded CA keeps them.
    pub fn from_root(root: CertificateDer<'static>, key: KeyPair) -> Result<Self, String> {
        let (valid_from, valid_until) = validity(&root)?;
        let issuer = Issuer::from_ca_cert_der(&root, key).map_err(|e| e.to_string())?;
        Ok(Self {
            issuer,
            intermediates: Vec::new(),
            anchor: root.clone(),
            roots: vec![root],
            valid_from,
            valid_until,
            plugged: None,
        })
    }

    /// Reads and checks a plug-in CA directory (see the module's docs).
    pub fn load_plugged(dir: &Path, trust_domain: &str) -> Result<Self, PluggedError> {
        let fail = |file: &str, reason: String| PluggedError { path: dir.join(file), reason };
        let ca_cert = match read_certs(dir, CA_CERT)?.as_slice() {
            [one] => one.clone(),
            many => return Err(fail(CA_CERT, format!("holds {} certificates; it must hold exactly one", many.len()))),
        };
        svid::check_root(&ca_cert).map_err(|_| {
            fail(CA_CERT, "is not a CA certificate (it needs basicConstraints cA=true and keyCertSign)".into())
        })?;
        let key = read_key(dir)?;
        let (_, cert) = X509Certificate::from_der(ca_cert.as_ref()).map_err(|e| fail(CA_CERT, e.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(fail(CA_KEY, format!("is not the key of {CA_CERT} ({})", cert.subject())));
        }
        if let Some(uri) = svid::other_trust_domain_named(&cert, trust_domain) {
            return Err(fail(CA_CERT, format!("names {uri}, which is not trust domain {trust_domain}")));
        }

        let chain = read_certs(dir, CERT_CHAIN)?;
        let roots = read_certs(dir, ROOT_CERT)?;
        for root in &roots {
            svid::check_root(root).map_err(|_| fail(ROOT_CERT, "holds a certificate that is not a CA".into()))?;
        }
        if chain.first() != Some(&ca_cert) {
            return Err(fail(CERT_CHAIN, format!("must begin with the certificate of {CA_CERT}")));
        }
        let intermediates: Vec<_> = chain.into_iter().filter(|c| !roots.contains(c)).collect();
        for (i, intermediate) in intermediates.iter().enumerate().skip(1) {
            svid::check_root(intermediate).map_err(|_| {
                fail(CERT_CHAIN, format!("certificate {} is not a CA, so it cannot be in a signing chain", i + 1))
            })?;
        }
        let top = intermediates.last().expect("holds ca-cert");
        // Roots of a rotation often share a name: the key identifiers tell them apart.
        let named: Vec<&CertificateDer<'static>> = roots.iter().filter(|root| issued_by(top, root)).collect();
        let anchor = match named.as_slice() {
            [] => {
                let reason =
                    format!("holds no root that issued the last certificate of {CERT_CHAIN} ({})", subject(top));
                return Err(fail(ROOT_CERT, reason));
            }
            [one] => *one,
            many => {
                let issuer_key = key_identifier(top, KeyId::Authority);
                let found =
                    many.iter().find(|root| issuer_key.is_some() && key_identifier(root, KeyId::Subject) == issuer_key);
                *found.ok_or_else(|| {
                    fail(
                        ROOT_CERT,
                        format!(
                            "holds {} roots named {}, and the key identifiers do not say which issued the chain; give the intermediate an authorityKeyIdentifier",
                            many.len(),
                            subject(many[0])
                        ),
                    )
                })?
            }
        };
        let mut valid_from = UNIX_EPOCH;
        let mut valid_until = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 4);
        for cert in intermediates.iter().chain([anchor]) {
            let (from, until) = validity(cert).map_err(|e| fail(CERT_CHAIN, e))?;
            (valid_from, valid_until) = (valid_from.max(from), valid_until.min(until));
        }
        let now = SystemTime::now();
        if valid_until <= now {
            return Err(fail(
                CERT_CHAIN,
                format!("a certificate of the chain expired at {}", humantime::format_rfc3339_seconds(valid_until)),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| fail(CA_CERT, e.to_string()))?;
        let anchor = anchor.clone();
        let plugged = Some(dir.to_path_buf());
        let signing = Self { issuer, intermediates, roots, anchor, valid_from, valid_until, plugged };
        signing.check_by_signing_a_probe(trust_domain).map_err(|reason| fail(CERT_CHAIN, reason))?;
        Ok(signing)
    }

    /// Signs a throw-away leaf and verifies it as a peer would: the whole
    /// chain, signatures and SPIFFE rules, against the roots.
    fn check_by_signing_a_probe(&self, trust_domain: &str) -> Result<(), String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let probe = Identity::new(trust_domain, "ambit-system", "chain-check");
        let chain = sign_leaf(self, &probe, &key, Duration::from_secs(60)).map_err(|e| e.to_string())?;
        let bundle = tls::TrustBundle::new(trust_domain, &self.roots).map_err(|e| e.to_string())?;
        tls::verify_issued(&bundle, &chain).map_err(|e| format!("the chain does not verify: {e}"))?;
        svid::check_chain_in(&chain, trust_domain).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Certificates to send after a leaf.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The root its leaves chain to.
    pub fn anchor(&self) -> &CertificateDer<'static> {
        &self.anchor
    }

    pub fn plugged_dir(&self) -> Option<&Path> {
        self.plugged.as_deref()
    }

    pub fn validity(&self) -> (SystemTime, SystemTime) {
        (self.valid_from, self.valid_until)
    }

    /// Whether `other` signs with the same certificates and trusts the same roots.
    pub fn same_as(&self, other: &SigningChain) -> bool {
        self.intermediates == other.intermediates && self.roots == other.roots
    }

    /// One line per certificate, signer first: for the CA's log.
    pub fn describe(&self) -> String {
        let until = |c: &CertificateDer| {
            validity(c).map(|(_, until)| humantime::format_rfc3339_seconds(until).to_string()).unwrap_or_default()
        };
        let mut parts: Vec<String> =
            self.intermediates.iter().map(|c| format!("{} (until {})", subject(c), until(c))).collect();
        parts.extend(self.roots.iter().map(|c| format!("root {} (until {})", subject(c), until(c))));
        parts.join(" <- ")
    }
}

fn read_certs(dir: &Path, file: &str) -> Result<Vec<CertificateDer<'static>>, PluggedError> {
    let path = dir.join(file);
    let fail = |reason: String| PluggedError { path: path.clone(), reason };
    let pem = std::fs::read(&path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(fail("holds no certificate".into()));
    }
    Ok(certs)
}

fn read_key(dir: &Path) -> Result<KeyPair, PluggedError> {
    let path = dir.join(CA_KEY);
    let fail = |reason: String| PluggedError { path: path.clone(), reason };
    let pem = std::fs::read(&path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let convert = "convert it with `openssl pkcs8 -topk8 -nocrypt -in ca-key.pem -out ca-key.pkcs8.pem`";
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(PrivateKeyDer::Pkcs8(key))) => KeyPair::try_from(&key)
            .map_err(|e| fail(format!("not a key the CA can sign with (ECDSA P-256/P-384, RSA, Ed25519): {e}"))),
        Ok(Some(PrivateKeyDer::Sec1(_))) => Err(fail(format!("is an EC key in SEC1 form; {convert}"))),
        Ok(Some(PrivateKeyDer::Pkcs1(_))) => Err(fail(format!("is an RSA key in PKCS#1 form; {convert}"))),
        Ok(_) => Err(fail("holds no private key".into())),
        Err(e) => Err(fail(format!("is not PEM: {e}"))),
    }
}

enum KeyId {
    Subject,
    Authority,
}

/// A certificate's subject or authority key identifier, if it carries one.
fn key_identifier(cert: &CertificateDer<'_>, which: KeyId) -> Option<Vec<u8>> {
    use x509_parser::extensions::ParsedExtension;
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    cert.extensions().iter().find_map(|e| match (e.parsed_extension(), &which) {
        (ParsedExtension::SubjectKeyIdentifier(id), KeyId::Subject) => Some(id.0.to_vec()),
        (ParsedExtension::AuthorityKeyIdentifier(aki), KeyId::Authority) => {
            aki.key_identifier.as_ref().map(|id| id.0.to_vec())
        }
        _ => None,
    })
}

fn issued_by(cert: &CertificateDer<'_>, issuer: &CertificateDer<'_>) -> bool {
    match (X509Certificate::from_der(cert.as_ref()), X509Certificate::from_der(issuer.as_ref())) {
        (Ok((_, cert)), Ok((_, issuer))) => cert.issuer().as_raw() == issuer.subject().as_raw(),
        _ => false,
    }
}

pub(crate) fn subject(cert: &CertificateDer<'_>) -> String {
    X509Certificate::from_der(cert.as_ref()).map(|(_, c)| c.subject().to_string()).unwrap_or_else(|_| "?".into())
}

fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), String> {
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).map_err(|e| e.to_string())?;
    let at = |t: x509_parser::time::ASN1Time| UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
    Ok((at(cert.validity().not_before), at(cert.validity().not_after)))
}

/// A root as a JSON Web Key with `use: x509-svid`, as SPIFFE bundles carry
/// it (the SPIFFE Trust Domain and Bundle spec, §4).
pub fn jwk(root: &CertificateDer<'_>) -> Result<serde_json::Value, String> {
    let (_, cert) = X509Certificate::from_der(root.as_ref()).map_err(|e| e.to_string())?;
    let spki = cert.public_key();
    let mut key = match spki.parsed().map_err(|e| e.to_string())? {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string())
                .unwrap_or_default();
            let crv = match curve.as_str() {
                "1.2.840.10045.3.1.7" => "P-256",
                "1.3.132.0.34" => "P-384",
                "1.3.132.0.35" => "P-521",
                other => return Err(format!("EC curve {other} has no JWK name")),
            };
            // Uncompressed SEC1 point: 0x04 || X || Y.
            let (x, y) = point.data()[1..].split_at((point.data().len() - 1) / 2);
            serde_json::json!({ "kty": "EC", "crv": crv, "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y) })
        }
        PublicKey::RSA(rsa) => {
            let n = rsa.modulus.strip_prefix(&[0]).unwrap_or(rsa.modulus);
            serde_json::json!({ "kty": "RSA", "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(rsa.exponent) })
        }
        PublicKey::Unknown(raw) if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => {
            serde_json::json!({ "kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(raw) })
        }
        _ => return Err(format!("{}: a key type SPIFFE bundles do not carry", cert.subject())),
    };
    key["use"] = "x509-svid".into();
    key["x5c"] = serde_json::json!([STANDARD.encode(root.as_ref())]);
    Ok(key)
}

/// Signs a leaf for `identity` with `signing`, back-dated a little for
/// clocks that lag, and kept within the chain's own validity: a leaf must
/// not start before, nor outlive, what it chains to.
pub fn sign_leaf(
    signing: &SigningChain,
    identity: &Identity,
    public_key: &impl PublicKeyData,
    ttl: Duration,
) -> Result<Vec<CertificateDer<'static>>, SignError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(identity.to_string().try_into().map_err(|_| SignError::InvalidId(identity.to_string()))?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    // RFC 5280 §4.2.1.1: every certificate but a self-signed root names its signer's key.
    params.use_authority_key_identifier_extension = true;
    let (chain_from, chain_until) = signing.validity();
    let now = SystemTime::now();
    let backdate = (ttl / 10).min(Duration::from_secs(60));
    let (not_before, not_after) = ((now - backdate).max(chain_from), (now + ttl).min(chain_until));
    if not_after <= now {
        return Err(SignError::ChainExpired { at: humantime::format_rfc3339_seconds(chain_until).to_string() });
    }
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial());
    let leaf = params.signed_by(public_key, &signing.issuer)?.der().clone();
    let mut chain = vec![leaf];
    chain.extend(signing.intermediates().iter().cloned());
    Ok(chain)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and never shorter than 16 bytes
    SerialNumber::from_slice(&bytes)
}
