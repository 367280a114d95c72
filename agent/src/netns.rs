//! Network namespaces: opening sockets inside a pod's netns.
//!
//! A socket belongs to the netns that was current when it was created and
//! keeps it for life. So the agent enters a pod's netns only for the
//! `socket()` call, on whatever thread it is on, and returns at once; the
//! socket is then driven by the shared tokio runtime like any other.

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
};

use ambit_abi::{AGENT_SOCKET_MARK, DELIVERY_SOCKET_MARK};
use nix::sched::{CloneFlags, setns};
use rtnetlink::{
    RouteMessageBuilder, RuleAddRequest,
    packet_route::{
        route::{RouteMessage, RouteScope, RouteType},
        rule::RuleAction,
    },
};
use socket2::{Domain, Protocol, Socket, Type};

/// The routing table, and the priority of the rule that selects it, that
/// send a pod's packets on delivery connections back to the agent.
const DELIVERY_TABLE: u32 = 15006;
const DELIVERY_RULE_PRIORITY: u32 = 15006;
/// The loopback interface's index, the same in every netns.
const LOOPBACK_IFINDEX: u32 = 1;
/// The pod's sysctls that [`Netns::route_deliveries`] turns on
/// (`tcp_fwmark_accept` covers both families).
const DELIVERY_SYSCTLS: [&str; 2] = ["/proc/sys/net/ipv4/tcp_fwmark_accept", "/proc/sys/net/ipv4/fwmark_reflect"];
/// The same for IPv6 replies, where the pod has IPv6.
const DELIVERY_SYSCTL_V6: &str = "/proc/sys/net/ipv6/fwmark_reflect";

/// A pod set up by [`Netns::route_deliveries`]: what it changed, to undo
/// it, and the source ports for deliveries.
#[derive(Debug)]
pub struct DeliveryRouting {
    /// The values of [`DELIVERY_SYSCTLS`] before, in that order.
    sysctls: Vec<String>,
    /// The value of [`DELIVERY_SYSCTL_V6`] before, if IPv6 deliveries are
    /// routed too (the pod has IPv6).
    sysctl_v6: Option<String>,
    /// The pod's ephemeral port range, which its apps leave free.
    ports: RangeInclusive<u16>,
    next_port: AtomicU32,
}

impl DeliveryRouting {
    /// Whether deliveries from IPv6 clients' addresses are routed.
    pub fn routes_ipv6(&self) -> bool {
        self.sysctl_v6.is_some()
    }

    /// The next source port for a delivery: the pod's ephemeral range, in
    /// turn, so a tuple comes back only after the whole range was used.
    pub fn next_port(&self) -> u16 {
        let (first, last) = (u32::from(*self.ports.start()), u32::from(*self.ports.end()));
        (first + self.next_port.fetch_add(1, Ordering::Relaxed) % (last - first + 1)) as u16
    }

    /// After a port that was taken: moves well past it. Taken ports come in
    /// runs (after an upgrade, the previous agent's deliveries), which
    /// trying the next port, one by one, would not get out of.
    pub fn skip_run(&self) {
        /// A prime, so repeated skips visit the whole range.
        const SKIP: u32 = 1009;
        self.next_port.fetch_add(SKIP, Ordering::Relaxed);
    }
}

/// Parses `net.ipv4.ip_local_port_range` ("32768\t60999").
fn parse_port_range(text: &str) -> io::Result<RangeInclusive<u16>> {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next()) {
        (Some(Ok(first)), Some(Ok(last))) if first <= last => Ok(first..=last),
        _ => Err(io::Error::other(format!("unexpected net.ipv4.ip_local_port_range {text:?}"))),
    }
}

/// The rule that sends delivery-marked packets to [`DELIVERY_TABLE`], for
/// the family of `request` (`handle.rule().add().v4()` or `.v6()`).
fn delivery_rule<T>(request: RuleAddRequest<T>) -> RuleAddRequest<T> {
    request
        .fw_mark(DELIVERY_SOCKET_MARK)
        .table_id(DELIVERY_TABLE)
        .priority(DELIVERY_RULE_PRIORITY)
        .action(RuleAction::ToTable)
}

