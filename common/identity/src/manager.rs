//! The certificate manager: one entry per identity used by a pod on this
//! node. Each entry fetches its SVID as soon as the first pod needs it (ahead
//! of that pod's first connection), renews it at half its lifetime, backs off
//! exponentially when the provider fails, keeps serving the current
//! certificate for as long as it is valid, and is dropped, key and all, when
//! the last pod using it leaves the node.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, task::JoinHandle};

use super::{Identity, IdentityError, IdentityProvider, Svid, SvidUpdate};
use ambit_runtime::metrics::Metrics;

const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct Entry {
    users: BTreeSet<String>,
    svid: watch::Receiver<Option<Arc<Svid>>>,
    refresher: JoinHandle<()>,
}

pub struct CertManager {
    provider: Arc<dyn IdentityProvider>,
    metrics: Arc<Metrics>,
    entries: Mutex<BTreeMap<Identity, Entry>>,
}

impl CertManager {
    pub fn new(provider: Arc<dyn IdentityProvider>, metrics: Arc<Metrics>) -> Self {
        Self { provider, metrics, entries: Mutex::new(BTreeMap::new()) }
    }

    /// Registers `pod` as a user of `identity`, starting the fetch if it is
    /// the first, and returns a view of the identity's current SVID.
    pub fn acquire(&self, identity: &Identity, pod: &str) -> watch::Receiver<Option<Arc<Svid>>> {
        let mut entries = self.entries.lock().expect("cert manager lock");
        let entry = entries.entry(identity.clone()).or_insert_with(|| {
            let (tx, rx) = watch::channel(None);
            let refresher = tokio::spawn(refresh(self.provider.clone(), self.metrics.clone(), identity.clone(), tx));
            Entry { users: BTreeSet::new(), svid: rx, refresher }
        });
        entry.users.insert(pod.to_string());
        entry.svid.clone()
    }

    /// `pod` no longer uses `identity`. An identity left without users
    /// stays until [`Self::drop_unused`], so that a pod enrolled again in
    /// the same pass (a new IP or netns) keeps its certificate, which
    /// matters when the CA cannot issue another.
    pub fn release(&self, identity: &Identity, pod: &str) {
        if let Some(entry) = self.entries.lock().expect("cert manager lock").get_mut(identity) {
            entry.users.remove(pod);
        }
    }

    /// Drops the identities no pod uses any more, certificate and key with them.
    pub fn drop_unused(&self) {
        self.entries.lock().expect("cert manager lock").retain(|identity, entry| {
            if !entry.users.is_empty() {
                return true;
            }
            entry.refresher.abort();
            let labels = Metrics::identity(identity);
            self.metrics.certificate_expiry.remove(&labels);
            self.metrics.certificate_issued.remove(&labels);
            tracing::info!(%identity, "identity no longer used on this node; certificate and key dropped");
            false
        });
    }

    /// A view of `identity`'s SVID, if a pod on this node uses it; unlike
    /// [`Self::acquire`], it keeps nothing alive.
    pub fn watch(&self, identity: &Identity) -> Option<watch::Receiver<Option<Arc<Svid>>>> {
        self.entries.lock().expect("cert manager lock").get(identity).map(|entry| entry.svid.clone())
    }

    /// Every identity held, with its current SVID if it has one.
    pub fn held(&self) -> Vec<(Identity, Option<Arc<Svid>>)> {
        let entries = self.entries.lock().expect("cert manager lock");
        entries.iter().map(|(id, e)| (id.clone(), e.svid.borrow().clone())).collect()
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        if let Ok(entries) = self.entries.lock() {
            for entry in entries.values() {
                entry.refresher.abort();
            }
        }
    }
}

