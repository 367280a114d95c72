//! Network namespaces: opening sockets inside a pod's netns.
//!
//! A socket belongs to the netns that was current when it was created and
//! keeps it for life. So the agent enters a pod's netns only for the
//! `socket()` call, on whatever thread it is on, and returns at once; the
//! socket is then driven by the shared tokio runtime like any other.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    sync::OnceLock,
};

use ambit_common::AGENT_SOCKET_MARK;
use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// The agent's own netns, recorded by [`record_agent_netns`] at start-up.
static AGENT_NETNS: OnceLock<File> = OnceLock::new();

/// Records the calling thread's netns as the one to return to. Call once,
/// from the main thread, before any pod is enrolled.
pub fn record_agent_netns() -> io::Result<()> {
    let file = File::open("/proc/thread-self/ns/net")?;
    let _ = AGENT_NETNS.set(file);
    Ok(())
}

/// A pod's network namespace, held open by file descriptor.
#[derive(Debug)]
pub struct Netns {
    file: File,
}

impl Netns {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self { file: File::open(path)? })
    }

    /// Runs `f` with the calling thread inside this netns.
    fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let home = AGENT_NETNS.get().expect("record_agent_netns runs at start-up");
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)?;
        let result = f();
        // A thread left in a pod's netns would open the agent's next sockets
        // there. That must never happen, so failing to return is fatal.
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("fatal: cannot return to the agent's network namespace: {e}");
            std::process::abort();
        }
        result
    }

    /// A TCP socket inside this netns, marked as the agent's own so the
    /// capture programs let it through, ready for tokio.
    pub fn tcp_socket(&self, peer: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
        let socket = self.run(|| Socket::new(Domain::for_address(peer), Type::STREAM, Some(Protocol::TCP)))?;
        socket.set_mark(AGENT_SOCKET_MARK)?;
        socket.set_nodelay(true)?;
        socket.set_nonblocking(true)?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }

    /// A listening socket inside this netns.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let socket = self.run(|| Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)))?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(socket.into())
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The cookie of the netns a socket lives in: the key of the ENROLLED map.
/// Needs SO_NETNS_COOKIE (Linux 5.14).
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a live u64,
    // and updates `len`; the fd is borrowed for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
