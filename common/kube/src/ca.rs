//! Who may have which identity, in a cluster: the CA's [`Authorizer`] for
//! Kubernetes mode.
//!
//! A caller presents the service-account token projected into its pod
//! (audience [`AUDIENCE`], short-lived). The CA asks the API server to
//! review it (TokenReview), then requires:
//! - a token bound to a pod (its extras name the pod and its uid), whose pod
//!   still exists with that uid on the node the caller speaks for;
//! - for the node agent's service account: a pod that runs as the requested
//!   identity on that node and has not finished;
//! - for any other service account (a waypoint, say): the requested
//!   identity is the caller's own.
//!
//! So a node's agent can obtain the identities of its own node's pods and
//! no others, and a waypoint only its own.

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use ambit_identity::{
    Identity,
    ca::{CertificateAuthority, pem},
    ca_server::{AuthorizeFuture, Authorizer, Refusal},
};
use anyhow::Context as _;
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenReview, TokenReviewSpec},
        core::v1::{ConfigMap, Namespace, Pod, Secret},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};

/// The audience agents and waypoints request their tokens for.
pub const AUDIENCE: &str = "ambit-ca";
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Checks callers' tokens with the API server.
pub struct TokenReviewAuthorizer {
    client: Client,
    /// `namespace/name` of the node agent's service account.
    agent: (String, String),
}

impl TokenReviewAuthorizer {
    /// `agent_namespace`/`agent_service_account`: the node agent's service
    /// account, the one allowed to speak for every pod of its node.
    pub fn new(client: Client, agent_namespace: &str, agent_service_account: &str) -> Self {
        Self { client, agent: (agent_namespace.to_string(), agent_service_account.to_string()) }
    }

    async fn check(&self, node: &str, token: &str, identity: &Identity) -> Result<(), Refusal> {
        let caller = self.review(token).await?;
        let pods = Api::<Pod>::namespaced(self.client.clone(), &caller.namespace);
        let unreachable = |e: kube::Error| Refusal::Unauthenticated(format!("cannot reach the API server: {e}"));
        let pod = pods.get_opt(&caller.pod_name).await.map_err(unreachable)?.ok_or_else(|| {
            Refusal::Unauthenticated(format!(
                "pod {}/{} that the token was issued to is gone",
                caller.namespace, caller.pod_name
            ))
        })?;
        if pod.metadata.uid.as_deref() != Some(caller.pod_uid.as_str()) {
            return Err(Refusal::Unauthenticated(format!(
                "pod {}/{} was replaced since the token was issued",
                caller.namespace, caller.pod_name
            )));
        }
        let caller_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or_default();
        if caller_node != node {
            return Err(Refusal::Forbidden(format!(
                "the caller, pod {}/{}, runs on node {caller_node:?}, not {node}",
                caller.namespace, caller.pod_name
            )));
        }
        let own = (identity.namespace.as_str(), identity.service_account.as_str())
            == (caller.namespace.as_str(), caller.service_account.as_str());
        if (caller.namespace.clone(), caller.service_account.clone()) != self.agent {
            if own {
                return Ok(());
            }
            return Err(Refusal::Forbidden(format!(
                "{}/{} may obtain only its own identity, not {identity}",
                caller.namespace, caller.service_account
            )));
        }
        let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let candidates = Api::<Pod>::namespaced(self.client.clone(), &identity.namespace)
            .list(&on_node)
            .await
            .map_err(unreachable)?;
        let runs_there = candidates.items.iter().any(|pod| {
            let spec = pod.spec.as_ref();
            let account = spec.and_then(|s| s.service_account_name.as_deref()).unwrap_or("default");
            let finished = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
            account == identity.service_account && !finished
        });
        if !runs_there {
            return Err(Refusal::Forbidden(format!("no running pod on node {node} runs as {identity}")));
        }
        Ok(())
    }

    /// The pod-bound service account behind `token`.
    async fn review(&self, token: &str) -> Result<Caller, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![AUDIENCE.to_string()]) },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unauthenticated(format!("cannot review the token with the API server: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(Refusal::Unauthenticated(format!("the token is not valid for audience {AUDIENCE}: {why}")));
        }
        if !status.audiences.unwrap_or_default().iter().any(|a| a == AUDIENCE) {
            return Err(Refusal::Unauthenticated(format!("the token was not issued for audience {AUDIENCE}")));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, service_account)) =
            username.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'))
        else {
            return Err(Refusal::Unauthenticated(format!("{username} is not a service account")));
        };
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|values| values.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (first(POD_NAME_EXTRA), first(POD_UID_EXTRA)) else {
            return Err(Refusal::Unauthenticated(
                "the token is not bound to a pod; project a service-account token into the pod".into(),
            ));
        };
        Ok(Caller { namespace: namespace.to_string(), service_account: service_account.to_string(), pod_name, pod_uid })
    }
}

/// A reviewed token's owner.
struct Caller {
    namespace: String,
    service_account: String,
    pod_name: String,
    pod_uid: String,
}

impl Authorizer for TokenReviewAuthorizer {
    fn authorize<'a>(&'a self, node: &'a str, token: &'a str, identity: &'a Identity) -> AuthorizeFuture<'a> {
        Box::pin(self.check(node, token, identity))
    }
}

