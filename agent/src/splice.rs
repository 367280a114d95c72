//! The same-node fast path in the kernel: the agent's two sockets of a
//! same-node connection, the one it accepted from the client pod's app and
//! the one it delivered with to the server pod's app, are joined by
//! `ambit_splice` (an sk_skb stream verdict program), so their bytes stop
//! passing through user space. The apps' sockets are never touched.
//!
//! - **Joining.** Before any byte is read, both sockets get fixed buffers
//!   ([`SPLICE_BUFFER`]), become redirect targets, name each other in
//!   SPLICE_PEERS, and only then become sources, one direction at a time.
//!   Bytes already queued are forwarded behind nothing (the agent read
//!   none) once `SO_RCVLOWAT` is set, so the first bytes arrive in order.
//! - **Memory.** The kernel queues a forwarded skb on the target without a
//!   bound of its own, so the program counts what it forwarded, and this
//!   agent tells it what the receiving app's kernel has acknowledged
//!   (SPLICE_DELIVERED, when the program asks at half the budget). Past
//!   [`ambit_abi::SPLICE_BUDGET`] undelivered bytes, the program keeps
//!   the bytes on the source, where they count against its receive window,
//!   and hands the direction over: once everything forwarded is delivered,
//!   the agent relays it in user space ([`relay_rest`]). Bulk transfers to
//!   a reader slower than the kernel end up there; request/response
//!   traffic stays in the kernel.
//! - **Ends.** The agent learns of a half-close or an error from an epoll
//!   set of its own that asks for nothing else ([`Watcher`]), so forwarded
//!   data wakes no thread. A half-close is passed on once every byte before
//!   it has been acknowledged by the receiving app's kernel.
//! - **Revocation.** The connection's SPLICE_PEERS entries go first (the
//!   program drops what still arrives), then both sockets are reset.
//! - **Bytes** are counted from `TCP_INFO` of the two sockets at the end.
//!
//! When the kernel joins nothing (a socket already half-closed: sockmaps
//! take established sockets only), the connection is relayed in user space.

