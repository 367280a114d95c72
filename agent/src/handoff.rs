//! Upgrades with no connection lost: a starting agent takes the pods'
//! listening sockets over from the running one, which then drains.
//!
//! The running agent answers on `<state dir>/handoff.sock`, a Unix
//! SOCK_SEQPACKET socket (one message per line below):
//!
//! ```text
//! new -> old  HANDOFF 1
//! old -> new  LISTENERS <n>      with n listening sockets (SCM_RIGHTS), repeated
//! old -> new  END
//!             (the new agent enrols the pods on those sockets and gets ready;
//!              both accept on them meanwhile, so no connection waits)
//! new -> old  TAKEOVER
//! old -> new  DRAINING           the old agent has stopped accepting
//! ```
//!
//! The sockets are the same kernel objects, so the kernel maps' entries stay
//! valid and no connect() or SYN in between is missed. The old agent then
//! sends GOAWAY on its HBONE connections and exits once its connections end
//! or the drain deadline passes. If the new agent goes away before
//! TAKEOVER, the old one carries on as before.

use std::{
    collections::HashMap,
    io::{self, IoSlice, IoSliceMut},
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use tokio::sync::{mpsc, oneshot};

use crate::netns::netns_cookie;

/// The socket's name in the state directory.
const SOCKET: &str = "handoff.sock";
const HELLO: &[u8] = b"HANDOFF 1";
const END: &[u8] = b"END";
const TAKEOVER: &[u8] = b"TAKEOVER";
const DRAINING: &[u8] = b"DRAINING";
/// Descriptors per message (the kernel takes at most 253).
const BATCH: usize = 200;
const MAX_MESSAGE: usize = 64;

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?)
}

fn send(conn: &OwnedFd, message: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    socket::sendmsg::<()>(conn.as_raw_fd(), &[IoSlice::new(message)], cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// The next message and the descriptors it carries; an empty message when
/// the peer has gone.
fn receive(conn: &OwnedFd) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; BATCH]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: SCM_RIGHTS installed these descriptors in this process
            // for this message; nothing else owns them.
            #[allow(unsafe_code)]
            fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let len = msg.bytes;
    Ok((buf[..len].to_vec(), fds))
}

/// The listening sockets a running agent handed over, by netns cookie and
/// address: the new agent takes each one when it enrols that pod.
#[derive(Default)]
pub struct Handed {
    listeners: HashMap<(u64, SocketAddr), TcpListener>,
}

impl Handed {
    fn new(fds: Vec<OwnedFd>) -> Self {
        let mut listeners = HashMap::new();
        for fd in fds {
            let listener = TcpListener::from(fd);
            match (netns_cookie(&listener), listener.local_addr()) {
                (Ok(cookie), Ok(addr)) => {
                    listeners.insert((cookie, addr), listener);
                }
                (Err(error), _) | (_, Err(error)) => tracing::warn!(%error, "a handed-over socket is unusable"),
            }
        }
        Self { listeners }
    }

    /// The handed-over listener of netns `cookie` on `addr`, if any.
    pub fn take(&mut self, cookie: u64, addr: SocketAddr) -> Option<TcpListener> {
        self.listeners.remove(&(cookie, addr))
    }

    pub fn len(&self) -> usize {
        self.listeners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }
}

/// The running agent, once it has handed its listeners over.
pub struct Predecessor {
    conn: OwnedFd,
}

/// Whether an agent runs with this state directory (it answers on the
/// handoff socket).
pub fn agent_running(state_dir: &Path) -> io::Result<bool> {
    Ok(connect(state_dir)?.is_some())
}

