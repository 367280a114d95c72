//! The SPIFFE Workload API for the node's enrolled pods
//! (`--workload-api-socket`): apps that do their own mTLS, and Envoy-based
//! gateways, get their pod's X.509-SVID from the same source as the tunnel.
//!
//! The service is `SpiffeWorkloadAPI` of the SPIFFE Workload API
//! specification, over a Unix socket mounted into the pods:
//! `FetchX509SVID` streams the pod's SVID, its key, this trust domain's
//! bundle and the federated ones, again at every rotation and bundle
//! change; `FetchX509Bundles` the bundles, again at every change. The JWT methods answer UNIMPLEMENTED.
//!
//! **Attestation.** A caller is the pod whose network namespace it runs in:
//! when the connection is accepted, the kernel's peer credentials give the
//! connecting process's pid, and that pid's netns cookie is bound to the
//! connection; each request is answered for the enrolled pod with that
//! cookie. (A pid read again later could be another process's.) A process in no enrolled
//! pod (the host, a pod outside the mesh) gets PERMISSION_DENIED, and a
//! request without the `workload.spiffe.io: true` header INVALID_ARGUMENT,
//! as the specification requires.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
};

use ambit_identity::{Identity, Svid};
use bytes::Bytes;
use futures::Stream;
use tokio::sync::watch;
use tonic::{Status, server::NamedService};

use crate::{admin::EnrolledPod, netns::Netns, proxy::ProxyContext};

