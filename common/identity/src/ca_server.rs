//! The embedded CA as a service: `ambit-agent ca serve`.
//!
//! HTTP/2 over TLS. The CA presents an SVID of its own
//! (`spiffe://<td>/ns/ambit-system/sa/ambit-ca`), which agents verify against
//! the root they were given. An [`Authorizer`] decides who may have which
//! identity: in standalone mode ([`NodeTokenAuthorizer`]) agents present
//! their node token (`ambit-agent ca token --node N`) and get only the
//! identities of pods that the configuration schedules on that node; in
//! Kubernetes mode, a pod's service-account token is checked with a
//! TokenReview (`ambit_kube::ca`). A node can never obtain another node's
//! identities.
//!
//! - `POST /v1/svid` `{"node", "token", "namespace", "service_account", "csr"}`
//!   (csr: base64 DER PKCS#10) returns `{"chain": [base64 DER, ...]}`;
//! - `GET /v1/bundle` returns the SPIFFE bundle.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use bytes::{Bytes, BytesMut};
use http::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{
    Identity, Svid,
    ca::{CaTokens, CertificateAuthority, Reloaded},
    tls,
};

/// Namespace and service account of the CA's own identity.
pub const CA_NAMESPACE: &str = "ambit-system";
pub const CA_SERVICE_ACCOUNT: &str = "ambit-ca";
/// The refresh hint of the SPIFFE bundle unless configured (the spec's suggestion).
const DEFAULT_BUNDLE_REFRESH_HINT: Duration = Duration::from_secs(300);
/// Two refresh intervals: a consumer that misses one fetch still has the new root in time.
const DEFAULT_ROOT_PROPAGATION: Duration = Duration::from_secs(600);
/// Largest request body the CA reads.
const MAX_BODY: usize = 64 * 1024;
/// How long a client has for the TLS and HTTP/2 handshakes, and how long a
/// connection may sit with no request: agents open one per request, so a
/// connection that says nothing is not an agent, and must not hold a
/// descriptor of the process every node renews from.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// What one caller may hold of the CA, which every node renews from: an
/// agent sends one request per connection, so a handful of streams, small
/// headers and a request that ends within seconds are all it needs. Without
/// these limits one unauthenticated client grew the CA by about 34 KB per
/// stream it never finished.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 4096;
/// Connections one peer address may hold at once; more are closed at once,
/// so one client cannot take every slot of [`MAX_CONNECTIONS`]. An agent
/// holds one per certificate request in flight.
const MAX_CONNECTIONS_PER_PEER: usize = 64;

