//! Upstream HTTP to a service's endpoints: a pooled hyper client whose
//! connections are HBONE streams to each endpoint's node tunnel, opened as
//! the waypoint's own identity and requiring the endpoint's.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use ambit_hbone::{Dialer, HBONE_PORT, HbonePool, HboneTarget, StreamGuard};
use ambit_identity::{Svid, tls::TrustStore};
use http::Uri;
use hyper_util::{
    client::legacy::connect::{Connected, Connection},
    rt::TokioIo,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::watch,
};

use crate::{View, io::StreamIo};

/// What opening an upstream stream needs.
pub struct Dial {
    /// The waypoint's own address, sent as `forwarded: for=`: pooled
    /// connections carry many clients' requests.
    pub ip: IpAddr,
    pub svid: watch::Receiver<Option<Arc<Svid>>>,
    pub trust: TrustStore,
    pub view: watch::Receiver<Arc<View>>,
    pub pool: HbonePool,
}

/// The waypoint dials from its own network namespace.
struct Host;

impl Dialer for Host {
    fn origin(&self) -> &str {
        "waypoint"
    }

    async fn dial(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        let tcp = TcpStream::connect(dst).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects `http://<endpoint ip>:<port>` URIs over HBONE.
#[derive(Clone)]
pub struct HboneConnector(pub Arc<Dial>);

impl tower_service::Service<Uri> for HboneConnector {
    type Response = TokioIo<Upstream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dial = self.0.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri.authority().ok_or("the upstream URI has no authority")?.as_str().parse()?;
            let expected = dial
                .view
                .borrow()
                .state
                .identity_at(addr.ip())
                .ok_or_else(|| format!("{addr} is not a pod of the mesh"))?;
            let svid = dial.svid.borrow().clone().ok_or("the waypoint has no certificate yet")?;
            let target =
                HboneTarget { hbone: SocketAddr::new(addr.ip(), HBONE_PORT), expected, app: addr, source_ip: dial.ip };
            let stream = dial.pool.open(&Host, &svid, &dial.trust, &target).await?;
            Ok(TokioIo::new(Upstream { io: StreamIo::new(stream.send, stream.recv), _guard: stream.guard }))
        })
    }
}

/// An upstream HBONE stream, counted in the pool while it lives.
pub struct Upstream {
    io: StreamIo,
    _guard: StreamGuard,
}

impl Connection for Upstream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Upstream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
