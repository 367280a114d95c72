//! The CA's Kubernetes authorizer against the API server double: a table of
//! callers (agents, a waypoint, a workload; good, stale and foreign tokens)
//! and the identities they ask for.

use ambit_identity::{
    Identity,
    ca_server::{Authorizer, Refusal},
};
use ambit_kube::ca::{AUDIENCE, TokenReviewAuthorizer};
use ambit_testbed::apiserver::{ApiServer, TokenOwner};
use serde_json::json;

fn pod(namespace: &str, name: &str, service_account: &str, node: &str, phase: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node, "serviceAccountName": service_account, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": phase},
    })
}

/// How a case came out.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Issued,
    Unauthenticated,
    Forbidden,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_gets_exactly_what_it_may() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = ApiServer::start().unwrap();
    let uid = |object: serde_json::Value| object["metadata"]["uid"].as_str().unwrap().to_string();
    let agent_n1 = uid(api.put(pod("ambit-system", "agent-n1", "ambit-agent", "n1", "Running")).unwrap());
    api.put(pod("ambit-system", "agent-n2", "ambit-agent", "n2", "Running")).unwrap();
    let web = uid(api.put(pod("shop", "web-1", "web", "n1", "Running")).unwrap());
    api.put(pod("shop", "batch-1", "batch", "n1", "Succeeded")).unwrap();
    api.put(pod("shop", "api-1", "api", "n2", "Running")).unwrap();
    let waypoint = uid(api.put(pod("shop", "wp-1", "waypoint", "n1", "Running")).unwrap());
    let token = |name: &str, namespace: &str, account: &str, pod: &str, pod_uid: &str, audience: &str| {
        let owner = TokenOwner {
            namespace: namespace.into(),
            service_account: account.into(),
            pod_name: pod.into(),
            pod_uid: pod_uid.into(),
            audiences: vec![audience.into()],
        };
        api.add_token(name, owner);
    };
    token("agent", "ambit-system", "ambit-agent", "agent-n1", &agent_n1, AUDIENCE);
    token("agent-for-kubernetes", "ambit-system", "ambit-agent", "agent-n1", &agent_n1, "kubernetes");
    token("agent-of-a-replaced-pod", "ambit-system", "ambit-agent", "agent-n1", "an-older-uid", AUDIENCE);
    token("waypoint", "shop", "waypoint", "wp-1", &waypoint, AUDIENCE);
    token("workload", "shop", "web", "web-1", &web, AUDIENCE);

    let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    let authorizer = TokenReviewAuthorizer::new(client, "ambit-system", "ambit-agent");
    use Outcome::*;
    let cases = [
        ("agent", "n1", "shop/web", Issued, "a pod of its node"),
        ("agent", "n1", "shop/api", Forbidden, "api runs on n2 only"),
        ("agent", "n2", "shop/api", Forbidden, "the agent's pod runs on n1: it cannot speak for n2"),
        ("agent", "n1", "shop/batch", Forbidden, "a finished pod needs no identity"),
        ("agent-for-kubernetes", "n1", "shop/web", Unauthenticated, "a token for another audience"),
        ("forged", "n1", "shop/web", Unauthenticated, "a token the API server never issued"),
        ("agent-of-a-replaced-pod", "n1", "shop/web", Unauthenticated, "the pod behind the token is gone"),
        ("waypoint", "n1", "shop/waypoint", Issued, "a waypoint's own identity"),
        ("waypoint", "n1", "shop/web", Forbidden, "a waypoint may have only its own identity"),
        ("workload", "n1", "shop/api", Forbidden, "a workload's token is not the agent's"),
    ];
    for (token, node, wanted, expected, why) in cases {
        let (namespace, account) = wanted.split_once('/').unwrap();
        let identity = Identity::new("cluster.local", namespace, account);
        let outcome = match authorizer.authorize(node, token, &identity).await {
            Ok(()) => Issued,
            Err(Refusal::Unauthenticated(_)) => Unauthenticated,
            Err(Refusal::Forbidden(_)) => Forbidden,
        };
        assert_eq!(outcome, expected, "token {token} for {wanted} on {node}: {why}");
    }
}