/// Open connections per peer address ([`MAX_CONNECTIONS_PER_PEER`]).
#[derive(Default)]
struct PeerConnections {
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One connection's place in [`PeerConnections`], given back on drop.
struct PeerSlot {
    peers: Arc<PeerConnections>,
    ip: std::net::IpAddr,
}

impl PeerConnections {
    fn take(self: Arc<Self>, ip: std::net::IpAddr) -> Option<PeerSlot> {
        let mut open = self.open.lock().expect("peer connections lock");
        let count = open.entry(ip).or_default();
        if *count >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        drop(open);
        Some(PeerSlot { peers: self, ip })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.open.lock().expect("peer connections lock");
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct SvidRequest {
    pub node: String,
    pub token: String,
    pub namespace: String,
    pub service_account: String,
    /// base64 (standard) of a DER PKCS#10 request.
    pub csr: String,
}

#[derive(Serialize, Deserialize)]
pub struct SvidResponse {
    /// base64 (standard) DER certificates, leaf first.
    pub chain: Vec<String>,
}

/// Why a caller may not have an identity.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The token does not prove who the caller is (401).
    Unauthenticated(String),
    /// The caller is known, but may not have this identity (403).
    Forbidden(String),
}

pub type AuthorizeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send + 'a>>;

/// Decides whether the caller that presents `token` for node `node` may
/// have `identity`.
pub trait Authorizer: Send + Sync {
    fn authorize<'a>(&'a self, node: &'a str, token: &'a str, identity: &'a Identity) -> AuthorizeFuture<'a>;
}

/// Where the standalone CA learns which pods run on which node.
pub trait PodPlacement: Send + Sync {
    /// Whether a pod running as `identity` is scheduled on `node`, as the
    /// configuration says now.
    fn runs_on(&self, node: &str, identity: &Identity) -> bool;
}

/// Standalone mode: a caller proves itself with a CA token
/// ([`CaTokens`]). A node token may have the identities of the pods its
/// placement schedules on that node; a workload token (a waypoint's) only
/// its own identity, and only while a pod on its node runs it.
pub struct NodeTokenAuthorizer {
    tokens: CaTokens,
    placement: Box<dyn PodPlacement>,
}

impl NodeTokenAuthorizer {
    pub fn new(tokens: CaTokens, placement: Box<dyn PodPlacement>) -> Self {
        Self { tokens, placement }
    }
}

impl Authorizer for NodeTokenAuthorizer {
    fn authorize<'a>(&'a self, node: &'a str, token: &'a str, identity: &'a Identity) -> AuthorizeFuture<'a> {
        Box::pin(async move {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
            let claims = self.tokens.verify(token, now).map_err(Refusal::Unauthenticated)?;
            if claims.node != node {
                return Err(Refusal::Unauthenticated(format!("the token is for node {}, not {node}", claims.node)));
            }
            let requested = format!("{}/{}", identity.namespace, identity.service_account);
            if let Some(own) = claims.identity.filter(|own| *own != requested) {
                return Err(Refusal::Forbidden(format!(
                    "a token for {own} obtains that identity only, not {requested}"
                )));
            }
            if !self.placement.runs_on(node, identity) {
                return Err(Refusal::Forbidden(format!("no pod on node {node} runs as {identity}")));
            }
            Ok(())
        })
    }
}

pub struct CaServer {
    ca: Arc<CertificateAuthority>,
    authorizer: Box<dyn Authorizer>,
    leaf_ttl: Duration,
    /// What the SPIFFE bundle tells consumers: fetch again after this long.
    bundle_refresh_hint: Duration,
    /// How long a new root is in the bundle before it signs.
    root_propagation: Duration,
}

/// The TLS a bundle endpoint presents: its SPIFFE profile.
pub enum BundleEndpointTls {
    /// `https_spiffe`: the CA's own SVID (`ns/ambit-system/sa/ambit-ca`).
    Spiffe,
    /// `https_web`: a Web PKI certificate chain and its key.
    Web { chain: Vec<rustls::pki_types::CertificateDer<'static>>, key: rustls::pki_types::PrivateKeyDer<'static> },
}

impl BundleEndpointTls {
    /// `https_web` with the chain and key in these PEM files.
    pub fn web_from_files(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let pem = std::fs::read(cert).with_context(|| format!("--bundle-endpoint-web-cert {}", cert.display()))?;
        let chain = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("--bundle-endpoint-web-cert {}: not PEM certificates", cert.display()))?;
        anyhow::ensure!(!chain.is_empty(), "--bundle-endpoint-web-cert {}: holds no certificate", cert.display());
        let pem = std::fs::read(key).with_context(|| format!("--bundle-endpoint-web-key {}", key.display()))?;
        let key = rustls_pemfile::private_key(&mut pem.as_slice())
            .with_context(|| format!("--bundle-endpoint-web-key {}: not PEM", key.display()))?
            .with_context(|| format!("--bundle-endpoint-web-key {}: holds no private key", key.display()))?;
        Ok(Self::Web { chain, key })
    }
}

impl CaServer {
    pub fn new(ca: Arc<CertificateAuthority>, authorizer: Box<dyn Authorizer>, leaf_ttl: Duration) -> Self {
        Self {
            ca,
            authorizer,
            leaf_ttl,
            bundle_refresh_hint: DEFAULT_BUNDLE_REFRESH_HINT,
            root_propagation: DEFAULT_ROOT_PROPAGATION,
        }
    }

    /// The bundle's refresh hint, and how long a new root is published
    /// before it signs (see [`CertificateAuthority::reload`]).
    pub fn with_bundle_timing(mut self, refresh_hint: Duration, root_propagation: Duration) -> Self {
        (self.bundle_refresh_hint, self.root_propagation) = (refresh_hint, root_propagation);
        self
    }

