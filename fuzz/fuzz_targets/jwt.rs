//! A bearer token, as a waypoint reads it from `Authorization`: header
//! parsing, the issuer peek, and verification against an inline key set.
#![no_main]

use std::sync::LazyLock;

use ambit_authz::jwt::{FetchedKeys, JwtVerifier};
use libfuzzer_sys::fuzz_target;

const RULES: &str = r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: users, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, name: wp}]
  jwtRules:
  - issuer: https://issuer.example
    audiences: [shop]
    jwks: '{"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "k1", "x": "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis", "y": "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE"}]}'
  - issuer: https://other.example
    jwksUri: https://other.example/jwks.json
"#;

static VERIFIER: LazyLock<JwtVerifier> = LazyLock::new(|| {
    let objects = ambit_model::parse_file(std::path::Path::new("rules.yaml"), RULES).expect("valid rules");
    let ambit_model::Object::RequestAuthentication(rules) = &objects[0] else { unreachable!() };
    JwtVerifier::new(rules.rules.clone())
});

fuzz_target!(|token: &str| {
    let fetched = FetchedKeys::default();
    let _ = VERIFIER.verify(token, &fetched);
    if let Ok(value) = http::HeaderValue::from_str(&format!("Bearer {token}")) {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value);
        let _ = VERIFIER.authenticate(&headers, &fetched);
    }
});
