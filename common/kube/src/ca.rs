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

use ambit_identity::{
    Identity,
    ca_server::{AuthorizeFuture, Authorizer, Refusal},
};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
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