/// The messages of the SPIFFE Workload API's X.509 part (workload.proto of
/// the SPIFFE specification), with its field numbers.
mod messages {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509SvidRequest {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509SvidResponse {
        #[prost(message, repeated, tag = "1")]
        pub svids: Vec<X509Svid>,
        #[prost(bytes = "bytes", repeated, tag = "2")]
        pub crl: Vec<bytes::Bytes>,
        #[prost(map = "string, bytes", tag = "3")]
        pub federated_bundles: HashMap<String, bytes::Bytes>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509Svid {
        #[prost(string, tag = "1")]
        pub spiffe_id: String,
        /// DER certificates, leaf first, concatenated.
        #[prost(bytes = "bytes", tag = "2")]
        pub x509_svid: bytes::Bytes,
        /// DER PKCS#8.
        #[prost(bytes = "bytes", tag = "3")]
        pub x509_svid_key: bytes::Bytes,
        /// This trust domain's roots, DER, concatenated.
        #[prost(bytes = "bytes", tag = "4")]
        pub bundle: bytes::Bytes,
        #[prost(string, tag = "5")]
        pub hint: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509BundlesRequest {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509BundlesResponse {
        #[prost(bytes = "bytes", repeated, tag = "1")]
        pub crl: Vec<bytes::Bytes>,
        /// By trust domain's SPIFFE ID, DER roots concatenated.
        #[prost(map = "string, bytes", tag = "2")]
        pub bundles: HashMap<String, bytes::Bytes>,
    }
}

use messages::*;

const SERVICE: &str = "SpiffeWorkloadAPI";
const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Listens on `socket` (replacing a previous agent's).
pub fn listen(socket: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context as _;
    let _ = std::fs::remove_file(socket);
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("--workload-api-socket {}", socket.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("--workload-api-socket {}: cannot listen", socket.display()))?;
    // Any process may connect; attestation decides what it gets.
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    tracing::info!(socket = %socket.display(), "SPIFFE Workload API serving the enrolled pods");
    Ok(listener)
}

/// Serves the Workload API on `listener` until the agent stops.
pub async fn serve(
    listener: tokio::net::UnixListener,
    host_proc: PathBuf,
    ctx: Arc<ProxyContext>,
    enrolled: watch::Receiver<Vec<EnrolledPod>>,
) {
    // Each connection is attested as it is accepted, while the process that
    // connected is there: its pid could be another process's by the time
    // of a later request on the same connection.
    let incoming =
        futures::StreamExt::map(tokio_stream::wrappers::UnixListenerStream::new(listener), move |accepted| {
            accepted.map(|stream| {
                let netns_cookie = netns_of_peer(&stream, &host_proc);
                AttestedStream { stream, caller: Caller(netns_cookie) }
            })
        });
    let service = WorkloadApi(Arc::new(Attestor { ctx, enrolled }));
    if let Err(error) = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await {
        tracing::error!(%error, "the SPIFFE Workload API stopped");
    }
}

/// The network namespace cookie of the process that made a connection, read
/// when it was accepted; or why there is none.
#[derive(Clone)]
struct Caller(Result<u64, String>);

fn netns_of_peer(stream: &tokio::net::UnixStream, host_proc: &Path) -> Result<u64, String> {
    let pid = stream
        .peer_cred()
        .ok()
        .and_then(|cred| cred.pid())
        .filter(|pid| *pid > 0)
        .ok_or("the caller's process is not visible to the agent")?;
    Netns::open(&host_proc.join(pid.to_string()).join("ns/net"))
        .and_then(|netns| netns.cookie())
        .map_err(|e| format!("cannot read process {pid}'s network namespace: {e}"))
}

/// A Workload API connection and what its caller was attested as.
struct AttestedStream {
    stream: tokio::net::UnixStream,
    caller: Caller,
}

impl tonic::transport::server::Connected for AttestedStream {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl tokio::io::AsyncRead for AttestedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for AttestedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

struct Attestor {
    ctx: Arc<ProxyContext>,
    enrolled: watch::Receiver<Vec<EnrolledPod>>,
}

impl Attestor {
    /// The identity of the enrolled pod the caller runs in.
    fn attest<T>(&self, request: &tonic::Request<T>) -> Result<Identity, Status> {
        if request.metadata().get(SECURITY_HEADER).and_then(|v| v.to_str().ok()) != Some("true") {
            return Err(Status::invalid_argument(format!("the `{SECURITY_HEADER}: true` header is required")));
        }
        let Some(Caller(attested)) = request.extensions().get::<Caller>() else {
            return Err(Status::internal("the connection was not attested"));
        };
        // Netns cookies are never reused, unlike pids.
        let cookie = attested.clone().map_err(Status::permission_denied)?;
        let enrolled = self.enrolled.borrow();
        let pod = enrolled.iter().find(|pod| pod.netns_cookie == cookie).ok_or_else(|| {
            tracing::warn!(netns_cookie = cookie, "Workload API caller refused: it runs in no enrolled pod");
            Status::permission_denied("the caller runs in no pod this agent enrols")
        })?;
        spiffe::SpiffeId::new(&pod.identity)
            .ok()
            .as_ref()
            .and_then(Identity::from_spiffe_id)
            .ok_or_else(|| Status::internal(format!("pod {} has no usable identity", pod.pod)))
    }

    fn bundles(&self) -> HashMap<String, Bytes> {
        let local = self.ctx.trust.local();
        std::iter::once(local)
            .chain(self.ctx.trust.foreign().into_values())
            .map(|b| (format!("spiffe://{}", b.trust_domain), concatenated(&b.roots())))
            .collect()
    }

    fn svid_response(&self, identity: &Identity, svid: &Svid) -> X509SvidResponse {
        let mut bundles = self.bundles();
        let bundle = bundles.remove(&format!("spiffe://{}", identity.trust_domain)).unwrap_or_default();
        X509SvidResponse {
            svids: vec![X509Svid {
                spiffe_id: identity.to_string(),
                x509_svid: concatenated(&svid.chain),
                x509_svid_key: Bytes::copy_from_slice(svid.key.secret_der()),
                bundle,
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: bundles,
        }
    }
}

/// DER certificates one after the other, as the Workload API carries them.
fn concatenated(certs: &[rustls::pki_types::CertificateDer<'_>]) -> Bytes {
    Bytes::from(certs.iter().flat_map(|c| c.as_ref().iter().copied()).collect::<Vec<u8>>())
}

type Updates<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
struct WorkloadApi(Arc<Attestor>);

impl NamedService for WorkloadApi {
    const NAME: &'static str = SERVICE;
}

impl tower_service::Service<http::Request<tonic::body::Body>> for WorkloadApi {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let attestor = self.0.clone();
        let method = request.uri().path().strip_prefix(&format!("/{SERVICE}/")).unwrap_or_default().to_string();
        Box::pin(async move {
            use tonic::server::Grpc;
            use tonic_prost::ProstCodec;
            Ok(match method.as_str() {
                "FetchX509SVID" => {
                    let codec: ProstCodec<X509SvidResponse, X509SvidRequest> = ProstCodec::default();
                    let fetch = tower::service_fn(move |request| fetch_x509_svid(attestor.clone(), request));
                    Grpc::new(codec).server_streaming(fetch, request).await
                }
                "FetchX509Bundles" => {
                    let codec: ProstCodec<X509BundlesResponse, X509BundlesRequest> = ProstCodec::default();
                    let fetch = tower::service_fn(move |request| fetch_x509_bundles(attestor.clone(), request));
                    Grpc::new(codec).server_streaming(fetch, request).await
                }
                other => Status::unimplemented(format!("{other}: ambit serves the X.509 part of the Workload API"))
                    .into_http(),
            })
        })
    }
}

/// The caller's SVID now, and again at every rotation and change of the
/// bundles; the stream ends when its pod's identity leaves the node.
async fn fetch_x509_svid(
    attestor: Arc<Attestor>,
    request: tonic::Request<X509SvidRequest>,
) -> Result<tonic::Response<Updates<X509SvidResponse>>, Status> {
    let identity = attestor.attest(&request)?;
    let svids = attestor
        .ctx
        .certs
        .watch(&identity)
        .ok_or_else(|| Status::unavailable(format!("no certificate for {identity} yet; retry")))?;
    let bundles = attestor.ctx.trust.subscribe();
    let updates = futures::stream::unfold((svids, bundles, true), move |(mut svids, mut bundles, first)| {
        let (attestor, identity) = (attestor.clone(), identity.clone());
        async move {
            if !first {
                tokio::select! {
                    changed = svids.changed() => changed.ok()?,
                    changed = bundles.changed() => changed.ok()?,
                }
            }
            let svid = svids.wait_for(Option::is_some).await.ok()?.clone().expect("waited for one");
            Some((Ok(attestor.svid_response(&identity, &svid)), (svids, bundles, false)))
        }
    });
    Ok(tonic::Response::new(Box::pin(updates)))
}

/// The bundles now, and again at every change.
async fn fetch_x509_bundles(
    attestor: Arc<Attestor>,
    request: tonic::Request<X509BundlesRequest>,
) -> Result<tonic::Response<Updates<X509BundlesResponse>>, Status> {
    attestor.attest(&request)?;
    let changes = attestor.ctx.trust.subscribe();
    let updates = futures::stream::unfold((changes, true), move |(mut changes, first)| {
        let attestor = attestor.clone();
        async move {
            if !first {
                changes.changed().await.ok()?;
            }
            Some((Ok(X509BundlesResponse { crl: Vec::new(), bundles: attestor.bundles() }), (changes, false)))
        }
    });
    Ok(tonic::Response::new(Box::pin(updates)))
}
