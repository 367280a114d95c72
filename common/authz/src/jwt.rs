//! End-user authentication for waypoints: `RequestAuthentication` JWT rules.
//!
//! A token is read from `Authorization: Bearer`, matched to the rule of its
//! issuer, and accepted only with an asymmetric signature (RSA, RSA-PSS,
//! ECDSA, EdDSA; never `none` or HMAC) by a key of that issuer's JWKS, an
//! allowed audience, and `exp`/`nbf` within a small leeway. A request
//! without a token passes unauthenticated (policy decides, as in Istio); a
//! request with a bad token is refused (401). Keys published over https are
//! fetched and cached by the waypoint, which passes what it holds to
//! [`JwtVerifier::authenticate`]; an issuer whose keys are not fetched yet
//! has its tokens refused, never accepted unchecked.

use std::{collections::HashMap, sync::Arc};

use base64::Engine as _;
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{Jwk, JwkSet},
};

use ambit_model::{Jwks, JwtRule};

use crate::request::RequestAuth;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// The signature algorithms a token may use.
const ALLOWED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Key sets fetched over https, by URI.
pub type FetchedKeys = HashMap<String, Arc<JwkSet>>;

/// Why a token was refused. The text goes to the log, not to the client.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("the Authorization header is not `Bearer <token>`")]
    NotBearer,
    #[error("the request has {0} Authorization headers; send one")]
    Repeated(usize),
    #[error("not a JWT: {0}")]
    Malformed(String),
    #[error("issuer `{0}` is not accepted here (no RequestAuthentication rule for it)")]
    UnknownIssuer(String),
    #[error("algorithm {0:?} is not accepted; only asymmetric signatures (RS*, PS*, ES256, ES384, EdDSA)")]
    Algorithm(Algorithm),
    #[error("no key of issuer `{issuer}` matches the token (kid {kid:?})")]
    NoKey {
        issuer: String,
        kid: Option<String>,
        /// The https URI of the issuer's keys, which may have rotated.
        uri: Option<String>,
    },
    #[error("the keys of issuer `{issuer}` have not been fetched from {uri} yet (the waypoint log says why)")]
    KeysUnavailable { issuer: String, uri: String },
    #[error("token rejected: {0}")]
    Invalid(String),
}

impl JwtError {
    /// The https key set to fetch again before refusing: the token names a
    /// key the cached set lacks, so the issuer may have rotated its keys.
    pub fn refetch_uri(&self) -> Option<&str> {
        match self {
            JwtError::NoKey { uri, .. } => uri.as_deref(),
            _ => None,
        }
    }
}

/// The JWT rules that apply to one waypoint.
#[derive(Clone, Debug, Default)]
pub struct JwtVerifier {
    rules: Vec<JwtRule>,
}

impl JwtVerifier {
    pub fn new(rules: Vec<JwtRule>) -> Self {
        Self { rules }
    }

