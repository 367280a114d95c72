//! Key sets (JWKS) that issuers publish over https, or that the operator
//! puts in files under `--jwks-dir`.
//!
//! A key set is fetched as soon as a RequestAuthentication names its URI,
//! kept in memory, and fetched again every `refresh`. A token whose key id
//! the cached set lacks triggers an early fetch (the issuer may have rotated
//! its keys), at most once per [`MIN_REFETCH`]. A failed fetch keeps the last
//! good set in use and is retried with backoff; while an issuer's keys have
//! never been fetched, its tokens are refused (401), never accepted
//! unchecked. Fetches use https only, with a bounded time and body size.
//! Files are read only under `--jwks-dir` (symbolic links resolved first),
//! only if regular (a FIFO or a device is refused without blocking), at most
//! 1 MiB, on a blocking thread with the same deadline: a hostile path in a
//! policy can neither read the node's secrets nor stall the waypoint.

use std::{
    collections::HashMap,
    io::Read as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use ambit_authz::jwt::FetchedKeys;
use anyhow::Context as _;
use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use jsonwebtoken::jwk::JwkSet;
use tokio::{
    sync::{Notify, watch},
    task::AbortHandle,
    time::Instant,
};

/// Early fetches (unknown key id) happen at most this often per URI, so
/// tokens with made-up key ids cannot make the waypoint hammer the issuer.
pub const MIN_REFETCH: Duration = Duration::from_secs(5);
/// How long a request with an unknown key id waits for the early fetch.
const REFETCH_WAIT: Duration = Duration::from_secs(2);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Larger bodies are refused: real key sets are a few kilobytes.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

pub struct JwksStore {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// `--jwks-dir`, canonical: where file:// key sets may be.
    dir: Option<PathBuf>,
    refresh: Duration,
    fetched: watch::Sender<Arc<FetchedKeys>>,
    /// One refresh task per URI the configuration names.
    sources: Mutex<HashMap<String, Source>>,
}

struct Source {
    wake: Arc<Notify>,
    task: AbortHandle,
}

impl JwksStore {
    /// `extra_roots`: a PEM file of CAs trusted for key-set servers besides
    /// the system's (`--jwks-ca`).
    pub fn new(extra_roots: Option<&Path>, dir: Option<PathBuf>, refresh: Duration) -> anyhow::Result<Arc<Self>> {
        let dir = dir
            .map(|dir| dir.canonicalize().with_context(|| format!("--jwks-dir {}: cannot open it", dir.display())))
            .transpose()?;
        let mut roots = rustls::RootCertStore::empty();
        // Unreadable system certificates only narrow what is trusted.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = extra_roots {
            let pem = std::fs::read(path).with_context(|| format!("--jwks-ca {}: cannot read it", path.display()))?;
            let certs = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("--jwks-ca {}: not PEM certificates", path.display()))?;
            anyhow::ensure!(!certs.is_empty(), "--jwks-ca {}: holds no certificate", path.display());
            for cert in certs {
                roots.add(cert).with_context(|| format!("--jwks-ca {}: unusable certificate", path.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(ambit_identity::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http1().build();
        Ok(Arc::new(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            dir,
            refresh,
            fetched: watch::Sender::new(Arc::default()),
            sources: Mutex::default(),
        }))
    }

    /// The key sets held now.
    pub fn keys(&self) -> Arc<FetchedKeys> {
        self.fetched.borrow().clone()
    }

    /// Keeps exactly these URIs fresh: starts fetching new ones, and stops
    /// and forgets those the configuration no longer names.
    pub fn want<'a>(self: &Arc<Self>, uris: impl IntoIterator<Item = &'a str>) {
        let wanted: Vec<&str> = uris.into_iter().collect();
        let mut sources = self.sources.lock().expect("jwks sources lock");
        sources.retain(|uri, source| {
            let keep = wanted.contains(&uri.as_str());
            if !keep {
                source.task.abort();
            }
            keep
        });
        self.fetched.send_if_modified(|keys| {
            let stale = keys.keys().any(|uri| !sources.contains_key(uri));
            if stale {
                Arc::make_mut(keys).retain(|uri, _| sources.contains_key(uri));
            }
            stale
        });
        for uri in wanted {
            if !sources.contains_key(uri) {
                let wake = Arc::new(Notify::new());
                let task = tokio::spawn(self.clone().keep_fresh(uri.to_string(), wake.clone())).abort_handle();
                sources.insert(uri.to_string(), Source { wake, task });
            }
        }
    }

    /// Asks for an early fetch of `uri` and waits a little for it, so the
    /// first token signed with a rotated-in key verifies.
    pub async fn refetch(&self, uri: &str) {
        let mut changed = self.fetched.subscribe();
        let Some(wake) = self.sources.lock().expect("jwks sources lock").get(uri).map(|s| s.wake.clone()) else {
            return;
        };
        wake.notify_one();
        let _ = tokio::time::timeout(REFETCH_WAIT, changed.changed()).await;
    }

    async fn keep_fresh(self: Arc<Self>, uri: String, wake: Arc<Notify>) {
        let mut retry = FIRST_RETRY;
        loop {
            let fetched_at = Instant::now();
            let wait = match self.fetch(&uri).await {
                Ok(set) => {
                    tracing::info!(%uri, keys = set.keys.len(), "JWKS fetched");
                    self.fetched.send_modify(|keys| {
                        Arc::make_mut(keys).insert(uri.clone(), Arc::new(set));
                    });
                    retry = FIRST_RETRY;
                    self.refresh
                }
                Err(e) => {
                    let consequence = if self.fetched.borrow().contains_key(&uri) {
                        "the keys fetched before stay in use"
                    } else {
                        "tokens of this issuer are refused until a fetch succeeds"
                    };
                    tracing::warn!(%uri, error = %format!("{e:#}"), retry_in_secs = retry.as_secs(), "JWKS fetch failed; {consequence}");
                    let wait = retry;
                    retry = (retry * 2).min(self.refresh);
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = wake.notified() => tokio::time::sleep_until(fetched_at + MIN_REFETCH).await,
            }
        }
    }

    async fn fetch(&self, uri: &str) -> anyhow::Result<JwkSet> {
        if let Some(path) = uri.strip_prefix("file://") {
            let dir = self.dir.clone().context("file:// key sets are read only under --jwks-dir; start the waypoint with --jwks-dir <directory> and put the file there")?;
            let path = PathBuf::from(path);
            let read = tokio::task::spawn_blocking(move || read_jwks_file(&dir, &path));
            let body = tokio::time::timeout(FETCH_TIMEOUT, read).await.context("not read within 5 s")???;
            return parse_jwks(&body);
        }
        let uri: Uri = uri.parse()?;
        let response =
            tokio::time::timeout(FETCH_TIMEOUT, self.client.get(uri)).await.context("no answer within 5 s")??;
        anyhow::ensure!(response.status() == StatusCode::OK, "the server answered {}", response.status());
        let body = tokio::time::timeout(FETCH_TIMEOUT, Limited::new(response.into_body(), MAX_JWKS_BYTES).collect())
            .await
            .context("the body did not arrive within 5 s")?
            .map_err(|e| anyhow::anyhow!("reading the body (at most {MAX_JWKS_BYTES} bytes): {e}"))?
            .to_bytes();
        parse_jwks(&body)
    }
}

fn parse_jwks(body: &[u8]) -> anyhow::Result<JwkSet> {
    let set: JwkSet = serde_json::from_slice(body).context("not a JWKS (`{\"keys\": [...]}`)")?;
    anyhow::ensure!(!set.keys.is_empty(), "the key set is empty");
    Ok(set)
}

/// Reads a key-set file, if it is a regular file under `dir` (canonical) of
/// at most [`MAX_JWKS_BYTES`].
fn read_jwks_file(dir: &Path, path: &Path) -> anyhow::Result<Vec<u8>> {
    let real = path.canonicalize().with_context(|| format!("cannot open {}", path.display()))?;
    anyhow::ensure!(
        real.starts_with(dir),
        "{} is outside --jwks-dir {}; key sets are read from there only",
        real.display(),
        dir.display()
    );
    // Non-blocking, so opening a FIFO returns at once; then only a regular
    // file is read.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(&real)
        .with_context(|| format!("cannot open {}", real.display()))?;
    let meta = file.metadata()?;
    anyhow::ensure!(meta.is_file(), "{} is not a regular file", real.display());
    anyhow::ensure!(meta.len() <= MAX_JWKS_BYTES as u64, "{} is larger than {MAX_JWKS_BYTES} bytes", real.display());
    let mut body = Vec::new();
    file.take(MAX_JWKS_BYTES as u64 + 1).read_to_end(&mut body)?;
    anyhow::ensure!(body.len() <= MAX_JWKS_BYTES, "{} is larger than {MAX_JWKS_BYTES} bytes", real.display());
    Ok(body)
}
