//! The embedded certificate authority: an ECDSA P-256 root that issues
//! short-lived X.509-SVIDs, publishes its trust bundle in the SPIFFE bundle
//! format, and derives the tokens nodes authenticate with.
//!
//! The CA's directory holds `root.pem`, `root.key` (mode 0600), `node-secret`
//! (the HMAC key behind node tokens) and `bundle-sequence`. The root key never
//! leaves the CA process: agents send certificate requests for keys they
//! generate themselves.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use hmac::{Hmac, Mac as _};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::Identity;

/// Lifetime of a newly created root.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How often bundle consumers should re-fetch the bundle.
pub const BUNDLE_REFRESH_HINT_SECS: u64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA directory {dir}: {reason}")]
    Storage { dir: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate request is invalid: {0}")]
    BadRequest(String),
}

/// Standalone mode's CA tokens (`ambit-agent ca token`): claims signed with
/// an HMAC under the CA's node secret, `v1.<claims>.<mac>` (base64url).
///
/// - A node token (no identity) obtains the identities of its node's pods.
/// - A workload token (a waypoint's) obtains its own identity only, and
///   only while a pod on its node runs it: a stolen one mints nothing else.
///
/// Every token expires; the agent and the waypoint read the token file for
/// every request, so a new token is put in place without restarting them.
#[derive(Clone)]
pub struct CaTokens {
    secret: Vec<u8>,
}

/// What a token allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    pub node: String,
    /// `namespace/service-account`: this identity only. None: a node token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

const TOKEN_VERSION: &str = "v1";

impl CaTokens {
    /// A token for `claims`.
    pub fn issue(&self, claims: &TokenClaims) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("serializable"));
        let mac = URL_SAFE_NO_PAD.encode(self.mac(&payload).finalize().into_bytes());
        format!("{TOKEN_VERSION}.{payload}.{mac}")
    }

    /// The claims of a genuine token that has not expired at `now` (seconds
    /// since the epoch); otherwise why not, for the operator.
    pub fn verify(&self, token: &str, now: u64) -> Result<TokenClaims, String> {
        let mut parts = token.split('.');
        let (Some(TOKEN_VERSION), Some(payload), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not an ambit CA token (v1.<claims>.<mac>); mint one with `ambit-agent ca token`".into());
        };
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| "the token's signature is not base64url".to_string())?;
        self.mac(payload).verify_slice(&mac).map_err(|_| "the token's signature does not verify".to_string())?;
        let claims: TokenClaims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or("the token's claims are unreadable")?;
        if claims.exp <= now {
            return Err(format!(
                "the token expired {}s ago; mint a new one with `ambit-agent ca token` and replace the file (no restart needed)",
                now - claims.exp
            ));
        }
        Ok(claims)
    }

    fn mac(&self, payload: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(b"ambit ca token\0");
        mac.update(payload.as_bytes());
        mac
    }
}

pub struct CertificateAuthority {
    trust_domain: String,
    root: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    node_secret: Vec<u8>,
    bundle_sequence: u64,
}