/// The ConfigMap, in every namespace, that holds the mesh's root
/// certificate (key [`ROOT_CERT_KEY`]) for agents and waypoints to mount.
pub const ROOT_CERT_CONFIG_MAP: &str = "ambit-root-cert";
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// How often [`publish_root`] looks for namespaces without the root.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(30);

/// The CA whose root is kept in the Secret `secret` (namespace, name):
/// loaded from it, or created and stored in it when there is none. `dir`
/// (an empty, memory-backed directory) holds the files while the CA runs.
/// Two CAs starting at once agree: the second one's create is refused and
/// it loads the first one's root.
pub async fn load_root(
    client: &Client,
    (namespace, name): (&str, &str),
    dir: &Path,
    trust_domain: &str,
) -> anyhow::Result<CertificateAuthority> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    for _ in 0..2 {
        if let Some(secret) =
            secrets.get_opt(name).await.with_context(|| format!("read the CA's Secret {namespace}/{name}"))?
        {
            std::fs::create_dir_all(dir)?;
            for (file, ByteString(bytes)) in secret.data.unwrap_or_default() {
                if file.contains('/') {
                    anyhow::bail!("Secret {namespace}/{name}: key {file:?} is not a file name");
                }
                std::fs::write(dir.join(&file), bytes)
                    .with_context(|| format!("write {}", dir.join(&file).display()))?;
            }
            let ca = CertificateAuthority::load_or_create(dir, trust_domain)
                .with_context(|| format!("Secret {namespace}/{name} does not hold a usable root"))?;
            tracing::info!(secret = %format!("{namespace}/{name}"), "loaded the root from its Secret");
            return Ok(ca);
        }
        let fresh = tempfile_dir(dir)?;
        CertificateAuthority::load_or_create(&fresh, trust_domain)?;
        let mut data = BTreeMap::new();
        for entry in std::fs::read_dir(&fresh)? {
            let entry = entry?;
            data.insert(entry.file_name().to_string_lossy().into_owned(), ByteString(std::fs::read(entry.path())?));
        }
        std::fs::remove_dir_all(&fresh)?;
        let secret = Secret {
            metadata: ObjectMeta { name: Some(name.to_string()), ..Default::default() },
            data: Some(data),
            type_: Some("Opaque".to_string()),
            ..Default::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => tracing::info!(secret = %format!("{namespace}/{name}"), "stored a new root in its Secret"),
            // Another CA replica stored its root first: use that one.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => return Err(error).with_context(|| format!("create the CA's Secret {namespace}/{name}")),
        }
    }
    anyhow::bail!("the CA's Secret {namespace}/{name} was created and then could not be read back")
}

/// A new directory next to `dir` for a root being created.
fn tempfile_dir(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let fresh = dir.with_extension("new");
    let _ = std::fs::remove_dir_all(&fresh);
    std::fs::create_dir_all(&fresh).with_context(|| format!("create {}", fresh.display()))?;
    Ok(fresh)
}

/// Keeps the root certificate in a ConfigMap in every namespace, so that
/// agents and waypoints mount the trust anchor like any other file.
/// The roots are read again each round: a plug-in CA's root-cert.pem may
/// change (a root rotation), and every namespace follows.
pub async fn publish_root(client: Client, ca: Arc<CertificateAuthority>) {
    loop {
        let roots: String = ca.roots().iter().map(|root| pem("CERTIFICATE", root)).collect();
        let wanted = BTreeMap::from([(ROOT_CERT_KEY.to_string(), roots)]);
        if let Err(error) = publish_once(&client, &wanted).await {
            tracing::warn!(error = %format!("{error:#}"), "cannot publish the root certificate; retrying");
        }
        tokio::time::sleep(PUBLISH_INTERVAL).await;
    }
}

async fn publish_once(client: &Client, wanted: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let namespaces = Api::<Namespace>::all(client.clone()).list(&ListParams::default()).await?;
    let named = ListParams::default().fields(&format!("metadata.name={ROOT_CERT_CONFIG_MAP}"));
    let published = Api::<ConfigMap>::all(client.clone()).list(&named).await?;
    for namespace in namespaces.items.iter().filter_map(|ns| ns.metadata.name.as_deref()) {
        let current = published.items.iter().find(|cm| cm.metadata.namespace.as_deref() == Some(namespace));
        if current.is_some_and(|cm| cm.data.as_ref() == Some(wanted)) {
            continue;
        }
        let config_map = ConfigMap {
            metadata: ObjectMeta {
                name: Some(ROOT_CERT_CONFIG_MAP.to_string()),
                namespace: Some(namespace.to_string()),
                resource_version: current.and_then(|cm| cm.metadata.resource_version.clone()),
                ..Default::default()
            },
            data: Some(wanted.clone()),
            ..Default::default()
        };
        let config_maps = Api::<ConfigMap>::namespaced(client.clone(), namespace);
        match current {
            None => config_maps.create(&PostParams::default(), &config_map).await.map(drop),
            Some(_) => config_maps.replace(ROOT_CERT_CONFIG_MAP, &PostParams::default(), &config_map).await.map(drop),
        }
        .with_context(|| format!("ConfigMap {namespace}/{ROOT_CERT_CONFIG_MAP}"))?;
    }
    Ok(())
}