use std::{
    collections::HashMap as StdHashMap,
    io,
    net::{Shutdown, TcpStream as StdTcpStream},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ambit_abi::{SPLICE_RELAYED, SpliceEvent};
use ambit_hbone::relay::{self, RelayOutcome};
use aya::maps::{HashMap, MapData, MapError, RingBuf, SockHash};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::{net::TcpStream, sync::watch};

use crate::netns::{set_rcvlowat, socket_cookie, tcp_info};

/// Receive and send buffer of each joined socket (the kernel doubles it).
pub const SPLICE_BUFFER: usize = 256 * 1024;
/// BPF_NOEXIST: a cookie is never reused, but an entry is never replaced.
const NO_EXIST: u64 = 1;
/// What the watcher tells a direction, bits of one `u32`.
const ENDED: u32 = 1;
const FAILED: u32 = 2;
const RELAY: u32 = 4;
/// The watcher's epoll token for the events ring buffer (cookies start at 1).
const EVENTS_TOKEN: u64 = 0;

/// The fast path's maps, and the watcher of the sockets in them.
pub struct Splicer {
    maps: Arc<Mutex<SpliceMaps>>,
    watcher: Watcher,
}

pub struct SpliceMaps {
    pub sources: SockHash<MapData, u64>,
    pub targets: SockHash<MapData, u64>,
    pub peers: HashMap<MapData, u64, u64>,
    pub forwarded: HashMap<MapData, u64, u64>,
    pub delivered: HashMap<MapData, u64, u64>,
}

/// What a connection became.
pub enum Joined {
    /// Joined in the kernel.
    Spliced(Spliced),
    /// The kernel joined nothing: relay in user space.
    NotJoined(TcpStream, TcpStream, String),
}

impl Splicer {
    /// Takes the (unpinned) maps, and starts the watcher thread;
    /// `ambit_splice` is attached to the sources map by
    /// `Capture::splicer`.
    pub fn new(maps: SpliceMaps, events: RingBuf<MapData>) -> io::Result<Self> {
        let maps = Arc::new(Mutex::new(maps));
        let watcher = Watcher::start(events, maps.clone())?;
        Ok(Self { maps, watcher })
    }

    /// Joins `a` (accepted from the client's app) and `b` (connected to
    /// the server's app), neither read from yet. An error ends the
    /// connection (both sockets are reset): a socket could not leave the
    /// runtime, or the kernel took one direction and not the other, when
    /// undoing the first could lose bytes.
    pub fn join(self: &Arc<Self>, a: TcpStream, b: TcpStream) -> io::Result<Joined> {
        let (a, b) = (a.into_std()?, b.into_std()?);
        match self.try_join(&a, &b) {
            Ok(joining) => Ok(Joined::Spliced(Spliced { splicer: self.clone(), a, b, joining })),
            Err(JoinError::Nothing(why)) => {
                Ok(Joined::NotJoined(TcpStream::from_std(a)?, TcpStream::from_std(b)?, why))
            }
            Err(JoinError::Half(why)) => {
                for socket in [&a, &b] {
                    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
                }
                Err(io::Error::other(why))
            }
        }
    }

    fn try_join(&self, a: &StdTcpStream, b: &StdTcpStream) -> Result<Joining, JoinError> {
        let cookies = [socket_cookie(a), socket_cookie(b)];
        let [Ok(ca), Ok(cb)] = cookies else {
            return Err(JoinError::Nothing("cannot read the sockets' cookies".into()));
        };
        // Before the program sends anything: what each socket's counter of
        // acknowledged bytes already holds (an active opener's SYN).
        let acked = |s: &StdTcpStream| tcp_info(s).map(|info| info.tcpi_bytes_acked);
        let (Ok(a_acked), Ok(b_acked)) = (acked(a), acked(b)) else {
            return Err(JoinError::Nothing("cannot read TCP_INFO".into()));
        };
        for socket in [a, b] {
            let socket = socket2::SockRef::from(socket);
            let sized =
                socket.set_recv_buffer_size(SPLICE_BUFFER).and_then(|()| socket.set_send_buffer_size(SPLICE_BUFFER));
            sized.map_err(|e| JoinError::Nothing(format!("socket buffers: {e}")))?;
        }
        // Watched before the program can ask anything about them.
        let watched = self
            .watcher
            .watch(a, ca, (b, b_acked))
            .and_then(|a_events| Ok((a_events, self.watcher.watch(b, cb, (a, a_acked))?)));
        let events = match watched {
            Ok(events) => events,
            Err(e) => {
                self.watcher.unwatch(a, ca);
                return Err(JoinError::Nothing(format!("cannot watch the sockets: {e}")));
            }
        };
        let mut maps = self.maps.lock().expect("splice maps lock");
        let mut entries = || -> Result<(), MapError> {
            maps.targets.insert(ca, a.as_raw_fd(), NO_EXIST)?;
            maps.targets.insert(cb, b.as_raw_fd(), NO_EXIST)?;
            for (source, target) in [(ca, cb), (cb, ca)] {
                maps.peers.insert(source, target, NO_EXIST)?;
                maps.forwarded.insert(source, 0, NO_EXIST)?;
                maps.delivered.insert(source, 0, NO_EXIST)?;
            }
            // Sources last: from here on the program forwards.
            maps.sources.insert(ca, a.as_raw_fd(), NO_EXIST)
        };
        let joined = match entries() {
            Err(e) => Err(JoinError::Nothing(format!("the kernel did not take the sockets: {e}"))),
            Ok(()) => maps
                .sources
                .insert(cb, b.as_raw_fd(), NO_EXIST)
                .map_err(|e| JoinError::Half(format!("the kernel joined one direction and not the other: {e}"))),
        };
        if let Err(e) = joined {
            maps.forget(ca, cb);
            drop(maps);
            self.watcher.unwatch(a, ca);
            self.watcher.unwatch(b, cb);
            return Err(e);
        }
        drop(maps);
        // Forwards what arrived before the program was there.
        for socket in [a, b] {
            let _ = set_rcvlowat(socket, 1);
        }
        Ok(Joining { cookies: (ca, cb), acked_before: (a_acked, b_acked), events })
    }

    /// Bytes the program forwarded from `source`.
    fn forwarded(&self, source: u64) -> (u64, bool) {
        let maps = self.maps.lock().expect("splice maps lock");
        let state = maps.forwarded.get(&source, 0).unwrap_or(0);
        (state & !SPLICE_RELAYED, state & SPLICE_RELAYED != 0)
    }
}

impl SpliceMaps {
    /// A connection not joined after all: every entry goes.
    fn forget(&mut self, ca: u64, cb: u64) {
        for cookie in [ca, cb] {
            let _ = self.sources.remove(&cookie);
            let _ = self.targets.remove(&cookie);
        }
        self.forget_counts(ca, cb);
    }

    /// A connection that ended: its sockets left the sockmaps as they
    /// closed; its other entries go.
    fn forget_counts(&mut self, ca: u64, cb: u64) {
        for cookie in [ca, cb] {
            let _ = self.peers.remove(&cookie);
            let _ = self.forwarded.remove(&cookie);
            let _ = self.delivered.remove(&cookie);
        }
    }
}

enum JoinError {
    /// Nothing was joined: the connection can be relayed in user space.
    Nothing(String),
    /// One direction was joined and not the other.
    Half(String),
}

/// A joined connection, until [`Spliced::run`] ends it.
pub struct Spliced {
    splicer: Arc<Splicer>,
    a: StdTcpStream,
    b: StdTcpStream,
    joining: Joining,
}

struct Joining {
    cookies: (u64, u64),
    /// Each socket's `tcpi_bytes_acked` when it was joined.
    acked_before: (u64, u64),
    /// What the watcher says of each source.
    events: (watch::Receiver<u32>, watch::Receiver<u32>),
}

/// One direction: from `source` (cookie) to `target`, whose count of
/// acknowledged bytes was `acked_before` when joined.
struct Way<'a> {
    splicer: &'a Splicer,
    source: &'a StdTcpStream,
    cookie: u64,
    target: &'a StdTcpStream,
    acked_before: u64,
    /// Set once the source's FIN has arrived (the kernel counts it as a byte).
    fin: AtomicBool,
    /// Set when the program handed the direction over to the agent.
    relayed: AtomicBool,
}

