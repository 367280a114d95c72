//! Logging for the agent, the waypoint and the CA: text or one JSON object per line,
//! on stderr, filtered by `AMBIT_LOG` (default `info`).

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AMBIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}

/// Rate limit for warnings an unauthenticated peer can trigger at will (a
/// refused plaintext connection, a failed handshake): one line per source
/// address and reason per [`WARN_INTERVAL`]; the lines left out are counted
/// (`ambit_warnings_suppressed_total`, by `name`) and the next line that is
/// logged says how many it stands for. Bounded: at most [`WARN_SOURCES`]
/// source-and-reason pairs are remembered, and while that many are recent,
/// new ones are suppressed too.
pub struct WarnLimiter {
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    seen: std::sync::Mutex<HashMap<(IpAddr, u64), Seen>>,
}

/// How long one source and reason stays quiet after a logged line.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// How many source-and-reason pairs are remembered.
pub const WARN_SOURCES: usize = 4096;

struct Seen {
    logged_at: Instant,
    suppressed: u64,
}

impl WarnLimiter {
    pub fn new(metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        Self { metrics, seen: std::sync::Mutex::default() }
    }

    /// Whether to log a warning from `source` saying `reason` (`name`, its
    /// kind, labels the count): `Some(n)` to log it, standing for `n`
    /// suppressed before it; `None` to leave it out (it is counted).
    pub fn admit(&self, source: IpAddr, name: &str, reason: &str) -> Option<u64> {
        let now = Instant::now();
        let key = (source, hash(reason));
        let mut seen = self.seen.lock().expect("warn limiter lock");
        let admitted = match seen.get_mut(&key) {
            Some(entry) if now.duration_since(entry.logged_at) < WARN_INTERVAL => {
                entry.suppressed += 1;
                None
            }
            Some(entry) => Some(std::mem::replace(entry, Seen { logged_at: now, suppressed: 0 }).suppressed),
            None => {
                if seen.len() >= WARN_SOURCES {
                    seen.retain(|_, entry| now.duration_since(entry.logged_at) < WARN_INTERVAL);
                }
                (seen.len() < WARN_SOURCES).then(|| {
                    seen.insert(key, Seen { logged_at: now, suppressed: 0 });
                    0
                })
            }
        };
        if admitted.is_none() {
            self.metrics
                .warnings_suppressed
                .get_or_create(&crate::metrics::NameLabels { name: name.to_string() })
                .inc();
        }
        admitted
    }
}

fn hash(text: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_source_and_reason_per_interval() {
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let limiter = WarnLimiter::new(metrics.clone());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!(limiter.admit(a, "plaintext", "STRICT"), Some(0));
        for _ in 0..99 {
            assert_eq!(limiter.admit(a, "plaintext", "STRICT"), None);
        }
        assert_eq!(limiter.admit(a, "handshake", "expired"), Some(0), "another reason");
        assert_eq!(limiter.admit(b, "plaintext", "STRICT"), Some(0), "another source");
        assert!(metrics.encode().contains("ambit_warnings_suppressed_total{name=\"plaintext\"} 99"));
        // Many sources at once: memory stays bounded, the excess is counted.
        for i in 0..(WARN_SOURCES as u32 + 10) {
            limiter.admit(IpAddr::from(i.to_be_bytes()), "flood", "x");
        }
        assert!(limiter.seen.lock().unwrap().len() <= WARN_SOURCES);
    }
}