/// A connection to the running agent's handoff socket; `None` if none answers.
fn connect(state_dir: &Path) -> io::Result<Option<OwnedFd>> {
    let conn = seqpacket()?;
    match socket::connect(conn.as_raw_fd(), &UnixAddr::new(&socket_path(state_dir))?) {
        Ok(()) => Ok(Some(conn)),
        Err(nix::Error::ENOENT | nix::Error::ECONNREFUSED) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Asks the agent running with this state directory, if any, for its
/// listeners. `None` if no agent answers.
pub fn request(state_dir: &Path) -> io::Result<Option<(Handed, Predecessor)>> {
    let Some(conn) = connect(state_dir)? else { return Ok(None) };
    send(&conn, HELLO, &[])?;
    let mut fds = Vec::new();
    loop {
        let (message, received) = receive(&conn)?;
        fds.extend(received);
        match message.as_slice() {
            END => break,
            m if m.starts_with(b"LISTENERS ") => {}
            other => {
                return Err(io::Error::other(format!(
                    "the running agent answered {:?}; is it another version that cannot hand over?",
                    String::from_utf8_lossy(other)
                )));
            }
        }
    }
    Ok(Some((Handed::new(fds), Predecessor { conn })))
}

impl Predecessor {
    /// Tells the old agent to stop accepting, and waits until it has.
    pub fn take_over(self) -> io::Result<()> {
        send(&self.conn, TAKEOVER, &[])?;
        match receive(&self.conn)?.0.as_slice() {
            DRAINING => Ok(()),
            other => Err(io::Error::other(format!("the old agent answered {:?}", String::from_utf8_lossy(other)))),
        }
    }
}

/// What the handoff thread asks of the agent's main loop.
pub enum Request {
    /// Copies of every pod listener.
    Listeners(oneshot::Sender<Vec<OwnedFd>>),
    /// Stop accepting; answer once no accept loop runs.
    TakeOver(oneshot::Sender<()>),
}

/// Listens on the state directory's handoff socket (replacing a stale
/// one) and serves agents that come to take over, on a thread of its own.
pub fn serve(state_dir: &Path, requests: mpsc::Sender<Request>) -> io::Result<()> {
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = seqpacket()?;
    socket::bind(listener.as_raw_fd(), &UnixAddr::new(&path)?)?;
    socket::listen(&listener, Backlog::new(4)?)?;
    std::thread::Builder::new().name("handoff".into()).spawn(move || {
        loop {
            let conn = match socket::accept(listener.as_raw_fd()) {
                // SAFETY: accept returned a new descriptor that nothing else owns.
                #[allow(unsafe_code)]
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(error) => {
                    tracing::warn!(%error, "handoff socket: accept failed");
                    continue;
                }
            };
            match hand_over(&conn, &requests) {
                Ok(Outcome::TookOver) => return,
                Ok(Outcome::Probed) => {}
                Ok(Outcome::WentAway) => tracing::warn!("the new agent went away before taking over; carrying on"),
                Err(error) => tracing::warn!(%error, "handoff failed; carrying on"),
            }
        }
    })?;
    Ok(())
}

enum Outcome {
    TookOver,
    WentAway,
    /// Only a check that an agent runs ([`agent_running`]).
    Probed,
}

/// One handoff.
fn hand_over(conn: &OwnedFd, requests: &mpsc::Sender<Request>) -> io::Result<Outcome> {
    match receive(conn)?.0.as_slice() {
        HELLO => {}
        [] => return Ok(Outcome::Probed),
        _ => return Err(io::Error::other("not a handoff request")),
    }
    let gone = || io::Error::other("the agent is stopping");
    let (reply, listeners) = oneshot::channel();
    requests.blocking_send(Request::Listeners(reply)).map_err(|_| gone())?;
    let listeners = listeners.blocking_recv().map_err(|_| gone())?;
    tracing::info!(listeners = listeners.len(), "a new agent asks to take over; handing the listeners over");
    for batch in listeners.chunks(BATCH) {
        let fds: Vec<RawFd> = batch.iter().map(AsRawFd::as_raw_fd).collect();
        send(conn, format!("LISTENERS {}", fds.len()).as_bytes(), &fds)?;
    }
    send(conn, END, &[])?;
    drop(listeners);
    match receive(conn)?.0.as_slice() {
        TAKEOVER => {}
        [] => return Ok(Outcome::WentAway),
        other => return Err(io::Error::other(format!("unexpected {:?}", String::from_utf8_lossy(other)))),
    }
    let (done, stopped) = oneshot::channel();
    requests.blocking_send(Request::TakeOver(done)).map_err(|_| gone())?;
    stopped.blocking_recv().map_err(|_| gone())?;
    send(conn, DRAINING, &[])?;
    Ok(Outcome::TookOver)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole handoff between two ends in one process: the listeners
    /// arrive as the same sockets, and the old end stops answering after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listeners_are_handed_over_and_the_old_agent_stops_answering() {
        let dir = tempfile::tempdir().unwrap();
        let listeners: Vec<TcpListener> = (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let expected: Vec<(u64, SocketAddr)> =
            listeners.iter().map(|l| (netns_cookie(l).unwrap(), l.local_addr().unwrap())).collect();
        let (tx, mut rx) = mpsc::channel(1);
        serve(dir.path(), tx).unwrap();
        let old_agent = tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                match request {
                    Request::Listeners(reply) => {
                        let copies = listeners.iter().map(|l| OwnedFd::from(l.try_clone().unwrap())).collect();
                        reply.send(copies).unwrap();
                    }
                    Request::TakeOver(stopped) => return stopped.send(()).unwrap(),
                }
            }
        });
        assert!(agent_running(dir.path()).unwrap());

        let path = dir.path().to_path_buf();
        let (mut handed, predecessor) =
            tokio::task::spawn_blocking(move || request(&path)).await.unwrap().unwrap().expect("an agent answers");
        assert_eq!(handed.len(), 3);
        for (cookie, addr) in &expected {
            let listener = handed.take(*cookie, *addr).expect("the same socket");
            assert_eq!(listener.local_addr().unwrap(), *addr);
        }
        assert!(handed.is_empty());
        tokio::task::spawn_blocking(move || predecessor.take_over()).await.unwrap().unwrap();
        old_agent.await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!agent_running(dir.path()).unwrap(), "the handoff thread ends after a takeover");
    }

    #[test]
    fn nobody_answers_in_an_empty_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!agent_running(dir.path()).unwrap());
        assert!(request(dir.path()).unwrap().is_none());
    }
}
