//! A test double of a SPIRE agent's Delegated Identity API.
//!
//! No SPIRE agent and server can run on the machines ambit is tested on, so
//! this double serves the real gRPC service,
//! `spire.api.agent.delegatedidentity.v1.DelegatedIdentity`, with the
//! message types the `spire-api` crate generates from SPIRE's published
//! protos, over a Unix socket, as the SPIRE agent's admin socket does:
//!
//! - `SubscribeToX509SVIDs`: the SVIDs of the registration entries whose
//!   selectors are all among the caller's, sent at once and again at every
//!   change (a rotation, a new or deleted entry); an update with no SVID
//!   when none is left;
//! - `SubscribeToX509Bundles`: the bundles by trust domain (keys as released
//!   agents send them, `spiffe://<td>`), federated ones included;
//! - callers are attested by their socket's peer credentials, and only the
//!   authorized delegate (a uid; root's by default) is served: others get
//!   PERMISSION_DENIED.
//!
//! SVIDs have SPIRE's shape (subject `C=US, O=SPIRE`, keyUsage
//! digitalSignature, keyEncipherment and keyAgreement), with a key the
//! agent generates, and are rotated at half their lifetime, as SPIRE does.
//! It is not a SPIRE: no node attestation, no server, one trust domain.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use futures::Stream;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use spire_api::pb::spire::api::{
    agent::delegatedidentity::v1::{
        SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest,
        SubscribeToX509sviDsResponse, X509svidWithKey,
    },
    types::{Spiffeid, X509svid},
};
use tokio::sync::watch;
use tonic::{Status, server::NamedService, transport::server::UdsConnectInfo};

const SERVICE: &str = "spire.api.agent.delegatedidentity.v1.DelegatedIdentity";

/// One registration entry and the SVID minted for it.
struct Entry {
    selectors: BTreeSet<(String, String)>,
    svid: Option<Minted>,
}

#[derive(Clone)]
struct Minted {
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
    serial: String,
    issued: SystemTime,
    expires: SystemTime,
}

struct Registry {
    trust_domain: String,
    ttl: Duration,
    root: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    entries: BTreeMap<String, Entry>,
    federated: BTreeMap<String, Vec<Vec<u8>>>,
}

struct Shared {
    /// The only caller served: the node agent's user.
    authorized_uid: u32,
    registry: Mutex<Registry>,
    /// Bumped at every change; each subscription sends again when it moves.
    version: watch::Sender<u64>,
}

