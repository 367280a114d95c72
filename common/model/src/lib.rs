//! The object model: Namespace, Pod, Service, PeerAuthentication,
//! AuthorizationPolicy, RequestAuthentication and Gateway, in the schemas of
//! their Kubernetes resources, with their parsing and validation.
//!
//! Every configuration source (the standalone directory, the Kubernetes
//! API) produces these objects and nothing else, so one code path leads
//! from an object to its enforcement. The model does no I/O of its own (a
//! `RequestAuthentication`'s `file://` key set is the waypoint's to read).
//! It knows neither the state store nor the authorization engine.
//!
//! - [`objects`]: the workload objects and their labels;
//! - [`policy`]: AuthorizationPolicy and RequestAuthentication;
//! - [`parse`] / [`policy_parse`]: documents to objects, every error naming
//!   the file, the object and the field ([`document`] holds what they share);
//! - [`snapshot`]: every object in force at one moment.
#![forbid(unsafe_code)]

pub mod document;
pub mod objects;
pub mod parse;
pub mod policy;
pub mod policy_parse;
pub mod snapshot;

pub use document::ConfigError;
pub use objects::*;
pub use parse::{parse_documents, parse_file, parse_object};
pub use policy::*;
pub use snapshot::Snapshot;

/// Namespace whose selector-less PeerAuthentication and AuthorizationPolicy
/// apply mesh-wide (the counterpart of Istio's `istio-system` root
/// namespace).
pub const ROOT_NAMESPACE: &str = "ambit-system";
