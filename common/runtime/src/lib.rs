//! What every long-running ambit process sets up, whatever its role (node
//! agent, waypoint, CA): logging, the Prometheus registry, and listeners
//! that outlive transient accept errors.
#![forbid(unsafe_code)]

pub mod listener;
pub mod logging;
pub mod metrics;
