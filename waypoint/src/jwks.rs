//! Key sets (JWKS) that issuers publish over https.
//!
//! A key set is fetched as soon as a RequestAuthentication names its URI,
//! kept in memory, and fetched again every `refresh`. A token whose key id
//! the cached set lacks triggers an early fetch (the issuer may have rotated
//! its keys), at most once per [`MIN_REFETCH`]. A failed fetch keeps the last
//! good set in use and is retried with backoff; while an issuer's keys have
//! never been fetched, its tokens are refused (401), never accepted
//! unchecked. Fetches use https only, with a bounded time and body size.

use std::{
    collections::HashMap,
    path::Path,
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
    pub fn new(extra_roots: Option<&Path>, refresh: Duration) -> anyhow::Result<Arc<Self>> {
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
        let uri: Uri = uri.parse()?;
        let response =
            tokio::time::timeout(FETCH_TIMEOUT, self.client.get(uri)).await.context("no answer within 5 s")??;
        anyhow::ensure!(response.status() == StatusCode::OK, "the server answered {}", response.status());
        let body = tokio::time::timeout(FETCH_TIMEOUT, Limited::new(response.into_body(), MAX_JWKS_BYTES).collect())
            .await
            .context("the body did not arrive within 5 s")?
            .map_err(|e| anyhow::anyhow!("reading the body (at most {MAX_JWKS_BYTES} bytes): {e}"))?
            .to_bytes();
        let set: JwkSet = serde_json::from_slice(&body).context("not a JWKS (`{\"keys\": [...]}`)")?;
        anyhow::ensure!(!set.keys.is_empty(), "the key set is empty");
        Ok(set)
    }
}
