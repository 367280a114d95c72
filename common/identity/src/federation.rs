//! SPIFFE federation (the SPIFFE Trust Domain and Bundle specification):
//!
//! - the **bundle endpoint** the CA serves: its trust bundle as a JWKS
//!   document with `spiffe_sequence` and `spiffe_refresh_hint`, under the
//!   `https_spiffe` profile (the CA's own SVID) or `https_web` (a Web PKI
//!   certificate);
//! - [`Federations`]: what an agent runs to keep each federated trust
//!   domain's bundle current in its [`TrustStore`]. It starts from the
//!   configured bundle, fetches the endpoint again at the refresh hint,
//!   keeps the last good bundle when a fetch fails, and applies a change at
//!   the next handshake. A trust domain that stops being federated is
//!   dropped, and its IDs are refused from then on.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls::pki_types::CertificateDer;
use spiffe::SpiffeId;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

use crate::{
    svid,
    tls::{self, TrustBundle, TrustStore},
};

/// Connections the bundle endpoint serves at once (more wait in the
/// listen queue), and how long one may last, handshake included: a bundle
/// is fetched in one request.
const ENDPOINT_MAX_CONNECTIONS: usize = 256;
const ENDPOINT_CONNECTION_TIME: Duration = Duration::from_secs(10);
/// Largest bundle document read.
const MAX_BUNDLE_BYTES: usize = 1024 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on the refresh hint a foreign endpoint asks for, and what is
/// used when it gives none (the spec's suggestion is five minutes).
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(3600);
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Retries after a failed fetch start here and double up to the refresh interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// A trust domain federated with this mesh, as the agent follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FederatedDomain {
    pub trust_domain: String,
    pub url: String,
    pub profile: EndpointProfile,
    /// The bundle (SPIFFE JSON) to use until the first fetch.
    pub initial_bundle: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointProfile {
    /// The endpoint presents the SVID `endpoint_id`, verified with the
    /// trust domain's own bundle.
    HttpsSpiffe { endpoint_id: String },
    /// The endpoint presents a Web PKI certificate, verified with these
    /// roots (PEM), or the system's.
    HttpsWeb { roots_pem: Option<String> },
}

/// A bundle document, parsed.
#[derive(Debug)]
pub struct BundleDocument {
    pub roots: Vec<CertificateDer<'static>>,
    pub sequence: Option<u64>,
    pub refresh_hint: Option<Duration>,
}

/// Parses a SPIFFE bundle (JWKS): the `x509-svid` keys are the roots, each
/// carrying exactly one certificate in `x5c`; other keys (`jwt-svid`) are
/// not used here.
pub fn parse_bundle(json: &[u8]) -> Result<BundleDocument, String> {
    let document: serde_json::Value = serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let keys = document["keys"].as_array().ok_or("no `keys` array: not a SPIFFE bundle")?;
    let mut roots = Vec::new();
    for (i, key) in keys.iter().enumerate().filter(|(_, key)| key["use"] == "x509-svid") {
        let x5c = key["x5c"]
            .as_array()
            .filter(|x5c| x5c.len() == 1)
            .ok_or_else(|| format!("keys[{i}]: an x509-svid key must carry exactly one certificate in `x5c`"))?;
        let der = x5c[0]
            .as_str()
            .and_then(|b64| STANDARD.decode(b64).ok())
            .ok_or_else(|| format!("keys[{i}].x5c[0] is not base64"))?;
        let root = CertificateDer::from(der);
        svid::check_root(&root).map_err(|e| format!("keys[{i}]: {e}"))?;
        roots.push(root);
    }
    if roots.is_empty() {
        return Err("no x509-svid key: the bundle holds no X.509 root".into());
    }
    Ok(BundleDocument {
        roots,
        sequence: document["spiffe_sequence"].as_u64(),
        refresh_hint: document["spiffe_refresh_hint"].as_u64().map(Duration::from_secs),
    })
}

