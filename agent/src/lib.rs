//! The ambit node agent: eBPF capture, per-pod proxies, identity and mTLS.
//! `main.rs` is the command line; docs/ARCHITECTURE.md walks the modules.
#![deny(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod capture;
pub mod config;
pub mod enrolment;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod probe;
pub mod proxy;
pub mod state;
pub mod tls;
pub mod watch;