/// The double: a SPIRE "server" (CA and entries) behind agent sockets.
pub struct SpireAgent {
    shared: Arc<Shared>,
    sockets: Vec<PathBuf>,
    runtime: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl SpireAgent {
    /// A SPIRE for `trust_domain` whose SVIDs live `ttl`, serving the
    /// Delegated Identity API on each of `sockets` (one per node).
    pub fn start(trust_domain: &str, ttl: Duration, sockets: &[PathBuf]) -> Result<Self> {
        Self::start_authorizing(trust_domain, ttl, sockets, 0)
    }

    /// Like [`SpireAgent::start`], serving only callers of user `uid`.
    pub fn start_authorizing(trust_domain: &str, ttl: Duration, sockets: &[PathBuf], uid: u32) -> Result<Self> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CountryName, "US");
        params.distinguished_name.push(DnType::OrganizationName, "SPIFFE");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(86400)).into();
        let root = params.self_signed(&key)?.der().to_vec();
        let registry = Registry {
            trust_domain: trust_domain.to_string(),
            ttl,
            root,
            issuer: Issuer::new(params, key),
            entries: BTreeMap::new(),
            federated: BTreeMap::new(),
        };
        let shared =
            Arc::new(Shared { authorized_uid: uid, registry: Mutex::new(registry), version: watch::Sender::new(0) });
        let agent = Self { shared, sockets: sockets.to_vec(), runtime: Mutex::default(), stop: Mutex::default() };
        agent.resume()?;
        Ok(agent)
    }

    /// The root (DER): what the SPIRE server's bundle holds.
    pub fn root(&self) -> Vec<u8> {
        self.shared.registry.lock().expect("registry").root.clone()
    }

    /// Registers `spiffe_id` for workloads with all of `selectors` (`type:value`).
    pub fn register(&self, spiffe_id: &str, selectors: &[&str]) {
        let selectors = selectors
            .iter()
            .map(|s| s.split_once(':').map(|(t, v)| (t.to_string(), v.to_string())).expect("type:value"))
            .collect();
        self.change(|registry| {
            registry.entries.insert(spiffe_id.to_string(), Entry { selectors, svid: None });
        });
    }

    /// Deletes the entry of `spiffe_id`: its subscribers get an update without it.
    pub fn delete(&self, spiffe_id: &str) {
        self.change(|registry| {
            registry.entries.remove(spiffe_id);
        });
    }

    /// Mints a new SVID for `spiffe_id` now and pushes it.
    pub fn rotate(&self, spiffe_id: &str) {
        self.change(|registry| {
            if let Some(entry) = registry.entries.get_mut(spiffe_id) {
                entry.svid = None;
            }
        });
    }

    /// Serials minted for `spiffe_id` so far, the current one.
    pub fn serial(&self, spiffe_id: &str) -> Option<String> {
        let registry = self.shared.registry.lock().expect("registry");
        registry.entries.get(spiffe_id)?.svid.as_ref().map(|s| s.serial.clone())
    }

    /// Federates with `trust_domain`, whose roots are `roots` (DER).
    pub fn federate(&self, trust_domain: &str, roots: Vec<Vec<u8>>) {
        self.change(|registry| {
            registry.federated.insert(trust_domain.to_string(), roots);
        });
    }

    fn change(&self, edit: impl FnOnce(&mut Registry)) {
        edit(&mut self.shared.registry.lock().expect("registry"));
        self.shared.version.send_modify(|v| *v += 1);
    }

    /// The agent goes down: sockets closed, every subscription cut.
    pub fn stop(&self) {
        if let Some(stop) = self.stop.lock().expect("stop").take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.runtime.lock().expect("runtime").take() {
            let _ = thread.join();
        }
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
    }

    /// The agent comes (back) up on its sockets.
    pub fn resume(&self) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let mut listeners = Vec::new();
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
            let _guard = runtime.enter();
            let listener =
                tokio::net::UnixListener::bind(socket).with_context(|| format!("bind {}", socket.display()))?;
            // Any user may connect; only the authorized delegate is served.
            std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
            listeners.push(listener);
        }
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let shared = self.shared.clone();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                tokio::spawn(rotate_at_half_life(shared.clone()));
                for listener in listeners {
                    let service = DelegatedIdentity(shared.clone());
                    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                    tokio::spawn(
                        tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming),
                    );
                }
                let _ = stop_rx.await;
            });
            // Dropping the runtime here drops every connection.
        });
        *self.runtime.lock().expect("runtime") = Some(thread);
        *self.stop.lock().expect("stop") = Some(stop_tx);
        Ok(())
    }
}

impl Drop for SpireAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SPIRE rotates an SVID once half its lifetime has passed.
async fn rotate_at_half_life(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut registry = shared.registry.lock().expect("registry");
        let now = SystemTime::now();
        let mut rotated = false;
        for entry in registry.entries.values_mut() {
            if let Some(svid) = &entry.svid
                && now >= svid.issued + (svid.expires.duration_since(svid.issued).unwrap_or_default() / 2)
            {
                entry.svid = None;
                rotated = true;
            }
        }
        drop(registry);
        if rotated {
            shared.version.send_modify(|v| *v += 1);
        }
    }
}

impl Registry {
    /// The SVIDs for a caller with `selectors`, minting those not minted yet.
    fn svids_for(&mut self, selectors: &BTreeSet<(String, String)>) -> Vec<X509svidWithKey> {
        let (trust_domain, ttl) = (self.trust_domain.clone(), self.ttl);
        let issuer = &self.issuer;
        let mut out = Vec::new();
        for (id, entry) in self.entries.iter_mut().filter(|(_, e)| e.selectors.is_subset(selectors)) {
            let svid = entry.svid.get_or_insert_with(|| mint(issuer, id, ttl).expect("mint an SVID"));
            out.push(X509svidWithKey {
                x509_svid: Some(X509svid {
                    id: Some(Spiffeid {
                        trust_domain: trust_domain.clone(),
                        path: id.strip_prefix(&format!("spiffe://{trust_domain}")).unwrap_or(id).to_string(),
                    }),
                    cert_chain: svid.chain.iter().map(|c| c.clone().into()).collect(),
                    expires_at: svid.expires.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
                        as i64,
                    hint: String::new(),
                }),
                x509_svid_key: svid.key.clone().into(),
            });
        }
        out
    }

    fn bundles(&self) -> SubscribeToX509BundlesResponse {
        let mut ca_certificates: std::collections::HashMap<String, prost::bytes::Bytes> = Default::default();
        ca_certificates.insert(format!("spiffe://{}", self.trust_domain), self.root.clone().into());
        for (td, roots) in &self.federated {
            ca_certificates.insert(format!("spiffe://{td}"), roots.concat().into());
        }
        SubscribeToX509BundlesResponse { ca_certificates }
    }
}

