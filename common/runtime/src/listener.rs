//! Accept loops that neither stop nor spin on transient errors.

use std::{net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};

/// The next connection on `listener` (named `name` in the log). Accept
/// errors such as EMFILE are transient: each is logged and retried after a
/// pause, so a listener neither stops nor spins.
pub async fn accept_next(listener: &TcpListener, name: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                tracing::warn!(listener = name, %error, "accept failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