impl CertificateAuthority {
    /// Loads the CA from `dir`, creating a new root there first if it has none.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let storage = |reason: String| CaError::Storage { dir: dir.to_path_buf(), reason };
        fs::create_dir_all(dir).map_err(|e| storage(e.to_string()))?;
        let (cert_path, key_path) = (dir.join("root.pem"), dir.join("root.key"));
        if !key_path.exists() {
            let created = Self::create(trust_domain)?;
            write_private(&dir.join("node-secret"), &created.node_secret).map_err(|e| storage(e.to_string()))?;
            write_private(&key_path, created.issuer.key().serialize_pem().as_bytes())
                .map_err(|e| storage(e.to_string()))?;
            fs::write(&cert_path, pem("CERTIFICATE", &created.root)).map_err(|e| storage(e.to_string()))?;
            fs::write(dir.join("bundle-sequence"), "1").map_err(|e| storage(e.to_string()))?;
            tracing::info!(dir = %dir.display(), trust_domain, "created a new root CA");
            return Ok(created);
        }
        let key_pem = fs::read_to_string(&key_path).map_err(|e| storage(format!("root.key: {e}")))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| storage(format!("root.key: {e}")))?;
        let cert_pem = fs::read(&cert_path).map_err(|e| storage(format!("root.pem: {e}")))?;
        let root = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .next()
            .ok_or_else(|| storage("root.pem holds no certificate".into()))?
            .map_err(|e| storage(format!("root.pem: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&root, key).map_err(|e| storage(format!("root.pem: {e}")))?;
        let node_secret = fs::read(dir.join("node-secret")).map_err(|e| storage(format!("node-secret: {e}")))?;
        let bundle_sequence =
            fs::read_to_string(dir.join("bundle-sequence")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1);
        Ok(Self { trust_domain: trust_domain.to_string(), root, issuer, node_secret, bundle_sequence })
    }

    /// A new CA held in memory only.
    pub fn create(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "ambit");
        name.push(DnType::CommonName, format!("ambit root CA for {trust_domain}"));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}").try_into().map_err(|_| CaError::BadRequest("trust domain".into()))?,
        )];
        let now = SystemTime::now();
        params.not_before = now.into();
        params.not_after = (now + ROOT_LIFETIME).into();
        params.serial_number = Some(random_serial());
        let root = params.self_signed(&key)?.der().clone();
        let mut node_secret = vec![0u8; 32];
        rand::fill(&mut node_secret[..]);
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            root,
            issuer: Issuer::new(params, key),
            node_secret,
            bundle_sequence: 1,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Issues a leaf for `identity` on `public_key`, valid for `ttl` (and
    /// back-dated a little, for clocks that lag).
    pub fn issue(
        &self,
        identity: &Identity,
        public_key: &impl PublicKeyData,
        ttl: Duration,
    ) -> Result<CertificateDer<'static>, CaError> {
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::BadRequest(format!("{identity} is not in trust domain {}", self.trust_domain)));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .to_string()
                .try_into()
                .map_err(|_| CaError::BadRequest(format!("{identity} is not a valid URI")))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let backdate = (ttl / 10).min(Duration::from_secs(60));
        let now = SystemTime::now();
        params.not_before = (now - backdate).into();
        params.not_after = (now + ttl).into();
        params.serial_number = Some(random_serial());
        Ok(params.signed_by(public_key, &self.issuer)?.der().clone())
    }

    /// Issues a leaf for `identity` from a PKCS#10 request. The request's
    /// signature proves possession of the key; nothing else in it is used:
    /// the CA decides every field of the certificate.
    pub fn issue_for_request(
        &self,
        identity: &Identity,
        request: &[u8],
        ttl: Duration,
    ) -> Result<CertificateDer<'static>, CaError> {
        let request = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(request))
            .map_err(|e| CaError::BadRequest(e.to_string()))?;
        self.issue(identity, &request.public_key, ttl)
    }

    /// The tokens standalone nodes and waypoints present to obtain SVIDs.
    pub fn tokens(&self) -> CaTokens {
        CaTokens { secret: self.node_secret.clone() }
    }

    /// The trust bundle in the SPIFFE bundle format (a JWKS document).
    pub fn bundle_json(&self) -> serde_json::Value {
        let point = self.issuer.key().public_key_raw();
        // Uncompressed SEC1 point: 0x04 || X (32 bytes) || Y (32 bytes).
        let (x, y) = point[1..].split_at(32);
        serde_json::json!({
            "keys": [{
                "use": "x509-svid",
                "kty": "EC",
                "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(x),
                "y": URL_SAFE_NO_PAD.encode(y),
                "x5c": [STANDARD.encode(self.root.as_ref())],
            }],
            "spiffe_sequence": self.bundle_sequence,
            "spiffe_refresh_hint": BUNDLE_REFRESH_HINT_SECS,
        })
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and never shorter than 16 bytes
    SerialNumber::from_slice(&bytes)
}

