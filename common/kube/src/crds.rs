//! The custom resources ambit enforces, in the `security.istio.io/v1`
//! schema Istio users already write: PeerAuthentication,
//! AuthorizationPolicy and RequestAuthentication. `cargo xtask crds` writes
//! their definitions to `deploy/crds/`; a cluster that runs Istio already
//! has them, and then ambit's copies are not installed. ambit's own
//! resource, TrustDomainFederation (`ambit.dev/v1alpha1`), goes to
//! `deploy/base/ambit-crds/`, installed in every case.
//!
//! Each spec keeps the fields it does not name
//! (`x-kubernetes-preserve-unknown-fields`): a field the API server pruned
//! silently could widen a policy, whereas one that reaches ambit is refused
//! by the model's parser, which names it.
//!
//! These types give the schema only; every object is read through the
//! model's parser (`ambit_model`), like a file's.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which workloads a policy applies to, by their labels.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    pub match_labels: Option<BTreeMap<String, String>>,
}

/// A Gateway (a waypoint) or Service a policy applies to.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct MutualTls {
    pub mode: Option<MtlsMode>,
}

/// Whether peers must present a certificate.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[kube(group = "security.istio.io", version = "v1", kind = "PeerAuthentication", namespaced)]
#[kube(doc = "Istio's PeerAuthentication, as ambit enforces it")]
#[kube(shortname = "pa")]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<MutualTls>,
    /// By port number.
    pub port_level_mtls: Option<BTreeMap<String, MutualTls>>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

/// The peer of a connection or the client of a request.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    pub principals: Option<Vec<String>>,
    pub not_principals: Option<Vec<String>>,
    pub request_principals: Option<Vec<String>>,
    pub not_request_principals: Option<Vec<String>>,
    pub namespaces: Option<Vec<String>>,
    pub not_namespaces: Option<Vec<String>>,
    pub service_accounts: Option<Vec<String>>,
    pub not_service_accounts: Option<Vec<String>>,
    pub ip_blocks: Option<Vec<String>>,
    pub not_ip_blocks: Option<Vec<String>>,
    pub remote_ip_blocks: Option<Vec<String>>,
    pub not_remote_ip_blocks: Option<Vec<String>>,
}

/// What a connection or request asks for.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    pub hosts: Option<Vec<String>>,
    pub not_hosts: Option<Vec<String>>,
    pub ports: Option<Vec<String>>,
    pub not_ports: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub not_methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub not_paths: Option<Vec<String>>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct From {
    pub source: Option<Source>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct To {
    pub operation: Option<Operation>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub key: String,
    pub values: Option<Vec<String>>,
    pub not_values: Option<Vec<String>>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct Rule {
    pub from: Option<Vec<From>>,
    pub to: Option<Vec<To>>,
    pub when: Option<Vec<Condition>>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct ExtensionProvider {
    pub name: Option<String>,
}

/// Who may call a workload, and what it may ask for.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[kube(group = "security.istio.io", version = "v1", kind = "AuthorizationPolicy", namespaced)]
#[kube(doc = "Istio's AuthorizationPolicy, as ambit enforces it")]
#[kube(shortname = "ap")]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    pub target_refs: Option<Vec<PolicyTargetReference>>,
    pub action: Option<Action>,
    pub provider: Option<ExtensionProvider>,
    pub rules: Option<Vec<Rule>>,
}

/// An issuer whose tokens a waypoint accepts.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Option<Vec<String>>,
    /// The key set, as JSON.
    pub jwks: Option<String>,
    /// An https:// URL of the key set.
    pub jwks_uri: Option<String>,
}

/// Which end-user tokens a waypoint accepts.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[kube(group = "security.istio.io", version = "v1", kind = "RequestAuthentication", namespaced)]
#[kube(doc = "Istio's RequestAuthentication, as ambit's waypoints enforce it")]
#[kube(shortname = "ra")]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct RequestAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    pub target_refs: Option<Vec<PolicyTargetReference>>,
    pub jwt_rules: Option<Vec<JwtRule>>,
}

/// How a bundle endpoint is authenticated.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub struct BundleEndpointProfile {
    /// `https_spiffe` or `https_web`.
    #[serde(rename = "type")]
    pub kind: String,
    /// https_spiffe: the endpoint's SPIFFE ID.
    #[serde(rename = "endpointSPIFFEID")]
    pub endpoint_spiffe_id: Option<String>,
    /// https_web: the PEM roots of the endpoint's certificate (else the system's).
    #[serde(rename = "caCertificates")]
    pub ca_certificates: Option<String>,
}

/// A trust domain federated with this mesh.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[kube(group = "ambit.dev", version = "v1alpha1", kind = "TrustDomainFederation")]
#[kube(doc = "A SPIFFE trust domain whose bundle ambit fetches from its bundle endpoint and trusts")]
#[kube(shortname = "tdf")]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct TrustDomainFederationSpec {
    pub trust_domain: String,
    #[serde(rename = "bundleEndpointURL")]
    pub bundle_endpoint_url: String,
    pub bundle_endpoint_profile: BundleEndpointProfile,
    /// The SPIFFE bundle (JSON) to start from; required with https_spiffe.
    pub trust_domain_bundle: Option<String>,
}