    /// Serves the trust bundle on a SPIFFE bundle endpoint.
    pub async fn serve_bundle_endpoint(
        self: Arc<Self>,
        listener: TcpListener,
        profile: BundleEndpointTls,
    ) -> anyhow::Result<()> {
        let tls = match profile {
            BundleEndpointTls::Spiffe => self.tls_config()?,
            BundleEndpointTls::Web { chain, key } => rustls::ServerConfig::builder_with_provider(tls::provider())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain, key)?,
        };
        tracing::info!(addr = %listener.local_addr()?, "SPIFFE bundle endpoint serving");
        let server = self.clone();
        let document = Arc::new(move || server.ca.bundle_json(server.bundle_refresh_hint));
        crate::federation::serve_bundle_endpoint(listener, tls, document).await;
        Ok(())
    }

    /// The CA's TLS configuration: it presents an SVID of its own, renewed
    /// like any other (see [`ServingCertificate`]).
    fn tls_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        let resolver = ServingCertificate::new(self.ca.clone(), self.leaf_ttl);
        resolver.current().ok_or_else(|| anyhow::anyhow!("the CA cannot issue its own serving certificate"))?;
        Ok(tls::server_config_with_resolver(Arc::new(resolver))?)
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> anyhow::Result<()> {
        let acceptor = TlsAcceptor::from(Arc::new(self.tls_config()?));
        tracing::info!(addr = %listener.local_addr()?, trust_domain = self.ca.trust_domain(), "CA serving");
        if self.ca.signing().plugged_dir().is_some() {
            tokio::spawn(follow_plugged_files(self.ca.clone(), self.root_propagation));
        }
        let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let per_peer = Arc::new(PeerConnections::default());
        loop {
            let permit = connections.clone().acquire_owned().await.expect("the semaphore is never closed");
            let (tcp, peer) = ambit_runtime::listener::accept_next(&listener, "ca").await;
            let Some(peer_slot) = per_peer.clone().take(peer.ip()) else {
                tracing::debug!(%peer, "CA connection refused: {MAX_CONNECTIONS_PER_PEER} already open from this address");
                continue;
            };
            let (acceptor, server) = (acceptor.clone(), self.clone());
            tokio::spawn(async move {
                if let Err(e) = server.connection(acceptor, tcp).await {
                    tracing::debug!(%peer, error = %e, "CA connection ended with an error");
                }
                drop((permit, peer_slot));
            });
        }
    }

    async fn connection(self: Arc<Self>, acceptor: TlsAcceptor, tcp: tokio::net::TcpStream) -> anyhow::Result<()> {
        let handshakes = async {
            let tls = acceptor.accept(tcp).await?;
            let h2 = h2::server::Builder::new()
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                .max_header_list_size(MAX_HEADER_LIST_BYTES)
                .handshake(tls)
                .await?;
            anyhow::Ok(h2)
        };
        let mut conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshakes)
            .await
            .map_err(|_| anyhow::anyhow!("no TLS and HTTP/2 handshake within {HANDSHAKE_TIMEOUT:?}"))??;
        while let Ok(Some(request)) = tokio::time::timeout(IDLE_TIMEOUT, conn.accept()).await {
            let (request, respond) = request?;
            let server = self.clone();
            // A request that has not ended in time is dropped, which resets its stream.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, server.request(request, respond)).await;
            });
        }
        Ok(())
    }

    async fn request(&self, request: http::Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
        let (parts, body) = request.into_parts();
        let (status, body) = match (parts.method, parts.uri.path()) {
            (Method::GET, "/v1/bundle") => (StatusCode::OK, self.ca.bundle_json(self.bundle_refresh_hint)),
            (Method::POST, "/v1/svid") => match read_body(body, MAX_BODY).await {
                Ok(body) => self.issue(&body).await,
                Err(e) => (StatusCode::BAD_REQUEST, serde_json::json!({ "error": e.to_string() })),
            },
            _ => (StatusCode::NOT_FOUND, serde_json::json!({ "error": "no such endpoint" })),
        };
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(())
            .expect("valid response");
        if let Ok(mut stream) = respond.send_response(response, false) {
            let _ = stream.send_data(Bytes::from(body.to_string()), true);
        }
    }

    /// Answers one `POST /v1/svid` body: the status and the JSON to send.
    pub async fn issue(&self, body: &[u8]) -> (StatusCode, serde_json::Value) {
        let refuse = |status, reason: String| {
            tracing::warn!(%reason, "SVID request refused");
            (status, serde_json::json!({ "error": reason }))
        };
        let request: SvidRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("malformed request: {e}")),
        };
        let identity = Identity::new(self.ca.trust_domain(), &request.namespace, &request.service_account);
        match self.authorizer.authorize(&request.node, &request.token, &identity).await {
            Ok(()) => {}
            Err(Refusal::Unauthenticated(reason)) => return refuse(StatusCode::UNAUTHORIZED, reason),
            Err(Refusal::Forbidden(reason)) => return refuse(StatusCode::FORBIDDEN, reason),
        }
        let csr = match STANDARD.decode(&request.csr) {
            Ok(csr) => csr,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("csr is not base64: {e}")),
        };
        match self.ca.issue_for_request(&identity, &csr, self.leaf_ttl) {
            Ok(leaf) => {
                tracing::info!(%identity, node = %request.node, ttl_secs = self.leaf_ttl.as_secs(), "SVID issued");
                let chain = leaf.iter().map(|c| STANDARD.encode(c.as_ref())).collect();
                (StatusCode::OK, serde_json::to_value(SvidResponse { chain }).expect("serializable"))
            }
            Err(e) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }
}