/// Serves `document()` (a SPIFFE bundle) to `GET` on any path, over HTTP/1.1
/// or HTTP/2 with the TLS of `tls` (whose ALPN this sets).
pub async fn serve_bundle_endpoint(
    listener: TcpListener,
    mut tls: rustls::ServerConfig,
    document: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
) {
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    // The endpoint runs in the CA, which every node renews from: a client
    // of it gets a bounded share of connections and time.
    let connections = Arc::new(tokio::sync::Semaphore::new(ENDPOINT_MAX_CONNECTIONS));
    loop {
        let permit = connections.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (tcp, peer) = ambit_runtime::listener::accept_next(&listener, "bundle endpoint").await;
        let (acceptor, document) = (acceptor.clone(), document.clone());
        tokio::spawn(async move {
            let served = async {
                let tls = acceptor.accept(tcp).await?;
                let service = service_fn(move |request: Request<Incoming>| {
                    let document = document.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&request, document.as_ref())) }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                builder.serve_connection(TokioIo::new(tls), service).await.map_err(std::io::Error::other)
            };
            match tokio::time::timeout(ENDPOINT_CONNECTION_TIME, served).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%peer, %error, "bundle endpoint connection ended with an error"),
                Err(_) => {
                    tracing::debug!(%peer, "bundle endpoint connection closed after {ENDPOINT_CONNECTION_TIME:?}")
                }
            }
            drop(permit);
        });
    }
}

