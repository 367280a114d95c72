//! Objects the model rejects are reported on the object, as a Warning
//! Event that `kubectl describe` and `kubectl get events` show.
//!
//! Every agent sees the same objects and rejects the same ones, so the
//! Event's name is derived from the object's uid and resourceVersion: the
//! first agent creates it, and the others' creates are refused as already
//! existing. One Event per rejected version, however many nodes.

use ambit_model::ConfigError;
use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DynamicObject, PostParams},
};

use crate::Kind;

/// Where Events about cluster-scoped objects (Namespaces) go.
const CLUSTER_EVENTS_NAMESPACE: &str = "default";

/// An object the model rejected, and why.
pub(crate) struct Rejection {
    involved: ObjectReference,
    message: String,
}

impl Rejection {
    pub(crate) fn new(kind: &Kind, object: &DynamicObject, error: &ConfigError) -> Self {
        let api_version =
            if kind.group.is_empty() { kind.version.to_string() } else { format!("{}/{}", kind.group, kind.version) };
        let metadata = &object.metadata;
        Self {
            involved: ObjectReference {
                api_version: Some(api_version),
                kind: Some(kind.kind.to_string()),
                name: metadata.name.clone(),
                namespace: metadata.namespace.clone(),
                uid: metadata.uid.clone(),
                resource_version: metadata.resource_version.clone(),
                ..Default::default()
            },
            message: format!("ambit does not enforce this version; the last good one stays in force: {error}"),
        }
    }
}

/// Creates the Event for `rejection`; `reporter` names the agent.
pub(crate) async fn report(client: Client, rejection: Rejection, reporter: String) {
    let involved = rejection.involved;
    let namespace = involved.namespace.clone().unwrap_or_else(|| CLUSTER_EVENTS_NAMESPACE.to_string());
    let name = format!(
        "{}.ambit-{}-{}",
        involved.name.as_deref().unwrap_or_default(),
        involved.uid.as_deref().unwrap_or_default().split('-').next().unwrap_or_default(),
        involved.resource_version.as_deref().unwrap_or_default()
    );
    let now = Timestamp::now();
    let event = Event {
        metadata: ObjectMeta { name: Some(name.clone()), namespace: Some(namespace.clone()), ..Default::default() },
        involved_object: involved,
        reason: Some("Rejected".to_string()),
        message: Some(rejection.message),
        type_: Some("Warning".to_string()),
        source: Some(EventSource { component: Some("ambit".to_string()), host: None }),
        reporting_component: Some("ambit.dev/agent".to_string()),
        reporting_instance: Some(reporter),
        action: Some("Parse".to_string()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        count: Some(1),
        ..Default::default()
    };
    match Api::<Event>::namespaced(client, &namespace).create(&PostParams::default(), &event).await {
        Ok(_) => {}
        // Another agent reported this version first.
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => tracing::warn!(event = %name, %error, "cannot report a rejected object as an Event"),
    }
}
