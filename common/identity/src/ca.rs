//! The embedded certificate authority: issues short-lived X.509-SVIDs with
//! the [`SigningChain`] it holds (a root it created, or a plug-in
//! intermediate from the user's PKI), publishes its trust bundle in the
//! SPIFFE bundle format, and derives the tokens nodes authenticate with.
//!
//! The CA's directory holds `node-secret` (the HMAC key behind node tokens,
//! mode 0600), `bundle-sequence`, and for a root the CA created, `root.pem`
//! and `root.key` (mode 0600). The signing key never leaves the CA process:
//! agents send certificate requests for keys they generate themselves.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::{Engine as _, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac as _};
use rcgen::{CertificateSigningRequestParams, KeyPair, PublicKeyData};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::Identity;
use crate::signing::{self, PluggedError, SignError, SigningChain, sign_leaf};

const BUNDLE_SEQUENCE: &str = "bundle-sequence";
const NODE_SECRET: &str = "node-secret";
/// Shorter RSA keys are refused (NIST SP 800-131A).
const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA directory {dir}: {reason}")]
    Storage { dir: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate request is invalid: {0}")]
    BadRequest(String),
    #[error(transparent)]
    Plugged(#[from] PluggedError),
    #[error(transparent)]
    Sign(#[from] SignError),
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

impl CaTokens {
    /// The tokens of the CA in `dir`, whose secret is created there if it has none.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let storage = |reason: String| CaError::Storage { dir: dir.to_path_buf(), reason };
        fs::create_dir_all(dir).map_err(|e| storage(e.to_string()))?;
        let path = dir.join(NODE_SECRET);
        if !path.exists() {
            write_private(&path, &Self::generate().secret).map_err(|e| storage(format!("{NODE_SECRET}: {e}")))?;
        }
        let secret = fs::read(&path).map_err(|e| storage(format!("{NODE_SECRET}: {e}")))?;
        Ok(Self { secret })
    }

    /// Tokens under a new secret held in memory only.
    pub fn generate() -> Self {
        let mut secret = vec![0u8; 32];
        rand::fill(&mut secret[..]);
        Self { secret }
    }
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

/// The CA: signs leaves with its [`SigningChain`], which a plug-in CA
/// replaces in place ([`Self::reload`]) when its files change.
pub struct CertificateAuthority {
    trust_domain: String,
    signing: RwLock<Signing>,
    tokens: CaTokens,
    /// Where `bundle-sequence` is kept; None for a CA held in memory.
    dir: Option<PathBuf>,
    bundle_sequence: AtomicU64,
}

impl CertificateAuthority {
    /// Loads the CA from `dir`, creating a new root there first if it has none.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let storage = |reason: String| CaError::Storage { dir: dir.to_path_buf(), reason };
        let tokens = CaTokens::load_or_create(dir)?;
        let (cert_path, key_path) = (dir.join("root.pem"), dir.join("root.key"));
        if !key_path.exists() {
            let signing = SigningChain::create_root(trust_domain)?;
            write_private(&key_path, signing.issuer.key().serialize_pem().as_bytes())
                .map_err(|e| storage(e.to_string()))?;
            fs::write(&cert_path, pem("CERTIFICATE", &signing.roots()[0])).map_err(|e| storage(e.to_string()))?;
            tracing::info!(dir = %dir.display(), trust_domain, "created a new root CA");
            return Ok(Self::new(trust_domain, signing, tokens, Some(dir)));
        }
        let key_pem = fs::read_to_string(&key_path).map_err(|e| storage(format!("root.key: {e}")))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| storage(format!("root.key: {e}")))?;
        let cert_pem = fs::read(&cert_path).map_err(|e| storage(format!("root.pem: {e}")))?;
        let root = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .next()
            .ok_or_else(|| storage("root.pem holds no certificate".into()))?
            .map_err(|e| storage(format!("root.pem: {e}")))?;
        let signing = SigningChain::from_root(root, key).map_err(|e| storage(format!("root.pem: {e}")))?;
        Ok(Self::new(trust_domain, signing, tokens, Some(dir)))
    }

    /// A plug-in CA: signs with the intermediate in `cacerts` (see
    /// [`crate::signing`]); `dir` keeps the node-token secret and the
    /// bundle sequence.
    pub fn plugged(dir: &Path, cacerts: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let tokens = CaTokens::load_or_create(dir)?;
        let signing = SigningChain::load_plugged(cacerts, trust_domain)?;
        tracing::info!(cacerts = %cacerts.display(), trust_domain, chain = %signing.describe(), "plug-in CA loaded");
        Ok(Self::new(trust_domain, signing, tokens, Some(dir)))
    }

    /// A new CA held in memory only.
    pub fn create(trust_domain: &str) -> Result<Self, CaError> {
        Ok(Self::new(trust_domain, SigningChain::create_root(trust_domain)?, CaTokens::generate(), None))
    }

    fn new(trust_domain: &str, signing: SigningChain, tokens: CaTokens, dir: Option<&Path>) -> Self {
        let bundle_sequence = dir
            .and_then(|dir| fs::read_to_string(dir.join(BUNDLE_SEQUENCE)).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1);
        Self {
            trust_domain: trust_domain.to_string(),
            signing: RwLock::new(Signing { active: Arc::new(signing), staged: None }),
            tokens,
            dir: dir.map(Path::to_path_buf),
            bundle_sequence: AtomicU64::new(bundle_sequence),
        }
    }

    /// A plug-in CA reads its files again. An unchanged chain is `None`; an
    /// invalid one is refused and the chain in use stays. A valid new chain
    /// under a root already trusted is used at once. One under a new root
    /// (a root rotation) is staged: its root joins the bundle now, and it
    /// signs only `propagation` later, once federated meshes and this
    /// mesh's agents have had time to fetch the new bundle, so that no
    /// peer meets a leaf, or a bundle endpoint, it cannot verify.
    pub fn reload(&self, propagation: Duration) -> Result<Option<Reloaded>, CaError> {
        let current = self.signing();
        let Some(cacerts) = current.plugged_dir() else {
            return Ok(None);
        };
        let next = SigningChain::load_plugged(cacerts, &self.trust_domain)?;
        let mut signing = self.signing.write().expect("signing lock");
        if signing.staged.as_ref().is_some_and(|(staged, _)| next.same_as(staged))
            || (next.same_as(&current) && signing.staged.is_none())
        {
            return Ok(None);
        }
        let roots_before = signing.roots();
        let next = Arc::new(next);
        let reloaded = match current.roots().contains(next.anchor()) {
            // The files went back to the chain in use: a staged one is withdrawn.
            true if next.same_as(&current) => {
                signing.staged = None;
                Reloaded::Active(current.clone())
            }
            true => {
                (signing.active, signing.staged) = (next.clone(), None);
                Reloaded::Active(next)
            }
            false => {
                let at = SystemTime::now() + propagation;
                signing.staged = Some((next.clone(), at));
                Reloaded::Staged { chain: next, signs_from: at }
            }
        };
        if signing.roots() != roots_before {
            let sequence = self.bundle_sequence.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(dir) = &self.dir
                && let Err(error) = fs::write(dir.join(BUNDLE_SEQUENCE), sequence.to_string())
            {
                tracing::warn!(%error, "cannot persist the bundle sequence");
            }
        }
        Ok(Some(reloaded))
    }

    /// The chain leaves are signed with now: a staged chain once its time has come.
    pub fn signing(&self) -> Arc<SigningChain> {
        let due = |signing: &Signing| signing.staged.as_ref().is_some_and(|(_, at)| SystemTime::now() >= *at);
        if due(&self.signing.read().expect("signing lock")) {
            let mut signing = self.signing.write().expect("signing lock");
            if due(&signing) {
                let (staged, _) = signing.staged.take().expect("due");
                tracing::info!(chain = %staged.describe(), "the staged chain signs from now on");
                signing.active = staged;
            }
        }
        self.signing.read().expect("signing lock").active.clone()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust anchors agents verify against: the chain's, and during a
    /// root rotation the staged chain's too.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.signing();
        self.signing.read().expect("signing lock").roots()
    }

    /// Issues a leaf for `identity` on `public_key`, valid for `ttl`, and
    /// returns it with the intermediates to send after it.
    pub fn issue(
        &self,
        identity: &Identity,
        public_key: &impl PublicKeyData,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::BadRequest(format!("{identity} is not in trust domain {}", self.trust_domain)));
        }
        Ok(sign_leaf(&self.signing(), identity, public_key, ttl)?)
    }

    /// Issues a leaf for `identity` from a PKCS#10 request. The request's
    /// signature proves possession of the key; nothing else in it is used:
    /// the CA decides every field of the certificate.
    pub fn issue_for_request(
        &self,
        identity: &Identity,
        request: &[u8],
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        check_request_key(request)?;
        let request = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(request))
            .map_err(|e| CaError::BadRequest(e.to_string()))?;
        self.issue(identity, &request.public_key, ttl)
    }

    /// The tokens standalone nodes and waypoints present to obtain SVIDs.
    pub fn tokens(&self) -> CaTokens {
        self.tokens.clone()
    }

    /// The trust bundle in the SPIFFE bundle format (a JWKS document),
    /// telling consumers to fetch it again after `refresh_hint`.
    pub fn bundle_json(&self, refresh_hint: Duration) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .roots()
            .iter()
            .filter_map(|root| match signing::jwk(root) {
                Ok(key) => Some(key),
                Err(reason) => {
                    tracing::warn!(%reason, "a root is left out of the SPIFFE bundle");
                    None
                }
            })
            .collect();
        serde_json::json!({
            "keys": keys,
            "spiffe_sequence": self.bundle_sequence.load(Ordering::SeqCst),
            "spiffe_refresh_hint": refresh_hint.as_secs().max(1),
        })
    }
}