/// The route of [`DELIVERY_TABLE`] for the family of `any` (an unspecified
/// address): every address is local, on loopback.
fn delivery_route(any: IpAddr) -> RouteMessage {
    RouteMessageBuilder::<IpAddr>::new()
        .table_id(DELIVERY_TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .output_interface(LOOPBACK_IFINDEX)
        .destination_prefix(any, 0)
        .expect("a default route is a valid prefix")
        .build()
}

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

    /// Opens the netns a pod's configuration names, refusing the agent's
    /// own network namespace and init's (the host's): whoever writes the
    /// path must not be able to enrol the node itself as a pod.
    pub fn open_pod(path: &Path) -> io::Result<Self> {
        let netns = Self::open(path)?;
        let id = |file: &File| file.metadata().map(|m| (m.dev(), m.ino()));
        let own = AGENT_NETNS.get().map(id).transpose()?;
        let init = File::open("/proc/1/ns/net").and_then(|f| id(&f)).ok();
        let this = netns.id()?;
        if Some(this) == own || Some(this) == init {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "this is the node's own network namespace (the agent's or the host's), not a pod's",
            ));
        }
        Ok(netns)
    }

    /// Whether `path` still names this netns: false once the pod's
    /// runtime has deleted it (or put another one there).
    pub fn is_at(&self, path: &Path) -> bool {
        let at = std::fs::metadata(path).map(|m| (m.dev(), m.ino()));
        matches!((at, self.id()), (Ok(at), Ok(this)) if at == this)
    }

    /// The netns's identity: device and inode of its nsfs file.
    fn id(&self) -> io::Result<(u64, u64)> {
        self.file.metadata().map(|m| (m.dev(), m.ino()))
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
        let socket = self.agent_socket(Domain::for_address(peer), AGENT_SOCKET_MARK)?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }

    /// A non-blocking TCP socket inside this netns with `mark`, Nagle off.
    fn agent_socket(&self, domain: Domain, mark: u32) -> io::Result<Socket> {
        let socket = self.run(|| stream_socket(domain))?;
        socket.set_mark(mark)?;
        socket.set_nodelay(true)?;
        Ok(socket)
    }

    /// A socket for delivering a connection to an app in this pod from the
    /// client's address `from` (transparent, like the client itself had
    /// connected), so the app sees its real client and each client has its
    /// own tuples. Needs [`Netns::route_deliveries`].
    ///
    /// The caller picks the port ([`DeliveryRouting::next_port`]), so it is
    /// known before connect(). The agent closes first, so each delivery
    /// leaves a TIME_WAIT in the pod: `SO_REUSEADDR` lets the bind share a
    /// port with those, and binding to loopback lets connect() reuse a
    /// TIME_WAIT tuple (`tcp_tw_reuse`'s default covers loopback), as a
    /// client's own kernel would.
    pub fn delivery_socket(&self, from: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
        let socket = self.agent_socket(Domain::for_address(from), DELIVERY_SOCKET_MARK)?;
        if from.is_ipv4() {
            socket.set_ip_transparent(true)?;
        } else {
            socket.set_only_v6(true)?;
            set_ipv6_transparent(&socket)?;
        }
        socket.set_reuse_address(true)?;
        socket.bind_device(Some(b"lo"))?;
        socket.bind(&from.into())?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }

    /// Makes the pod's replies on delivery connections come back to the
    /// agent: accepted sockets take the mark of the SYN that opened them
    /// (`tcp_fwmark_accept`), resets and ICMP errors take the mark of the
    /// packet they answer (`fwmark_reflect`: a refused delivery must reach
    /// the agent as a reset), and packets with the delivery mark are routed
    /// to the pod's own loopback (a `local` default route in a table of
    /// their own), where the agent's transparent socket receives them.
    /// Only those packets are affected. [`Netns::unroute_deliveries`] undoes
    /// it with what this returns.
    pub async fn route_deliveries(&self) -> io::Result<DeliveryRouting> {
        let (sysctls, ports) = self.run(|| {
            let ports = parse_port_range(&std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?)?;
            let mut previous = Vec::new();
            for path in DELIVERY_SYSCTLS {
                previous.push(std::fs::read_to_string(path)?);
                std::fs::write(path, "1")?;
            }
            Ok((previous, ports))
        })?;
        // IPv6 where the pod has it: the sysctl exists, and so do the rule and route.
        let sysctl_v6 = self
            .run(|| {
                let previous = std::fs::read_to_string(DELIVERY_SYSCTL_V6)?;
                std::fs::write(DELIVERY_SYSCTL_V6, "1")?;
                Ok(previous)
            })
            .ok();
        // A random start: the agent before this one (an upgrade) used the
        // ports from the start of the range, and may still hold them.
        let mut start = [0u8; 4];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut start)
            .map_err(|_| io::Error::other("no randomness for the delivery ports"))?;
        let next_port = AtomicU32::new(u32::from_ne_bytes(start));
        let mut routing = DeliveryRouting { sysctls, sysctl_v6, ports, next_port };
        let added = self
            .netlink(|handle| async move {
                let rule = delivery_rule(handle.rule().add().v4()).execute().await;
                let route = handle.route().add(delivery_route(Ipv4Addr::UNSPECIFIED.into())).replace().execute().await;
                [rule, route]
            })
            .await?;
        for result in added {
            match result {
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                Err(e) => {
                    let _ = self.unroute_deliveries(&routing).await;
                    return Err(io::Error::other(e));
                }
                Ok(()) => {}
            }
        }
        if routing.sysctl_v6.is_some() {
            let added = self
                .netlink(|handle| async move {
                    let rule = delivery_rule(handle.rule().add().v6()).execute().await;
                    let route =
                        handle.route().add(delivery_route(Ipv6Addr::UNSPECIFIED.into())).replace().execute().await;
                    [rule, route]
                })
                .await?;
            let failed = added.into_iter().find_map(|result| match result {
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => None,
                other => other.err(),
            });
            if let Some(error) = failed {
                tracing::warn!(%error, "cannot route IPv6 deliveries in this pod; IPv6 clients are delivered from the pod's own address");
                let previous = routing.sysctl_v6.take();
                let _ = self.run(|| std::fs::write(DELIVERY_SYSCTL_V6, previous.unwrap_or_default()));
            }
        }
        Ok(routing)
    }

    /// Removes what [`Netns::route_deliveries`] added and restores the
    /// sysctls it changed. Parts already gone are fine.
    pub async fn unroute_deliveries(&self, routing: &DeliveryRouting) -> io::Result<()> {
        let ipv6 = routing.sysctl_v6.is_some();
        let removed = self
            .netlink(|handle| async move {
                let mut removed = Vec::new();
                for any in [IpAddr::from(Ipv4Addr::UNSPECIFIED), Ipv6Addr::UNSPECIFIED.into()] {
                    if any.is_ipv6() && !ipv6 {
                        continue;
                    }
                    let rule = handle.rule().add();
                    let message = if any.is_ipv4() {
                        delivery_rule(rule.v4()).message_mut().clone()
                    } else {
                        delivery_rule(rule.v6()).message_mut().clone()
                    };
                    removed.push(handle.rule().del(message).execute().await);
                    removed.push(handle.route().del(delivery_route(any)).execute().await);
                }
                removed
            })
            .await?;
        self.run(|| {
            for (path, value) in DELIVERY_SYSCTLS.iter().zip(&routing.sysctls) {
                std::fs::write(path, value)?;
            }
            if let Some(value) = &routing.sysctl_v6 {
                std::fs::write(DELIVERY_SYSCTL_V6, value)?;
            }
            Ok(())
        })?;
        for result in removed {
            match result {
                Err(rtnetlink::Error::NetlinkError(e)) if [-libc::ENOENT, -libc::ESRCH].contains(&e.raw_code()) => {}
                other => other.map_err(io::Error::other)?,
            }
        }
        Ok(())
    }

    /// Runs `f` with a route-netlink handle whose socket is in this netns.
    async fn netlink<F, T>(&self, f: impl FnOnce(rtnetlink::Handle) -> F) -> io::Result<T>
    where
        F: Future<Output = T>,
    {
        let (connection, handle, _) = self.run(rtnetlink::new_connection)?;
        let connection = tokio::spawn(connection);
        let result = f(handle).await;
        connection.abort();
        Ok(result)
    }

    /// The netns's cookie (the key of the ENROLLED map), read from a socket
    /// made in it for the purpose.
    pub fn cookie(&self) -> io::Result<u64> {
        let socket = self.run(|| Socket::new(Domain::UNIX, socket2::Type::DGRAM.cloexec(), None))?;
        netns_cookie(&socket)
    }

    /// A non-blocking listening socket inside this netns, not yet registered
    /// with a runtime: the proxy worker that accepts on it does that.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        let socket = self.run(|| stream_socket(Domain::for_address(addr)))?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    }

    /// Every address of this netns but loopback, link-local included.
    pub fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        let interfaces = self.run(|| nix::ifaddrs::getifaddrs().map_err(io::Error::from))?;
        let mut addresses: Vec<IpAddr> = interfaces
            .filter_map(|interface| {
                let address = interface.address?;
                let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                    (Some(v4), _) => IpAddr::from(v4.ip()),
                    (_, Some(v6)) => IpAddr::from(v6.ip()),
                    _ => return None,
                };
                (!ip.is_loopback()).then_some(ip)
            })
            .collect();
        addresses.sort();
        addresses.dedup();
        Ok(addresses)
    }
}