    /// The end user of a request: `None` without a token, an error for a
    /// token that does not verify. `fetched` holds the https key sets.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        fetched: &FetchedKeys,
    ) -> Result<Option<RequestAuth>, JwtError> {
        // One header only: the waypoint verifies the token the app reads.
        let value = match headers.get_all(http::header::AUTHORIZATION).iter().collect::<Vec<_>>().as_slice() {
            [] => return Ok(None),
            [one] => *one,
            many => return Err(JwtError::Repeated(many.len())),
        };
        let value = value.to_str().map_err(|_| JwtError::NotBearer)?;
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => token.trim(),
            _ => return Err(JwtError::NotBearer),
        };
        self.verify(token, fetched).map(Some)
    }

    /// The URIs (https:// and file://) whose keys these rules need.
    pub fn fetched_uris(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().filter_map(|r| match &r.jwks {
            Jwks::Fetched(uri) => Some(uri.as_str()),
            Jwks::Loaded(_) => None,
        })
    }

    pub fn verify(&self, token: &str, fetched: &FetchedKeys) -> Result<RequestAuth, JwtError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
        if !ALLOWED.contains(&header.alg) {
            return Err(JwtError::Algorithm(header.alg));
        }
        let issuer = unverified_issuer(token)?;
        let rule = self.rules.iter().find(|r| r.issuer == issuer).ok_or(JwtError::UnknownIssuer(issuer))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&rule.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        if rule.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&rule.audiences);
        }
        let (set, uri) = match &rule.jwks {
            Jwks::Loaded(set) => (set, None),
            Jwks::Fetched(uri) => match fetched.get(uri) {
                Some(set) => (set.as_ref(), Some(uri)),
                None => return Err(JwtError::KeysUnavailable { issuer: rule.issuer.clone(), uri: uri.clone() }),
            },
        };
        let keys: Vec<&Jwk> = set
            .keys
            .iter()
            .filter(|k| header.kid.is_none() || k.common.key_id == header.kid)
            .filter(|k| k.common.key_algorithm.is_none_or(|a| format!("{a:?}") == format!("{:?}", header.alg)))
            .collect();
        if keys.is_empty() {
            return Err(JwtError::NoKey { issuer: rule.issuer.clone(), kid: header.kid, uri: uri.cloned() });
        }
        let mut last_error = None;
        for jwk in keys {
            let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
            match jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation) {
                Ok(data) => return Ok(request_auth(data.claims, rule.forward_original_token)),
                Err(e) => last_error = Some(e),
            }
        }
        Err(JwtError::Invalid(last_error.map(|e| e.to_string()).unwrap_or_else(|| "no usable key".into())))
    }
}

/// `iss` before verification, only to choose the rule whose keys verify it.
fn unverified_issuer(token: &str) -> Result<String, JwtError> {
    let payload = token.split('.').nth(1).ok_or_else(|| JwtError::Malformed("no payload".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| JwtError::Malformed(format!("payload: {e}")))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| JwtError::Malformed(format!("payload: {e}")))?;
    claims["iss"].as_str().map(str::to_string).ok_or_else(|| JwtError::Malformed("no `iss` claim".into()))
}