fn mint(issuer: &Issuer<'static, KeyPair>, spiffe_id: &str, ttl: Duration) -> Result<Minted> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CountryName, "US");
    params.distinguished_name.push(DnType::OrganizationName, "SPIRE");
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages =
        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment, KeyUsagePurpose::KeyAgreement];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(10)).into();
    params.not_after = (now + ttl).into();
    let mut serial = [0u8; 16];
    rand::fill(&mut serial);
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params.signed_by(&key, issuer)?;
    Ok(Minted {
        chain: vec![cert.der().to_vec()],
        key: key.serialize_der(),
        serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        issued: now,
        expires: now + ttl,
    })
}

/// The gRPC service, routed by method path.
#[derive(Clone)]
struct DelegatedIdentity(Arc<Shared>);

impl NamedService for DelegatedIdentity {
    const NAME: &'static str = SERVICE;
}

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Updates<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl tower_service::Service<http::Request<tonic::body::Body>> for DelegatedIdentity {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Boxed<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let shared = self.0.clone();
        let method = request.uri().path().strip_prefix(&format!("/{SERVICE}/")).unwrap_or_default().to_string();
        Box::pin(async move {
            use tonic::server::Grpc;
            use tonic_prost::ProstCodec;
            Ok(match method.as_str() {
                "SubscribeToX509SVIDs" => {
                    let codec: ProstCodec<SubscribeToX509sviDsResponse, SubscribeToX509sviDsRequest> =
                        ProstCodec::default();
                    let subscribe = tower::service_fn(move |request| subscribe_svids(shared.clone(), request));
                    Grpc::new(codec).server_streaming(subscribe, request).await
                }
                "SubscribeToX509Bundles" => {
                    let codec: ProstCodec<SubscribeToX509BundlesResponse, SubscribeToX509BundlesRequest> =
                        ProstCodec::default();
                    let subscribe = tower::service_fn(move |request| subscribe_bundles(shared.clone(), request));
                    Grpc::new(codec).server_streaming(subscribe, request).await
                }
                _ => Status::unimplemented(format!("{method} is not served by this double")).into_http(),
            })
        })
    }
}

/// The caller must be the authorized delegate, as its peer credentials say.
fn attest<T>(shared: &Shared, request: &tonic::Request<T>) -> Result<(), Status> {
    let uid = request.extensions().get::<UdsConnectInfo>().and_then(|info| info.peer_cred).map(|cred| cred.uid());
    match uid {
        Some(uid) if uid == shared.authorized_uid => Ok(()),
        other => Err(Status::permission_denied(format!(
            "caller (uid {other:?}) is not an authorized delegate of this SPIRE agent"
        ))),
    }
}

/// Sends `current()` at once, then again whenever it changes.
fn follow<T, F>(shared: Arc<Shared>, current: F) -> Updates<T>
where
    T: PartialEq + Clone + Send + 'static,
    F: Fn(&mut Registry) -> T + Send + Sync + 'static,
{
    let current = Arc::new(current);
    let changes = shared.version.subscribe();
    Box::pin(futures::stream::unfold((changes, None::<T>), move |(mut changes, mut last)| {
        let (shared, current) = (shared.clone(), current.clone());
        async move {
            loop {
                let next = current(&mut shared.registry.lock().expect("registry"));
                if last.as_ref() != Some(&next) {
                    last = Some(next.clone());
                    return Some((Ok(next), (changes, last)));
                }
                changes.changed().await.ok()?;
            }
        }
    }))
}

async fn subscribe_svids(
    shared: Arc<Shared>,
    request: tonic::Request<SubscribeToX509sviDsRequest>,
) -> Result<tonic::Response<Updates<SubscribeToX509sviDsResponse>>, Status> {
    attest(&shared, &request)?;
    let request = request.into_inner();
    if request.pid != 0 {
        return Err(Status::unimplemented("attestation by pid is not served by this double; send selectors"));
    }
    let selectors: BTreeSet<(String, String)> = request.selectors.into_iter().map(|s| (s.r#type, s.value)).collect();
    Ok(tonic::Response::new(follow(shared, move |registry| SubscribeToX509sviDsResponse {
        x509_svids: registry.svids_for(&selectors),
        federates_with: Vec::new(),
    })))
}

async fn subscribe_bundles(
    shared: Arc<Shared>,
    request: tonic::Request<SubscribeToX509BundlesRequest>,
) -> Result<tonic::Response<Updates<SubscribeToX509BundlesResponse>>, Status> {
    attest(&shared, &request)?;
    Ok(tonic::Response::new(follow(shared, |registry| registry.bundles())))
}

/// Where a node's SPIRE agent socket lives in a bed.
pub fn socket_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("spire-agent-{node}.sock"))
}