/// A TCP socket, non-blocking from its creation (`SOCK_NONBLOCK`: no
/// `fcntl` calls per connection).
fn stream_socket(domain: Domain) -> io::Result<Socket> {
    Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))
}

impl AsFd for Netns {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Sets `IPV6_TRANSPARENT`, which socket2 0.5 does not offer: an IPv6
/// delivery socket binds the client's address.
fn set_ipv6_transparent(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `on`, a live
    // c_int; the fd is borrowed for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_TRANSPARENT,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The cookie of the netns a socket lives in: the key of the ENROLLED map.
/// Needs SO_NETNS_COOKIE (Linux 5.14).
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    get_sockopt(socket, libc::SOL_SOCKET, libc::SO_NETNS_COOKIE)
}

/// A socket's own cookie (SO_COOKIE, Linux 4.13): never reused while the
/// machine runs, the key of the splice maps.
pub fn socket_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    get_sockopt(socket, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// A TCP socket's counters (TCP_INFO).
pub fn tcp_info(socket: &impl AsRawFd) -> io::Result<libc::tcp_info> {
    get_sockopt(socket, libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// Sets SO_RCVLOWAT; the kernel then checks the queue at once, which is
/// what runs a newly attached stream verdict over bytes already queued.
pub fn set_rcvlowat(socket: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: setsockopt reads `len` bytes from `bytes`, a live c_int.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT, (&raw const bytes).cast(), len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Option values that are plain integers, for which all zeroes is valid.
trait SockoptValue: Copy {}
impl SockoptValue for u64 {}
impl SockoptValue for libc::tcp_info {}

fn get_sockopt<T: SockoptValue>(socket: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = std::mem::MaybeUninit::<T>::zeroed();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which is
    // that large, and updates `len`; the fd is borrowed for the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::getsockopt(socket.as_raw_fd(), level, name, value.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zeroed, then partly written by the kernel; every bit
    // pattern is a valid `SockoptValue` (integers only).
    #[allow(unsafe_code)]
    Ok(unsafe { value.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::parse_port_range;

    #[test]
    fn port_range_as_the_kernel_writes_it() {
        assert_eq!(parse_port_range("32768\t60999\n").unwrap(), 32768..=60999);
        assert_eq!(parse_port_range("40000 40000").unwrap(), 40000..=40000);
        for bad in ["", "32768", "60999 32768", "a b", "1 70000"] {
            assert!(parse_port_range(bad).is_err(), "{bad:?}");
        }
    }
}
