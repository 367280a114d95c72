//! A certificate request body, as the CA answers `POST /v1/svid` from any
//! caller: JSON, a token, a base64 DER CSR.
#![no_main]

use std::{sync::LazyLock, time::Duration};

use ambit_identity::{
    Identity,
    ca::CertificateAuthority,
    ca_server::{CaServer, NodeTokenAuthorizer, PodPlacement},
};
use libfuzzer_sys::fuzz_target;

/// Every node runs every identity: the fuzzer reaches the CSR handling.
struct Anywhere;

impl PodPlacement for Anywhere {
    fn runs_on(&self, _node: &str, _identity: &Identity) -> bool {
        true
    }
}

static SERVER: LazyLock<(CaServer, tokio::runtime::Runtime)> = LazyLock::new(|| {
    let ca = std::sync::Arc::new(CertificateAuthority::create("cluster.local").expect("a CA"));
    let authorizer = NodeTokenAuthorizer::new(ca.tokens(), Box::new(Anywhere));
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    (CaServer::new(ca, Box::new(authorizer), Duration::from_secs(60)), runtime)
});

fuzz_target!(|body: &[u8]| {
    let (server, runtime) = &*SERVER;
    let (status, _) = runtime.block_on(server.issue(body));
    assert_ne!(status, http::StatusCode::OK, "issued without a valid token");
});