fn request_auth(claims: serde_json::Value, forward_token: bool) -> RequestAuth {
    let text = |key: &str| claims[key].as_str().map(str::to_string);
    let audiences = match &claims["aud"] {
        serde_json::Value::String(aud) => vec![aud.clone()],
        serde_json::Value::Array(auds) => auds.iter().filter_map(|a| a.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    };
    RequestAuth {
        principal: format!("{}/{}", text("iss").unwrap_or_default(), text("sub").unwrap_or_default()),
        audiences,
        presenter: text("azp"),
        claims,
        forward_token,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use jsonwebtoken::{EncodingKey, Header};
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
    use serde_json::json;

    use super::*;

    const ISSUER: &str = "https://issuer.example";

    /// A P-256 signing key and its JWK.
    fn key(kid: &str) -> (EncodingKey, Jwk) {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let point = pair.public_key_raw(); // 0x04 || x || y
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65]), "kid": kid, "alg": "ES256"});
        (EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(), serde_json::from_value(jwk).unwrap())
    }

    fn now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn sign(key: &EncodingKey, kid: &str, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    fn claims(patch: serde_json::Value) -> serde_json::Value {
        let mut claims =
            json!({"iss": ISSUER, "sub": "user-1", "aud": "payments", "exp": now() + 300, "scope": "payments:charge"});
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    }

    fn bearer(token: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        headers
    }

    #[test]
    fn tokens_are_verified_or_refused_with_the_reason() {
        let (signing, jwk) = key("k1");
        let (forger, _) = key("k1");
        let verifier = JwtVerifier::new(vec![JwtRule {
            issuer: ISSUER.into(),
            audiences: vec!["payments".into()],
            jwks: Jwks::Loaded(JwkSet { keys: vec![jwk] }),
            forward_original_token: false,
        }]);
        let unfetched = FetchedKeys::new();
        let good =
            verifier.authenticate(&bearer(&sign(&signing, "k1", claims(json!({})))), &unfetched).unwrap().unwrap();
        assert_eq!(good.principal, "https://issuer.example/user-1");
        assert_eq!(good.audiences, vec!["payments"]);

        assert_eq!(
            verifier.authenticate(&http::HeaderMap::new(), &unfetched),
            Ok(None),
            "no token: unauthenticated, not refused"
        );
        let leeway = claims(json!({"exp": now() - 10}));
        assert!(verifier.verify(&sign(&signing, "k1", leeway), &unfetched).is_ok(), "expired within the leeway");

        let hs256 =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims(json!({})), &EncodingKey::from_secret(b"s"))
                .unwrap();
        let none = format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims(json!({})).to_string())
        );
        let cases: Vec<(&str, String, &str)> = vec![
            ("forged signature", sign(&forger, "k1", claims(json!({}))), "token rejected: InvalidSignature"),
            ("expired", sign(&signing, "k1", claims(json!({"exp": now() - 120}))), "ExpiredSignature"),
            ("not yet valid", sign(&signing, "k1", claims(json!({"nbf": now() + 120}))), "ImmatureSignature"),
            ("other audience", sign(&signing, "k1", claims(json!({"aud": "shop"}))), "InvalidAudience"),
            ("other issuer", sign(&signing, "k1", claims(json!({"iss": "https://evil.example"}))), "not accepted here"),
            ("unknown key id", sign(&signing, "k2", claims(json!({}))), "no key of issuer"),
            ("no exp", sign(&signing, "k1", claims(json!({"exp": null}))), "Missing required claim: exp"),
            ("HS256", hs256, "algorithm HS256 is not accepted"),
            ("alg none", none, "not a JWT"),
            ("garbage", "a.b.c".into(), "not a JWT"),
        ];
        for (name, token, want) in cases {
            let error = verifier.authenticate(&bearer(&token), &unfetched).unwrap_err().to_string();
            assert!(error.contains(want), "{name}: {error}");
        }
        let mut basic = http::HeaderMap::new();
        basic.insert(http::header::AUTHORIZATION, "Basic dXNlcjpwdw==".parse().unwrap());
        assert_eq!(verifier.authenticate(&basic, &unfetched), Err(JwtError::NotBearer));
        // Two tokens: which one the app reads is anyone's guess; refused.
        let mut two = bearer("a.b.c");
        two.append(http::header::AUTHORIZATION, "Bearer d.e.f".parse().unwrap());
        assert_eq!(verifier.authenticate(&two, &unfetched), Err(JwtError::Repeated(2)));
    }

    #[test]
    fn https_keys_are_used_once_fetched_and_an_unknown_kid_asks_for_a_refetch() {
        const URI: &str = "https://issuer.example/jwks.json";
        let (signing, jwk) = key("k1");
        let verifier = JwtVerifier::new(vec![JwtRule {
            issuer: ISSUER.into(),
            audiences: vec![],
            jwks: Jwks::Fetched(URI.into()),
            forward_original_token: false,
        }]);
        assert_eq!(verifier.fetched_uris().collect::<Vec<_>>(), vec![URI]);
        let token = sign(&signing, "k1", claims(json!({})));
        let unfetched = verifier.verify(&token, &FetchedKeys::new()).unwrap_err();
        assert!(matches!(unfetched, JwtError::KeysUnavailable { .. }), "not fetched yet: refused, {unfetched}");
        assert_eq!(unfetched.refetch_uri(), None, "the fetcher already retries on its own");

        let fetched = FetchedKeys::from([(URI.to_string(), Arc::new(JwkSet { keys: vec![jwk] }))]);
        assert!(verifier.verify(&token, &fetched).is_ok());
        let rotated = verifier.verify(&sign(&signing, "k2", claims(json!({}))), &fetched).unwrap_err();
        assert_eq!(rotated.refetch_uri(), Some(URI), "{rotated}");
    }
}
