//! SPIRE as the identity provider: the agent is the node's authorized
//! delegate on the SPIRE agent's admin socket and uses its Delegated
//! Identity API (the `spire-api` crate's client):
//!
//! - each identity is subscribed by the selectors of its pods (by default
//!   `k8s:ns:<namespace>` and `k8s:sa:<service account>`; configurable for
//!   standalone nodes), and SPIRE pushes each new SVID as it rotates one;
//! - an update without an SVID (the registration entry was deleted) revokes
//!   the identity here: its certificate is dropped and its connections fail;
//! - the trust bundles, this trust domain's and federated ones, come from
//!   SPIRE's bundle subscription.
//!
//! SPIRE unreachable is handled as the embedded CA's outage: the current
//! SVID stays in use until it expires, and the subscription is retried.

use std::{collections::BTreeSet, time::Duration};

use futures::StreamExt as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use spire_api::{DelegateAttestationRequest, DelegatedIdentityClient, DelegatedIdentityError, selectors::Selector};

use crate::{
    Identity, IdentityError, IdentityProvider, ProviderFuture, Svid, SvidStream, SvidUpdate,
    tls::{self, TrustBundle, TrustStore},
};

/// How long the first bundle may take at start-up.
const FIRST_BUNDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries of the bundle subscription start here and double up to this.
const BUNDLE_RETRY: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(30));

/// Selector templates: `type:value`, with `{namespace}`, `{service_account}`
/// and `{trust_domain}` in the value.
#[derive(Clone, Debug)]
pub struct SelectorTemplates(Vec<(String, String)>);