/// Every copy of Istio's definitions, with the file name `cargo xtask crds` gives it.
pub fn all() -> Vec<(String, CustomResourceDefinition)> {
    named([PeerAuthentication::crd(), AuthorizationPolicy::crd(), RequestAuthentication::crd()])
}

/// ambit's own definitions, installed with the base.
pub fn ambit_own() -> Vec<(String, CustomResourceDefinition)> {
    named([TrustDomainFederation::crd()])
}

fn named(crds: impl IntoIterator<Item = CustomResourceDefinition>) -> Vec<(String, CustomResourceDefinition)> {
    crds.into_iter().map(|crd| (format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default()), crd)).collect()
}

/// Where ambit's own definitions go, under `deploy/base/`.
pub const OWN_DIR: &str = "ambit-crds";

/// The file that lists the definitions for kustomize (`deploy/crds/`).
pub const KUSTOMIZATION: &str = "kustomization.yaml";

/// `deploy/crds/kustomization.yaml`: every definition, for `kubectl apply -k`.
pub fn kustomization() -> String {
    let mut files: Vec<String> = all().into_iter().map(|(file, _)| file).collect();
    files.sort();
    let resources: String = files.iter().map(|file| format!("  - {file}\n")).collect();
    format!(
        "# Generated by `cargo xtask crds`; do not edit.\n\
         # ambit's copies of Istio's security.istio.io/v1 CRDs. Install them only\n\
         # where Istio's are not installed: `kubectl get crd\n\
         # authorizationpolicies.security.istio.io` finds none.\n\
         apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n{resources}"
    )
}

/// A definition as the committed file holds it.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    let body = serde_yaml_ng::to_string(crd).expect("a definition serializes");
    format!("# Generated by `cargo xtask crds` from common/kube/src/crds.rs; do not edit.\n{body}")
}

#[cfg(test)]
mod tests {
    use std::{path::Path, process::Command};

    use super::*;

    fn deploy() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy"))
    }

    /// Every definition and the directory its file is committed in.
    fn committed() -> Vec<(std::path::PathBuf, CustomResourceDefinition)> {
        let istio = all().into_iter().map(|(file, crd)| (deploy().join("crds").join(file), crd));
        let own = ambit_own().into_iter().map(|(file, crd)| (deploy().join("base").join(OWN_DIR).join(file), crd));
        istio.chain(own).collect()
    }

    #[test]
    fn the_committed_definitions_are_current() {
        for (path, crd) in committed() {
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(committed == to_yaml(&crd), "{} differs from the types; run `cargo xtask crds`", path.display());
        }
        let path = deploy().join("crds").join(KUSTOMIZATION);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(committed == kustomization(), "{} differs; run `cargo xtask crds`", path.display());
    }

    /// What `kubectl apply` would send passes Kubernetes 1.33's own schema
    /// for CustomResourceDefinitions, unknown fields refused
    /// (kubernetes-validate bundles the schemas; `cargo xtask setup`
    /// installs it).
    #[test]
    fn the_definitions_pass_the_kubernetes_schema() {
        let files: Vec<_> = committed().into_iter().map(|(path, _)| path).collect();
        let output = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", "1.33.0"])
            .args(&files)
            .output()
            .expect("run kubernetes-validate (cargo xtask setup installs it)");
        assert!(
            output.status.success(),
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The examples the docs give validate against the definitions'
    /// schemas (with Python's jsonschema, which `cargo xtask setup`
    /// installs).
    #[test]
    fn the_examples_validate_against_the_definitions() {
        let schemas: BTreeMap<String, serde_json::Value> = committed()
            .into_iter()
            .map(|(_, crd)| {
                let version = &crd.spec.versions[0];
                let schema = version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("a schema");
                (crd.spec.names.kind.clone(), serde_json::to_value(schema).unwrap())
            })
            .collect();
        let examples = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/examples/policy/policies.yaml"));
        let mut checked = 0;
        for document in serde_yaml_ng::Deserializer::from_str(&std::fs::read_to_string(examples).unwrap()) {
            let object =
                serde_json::Value::deserialize(document).unwrap_or_else(|e| panic!("{}: {e}", examples.display()));
            let Some(schema) = object["kind"].as_str().and_then(|kind| schemas.get(kind)) else { continue };
            let script = "import json, sys, jsonschema\n\
                          schema, instance = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n\
                          jsonschema.validate(instance, schema)\n";
            let output = Command::new("python3")
                .args(["-c", script, &schema.to_string(), &object.to_string()])
                .output()
                .expect("run python3");
            assert!(
                output.status.success(),
                "{} ({}): {}",
                object["metadata"]["name"],
                object["kind"],
                String::from_utf8_lossy(&output.stderr)
            );
            checked += 1;
        }
        assert!(checked >= 3, "only {checked} examples checked");
    }
}