async fn refresh(
    provider: Arc<dyn IdentityProvider>,
    metrics: Arc<Metrics>,
    identity: Identity,
    tx: watch::Sender<Option<Arc<Svid>>>,
) {
    let holder = Holder { labels: Metrics::identity(&identity), identity, metrics, tx };
    let mut backoff = INITIAL_BACKOFF;
    loop {
        match provider.subscribe(&holder.identity) {
            Some(subscription) => follow(&holder, subscription, &mut backoff).await,
            None => pull(&holder, provider.as_ref(), &mut backoff).await,
        }
        back_off(&mut backoff).await;
    }
}

/// Asks the provider for a new SVID at half the current one's life, until
/// a request fails.
async fn pull(holder: &Holder, provider: &dyn IdentityProvider, backoff: &mut Duration) {
    loop {
        let svid = match provider.fetch(&holder.identity).await.and_then(|svid| holder.valid_now(svid)) {
            Ok(svid) => svid,
            Err(error) => return holder.failed(&error, *backoff),
        };
        let refresh_at = svid.refresh_at();
        holder.publish(svid);
        if refresh_at <= SystemTime::now() {
            // Issued with half its life already gone by this node's clock:
            // asking again at once would get the same.
            tracing::warn!(
                identity = %holder.identity,
                retry_in_ms = backoff.as_millis() as u64,
                "certificate issued past its renewal time; is the CA's clock behind this node's?"
            );
            return;
        }
        *backoff = INITIAL_BACKOFF;
        sleep_until(refresh_at).await;
    }
}

/// Follows a pushing provider's updates until its stream fails or ends.
async fn follow(holder: &Holder, subscription: crate::SubscribeFuture<'_>, backoff: &mut Duration) {
    use futures::StreamExt as _;
    let mut updates = match subscription.await {
        Ok(updates) => updates,
        Err(error) => return holder.failed(&error, *backoff),
    };
    while let Some(update) = updates.next().await {
        match update.and_then(|update| match update {
            SvidUpdate::Issued(svid) => holder.valid_now(svid).map(Some),
            SvidUpdate::Revoked(reason) => Ok(holder.revoke(&reason)),
        }) {
            Ok(Some(svid)) => {
                *backoff = INITIAL_BACKOFF;
                holder.publish(svid);
            }
            Ok(None) => {}
            Err(error) => return holder.failed(&error, *backoff),
        }
    }
    holder
        .failed(&IdentityError::Unreachable { addr: "the provider".into(), reason: "updates ended".into() }, *backoff);
}

/// One identity's certificate, as the manager keeps it.
struct Holder {
    identity: Identity,
    labels: ambit_runtime::metrics::IdentityLabels,
    metrics: Arc<Metrics>,
    tx: watch::Sender<Option<Arc<Svid>>>,
}

impl Holder {
    /// A certificate this node's clock does not accept yet (or any more) is
    /// a failed renewal: the current one stays in use.
    fn valid_now(&self, svid: Svid) -> Result<Svid, IdentityError> {
        match svid.is_valid_at(SystemTime::now()) {
            true => Ok(svid),
            false => Err(IdentityError::NotValidNow {
                identity: self.identity.to_string(),
                not_before: humantime::format_rfc3339_seconds(svid.not_before).to_string(),
                not_after: humantime::format_rfc3339_seconds(svid.not_after).to_string(),
            }),
        }
    }

    fn publish(&self, svid: Svid) {
        let unix = |t: SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        tracing::info!(
            identity = %self.identity,
            serial = %svid.serial,
            valid_for_secs = svid.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
            "certificate obtained"
        );
        self.metrics.certificate_expiry.get_or_create(&self.labels).set(unix(svid.not_after));
        self.metrics.certificate_issued.get_or_create(&self.labels).set(unix(svid.not_before));
        self.tx.send_replace(Some(Arc::new(svid)));
    }

    /// The provider took the identity back: the certificate goes at once.
    fn revoke(&self, reason: &str) -> Option<Svid> {
        self.tx.send_replace(None);
        self.metrics.certificate_expiry.remove(&self.labels);
        self.metrics.certificate_issued.remove(&self.labels);
        tracing::error!(
            identity = %self.identity,
            %reason,
            "identity revoked by its provider: certificate and key dropped; connections for it fail"
        );
        None
    }