impl SelectorTemplates {
    /// Parses `type:value` templates (`--spire-selector`).
    pub fn parse(templates: &[String]) -> Result<Self, String> {
        let parsed = templates
            .iter()
            .map(|t| match t.split_once(':') {
                Some((kind, value)) if !kind.is_empty() && !value.is_empty() => Ok((kind.into(), value.into())),
                _ => {
                    Err(format!("--spire-selector `{t}`: give type:value, e.g. k8s:ns:{{namespace}} or unix:uid:1000"))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if parsed.is_empty() {
            return Err("--spire-selector: give at least one selector".into());
        }
        Ok(Self(parsed))
    }

    fn for_identity(&self, identity: &Identity) -> Vec<Selector> {
        let fill = |value: &str| {
            value
                .replace("{namespace}", &identity.namespace)
                .replace("{service_account}", &identity.service_account)
                .replace("{trust_domain}", &identity.trust_domain)
        };
        self.0.iter().map(|(kind, value)| Selector::Generic((kind.clone(), fill(value)))).collect()
    }
}

pub struct SpireProvider {
    /// `unix:/path/to/admin.sock`.
    endpoint: String,
    selectors: SelectorTemplates,
    trust: TrustStore,
}

impl SpireProvider {
    /// Connects to the SPIRE agent's admin socket and takes the first
    /// bundle of this trust domain from it: the trust store every
    /// handshake uses, kept current by [`follow_bundles`].
    pub async fn connect(
        socket: &std::path::Path,
        trust_domain: &str,
        selectors: SelectorTemplates,
    ) -> anyhow::Result<(Self, TrustStore)> {
        let endpoint = format!("unix:{}", socket.display());
        let hint = "is the SPIRE agent running, with this agent among its authorized_delegates?";
        let first = async {
            let client = DelegatedIdentityClient::connect_to(&endpoint).await?;
            client.fetch_x509_bundles().await
        };
        let bundles = tokio::time::timeout(FIRST_BUNDLE_TIMEOUT, first)
            .await
            .map_err(|_| {
                anyhow::anyhow!("--spire-admin-socket {endpoint}: no bundle within {FIRST_BUNDLE_TIMEOUT:?}; {hint}")
            })?
            .map_err(|e| anyhow::anyhow!("--spire-admin-socket {endpoint}: {e}; {hint}"))?;
        let local =
            bundles.iter().map(|(_, bundle)| bundle).find(|b| b.trust_domain().as_str() == trust_domain).ok_or_else(
                || anyhow::anyhow!("SPIRE serves no bundle of trust domain {trust_domain}; check --trust-domain"),
            )?;
        let trust = TrustStore::new(TrustBundle::new(trust_domain, &tls::authorities(local))?);
        Ok((Self { endpoint, selectors, trust: trust.clone() }, trust))
    }

    fn unreachable(&self, error: impl std::fmt::Display) -> IdentityError {
        IdentityError::Unreachable { addr: self.endpoint.clone(), reason: error.to_string() }
    }

    async fn open(&self, identity: &Identity) -> Result<SvidStream, IdentityError> {
        let client = DelegatedIdentityClient::connect_to(&self.endpoint).await.map_err(|e| self.unreachable(e))?;
        let request = DelegateAttestationRequest::for_selectors(self.selectors.for_identity(identity))
            .map_err(|e| IdentityError::Crypto(e.to_string()))?;
        let stream = client.stream_x509_svids(request).await.map_err(|e| refused_or_unreachable(self, identity, e))?;
        let (identity, trust) = (identity.clone(), self.trust.clone());
        let endpoint = self.endpoint.clone();
        Ok(Box::pin(stream.map(move |update| match update {
            Ok(svid) => to_svid(&identity, &trust, &svid).map(SvidUpdate::Issued),
            // An update that carries no SVID: the entry is gone.
            Err(DelegatedIdentityError::EmptyResponse) => Ok(SvidUpdate::Revoked(
                "SPIRE no longer issues an SVID for these selectors (the registration entry was deleted)".into(),
            )),
            Err(e) => Err(IdentityError::Unreachable { addr: endpoint.clone(), reason: e.to_string() }),
        })))
    }
}

fn refused_or_unreachable(
    provider: &SpireProvider,
    identity: &Identity,
    error: DelegatedIdentityError,
) -> IdentityError {
    let text = error.to_string();
    match text.contains("PermissionDenied") || text.contains("permission denied") {
        true => IdentityError::Refused {
            identity: identity.to_string(),
            reason: format!("{text}; the SPIRE agent must list this agent's SPIFFE ID in authorized_delegates"),
        },
        false => provider.unreachable(text),
    }
}

/// Checks an SVID SPIRE pushed, as any issued one: the identity asked for,
/// the SPIFFE rules, and a chain to this trust domain's bundle.
fn to_svid(identity: &Identity, trust: &TrustStore, svid: &spiffe::X509Svid) -> Result<Svid, IdentityError> {
    let invalid = |reason: String| IdentityError::InvalidSvid { identity: identity.to_string(), reason };
    let chain: Vec<CertificateDer<'static>> =
        svid.cert_chain().iter().map(|c| CertificateDer::from(c.as_bytes().to_vec())).collect();
    if svid.spiffe_id().to_string() != identity.to_string() {
        return Err(invalid(format!("SPIRE issued {} for these selectors", svid.spiffe_id())));
    }
    tls::verify_issued(&trust.local(), &chain).map_err(invalid)?;
    let key = PrivateKeyDer::Pkcs8(svid.private_key().as_bytes().to_vec().into());
    Svid::from_chain(identity, chain, key, trust.trust_domain()).map_err(invalid)
}

impl IdentityProvider for SpireProvider {
    fn fetch<'a>(&'a self, identity: &'a Identity) -> ProviderFuture<'a> {
        Box::pin(async move {
            let mut stream = self.open(identity).await?;
            match stream.next().await {
                Some(Ok(SvidUpdate::Issued(svid))) => Ok(svid),
                Some(Ok(SvidUpdate::Revoked(reason))) => {
                    Err(IdentityError::Refused { identity: identity.to_string(), reason })
                }
                Some(Err(e)) => Err(e),
                None => Err(self.unreachable("the subscription ended")),
            }
        })
    }

    fn subscribe<'a>(&'a self, identity: &'a Identity) -> Option<crate::SubscribeFuture<'a>> {
        Some(Box::pin(self.open(identity)))
    }
}

/// Keeps `trust` as SPIRE's bundle subscription says: this trust domain's
/// roots, and the bundles of the trust domains SPIRE federates with (those
/// it stops sending are dropped).
pub async fn follow_bundles(provider: std::sync::Arc<SpireProvider>) {
    let trust = provider.trust.clone();
    let mut federated: BTreeSet<String> = BTreeSet::new();
    let mut retry = BUNDLE_RETRY.0;
    loop {
        let stream = async {
            let client = DelegatedIdentityClient::connect_to(&provider.endpoint).await?;
            client.stream_x509_bundles().await
        };
        match stream.await {
            Ok(mut stream) => {
                while let Some(update) = stream.next().await {
                    let set = match update {
                        Ok(set) => set,
                        Err(error) => {
                            tracing::warn!(%error, "SPIRE bundle update unusable; the bundles in use stay");
                            break;
                        }
                    };
                    retry = BUNDLE_RETRY.0;
                    let mut seen = BTreeSet::new();
                    for (_, bundle) in set.iter() {
                        let td = bundle.trust_domain().as_str().to_string();
                        match TrustBundle::new(&td, &tls::authorities(bundle)) {
                            Ok(next) if trust.bundle_for(&td).map_or(true, |b| b.roots() != next.roots()) => {
                                tracing::info!(trust_domain = %td, roots = next.roots().len(), "bundle from SPIRE");
                                trust.set(next);
                            }
                            Ok(_) => {}
                            Err(error) => tracing::error!(trust_domain = %td, %error, "SPIRE bundle unusable"),
                        }
                        seen.insert(td);
                    }
                    for gone in federated.difference(&seen) {
                        trust.remove_foreign(gone);
                        tracing::info!(trust_domain = %gone, "SPIRE no longer federates with it: its IDs are refused");
                    }
                    federated = seen;
                }
            }
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = retry.as_millis() as u64, "cannot reach SPIRE for bundles")
            }
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(BUNDLE_RETRY.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_templates_fill_in_the_identity_and_refuse_what_is_not_type_value() {
        let templates = SelectorTemplates::parse(&["k8s:ns:{namespace}".into(), "unix:uid:{service_account}".into()]);
        let selectors = templates.unwrap().for_identity(&Identity::new("td", "shop", "1000"));
        let pairs: Vec<(String, String)> = selectors
            .into_iter()
            .map(|s| match s {
                Selector::Generic(pair) => pair,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(pairs, [("k8s".into(), "ns:shop".into()), ("unix".into(), "uid:1000".into())]);
        for bad in ["k8s", ":ns:x", "k8s:"] {
            assert!(SelectorTemplates::parse(&[bad.into()]).unwrap_err().contains("give type:value"), "{bad}");
        }
        assert!(SelectorTemplates::parse(&[]).is_err());
    }
}