fn answer(request: &Request<Incoming>, document: &dyn Fn() -> serde_json::Value) -> Response<Full<Bytes>> {
    let (status, body) = match *request.method() {
        hyper::Method::GET => (StatusCode::OK, document().to_string()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, r#"{"error":"the bundle endpoint answers GET only"}"#.to_string()),
    };
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

/// Fetches `domain`'s bundle from its endpoint. With `https_spiffe`, the
/// endpoint's SVID is verified with the bundle `trust` holds for the domain.
pub async fn fetch(domain: &FederatedDomain, trust: &TrustStore) -> Result<BundleDocument, String> {
    let mut config = match &domain.profile {
        EndpointProfile::HttpsSpiffe { endpoint_id } => {
            let id = SpiffeId::new(endpoint_id).map_err(|e| format!("endpoint SPIFFE ID {endpoint_id}: {e}"))?;
            tls::client_config(None, trust, id).map_err(|e| e.to_string())?
        }
        EndpointProfile::HttpsWeb { roots_pem } => web_client_config(roots_pem.as_deref())?,
    };
    // The connector sets ALPN itself (http/1.1).
    config.alpn_protocols.clear();
    let connector =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only().enable_http1().build();
    let client: Client<_, http_body_util::Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let uri: hyper::Uri = domain.url.parse().map_err(|e| format!("{}: {e}", domain.url))?;
    let exchange = async {
        let response = client.get(uri).await.map_err(|e| format!("{}: {}", domain.url, error_chain(&e)))?;
        if response.status() != StatusCode::OK {
            return Err(format!("{} answered {}", domain.url, response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_BUNDLE_BYTES)
            .collect()
            .await
            .map_err(|e| format!("{}: reading the bundle: {e}", domain.url))?;
        Ok(body.to_bytes())
    };
    let body = tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{}: no answer within {FETCH_TIMEOUT:?}", domain.url))??;
    parse_bundle(&body).map_err(|e| format!("{}: {e}", domain.url))
}

/// The whole cause of a client error: hyper's outermost message alone
/// ("client error (Connect)") does not say what to fix.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

fn web_client_config(roots_pem: Option<&str>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match roots_pem {
        Some(pem) => {
            let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("caCertificates: not PEM: {e}"))?;
            for cert in certs {
                roots.add(cert).map_err(|e| format!("caCertificates: {e}"))?;
            }
        }
        // Unreadable system certificates only narrow what is trusted.
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Keeps the bundles of the federated trust domains current in a [`TrustStore`].
pub struct Federations {
    trust: TrustStore,
    followed: Mutex<BTreeMap<String, (FederatedDomain, JoinHandle<()>)>>,
}

impl Federations {
    pub fn new(trust: TrustStore) -> Self {
        Self { trust, followed: Mutex::default() }
    }

    /// Follows exactly `domains`: new ones are started, changed ones
    /// restarted, and those no longer listed stopped and their bundles
    /// dropped from the trust store.
    pub fn follow(&self, domains: &[FederatedDomain]) {
        let mut followed = self.followed.lock().expect("federations lock");
        followed.retain(|trust_domain, (current, task)| {
            let keep = domains.contains(current);
            if !keep {
                task.abort();
                self.trust.remove_foreign(trust_domain);
                tracing::info!(%trust_domain, "no longer federated: its IDs are refused from now on");
            }
            keep
        });
        for domain in domains {
            if domain.trust_domain == self.trust.trust_domain() {
                tracing::error!(
                    trust_domain = %domain.trust_domain,
                    "a TrustDomainFederation names this mesh's own trust domain; it is ignored"
                );
                continue;
            }
            if !followed.contains_key(&domain.trust_domain) {
                let task = tokio::spawn(keep_current(domain.clone(), self.trust.clone()));
                followed.insert(domain.trust_domain.clone(), (domain.clone(), task));
            }
        }
    }
}

impl Drop for Federations {
    fn drop(&mut self) {
        if let Ok(followed) = self.followed.lock() {
            followed.values().for_each(|(_, task)| task.abort());
        }
    }
}

/// One federated domain: the configured bundle first, then the endpoint's.
async fn keep_current(domain: FederatedDomain, trust: TrustStore) {
    let td = domain.trust_domain.clone();
    if let Some(initial) = &domain.initial_bundle {
        match parse_bundle(initial.as_bytes()).and_then(|doc| install(&trust, &td, &doc.roots)) {
            Ok(()) => tracing::info!(trust_domain = %td, "federated: starting from the configured bundle"),
            Err(error) => tracing::error!(trust_domain = %td, %error, "the configured trustDomainBundle is unusable"),
        }
    }
    let mut retry = FIRST_RETRY;
    let mut last_sequence = None;
    loop {
        let wait = match fetch(&domain, &trust).await {
            Ok(document) => {
                retry = FIRST_RETRY;
                let changed = trust.bundle_for(&td).map_or(true, |current| current.roots() != document.roots);
                if changed {
                    match install(&trust, &td, &document.roots) {
                        Ok(()) => tracing::info!(
                            trust_domain = %td,
                            sequence = document.sequence,
                            roots = document.roots.len(),
                            "federated bundle updated"
                        ),
                        Err(error) => tracing::error!(trust_domain = %td, %error, "the fetched bundle is unusable"),
                    }
                } else if document.sequence != last_sequence {
                    tracing::debug!(trust_domain = %td, sequence = document.sequence, "federated bundle unchanged");
                }
                last_sequence = document.sequence;
                document.refresh_hint.unwrap_or(DEFAULT_REFRESH).clamp(MIN_REFRESH, MAX_REFRESH)
            }
            Err(error) => {
                let held = trust.bundle_for(&td).is_ok();
                tracing::warn!(
                    trust_domain = %td,
                    %error,
                    retry_in_ms = retry.as_millis() as u64,
                    "cannot fetch the federated bundle; {}",
                    if held { "the last good bundle stays in use" } else { "its IDs are refused until one is fetched" }
                );
                let wait = retry;
                retry = (retry * 2).min(DEFAULT_REFRESH);
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

fn install(trust: &TrustStore, trust_domain: &str, roots: &[CertificateDer<'static>]) -> Result<(), String> {
    trust.set(TrustBundle::new(trust_domain, roots).map_err(|e| e.to_string())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Identity,
        ca::CertificateAuthority,
        ca_server::{BundleEndpointTls, CaServer, NodeTokenAuthorizer, PodPlacement},
    };

    struct Nowhere;

    impl PodPlacement for Nowhere {
        fn runs_on(&self, _: &str, _: &Identity) -> bool {
            false
        }
    }

    fn bundle_text(ca: &CertificateAuthority) -> String {
        ca.bundle_json(Duration::from_secs(7)).to_string()
    }

    /// One case per way a bundle document can be unusable.
    #[test]
    fn bundle_documents() {
        let ca = CertificateAuthority::create("a.example").unwrap();
        let good = parse_bundle(bundle_text(&ca).as_bytes()).unwrap();
        assert_eq!(good.roots, ca.roots());
        assert_eq!((good.sequence, good.refresh_hint), (Some(1), Some(Duration::from_secs(7))));

        let root = STANDARD.encode(ca.roots()[0].as_ref());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = ca.issue(&Identity::new("a.example", "shop", "web"), &key, Duration::from_secs(60)).unwrap();
        let leaf = STANDARD.encode(leaf[0].as_ref());
        let cases = [
            ("not JSON", "{".to_string(), "not JSON"),
            ("no keys", "{}".to_string(), "no `keys` array"),
            ("only JWT keys", r#"{"keys":[{"use":"jwt-svid","kty":"EC"}]}"#.to_string(), "no x509-svid key"),
            (
                "two certificates",
                format!(r#"{{"keys":[{{"use":"x509-svid","x5c":["{root}","{root}"]}}]}}"#),
                "exactly one",
            ),
            ("not base64", r#"{"keys":[{"use":"x509-svid","x5c":["***"]}]}"#.to_string(), "not base64"),
            ("a leaf as a root", format!(r#"{{"keys":[{{"use":"x509-svid","x5c":["{leaf}"]}}]}}"#), "not a CA"),
        ];
        for (name, text, expected) in cases {
            let error = parse_bundle(text.as_bytes()).unwrap_err();
            assert!(error.contains(expected), "{name}: {error}");
        }
    }

    async fn endpoint(ca: Arc<CertificateAuthority>, tls: BundleEndpointTls) -> String {
        let authorizer = NodeTokenAuthorizer::new(ca.tokens(), Box::new(Nowhere));
        let server = Arc::new(CaServer::new(ca, Box::new(authorizer), Duration::from_secs(3600)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(server.serve_bundle_endpoint(listener, tls));
        format!("https://localhost:{port}/bundle")
    }

    #[tokio::test]
    async fn both_profiles_serve_the_bundle_and_authenticate_the_endpoint() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let foreign = Arc::new(CertificateAuthority::create("a.example").unwrap());
        let ours = CertificateAuthority::create("b.example").unwrap();
        let trust = TrustStore::new(TrustBundle::new("b.example", &ours.roots()).unwrap());

        // https_spiffe: verified with the foreign domain's bundle, once there is one.
        let url = endpoint(foreign.clone(), BundleEndpointTls::Spiffe).await;
        let ca_id = "spiffe://a.example/ns/ambit-system/sa/ambit-ca";
        let domain = FederatedDomain {
            trust_domain: "a.example".into(),
            url,
            profile: EndpointProfile::HttpsSpiffe { endpoint_id: ca_id.into() },
            initial_bundle: None,
        };
        let error = fetch(&domain, &trust).await.unwrap_err();
        assert!(error.contains("not federated"), "{error}");
        trust.set(TrustBundle::new("a.example", &foreign.roots()).unwrap());
        assert_eq!(fetch(&domain, &trust).await.unwrap().roots, foreign.roots());
        let impostor = FederatedDomain {
            profile: EndpointProfile::HttpsSpiffe { endpoint_id: "spiffe://a.example/ns/x/sa/y".into() },
            ..domain.clone()
        };
        let error = fetch(&impostor, &trust).await.unwrap_err();
        assert!(error.contains("expected spiffe://a.example/ns/x/sa/y"), "{error}");

        // https_web: a Web PKI certificate for the host name.
        let web_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let web_cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&web_key).unwrap();
        let tls = BundleEndpointTls::Web {
            chain: vec![web_cert.der().clone()],
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(web_key.serialize_der().into()),
        };
        let url = endpoint(foreign.clone(), tls).await;
        let web = |roots_pem| FederatedDomain {
            trust_domain: "a.example".into(),
            url: url.clone(),
            profile: EndpointProfile::HttpsWeb { roots_pem },
            initial_bundle: None,
        };
        assert_eq!(fetch(&web(Some(web_cert.pem())), &trust).await.unwrap().roots, foreign.roots());
        let error = fetch(&web(None), &trust).await.unwrap_err();
        assert!(error.contains("UnknownIssuer"), "the system roots do not vouch for it: {error}");
    }

    #[tokio::test]
    async fn a_followed_domain_keeps_its_last_good_bundle_and_goes_when_unlisted() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let foreign = Arc::new(CertificateAuthority::create("a.example").unwrap());
        let ours = CertificateAuthority::create("b.example").unwrap();
        let trust = TrustStore::new(TrustBundle::new("b.example", &ours.roots()).unwrap());
        let federations = Federations::new(trust.clone());
        // Nothing listens at this endpoint: the configured bundle is what there is.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://127.0.0.1:{}/", listener.local_addr().unwrap().port());
        drop(listener);
        let domain = FederatedDomain {
            trust_domain: "a.example".into(),
            url,
            profile: EndpointProfile::HttpsSpiffe {
                endpoint_id: "spiffe://a.example/ns/ambit-system/sa/ambit-ca".into(),
            },
            initial_bundle: Some(bundle_text(&foreign)),
        };
        federations.follow(std::slice::from_ref(&domain));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(trust.bundle_for("a.example").unwrap().roots(), foreign.roots(), "kept while fetches fail");
        // Its own trust domain is never followed as a foreign one.
        let own = FederatedDomain { trust_domain: "b.example".into(), ..domain.clone() };
        federations.follow(&[domain, own]);
        assert!(!trust.foreign().contains_key("b.example"));
        federations.follow(&[]);
        assert!(trust.bundle_for("a.example").unwrap_err().contains("not federated"));
    }
}