/// How often a plug-in CA looks at its files. A Kubernetes Secret mounted
/// as a volume changes by a symbolic link swapped under the directory,
/// which reading the files again sees whatever the file system is.
const PLUGGED_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Follows the plug-in CA's files: a new, valid chain is used for every
/// leaf from then on; an invalid one is refused, said once, and the chain
/// in use stays.
async fn follow_plugged_files(ca: Arc<CertificateAuthority>, root_propagation: Duration) {
    let mut refused = None;
    loop {
        tokio::time::sleep(PLUGGED_RELOAD_INTERVAL).await;
        match ca.reload(root_propagation) {
            Ok(Some(Reloaded::Active(chain))) => {
                refused = None;
                tracing::info!(chain = %chain.describe(), "plug-in CA files changed; new leaves are signed with this chain");
            }
            Ok(Some(Reloaded::Staged { chain, signs_from })) => {
                refused = None;
                tracing::info!(
                    chain = %chain.describe(),
                    signs_from = %humantime::format_rfc3339_seconds(signs_from),
                    "plug-in CA files changed to a new root: it is in the bundle now, and signs once peers have fetched it"
                );
            }
            Ok(None) => refused = None,
            Err(error) => {
                let reason = error.to_string();
                if refused.as_ref() != Some(&reason) {
                    tracing::error!(
                        error = %reason,
                        "the plug-in CA files are not usable; the chain in use stays until they are fixed"
                    );
                    refused = Some(reason);
                }
            }
        }
    }
}

/// The CA's own SVID (`ns/ambit-system/sa/ambit-ca`), issued by the CA
/// itself with the leaf lifetime, and issued again at half its life or
/// when the signing chain changes, at the next handshake.
struct ServingCertificate {
    ca: Arc<CertificateAuthority>,
    ttl: Duration,
    current: std::sync::Mutex<Option<Served>>,
}

struct Served {
    key: Arc<rustls::sign::CertifiedKey>,
    renew_at: std::time::SystemTime,
    chain: Arc<crate::signing::SigningChain>,
}

impl std::fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServingCertificate({})", self.ca.trust_domain())
    }
}

impl ServingCertificate {
    fn new(ca: Arc<CertificateAuthority>, ttl: Duration) -> Self {
        Self { ca, ttl, current: std::sync::Mutex::new(None) }
    }

