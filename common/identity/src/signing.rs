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
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData as _, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::{
    certificate::X509Certificate, extensions::GeneralName, prelude::FromDer as _, public_key::PublicKey,
};

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
        params.serial_number = Some(crate::ca::random_serial());
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
        check_signing_trust_domain(&cert, trust_domain).map_err(|reason| fail(CA_CERT, reason))?;

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
        let anchor = roots.iter().find(|root| issued_by(top, root)).ok_or_else(|| {
            fail(
                ROOT_CERT,
                format!("holds no root that issued the last certificate of {CERT_CHAIN} ({})", subject(top)),
            )
        })?;
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
        let chain = crate::ca::sign_leaf(self, &probe, &key, Duration::from_secs(60)).map_err(|e| e.to_string())?;
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

/// A signing certificate may name its trust domain (`spiffe://<td>`); if
/// it names another, its leaves would carry IDs it is not trusted for.
fn check_signing_trust_domain(cert: &X509Certificate<'_>, trust_domain: &str) -> Result<(), String> {
    let sans = cert.subject_alternative_name().ok().flatten();
    for name in sans.iter().flat_map(|san| san.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name
            && let Some(rest) = uri.strip_prefix("spiffe://")
            && rest.trim_end_matches('/') != trust_domain
        {
            return Err(format!("names {uri}, which is not trust domain {trust_domain}"));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CertificateAuthority, Reloaded, tests::assert_conforms};

    /// A user's PKI, built with rcgen: a root and intermediates under it.
    struct Pki {
        root: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca_params(name: &str, lifetime: Duration) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(600)).into();
        params.not_after = (now + lifetime).into();
        params
    }

    impl Pki {
        fn new(name: &str) -> Self {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let params = ca_params(name, Duration::from_secs(10 * 365 * 86400));
            let root = params.self_signed(&key).unwrap().der().clone();
            Self { root, issuer: Issuer::new(params, key) }
        }

        /// An intermediate signed by the root, changed by `edit` first.
        fn intermediate(&self, edit: impl FnOnce(&mut CertificateParams)) -> (CertificateDer<'static>, KeyPair) {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = ca_params("ambit intermediate", Duration::from_secs(365 * 86400));
            edit(&mut params);
            (params.signed_by(&key, &self.issuer).unwrap().der().clone(), key)
        }
    }

    fn pem_of(certs: &[&CertificateDer<'_>]) -> String {
        certs.iter().map(|c| crate::ca::pem("CERTIFICATE", c)).collect()
    }

    /// Writes a cacerts directory: the intermediate, its key, chain and roots.
    fn write(
        dir: &Path,
        cert: &CertificateDer<'_>,
        key: &KeyPair,
        chain: &[&CertificateDer<'_>],
        roots: &[&CertificateDer<'_>],
    ) {
        std::fs::write(dir.join(CA_CERT), pem_of(&[cert])).unwrap();
        std::fs::write(dir.join(CA_KEY), key.serialize_pem()).unwrap();
        std::fs::write(dir.join(CERT_CHAIN), pem_of(chain)).unwrap();
        std::fs::write(dir.join(ROOT_CERT), pem_of(roots)).unwrap();
    }

    fn shop_cart() -> Identity {
        Identity::new("cluster.local", "shop", "cart")
    }

    #[test]
    fn a_plugged_intermediate_signs_leaves_that_carry_it_and_verify_against_the_root() {
        let (pki, dir, state) = (Pki::new("corp root"), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (cert, key) = pki.intermediate(|_| {});
        write(dir.path(), &cert, &key, &[&cert, &pki.root], &[&pki.root]);
        let ca = CertificateAuthority::plugged(state.path(), dir.path(), "cluster.local").unwrap();
        assert_eq!(ca.roots(), vec![pki.root.clone()], "agents trust root-cert.pem");
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = ca.issue(&shop_cart(), &leaf_key, Duration::from_secs(3600)).unwrap();
        assert_eq!(chain[1..], [cert], "the leaf carries the intermediate, not the root");
        assert_conforms(&chain, &leaf_key, std::slice::from_ref(&pki.root));
        assert_eq!(ca.bundle_json(Duration::from_secs(300))["keys"][0]["x5c"][0], STANDARD.encode(pki.root.as_ref()));
    }

    #[test]
    fn leaves_never_outlive_the_intermediate() {
        let (pki, dir, state) = (Pki::new("corp root"), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (cert, key) = pki.intermediate(|p| p.not_after = (SystemTime::now() + Duration::from_secs(1800)).into());
        write(dir.path(), &cert, &key, &[&cert], &[&pki.root]);
        let ca = CertificateAuthority::plugged(state.path(), dir.path(), "cluster.local").unwrap();
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = ca.issue(&shop_cart(), &leaf_key, Duration::from_secs(3600)).unwrap();
        assert_conforms(&chain, &leaf_key, std::slice::from_ref(&pki.root));
    }

    /// One case per way a plug-in directory can be wrong; each is refused
    /// at start-up with the file and the reason.
    #[test]
    fn bad_or_mismatched_files_are_refused_by_name() {
        let pki = Pki::new("corp root");
        let other = Pki::new("another root");
        let (good, good_key) = pki.intermediate(|_| {});
        let (stranger, _) = other.intermediate(|_| {});
        let (_, unrelated_key) = pki.intermediate(|_| {});
        let (leaf_like, leaf_key) = pki.intermediate(|p| {
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        });
        let (expired, expired_key) = pki.intermediate(|p| {
            p.not_before = (SystemTime::now() - Duration::from_secs(7200)).into();
            p.not_after = (SystemTime::now() - Duration::from_secs(3600)).into();
        });
        let (foreign_td, foreign_key) = pki.intermediate(|p| {
            p.subject_alt_names = vec![SanType::URI("spiffe://other.example".try_into().unwrap())];
        });
        type Setup<'a> = Box<dyn Fn(&Path) + 'a>;
        let cases: Vec<(&str, Setup, &str)> = vec![
            (
                "key of another certificate",
                Box::new(|d| write(d, &good, &unrelated_key, &[&good], &[&pki.root])),
                "ca-key.pem: is not the key of ca-cert.pem",
            ),
            (
                "chain not starting with ca-cert",
                Box::new(|d| write(d, &good, &good_key, &[&pki.root], &[&pki.root])),
                "cert-chain.pem: must begin with",
            ),
            (
                "root of another PKI",
                Box::new(|d| write(d, &good, &good_key, &[&good], &[&other.root])),
                "root-cert.pem: holds no root that issued",
            ),
            (
                "intermediate of another PKI",
                Box::new(|d| write(d, &stranger, &unrelated_key, &[&stranger], &[&pki.root])),
                "ca-key.pem: is not the key",
            ),
            (
                "a leaf as ca-cert",
                Box::new(|d| write(d, &leaf_like, &leaf_key, &[&leaf_like], &[&pki.root])),
                "ca-cert.pem: is not a CA certificate",
            ),
            (
                "expired intermediate",
                Box::new(|d| write(d, &expired, &expired_key, &[&expired], &[&pki.root])),
                "expired at",
            ),
            (
                "another trust domain",
                Box::new(|d| write(d, &foreign_td, &foreign_key, &[&foreign_td], &[&pki.root])),
                "not trust domain cluster.local",
            ),
            (
                "two certificates in ca-cert",
                Box::new(|d| {
                    write(d, &good, &good_key, &[&good], &[&pki.root]);
                    std::fs::write(d.join(CA_CERT), pem_of(&[&good, &pki.root])).unwrap();
                }),
                "exactly one",
            ),
            (
                "missing key",
                Box::new(|d| {
                    write(d, &good, &good_key, &[&good], &[&pki.root]);
                    std::fs::remove_file(d.join(CA_KEY)).unwrap();
                }),
                "ca-key.pem: cannot read it",
            ),
            (
                "SEC1 key",
                Box::new(|d| {
                    write(d, &good, &good_key, &[&good], &[&pki.root]);
                    let sec1 =
                        std::process::Command::new("openssl").args(["ec", "-in"]).arg(d.join(CA_KEY)).output().unwrap();
                    assert!(sec1.status.success());
                    std::fs::write(d.join(CA_KEY), sec1.stdout).unwrap();
                }),
                "SEC1 form; convert it with `openssl pkcs8 -topk8",
            ),
        ];
        for (name, setup, expected) in cases {
            let (dir, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            setup(dir.path());
            let error = CertificateAuthority::plugged(state.path(), dir.path(), "cluster.local").err();
            let error = error.unwrap_or_else(|| panic!("{name}: accepted")).to_string();
            assert!(error.contains(expected), "{name}: {error}");
            assert!(error.starts_with("plug-in CA "), "{name}: {error}");
        }
    }

    #[test]
    fn a_new_intermediate_is_taken_up_and_a_broken_one_refused() {
        let (pki, dir, state) = (Pki::new("corp root"), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (first, first_key) = pki.intermediate(|_| {});
        write(dir.path(), &first, &first_key, &[&first, &pki.root], &[&pki.root]);
        let ca = CertificateAuthority::plugged(state.path(), dir.path(), "cluster.local").unwrap();
        let propagation = Duration::from_secs(3600);
        assert!(ca.reload(propagation).unwrap().is_none(), "unchanged files change nothing");

        let (second, second_key) = pki.intermediate(|_| {});
        write(dir.path(), &second, &second_key, &[&second, &pki.root], &[&pki.root]);
        assert!(matches!(ca.reload(propagation).unwrap(), Some(Reloaded::Active(_))), "same root: at once");
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(ca.issue(&shop_cart(), &leaf_key, Duration::from_secs(60)).unwrap()[1], second);
        assert_eq!(ca.bundle_json(Duration::from_secs(300))["spiffe_sequence"], 1, "same root, same bundle");

        // Half-written: the new certificate with the old key.
        std::fs::write(dir.path().join(CA_CERT), pem_of(&[&first])).unwrap();
        assert!(ca.reload(propagation).is_err());
        assert_eq!(ca.issue(&shop_cart(), &leaf_key, Duration::from_secs(60)).unwrap()[1], second, "still signing");
    }

    /// A root rotation in one step (new root and an intermediate under it):
    /// the new root is published at once, and signs only after the
    /// propagation time.
    #[test]
    fn a_new_root_is_published_before_it_signs() {
        let (pki, dir, state) = (Pki::new("corp root"), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (first, first_key) = pki.intermediate(|_| {});
        write(dir.path(), &first, &first_key, &[&first], &[&pki.root]);
        let ca = CertificateAuthority::plugged(state.path(), dir.path(), "cluster.local").unwrap();
        let next = Pki::new("next corp root");
        let (second, second_key) = next.intermediate(|_| {});
        write(dir.path(), &second, &second_key, &[&second], &[&pki.root, &next.root]);
        let Some(Reloaded::Staged { .. }) = ca.reload(Duration::from_millis(300)).unwrap() else {
            panic!("a new root is staged")
        };
        assert_eq!(ca.roots(), vec![pki.root.clone(), next.root.clone()], "both roots are published");
        let bundle = ca.bundle_json(Duration::from_secs(300));
        assert_eq!((bundle["spiffe_sequence"].as_u64(), bundle["keys"].as_array().unwrap().len()), (Some(2), 2));
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(ca.issue(&shop_cart(), &leaf_key, Duration::from_secs(60)).unwrap()[1], first, "still the old");
        assert!(ca.reload(Duration::from_millis(300)).unwrap().is_none(), "staged once");
        std::thread::sleep(Duration::from_millis(400));
        let chain = ca.issue(&shop_cart(), &leaf_key, Duration::from_secs(60)).unwrap();
        assert_eq!(chain[1], second, "the new chain signs once propagated");
        assert_conforms(&chain, &leaf_key, &ca.roots());
    }

    #[test]
    fn plugged_files_are_all_or_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!plugged_files_present(dir.path()).unwrap());
        assert!(!plugged_files_present(&dir.path().join("absent")).unwrap());
        std::fs::write(dir.path().join(CA_CERT), "").unwrap();
        let error = plugged_files_present(dir.path()).unwrap_err().to_string();
        assert!(error.contains("ca-key.pem, cert-chain.pem, root-cert.pem missing"), "{error}");
        for file in PLUGGED_FILES {
            std::fs::write(dir.path().join(file), "").unwrap();
        }
        assert!(plugged_files_present(dir.path()).unwrap());
    }
}
