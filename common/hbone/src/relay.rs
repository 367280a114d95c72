//! Bidirectional byte relays: between two TCP connections ([`relay`]), and
//! between a TCP connection and an HBONE stream ([`bridge`]).
//!
//! Each direction copies until its reader reaches end of stream, then shuts
//! down the other side's write half, so a half-close travels through the
//! tunnel and the other direction keeps flowing. If either side fails (a reset
//! or another error), both sockets are closed with a reset, so the failure
//! reaches both peers instead of looking like a clean end of stream. Writes
//! are awaited before the next read: a slow reader slows the writer
//! (backpressure) and memory stays at one buffer per direction. When `stop`
//! resolves (access revoked), both sockets are reset.

use std::{
    future::{Future, poll_fn},
    io,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::READ_CHUNK;

/// Copy buffer per direction.
const BUFFER_SIZE: usize = 64 * 1024;

/// What a finished relay moved, and how it ended.
#[derive(Debug)]
pub struct RelayOutcome {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
    /// `None` when both directions reached end of stream.
    pub error: Option<io::Error>,
}

impl RelayOutcome {
    /// Whether the connection was cut because `stop` resolved.
    pub fn revoked(&self) -> bool {
        self.error.as_ref().is_some_and(|e| e.kind() == io::ErrorKind::PermissionDenied)
    }
}

/// The error a relay ends with when `stop` resolves with `reason`.
pub fn revoked(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, format!("access revoked: {reason}"))
}

pub async fn relay(mut a: TcpStream, mut b: TcpStream, stop: impl Future<Output = String>) -> RelayOutcome {
    let (mut a_read, mut a_write) = a.split();
    let (mut b_read, mut b_write) = b.split();
    let mut a_to_b = 0u64;
    let mut b_to_a = 0u64;
    let forward = copy_then_shutdown(&mut a_read, &mut b_write, &mut a_to_b);
    let backward = copy_then_shutdown(&mut b_read, &mut a_write, &mut b_to_a);
    // try_join: the first error stops the other direction at once.
    let error = tokio::select! {
        result = async { tokio::try_join!(forward, backward) } => result.err(),
        reason = stop => Some(revoked(reason)),
    };
    if error.is_some() {
        reset(&a);
        reset(&b);
    }
    RelayOutcome { a_to_b, b_to_a, error }
}

/// One direction of [`relay`]: copies until `reader` ends, then shuts
/// down `writer`'s write half; `copied` counts as it goes.
pub async fn copy_then_shutdown<R, W>(reader: &mut R, writer: &mut W, copied: &mut u64) -> io::Result<()>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            // End of stream from this side: pass the half-close on.
            return writer.shutdown().await;
        }
        writer.write_all(&buf[..n]).await?;
        *copied += n as u64;
    }
}

/// Makes the coming close send RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Copies between a TCP connection and an HTTP/2 stream. `a_to_b` counts
/// TCP to stream, `b_to_a` stream to TCP. End of stream travels as a
/// half-close each way; an error on either side, or `stop` resolving,
/// resets both.
pub async fn bridge(
    mut tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    stop: impl Future<Output = String>,
) -> RelayOutcome {
    let (mut tcp_read, mut tcp_write) = tcp.split();
    let mut up = 0u64;
    let mut down = 0u64;
    let upstream = async {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buf.reserve(READ_CHUNK);
            if tcp_read.read_buf(&mut buf).await? == 0 {
                send.send_data(Bytes::new(), true).map_err(io::Error::other)?;
                return Ok::<_, io::Error>(());
            }
            let mut chunk = buf.split().freeze();
            up += chunk.len() as u64;
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(granted) => granted.map_err(io::Error::other)?,
                    None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed")),
                };
                if granted > 0 {
                    send.send_data(chunk.split_to(granted.min(chunk.len())), false).map_err(io::Error::other)?;
                }
            }
        }
    };
    let downstream = async {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(io::Error::other)?;
            tcp_write.write_all(&chunk).await?;
            down += chunk.len() as u64;
            let _ = recv.flow_control().release_capacity(chunk.len());
        }
        tcp_write.shutdown().await
    };
    let error = tokio::select! {
        result = async { tokio::try_join!(upstream, downstream) } => result.err(),
        reason = stop => Some(revoked(reason)),
    };
    if error.is_some() {
        reset(&tcp);
        send.send_reset(h2::Reason::CANCEL);
    }
    RelayOutcome { a_to_b: up, b_to_a: down, error }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A connected pair of real loopback sockets.
    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    #[tokio::test]
    async fn carries_every_byte_both_ways_and_half_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut app, tunnel_a) = pair(&listener).await;
        let (tunnel_b, mut peer) = pair(&listener).await;
        let relay = tokio::spawn(relay(tunnel_a, tunnel_b, std::future::pending()));

        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            app.write_all(&sent).await.unwrap();
            app.shutdown().await.unwrap(); // half-close: the reply must still arrive
            let mut reply = Vec::new();
            app.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut received = Vec::new();
        peer.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, payload);
        peer.write_all(b"done").await.unwrap();
        drop(peer);

        assert_eq!(writer.await.unwrap(), b"done");
        let outcome = relay.await.unwrap();
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!((outcome.a_to_b, outcome.b_to_a), (payload.len() as u64, 4));
    }

    #[tokio::test]
    async fn reset_on_one_side_resets_the_other() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut app, tunnel_a) = pair(&listener).await;
        let (tunnel_b, peer) = pair(&listener).await;
        let relay = tokio::spawn(relay(tunnel_a, tunnel_b, std::future::pending()));
        reset(&peer);
        drop(peer);
        let outcome = relay.await.unwrap();
        assert!(outcome.error.is_some());
        let mut buf = [0u8; 1];
        let err = app.read(&mut buf).await.expect_err("the app must see the reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn stop_resets_both_sides() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut app, tunnel_a) = pair(&listener).await;
        let (tunnel_b, mut peer) = pair(&listener).await;
        let outcome = relay(tunnel_a, tunnel_b, async { "policy changed".to_string() }).await;
        assert!(outcome.revoked(), "{:?}", outcome.error);
        for side in [&mut app, &mut peer] {
            let err = side.read(&mut [0u8; 1]).await.expect_err("each side sees the reset");
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        }
    }
}