impl Spliced {
    /// Runs until both directions have ended, either socket fails, or
    /// `stop` resolves (access revoked); then both sockets are reset. Also
    /// says whether a direction was handed over to user space.
    pub async fn run(self, stop: impl std::future::Future<Output = String>) -> (RelayOutcome, bool) {
        let Spliced { splicer, a, b, joining } = self;
        let Joining { cookies: (ca, cb), acked_before: (a_acked, b_acked), events: (a_events, b_events) } = joining;
        let way = |source, cookie, target, acked_before| Way {
            splicer: &splicer,
            source,
            cookie,
            target,
            acked_before,
            fin: false.into(),
            relayed: false.into(),
        };
        let (forward, backward) = (way(&a, ca, &b, b_acked), way(&b, cb, &a, a_acked));
        let (a_failure, b_failure) = (failure(&a, a_events.clone()), failure(&b, b_events.clone()));
        let error = tokio::select! {
            result = async { tokio::try_join!(forward.run(a_events), backward.run(b_events)) } => result.err(),
            // A socket's error ends the connection even after its own
            // direction is done: the program can no longer deliver to it.
            e = a_failure => Some(e),
            e = b_failure => Some(e),
            reason = stop => Some(relay::revoked(reason)),
        };
        {
            let mut maps = splicer.maps.lock().expect("splice maps lock");
            // The peers first: nothing more is forwarded from here on.
            let _ = maps.peers.remove(&ca);
            let _ = maps.peers.remove(&cb);
        }
        splicer.watcher.unwatch(&a, ca);
        splicer.watcher.unwatch(&b, cb);
        let (a_to_b, b_to_a) = (forward.received(), backward.received());
        let relayed = forward.relayed.load(Ordering::Relaxed) || backward.relayed.load(Ordering::Relaxed);
        if error.is_some() {
            for socket in [&a, &b] {
                let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
            }
        }
        // Closing takes the sockets out of the sockmaps.
        drop((a, b));
        splicer.maps.lock().expect("splice maps lock").forget_counts(ca, cb);
        (RelayOutcome { a_to_b, b_to_a, error }, relayed)
    }
}

