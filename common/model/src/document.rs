//! What the parser of every kind shares: the error type, the metadata
//! block, and typed deserialization that names the failing field.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_yaml_ng::Value;

/// What went wrong with a configuration file. Each variant names the file and,
/// where there is one, the object and field, and says how to fix it.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{file}: cannot read the file: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: document {doc}: not valid YAML: {reason}")]
    Yaml { file: PathBuf, doc: usize, reason: String },
    #[error("{file}: document {doc}: missing `kind`; every object needs `apiVersion` and `kind` (e.g. Namespace, Pod)")]
    MissingKind { file: PathBuf, doc: usize },
    #[error(
        "{file}: document {doc}: kind `{kind}` is not supported; use Namespace, Pod, Service, Gateway, PeerAuthentication, AuthorizationPolicy, RequestAuthentication or TrustDomainFederation"
    )]
    UnknownKind { file: PathBuf, doc: usize, kind: String },
    #[error("{file}: document {doc} ({object}): field `{field}`: {reason}")]
    Field { file: PathBuf, doc: usize, object: String, field: String, reason: String },
    #[error("{file}: {object} is also defined in {first}; remove one of the two (the one in {first} stays in force)")]
    Duplicate { file: PathBuf, object: String, first: PathBuf },
}

impl ConfigError {
    pub(crate) fn field(file: &Path, doc: usize, object: &str, field: &str, reason: impl Into<String>) -> Self {
        ConfigError::Field {
            file: file.to_path_buf(),
            doc,
            object: object.to_string(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawMetadata {
    pub(crate) name: String,
    pub(crate) namespace: Option<String>,
    /// Set by the API server; standalone files have none.
    #[serde(default)]
    pub(crate) uid: Option<String>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
}

pub(crate) fn deserialize<T: serde::de::DeserializeOwned>(
    file: &Path,
    doc: usize,
    object: &str,
    value: Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        ConfigError::field(file, doc, object, &field, e.into_inner().to_string())
    })
}
