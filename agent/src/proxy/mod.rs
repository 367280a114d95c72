//! The per-pod proxies. Each enrolled pod has listeners inside its own netns:
//! [`outbound`] takes connections the pod's apps make, [`inbound`] takes
//! connections made to the pod. Both relay bytes with [`relay`].

pub mod inbound;
pub mod outbound;
pub mod relay;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use crate::{capture::OrigDstTable, netns::Netns, state::State};

/// Port of the outbound listener, on 127.0.0.1 and ::1 inside each pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the plaintext inbound listener, on each pod IP.
pub const INBOUND_PORT: u16 = 15006;
/// How long to wait for the destination to accept before failing the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every proxy task shares.
pub struct ProxyContext {
    pub orig_dst: OrigDstTable,
    pub state: watch::Receiver<Arc<State>>,
}

impl ProxyContext {
    fn workload_at(&self, ip: IpAddr) -> Option<String> {
        self.state.borrow().workload_at(ip).map(str::to_string)
    }
}

/// An enrolled pod, as its proxies see it.
pub struct PodContext {
    /// `namespace/name`.
    pub id: String,
    pub netns: Netns,
    pub netns_cookie: u64,
}

impl PodContext {
    /// Connects from inside the pod's netns, as the agent (marked socket).
    async fn connect(&self, dst: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let socket = self.netns.tcp_socket(dst)?;
        match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            )),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Outbound,
    Inbound,
}

/// One line per connection, when it ends.
struct ConnectionLog {
    direction: Direction,
    src_workload: Option<String>,
    src_addr: SocketAddr,
    dst_workload: Option<String>,
    dst_addr: SocketAddr,
    started: Instant,
}

impl ConnectionLog {
    /// `sent`: bytes from the source to the destination; `received`: back.
    fn finish(&self, sent: u64, received: u64, error: Option<&dyn std::fmt::Display>) {
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let direction = match self.direction {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        };
        let src_workload = self.src_workload.as_deref().unwrap_or("-");
        let dst_workload = self.dst_workload.as_deref().unwrap_or("-");
        match error {
            None => tracing::info!(
                target: "ambit::conn",
                direction,
                src_workload = src_workload,
                src_addr = %self.src_addr,
                dst_workload = dst_workload,
                dst_addr = %self.dst_addr,
                bytes_sent = sent,
                bytes_received = received,
                duration_ms,
                "connection closed"
            ),
            Some(error) => tracing::warn!(
                target: "ambit::conn",
                direction,
                src_workload = src_workload,
                src_addr = %self.src_addr,
                dst_workload = dst_workload,
                dst_addr = %self.dst_addr,
                bytes_sent = sent,
                bytes_received = received,
                duration_ms,
                error = %error,
                "connection failed"
            ),
        }
    }
}

/// Accept errors such as EMFILE are transient: wait a little and go on.
async fn accept_backoff(error: std::io::Error, pod: &str) {
    tracing::warn!(pod, %error, "accept failed; retrying");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