/// PEM text of one DER object.
pub fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> =
        body.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("base64 is ASCII")).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(contents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svid::{check_chain, check_root};

    fn issued(ca: &CertificateAuthority, ttl: Duration) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        ca.issue(&Identity::new("cluster.local", "shop", "cart"), &key, ttl).unwrap()
    }

    #[test]
    fn issued_svids_pass_every_spiffe_rule() {
        let ca = CertificateAuthority::create("cluster.local").unwrap();
        check_root(ca.root()).unwrap();
        let leaf = issued(&ca, Duration::from_secs(3600));
        let id = check_chain(&[leaf.clone(), ca.root().clone()]).unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        // The spiffe crate's own X509Svid parser accepts it as well.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = ca.issue(&Identity::new("cluster.local", "shop", "cart"), &key, Duration::from_secs(60)).unwrap();
        spiffe::X509Svid::parse_from_der(der.as_ref(), &key.serialize_der()).unwrap();
    }

    #[test]
    fn leaf_lifetime_follows_the_ttl() {
        let ca = CertificateAuthority::create("cluster.local").unwrap();
        let leaf = issued(&ca, Duration::from_secs(20));
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
        let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 22, "20 s, back-dated by a tenth");
    }

    #[test]
    fn other_trust_domains_are_refused() {
        let ca = CertificateAuthority::create("cluster.local").unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(ca.issue(&Identity::new("evil.example", "shop", "cart"), &key, Duration::from_secs(60)).is_err());
    }

    #[test]
    fn requests_are_signed_with_the_cas_own_fields() {
        let ca = CertificateAuthority::create("cluster.local").unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        // The request asks for a CA certificate; the CA ignores that.
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let request = params.serialize_request(&key).unwrap();
        let leaf = ca
            .issue_for_request(&Identity::new("cluster.local", "shop", "cart"), request.der(), Duration::from_secs(60))
            .unwrap();
        check_chain(&[leaf]).unwrap();
    }

    #[test]
    fn tokens_verify_only_unaltered_and_unexpired() {
        let ca = CertificateAuthority::create("cluster.local").unwrap();
        let tokens = ca.tokens();
        let claims = TokenClaims { node: "node-1".into(), identity: Some("shop/waypoint".into()), exp: 1_000 };
        let token = tokens.issue(&claims);
        assert_eq!(tokens.verify(&token, 999), Ok(claims.clone()));
        assert!(tokens.verify(&token, 1_000).unwrap_err().contains("expired"));
        // Claims edited (a node token made from a workload token) fail the MAC.
        let (_, rest) = token.split_once('.').unwrap();
        let (_, mac) = rest.split_once('.').unwrap();
        let widened = URL_SAFE_NO_PAD.encode(br#"{"node":"node-1","exp":1000}"#);
        assert!(tokens.verify(&format!("v1.{widened}.{mac}"), 999).unwrap_err().contains("signature"));
        // Another CA's token, and the old bare-HMAC format, are refused.
        let other = CertificateAuthority::create("cluster.local").unwrap().tokens().issue(&claims);
        assert!(tokens.verify(&other, 999).is_err());
        assert!(tokens.verify("00ff", 999).unwrap_err().contains("ambit-agent ca token"));
    }

    #[test]
    fn bundle_is_a_spiffe_jwks_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let bundle = ca.bundle_json();
        assert_eq!(bundle["spiffe_sequence"], 1);
        assert_eq!(bundle["spiffe_refresh_hint"], BUNDLE_REFRESH_HINT_SECS);
        let key = &bundle["keys"][0];
        assert_eq!(
            (key["use"].as_str(), key["kty"].as_str(), key["crv"].as_str()),
            (Some("x509-svid"), Some("EC"), Some("P-256"))
        );
        assert_eq!(STANDARD.decode(key["x5c"][0].as_str().unwrap()).unwrap(), ca.root().as_ref());
        assert_eq!(URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap().len(), 32);
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(dir.path().join("root.key")).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);

        let again = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        assert_eq!(again.root(), ca.root(), "the root is loaded, not recreated");
        let claims = TokenClaims { node: "n1".into(), identity: None, exp: u64::MAX };
        assert_eq!(again.tokens().verify(&ca.tokens().issue(&claims), 0), Ok(claims), "same token secret");
    }
}