    fn current(&self) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let mut current = self.current.lock().expect("serving certificate lock");
        let chain = self.ca.signing();
        let fresh = current
            .as_ref()
            .is_some_and(|served| std::time::SystemTime::now() < served.renew_at && Arc::ptr_eq(&served.chain, &chain));
        if !fresh {
            match self.issue() {
                Ok((key, renew_at)) => *current = Some(Served { key, renew_at, chain }),
                // The one it has (if any) stays in use until it expires.
                Err(error) => tracing::error!(%error, "cannot renew the CA's own serving certificate"),
            }
        }
        current.as_ref().map(|served| served.key.clone())
    }

    fn issue(&self) -> anyhow::Result<(Arc<rustls::sign::CertifiedKey>, std::time::SystemTime)> {
        let identity = Identity::new(self.ca.trust_domain(), CA_NAMESPACE, CA_SERVICE_ACCOUNT);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let chain = self.ca.issue(&identity, &key, self.ttl)?;
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let svid = Svid::from_chain(&identity, chain, key, self.ca.trust_domain()).map_err(anyhow::Error::msg)?;
        let signing_key = tls::provider().key_provider.load_private_key(svid.key.clone_key())?;
        tracing::info!(serial = %svid.serial, "the CA's own serving certificate issued");
        Ok((Arc::new(rustls::sign::CertifiedKey::new(svid.chain.clone(), signing_key)), svid.refresh_at()))
    }
}

impl rustls::server::ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.current()
    }
}