/// The chain in use, and one staged to replace it at a set time.
struct Signing {
    active: Arc<SigningChain>,
    staged: Option<(Arc<SigningChain>, SystemTime)>,
}

impl Signing {
    fn roots(&self) -> Vec<CertificateDer<'static>> {
        let mut roots = self.active.roots().to_vec();
        for root in self.staged.iter().flat_map(|(staged, _)| staged.roots()) {
            if !roots.contains(root) {
                roots.push(root.clone());
            }
        }
        roots
    }
}

/// What a reload of the plug-in files did.
pub enum Reloaded {
    /// The new chain signs from now on.
    Active(Arc<SigningChain>),
    /// The new chain's root is in the bundle; the chain signs from `signs_from`.
    Staged { chain: Arc<SigningChain>, signs_from: SystemTime },
}

/// The keys the CA signs for: ECDSA P-256 and P-384, RSA of 2048 bits or
/// more, and Ed25519. Anything else is refused by name, before the request's
/// signature is checked (which would fail for a short RSA key with a
/// misleading "invalid signature").
fn check_request_key(request: &[u8]) -> Result<(), CaError> {
    use x509_parser::{certification_request::X509CertificationRequest, prelude::FromDer as _, public_key::PublicKey};
    let (_, parsed) = X509CertificationRequest::from_der(request)
        .map_err(|e| CaError::BadRequest(format!("not a PKCS#10 certificate request: {e}")))?;
    let spki = &parsed.certification_request_info.subject_pki;
    let refuse = |what: String| {
        CaError::BadRequest(format!(
            "{what} keys are not accepted; use ECDSA P-256 or P-384, RSA of 2048 bits or more, or Ed25519"
        ))
    };
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() < MIN_RSA_BITS => Err(refuse(format!("RSA-{}", rsa.key_size()))),
        Ok(PublicKey::RSA(_)) => Ok(()),
        Ok(PublicKey::EC(_)) => {
            let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7" | "1.3.132.0.34") => Ok(()),
                other => Err(refuse(format!("EC ({})", other.unwrap_or("no curve")))),
            }
        }
        _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => Ok(()),
        _ => Err(refuse(format!("algorithm {}", spki.algorithm.algorithm.to_id_string()))),
    }
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
pub(crate) mod tests {
    use super::*;
    use crate::svid::{check_chain, check_root};
    use rcgen::{CertificateParams, IsCa, PKCS_ECDSA_P256_SHA256};