    fn failed(&self, error: &IdentityError, backoff: Duration) {
        self.metrics.certificate_renewal_failures.get_or_create(&self.labels).inc();
        let current = self.tx.borrow().clone();
        match current.filter(|svid| svid.is_valid_at(SystemTime::now())) {
            Some(svid) => tracing::warn!(
                identity = %self.identity,
                %error,
                serial = %svid.serial,
                expires_in_secs = svid.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
                retry_in_ms = backoff.as_millis() as u64,
                "certificate renewal failed; the current certificate stays in use until it expires"
            ),
            None => tracing::error!(
                identity = %self.identity,
                %error,
                retry_in_ms = backoff.as_millis() as u64,
                "no valid certificate; connections for this identity fail until one is issued"
            ),
        }
    }
}

/// Waits `backoff`, then doubles it (up to [`MAX_BACKOFF`]) for next time.
async fn back_off(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}

async fn sleep_until(at: SystemTime) {
    if let Ok(wait) = at.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

    use super::*;
    use crate::{IdentityError, ProviderFuture, ca::CertificateAuthority};

    /// A provider in front of a real in-memory CA that can be switched off.
    struct FlakyCa {
        ca: CertificateAuthority,
        ttl: Duration,
        up: AtomicBool,
        calls: AtomicUsize,
        /// How far the CA's clock is ahead of this node's (negative: behind).
        skew_secs: AtomicI64,
    }

    impl IdentityProvider for FlakyCa {
        fn fetch<'a>(&'a self, identity: &'a Identity) -> ProviderFuture<'a> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if !self.up.load(Ordering::SeqCst) {
                    return Err(IdentityError::Unreachable { addr: "test".into(), reason: "switched off".into() });
                }
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
                let chain = self.ca.issue(identity, &key, self.ttl).unwrap();
                let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
                let mut svid = Svid::from_chain(identity, chain, key, "cluster.local").unwrap();
                // The manager judges the validity it reads, not the signature.
                let skew = self.skew_secs.load(Ordering::SeqCst);
                let shift = |t: SystemTime| match skew >= 0 {
                    true => t + Duration::from_secs(skew as u64),
                    false => t - Duration::from_secs(skew.unsigned_abs()),
                };
                (svid.not_before, svid.not_after) = (shift(svid.not_before), shift(svid.not_after));
                Ok(svid)
            })
        }
    }

    fn flaky(ttl: Duration) -> Arc<FlakyCa> {
        Arc::new(FlakyCa {
            ca: CertificateAuthority::create("cluster.local").unwrap(),
            ttl,
            up: AtomicBool::new(true),
            calls: AtomicUsize::new(0),
            skew_secs: AtomicI64::new(0),
        })
    }

    /// A manager in front of `ca`, with shop/cart acquired by one pod.
    fn started(ca: Arc<FlakyCa>) -> (Arc<FlakyCa>, CertManager, Identity, watch::Receiver<Option<Arc<Svid>>>) {
        let manager = CertManager::new(ca.clone(), Arc::new(Metrics::new()));
        let id = Identity::new("cluster.local", "shop", "cart");
        let rx = manager.acquire(&id, "shop/cart-1");
        (ca, manager, id, rx)
    }

    async fn next_serial(rx: &mut watch::Receiver<Option<Arc<Svid>>>) -> String {
        tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.unwrap().unwrap();
        rx.borrow().as_ref().unwrap().serial.clone()
    }

    #[tokio::test]
    async fn fetches_ahead_and_renews_at_half_life() {
        let (_ca, _manager, _, mut rx) = started(flaky(Duration::from_secs(4)));
        let first_serial = next_serial(&mut rx).await;
        let first = rx.borrow().clone().unwrap();
        let second_serial = next_serial(&mut rx).await;
        let renewed = SystemTime::now();
        assert_ne!(first_serial, second_serial);
        // Certificate times have one-second resolution; allow for it.
        assert!(renewed + Duration::from_millis(100) >= first.refresh_at(), "renewed before half-life");
        assert!(renewed < first.not_after, "renewed before expiry");
    }

    #[tokio::test]
    async fn one_entry_per_identity_dropped_with_its_last_user() {
        let (ca, manager, id, mut rx) = started(flaky(Duration::from_secs(60)));
        let _ = manager.acquire(&id, "shop/cart-2");
        next_serial(&mut rx).await;
        assert_eq!(manager.held().len(), 1);
        assert_eq!(ca.calls.load(Ordering::SeqCst), 1, "two pods, one identity, one fetch");
        manager.release(&id, "shop/cart-1");
        manager.drop_unused();
        assert_eq!(manager.held().len(), 1);
        manager.release(&id, "shop/cart-2");
        manager.drop_unused();
        assert!(manager.held().is_empty());
    }

    #[tokio::test]
    async fn a_pod_enrolled_again_keeps_its_certificate_while_the_ca_is_down() {
        let (ca, manager, id, mut rx) = started(flaky(Duration::from_secs(60)));
        let serial = next_serial(&mut rx).await;
        ca.up.store(false, Ordering::SeqCst);
        // A new IP or netns: unenrolled, then enrolled in the same pass.
        manager.release(&id, "shop/cart-1");
        let rx = manager.acquire(&id, "shop/cart-1");
        manager.drop_unused();
        assert_eq!(rx.borrow().as_ref().map(|svid| svid.serial.clone()), Some(serial));
    }

    #[tokio::test]
    async fn certificates_outside_this_nodes_clock_do_not_replace_one_or_loop() {
        // The CA's clock 120 s ahead: its certificates are not valid yet here.
        let (ca, _manager, _, mut rx) = started(flaky(Duration::from_secs(2)));
        let serial = next_serial(&mut rx).await;
        ca.skew_secs.store(120, Ordering::SeqCst);
        let calls_before = ca.calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1800)).await;
        assert_eq!(rx.borrow().as_ref().unwrap().serial, serial, "the valid certificate stays in use");
        let retries = ca.calls.load(Ordering::SeqCst) - calls_before;
        assert!((1..=4).contains(&retries), "{retries} renewals in ~0.9 s: backed off");

        // The CA's clock 40 s behind, 60 s certificates: valid here, but
        // past half their life already. Used, and asked again with backoff.
        let behind = flaky(Duration::from_secs(60));
        behind.skew_secs.store(-40, Ordering::SeqCst);
        let (ca, _manager, _, mut rx) = started(behind);
        next_serial(&mut rx).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let calls = ca.calls.load(Ordering::SeqCst);
        assert!((2..=4).contains(&calls), "{calls} fetches in 1 s: backed off, not a busy loop");
        assert!(rx.borrow().is_some(), "the certificate is in use");
    }

    #[tokio::test]
    async fn keeps_the_valid_certificate_while_the_ca_is_down_and_backs_off() {
        let (ca, _manager, _, mut rx) = started(flaky(Duration::from_secs(2)));
        let serial = next_serial(&mut rx).await;
        ca.up.store(false, Ordering::SeqCst);
        let calls_before = ca.calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1800)).await;
        let current = rx.borrow().clone().unwrap();
        assert_eq!(current.serial, serial, "still serving the certificate it has");
        let retries = ca.calls.load(Ordering::SeqCst) - calls_before;
        assert!((1..=4).contains(&retries), "{retries} retries in ~0.9 s of outage: exponential, not a busy loop");
        ca.up.store(true, Ordering::SeqCst);
        assert_ne!(next_serial(&mut rx).await, serial, "renewed once the CA is back");
    }
}