/// Reads a whole HTTP/2 body, up to `limit` bytes, returning flow-control
/// credit as it goes.
pub async fn read_body(mut body: h2::RecvStream, limit: usize) -> anyhow::Result<Bytes> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len() + chunk.len() > limit {
            anyhow::bail!("body larger than {limit} bytes");
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::TokenClaims;

    /// One pod, running as shop/web on node n1.
    struct OnePod;

    impl PodPlacement for OnePod {
        fn runs_on(&self, node: &str, identity: &Identity) -> bool {
            node == "n1" && (identity.namespace.as_str(), identity.service_account.as_str()) == ("shop", "web")
        }
    }

    /// A node's request for shop/web.
    fn request(ca: &CertificateAuthority, node: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap();
        let request = SvidRequest {
            node: node.into(),
            token: ca.tokens().issue(&TokenClaims { node: node.into(), identity: None, exp: u64::MAX }),
            namespace: "shop".into(),
            service_account: "web".into(),
            csr: STANDARD.encode(csr.der()),
        };
        serde_json::to_vec(&request).unwrap()
    }

    #[tokio::test]
    async fn a_node_gets_only_the_identities_of_its_own_pods() {
        let ca = Arc::new(CertificateAuthority::create("cluster.local").unwrap());
        let (to_n1, to_n2) = (request(&ca, "n1"), request(&ca, "n2"));
        let mut forged: SvidRequest = serde_json::from_slice(&to_n2).unwrap();
        forged.node = "n1".into();
        let authorizer = NodeTokenAuthorizer::new(ca.tokens(), Box::new(OnePod));
        let server = CaServer::new(ca, Box::new(authorizer), Duration::from_secs(60));
        assert_eq!(server.issue(&to_n1).await.0, StatusCode::OK);
        assert_eq!(server.issue(&to_n2).await.0, StatusCode::FORBIDDEN, "n2 runs no pod as shop/web");
        let forged = serde_json::to_vec(&forged).unwrap();
        assert_eq!(server.issue(&forged).await.0, StatusCode::UNAUTHORIZED, "n2's token is not n1's");
    }

    /// A waypoint's token on n1, stolen: it obtains the waypoint's own
    /// identity only, never another pod's of the same node.
    #[tokio::test]
    async fn a_workload_token_obtains_its_own_identity_only() {
        let ca = Arc::new(CertificateAuthority::create("cluster.local").unwrap());
        let mut asked: SvidRequest = serde_json::from_slice(&request(&ca, "n1")).unwrap();
        let scoped = |identity: &str| {
            ca.tokens().issue(&TokenClaims { node: "n1".into(), identity: Some(identity.into()), exp: u64::MAX })
        };
        let (own, other) = (scoped("shop/web"), scoped("shop/waypoint"));
        let authorizer = NodeTokenAuthorizer::new(ca.tokens(), Box::new(OnePod));
        let server = CaServer::new(ca, Box::new(authorizer), Duration::from_secs(60));
        asked.token = own;
        assert_eq!(server.issue(&serde_json::to_vec(&asked).unwrap()).await.0, StatusCode::OK);
        asked.token = other;
        let (status, body) = server.issue(&serde_json::to_vec(&asked).unwrap()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    }

    /// The CA's own serving certificate is issued again at half its life,
    /// and when the signing chain changes: it never runs out under a CA
    /// that runs for longer than a leaf lives.
    #[test]
    fn the_cas_serving_certificate_is_renewed() {
        let ca = Arc::new(CertificateAuthority::create("cluster.local").unwrap());
        let serving = ServingCertificate::new(ca, Duration::from_secs(2));
        let first = serving.current().unwrap();
        assert!(Arc::ptr_eq(&first, &serving.current().unwrap()), "kept while fresh");
        std::thread::sleep(Duration::from_millis(1200));
        let second = serving.current().unwrap();
        assert_ne!(first.cert[0], second.cert[0], "renewed past half its life");
        let (_, leaf) = x509_parser::parse_x509_certificate(second.cert[0].as_ref()).unwrap();
        let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert!(lifetime <= 3, "the leaf lifetime, not a year: {lifetime} s");
    }

    #[test]
    fn one_peer_holds_at_most_its_share_of_connections() {
        let peers = Arc::new(PeerConnections::default());
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let held: Vec<_> = (0..MAX_CONNECTIONS_PER_PEER).map(|_| peers.clone().take(a).unwrap()).collect();
        assert!(peers.clone().take(a).is_none(), "one more from the same address is refused");
        assert!(peers.clone().take(b).is_some(), "another address is not affected");
        drop(held);
        let again = peers.clone().take(a);
        assert!(again.is_some(), "closing gives the slots back");
        drop(again);
        assert!(peers.open.lock().unwrap().is_empty(), "nothing is left of closed connections");
    }

    /// An unauthenticated caller opens streams and never finishes them: it
    /// gets MAX_STREAMS_PER_CONNECTION at most, and each is reset after
    /// REQUEST_TIMEOUT, so it cannot grow the CA.
    #[tokio::test]
    async fn a_caller_cannot_hold_many_streams_or_any_for_long() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = Arc::new(CertificateAuthority::create("cluster.local").unwrap());
        let bundle = tls::TrustBundle::new("cluster.local", &ca.roots()).unwrap();
        let authorizer = NodeTokenAuthorizer::new(ca.tokens(), Box::new(OnePod));
        let server = Arc::new(CaServer::new(ca, Box::new(authorizer), Duration::from_secs(60)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(server.serve(listener));

        let ca_id = Identity::new("cluster.local", CA_NAMESPACE, CA_SERVICE_ACCOUNT).spiffe_id();
        let config = Arc::new(tls::client_config(None, &tls::TrustStore::new(bundle), ca_id).unwrap());
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
        let (mut client, connection) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(connection);
        // One finished request first: by its answer, the client has the
        // server's settings, limits included.
        let bundle_request = http::Request::get(format!("https://{addr}/v1/bundle")).body(()).unwrap();
        let (response, _) = client.send_request(bundle_request, true).unwrap();
        assert_eq!(response.await.unwrap().status(), StatusCode::OK);
        let started = tokio::time::Instant::now();
        let held: Vec<_> = (0..MAX_STREAMS_PER_CONNECTION)
            .map(|_| {
                let request = http::Request::post(format!("https://{addr}/v1/svid")).body(()).unwrap();
                client.send_request(request, false).unwrap()
            })
            .collect();
        // The CA serves no more streams on this connection while these are open...
        let request = http::Request::get(format!("https://{addr}/v1/bundle")).body(()).unwrap();
        let (mut next, _) = client.send_request(request, true).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), &mut next).await.is_err(),
            "a stream past the limit was served"
        );
        // ...and none of them ever ends its body: each is reset after the deadline, which frees the next.
        let (first, _body) = held.into_iter().next().unwrap();
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT * 2, first).await.expect("an answer in time");
        assert!(outcome.is_err(), "the unfinished request was reset");
        let served = tokio::time::timeout(Duration::from_secs(2), next).await.expect("served once streams freed");
        assert_eq!(served.unwrap().status(), StatusCode::OK);
        let waited = started.elapsed();
        assert!(waited >= REQUEST_TIMEOUT && waited < REQUEST_TIMEOUT + Duration::from_secs(3), "{waited:?}");
    }
}