    fn shop_cart() -> Identity {
        Identity::new("cluster.local", "shop", "cart")
    }

    /// What every SVID ambit hands out must pass, whichever CA signed it:
    /// the SPIFFE rules, the spiffe crate's parser, webpki against `roots`,
    /// an Authority Key Identifier naming its signer's key, and a validity
    /// inside its signer's.
    pub(crate) fn assert_conforms(chain: &[CertificateDer<'static>], key: &KeyPair, roots: &[CertificateDer<'static>]) {
        check_chain(chain).unwrap();
        let der: Vec<u8> = chain.iter().flat_map(|c| c.as_ref().iter().copied()).collect();
        spiffe::X509Svid::parse_from_der(&der, &key.serialize_der()).unwrap();
        let bundle = crate::tls::TrustBundle::new("cluster.local", roots).unwrap();
        crate::tls::verify_issued(&bundle, chain).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref()).unwrap();
        let signer_der = chain.get(1).unwrap_or(&roots[0]);
        let (_, signer) = x509_parser::parse_x509_certificate(signer_der.as_ref()).unwrap();
        let aki = leaf.extensions().iter().find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.clone(),
            _ => None,
        });
        let ski = signer.extensions().iter().find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.clone()),
            _ => None,
        });
        assert_eq!(aki.map(|k| k.0.to_vec()), ski.map(|k| k.0.to_vec()), "the AKI names the signer's key");
        assert!(leaf.validity().not_before >= signer.validity().not_before, "the leaf starts before its signer");
        assert!(leaf.validity().not_after <= signer.validity().not_after, "the leaf outlives its signer");
    }

    fn issued(ca: &CertificateAuthority, ttl: Duration) -> (Vec<CertificateDer<'static>>, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        (ca.issue(&shop_cart(), &key, ttl).unwrap(), key)
    }

    #[test]
    fn issued_svids_pass_every_spiffe_rule() {
        let ca = CertificateAuthority::create("cluster.local").unwrap();
        check_root(&ca.roots()[0]).unwrap();
        let (chain, key) = issued(&ca, Duration::from_secs(3600));
        assert_eq!(chain.len(), 1, "the root signs: no intermediates");
        assert_eq!(check_chain(&chain).unwrap().to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert_conforms(&chain, &key, &ca.roots());
    }

    #[test]
    fn leaf_lifetime_follows_the_ttl() {
        let ca = CertificateAuthority::create("cluster.local").unwrap();
        let (chain, _) = issued(&ca, Duration::from_secs(20));
        let (_, cert) = x509_parser::parse_x509_certificate(chain[0].as_ref()).unwrap();
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
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let request = params.serialize_request(&key).unwrap();
        let chain = ca.issue_for_request(&shop_cart(), request.der(), Duration::from_secs(60)).unwrap();
        assert_conforms(&chain, &key, &ca.roots());
    }

    /// One case per key type: the ones the CA signs, and the ones it
    /// refuses by name.
    #[test]
    fn request_key_types() {
        let ca = CertificateAuthority::create("cluster.local").unwrap();
        let openssl_key = |args: &[&str]| {
            let out = std::process::Command::new("openssl").arg("genpkey").args(args).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            KeyPair::from_pem(&String::from_utf8(out.stdout).unwrap())
        };
        let cases: Vec<(&str, Result<KeyPair, rcgen::Error>, Option<&str>)> = vec![
            ("P-256", KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256), None),
            ("P-384", KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384), None),
            ("Ed25519", KeyPair::generate_for(&rcgen::PKCS_ED25519), None),
            ("RSA-2048", openssl_key(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]), None),
            (
                "RSA-1024",
                openssl_key(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"]),
                Some("RSA-1024 keys are not accepted"),
            ),
        ];
        for (name, key, refusal) in cases {
            let key = match key {
                Ok(key) => key,
                // ring cannot load a 1024-bit RSA key to sign the request: build it with openssl.
                Err(_) => continue,
            };
            let request = CertificateParams::default().serialize_request(&key).unwrap();
            let result = ca.issue_for_request(&shop_cart(), request.der(), Duration::from_secs(60));
            match refusal {
                None => assert_conforms(&result.unwrap_or_else(|e| panic!("{name}: {e}")), &key, &ca.roots()),
                Some(reason) => assert!(result.unwrap_err().to_string().contains(reason), "{name}"),
            }
        }
        // RSA-1024 from openssl's own request, as a client would send it.
        let dir = tempfile::tempdir().unwrap();
        let csr = dir.path().join("csr.der");
        let out = std::process::Command::new("openssl")
            .args(["req", "-new", "-newkey", "rsa:1024", "-nodes", "-subj", "/CN=x", "-outform", "DER", "-keyout"])
            .arg(dir.path().join("key.pem"))
            .arg("-out")
            .arg(&csr)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let error = ca.issue_for_request(&shop_cart(), &fs::read(&csr).unwrap(), Duration::from_secs(60)).unwrap_err();
        assert!(error.to_string().contains("RSA-1024 keys are not accepted; use ECDSA P-256"), "{error}");
    }

    #[test]
    fn a_fresh_roots_leaves_start_inside_it() {
        let ca = CertificateAuthority::create("cluster.local").unwrap();
        let (chain, key) = issued(&ca, Duration::from_secs(3600));
        assert_conforms(&chain, &key, &ca.roots());
        let roots = ca.roots();
        let (_, root) = x509_parser::parse_x509_certificate(roots[0].as_ref()).unwrap();
        let age = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
            - root.validity().not_before.timestamp();
        assert!(age >= 3599, "the root is back-dated an hour for lagging clocks: {age} s");
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
        let bundle = ca.bundle_json(Duration::from_secs(300));
        assert_eq!(bundle["spiffe_sequence"], 1);
        assert_eq!(bundle["spiffe_refresh_hint"], 300);
        let key = &bundle["keys"][0];
        assert_eq!(
            (key["use"].as_str(), key["kty"].as_str(), key["crv"].as_str()),
            (Some("x509-svid"), Some("EC"), Some("P-256"))
        );
        assert_eq!(STANDARD.decode(key["x5c"][0].as_str().unwrap()).unwrap(), ca.roots()[0].as_ref());
        assert_eq!(URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap().len(), 32);
        for file in ["root.key", NODE_SECRET] {
            let mode =
                std::os::unix::fs::PermissionsExt::mode(&fs::metadata(dir.path().join(file)).unwrap().permissions());
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }

        let again = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        assert_eq!(again.roots(), ca.roots(), "the root is loaded, not recreated");
        let claims = TokenClaims { node: "n1".into(), identity: None, exp: u64::MAX };
        assert_eq!(again.tokens().verify(&ca.tokens().issue(&claims), 0), Ok(claims), "same token secret");
    }

    #[test]
    fn tokens_minted_before_the_ca_first_started_stay_valid() {
        let dir = tempfile::tempdir().unwrap();
        let claims = TokenClaims { node: "n1".into(), identity: None, exp: u64::MAX };
        let token = CaTokens::load_or_create(dir.path()).unwrap().issue(&claims);
        let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        assert_eq!(ca.tokens().verify(&token, 0), Ok(claims));
    }
}
