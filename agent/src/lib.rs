//! The ambit node agent: what only a node agent does. It loads and attaches
//! the kernel programs, enters pods' network namespaces, enrols the node's
//! ambient pods, runs their proxies and serves the admin endpoint. The mesh
//! logic it shares with the waypoint and the CLI lives in `common/`.
//! `main.rs` is the command line; docs/ARCHITECTURE.md walks the modules.
#![deny(unsafe_code)]

pub mod admin;
pub mod bpffs;
pub mod ca;
pub mod capture;
pub mod cni;
pub mod cni_install;
pub mod enrolment;
pub mod handoff;
pub mod kubernetes;
pub mod netns;
pub mod podscan;
pub mod probe;
pub mod proxy;
pub mod splice;
pub mod workload_api;