impl Way<'_> {
    /// Until the source's end has reached the target, or an error.
    async fn run(&self, mut events: watch::Receiver<u32>) -> io::Result<()> {
        let seen = *events.wait_for(|e| *e != 0).await.map_err(|_| gone())?;
        if seen & FAILED != 0 {
            return Err(socket_error(self.source));
        }
        if seen & RELAY == 0 {
            // The source's FIN arrived (no error). The program may still
            // hand the direction over while its last bytes go through.
            self.fin.store(true, Ordering::Relaxed);
            if self.delivered().await? {
                return self.target.shutdown(Shutdown::Write);
            }
        }
        self.relay_rest().await
    }

    /// Polls `done` (no event says when the target's kernel acknowledges),
    /// backing off to 100 ms, until it answers or the target fails.
    async fn poll<T>(&self, mut done: impl FnMut() -> io::Result<Option<T>>) -> io::Result<T> {
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(answer) = done()? {
                return Ok(answer);
            }
            if let Some(e) = self.target.take_error()? {
                return Err(e);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Data bytes the source received (`tcpi_bytes_received` counts a FIN).
    fn received(&self) -> u64 {
        let fin = u64::from(self.fin.load(Ordering::Relaxed));
        tcp_info(self.source).map_or(0, |info| info.tcpi_bytes_received - fin)
    }

    /// Bytes of the target's acknowledged since it was joined.
    fn acked(&self) -> io::Result<u64> {
        Ok(tcp_info(self.target)?.tcpi_bytes_acked - self.acked_before)
    }

    /// After the FIN: waits until the receiving app's kernel has
    /// acknowledged every byte the source received, so the half-close may
    /// follow them. False if the program handed the direction over instead.
    async fn delivered(&self) -> io::Result<bool> {
        self.poll(|| {
            if self.acked()? >= self.received() {
                return Ok(Some(true));
            }
            Ok(self.splicer.forwarded(self.cookie).1.then_some(false))
        })
        .await
    }

    /// The program handed this direction over: once every forwarded byte
    /// is delivered (so none can be overtaken), copies the rest, which the
    /// program left on the source, to its end, and passes the half-close on.
    async fn relay_rest(&self) -> io::Result<()> {
        self.relayed.store(true, Ordering::Relaxed);
        let (forwarded, _) = self.splicer.forwarded(self.cookie);
        self.poll(|| Ok((self.acked()? >= forwarded).then_some(()))).await?;
        let mut source = TcpStream::from_std(self.source.try_clone()?)?;
        let mut target = TcpStream::from_std(self.target.try_clone()?)?;
        relay::copy_then_shutdown(&mut source, &mut target, &mut 0).await?;
        // The FIN counted in `tcpi_bytes_received` has arrived.
        self.fin.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// Resolves with the error once the watcher says `socket` failed.
async fn failure(socket: &StdTcpStream, mut events: watch::Receiver<u32>) -> io::Error {
    if events.wait_for(|e| e & FAILED != 0).await.is_err() {
        return gone();
    }
    socket_error(socket)
}

/// The error a failed socket holds (a reset if it says none).
fn socket_error(socket: &StdTcpStream) -> io::Error {
    socket.take_error().ok().flatten().unwrap_or_else(|| io::ErrorKind::ConnectionReset.into())
}

fn gone() -> io::Error {
    io::Error::other("the splice watcher stopped")
}

/// One thread on an epoll set for joined sockets that asks only for
/// half-close, hang-up and error, so forwarded data wakes nothing, and for
/// the program's requests (SPLICE_EVENTS); it answers those about delivery
/// itself and tells each direction's task the rest.
struct Watcher {
    epoll: Arc<Epoll>,
    watched: Arc<Mutex<StdHashMap<u64, Watched>>>,
}

/// A source socket being watched.
struct Watched {
    events: watch::Sender<u32>,
    /// A duplicate of its target, whose TCP_INFO says what was delivered.
    target: OwnedFd,
    acked_before: u64,
}

impl Watcher {
    fn start(mut events: RingBuf<MapData>, maps: Arc<Mutex<SpliceMaps>>) -> io::Result<Self> {
        let epoll = Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
        epoll.add(events.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, EVENTS_TOKEN))?;
        let watched: Arc<Mutex<StdHashMap<u64, Watched>>> = Arc::default();
        let (thread_epoll, thread_watched) = (epoll.clone(), watched.clone());
        let spawned = std::thread::Builder::new().name("ambit-splice".into()).spawn(move || {
            let mut ready = vec![EpollEvent::empty(); 64];
            loop {
                let n = match thread_epoll.wait(&mut ready, EpollTimeout::NONE) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(error) => {
                        return tracing::error!(%error, "the splice watcher failed; joined connections no longer see their ends");
                    }
                };
                let watched = thread_watched.lock().expect("splice watcher lock");
                for event in &ready[..n] {
                    if event.data() == EVENTS_TOKEN {
                        answer(&mut events, &watched, &maps);
                        continue;
                    }
                    let Some(entry) = watched.get(&event.data()) else { continue };
                    let flags = event.events();
                    let seen = if flags.contains(EpollFlags::EPOLLERR) { FAILED } else { ENDED };
                    entry.events.send_modify(|e| *e |= seen);
                }
            }
        });
        spawned?;
        Ok(Self { epoll, watched })
    }

    /// Watches `source`, whose bytes go to `target` (with its count of
    /// acknowledged bytes when joined).
    fn watch(
        &self,
        source: &StdTcpStream,
        cookie: u64,
        (target, acked_before): (&StdTcpStream, u64),
    ) -> io::Result<watch::Receiver<u32>> {
        let (sender, receiver) = watch::channel(0);
        let target = target.as_fd().try_clone_to_owned()?;
        let entry = Watched { events: sender, target, acked_before };
        self.watched.lock().expect("splice watcher lock").insert(cookie, entry);
        // Edge-triggered: each change is said once; an end already there is
        // said at once.
        let interest = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        self.epoll.add(source, EpollEvent::new(interest, cookie)).map_err(io::Error::from)?;
        Ok(receiver)
    }

    fn unwatch(&self, socket: &StdTcpStream, cookie: u64) {
        let _ = self.epoll.delete(socket);
        self.watched.lock().expect("splice watcher lock").remove(&cookie);
    }
}

/// Answers the program's requests: what a target has delivered goes into
/// SPLICE_DELIVERED; a direction handed over is told to its task.
fn answer(events: &mut RingBuf<MapData>, watched: &StdHashMap<u64, Watched>, maps: &Mutex<SpliceMaps>) {
    while let Some(item) = events.next() {
        let word = |i: usize| item.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(u64::from_ne_bytes);
        let (Some(source), Some(kind)) = (word(0), word(1)) else { continue };
        let event = SpliceEvent { source, kind };
        let Some(entry) = watched.get(&event.source) else { continue };
        match event.kind {
            SpliceEvent::RELAY => entry.events.send_modify(|e| *e |= RELAY),
            SpliceEvent::DELIVERED => {
                if let Ok(info) = tcp_info(&entry.target) {
                    let delivered = info.tcpi_bytes_acked - entry.acked_before;
                    let _ = maps.lock().expect("splice maps lock").delivered.insert(event.source, delivered, 0);
                }
            }
            _ => {}
        }
    }
}
