//! ambit's kernel programs: capture the TCP traffic of enrolled pods and hand
//! it to the pod's listeners, which the node agent opens inside the pod's
//! network namespace. See docs/ARCHITECTURE.md for the whole path.
//!
//! - `ambit_connect4`/`ambit_connect6` (cgroup/connect4, connect6): outbound.
//! - `ambit_sock_ops` (sock_ops): re-keys the original destination by 4-tuple.
//! - `ambit_sk_lookup` (sk_lookup, per pod netns): inbound.
//! - `ambit_splice` (sk_skb stream verdict): the same-node fast path. It
//!   forwards what arrives on one of the agent's own sockets to the socket
//!   the agent joined it with, in the kernel (see `agent/src/splice.rs`).
//!
//! Outbound, every program returns "allow": capture redirects, it never
//! drops, and when a map update fails the connection goes on uncaptured and
//! a counter says so. Inbound fails closed: a TCP connection to an enrolled
//! pod that cannot be steered to the pod's listener is dropped.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use ambit_abi::{
    ConnKey, Counter, DNS_PORT, DeliveryKey, EnrolledPod, HBONE_PORT, INBOUND_PORT, IpKey, ListenerKey, MAX_PODS,
    ORIG_DST_CAPACITY, OrigDst, PodAddress, SPLICE_BUDGET, SPLICE_CAPACITY, SPLICE_EVENTS_BYTES, SPLICE_RELAYED,
    SockAddrKey, SpliceEvent, is_agent_mark,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops, stream_verdict},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
/// cgroup/connect programs: 1 lets the connect() proceed.
const CONNECT_ALLOW: i32 = 1;

/// Enrolled pods of this node, keyed by network-namespace cookie.
#[map(name = "ENROLLED")]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::with_max_entries(MAX_PODS, 0);

/// Original destination of a captured connect(), keyed by socket cookie.
#[map(name = "ORIG_DST_BY_COOKIE")]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(ORIG_DST_CAPACITY, 0);

/// Original destination keyed by (netns cookie, 4-tuple); the agent reads and
/// deletes the entry after accept().
#[map(name = "ORIG_DST_BY_CONN")]
static ORIG_DST_BY_CONN: LruHashMap<ConnKey, SockAddrKey> = LruHashMap::with_max_entries(ORIG_DST_CAPACITY, 0);

/// Every address of every enrolled pod's netns.
#[map(name = "POD_ADDRESSES")]
static POD_ADDRESSES: HashMap<IpKey, PodAddress> = HashMap::with_max_entries(MAX_PODS * 8, 0);

/// The listeners (plaintext and HBONE) of each address in `POD_ADDRESSES`.
#[map(name = "INBOUND_LISTENERS")]
static INBOUND_LISTENERS: SockHash<ListenerKey> = SockHash::with_max_entries(MAX_PODS * 16, 0);

/// Deliveries in flight, written by the agent around each connect().
#[map(name = "DELIVERIES")]
static DELIVERIES: LruHashMap<DeliveryKey, u8> = LruHashMap::with_max_entries(ORIG_DST_CAPACITY, 0);

/// Agent sockets whose incoming bytes `ambit_splice` forwards, keyed by
/// socket cookie. Not pinned: a splice ends with the agent that made it.
#[map(name = "SPLICE_SOURCES")]
static SPLICE_SOURCES: SockHash<u64> = SockHash::with_max_entries(SPLICE_CAPACITY, 0);

/// Agent sockets bytes are forwarded to, keyed by socket cookie. A map of
/// its own, without a program: a socket is a target before it is a source,
/// so nothing is ever sent to a socket that is not there yet.
#[map(name = "SPLICE_TARGETS")]
static SPLICE_TARGETS: SockHash<u64> = SockHash::with_max_entries(SPLICE_CAPACITY, 0);

/// For each source's cookie, its target's. The agent deletes both entries
/// of a connection to stop it at once (access revoked).
#[map(name = "SPLICE_PEERS")]
static SPLICE_PEERS: HashMap<u64, u64> = HashMap::with_max_entries(SPLICE_CAPACITY, 0);

/// For each source: bytes forwarded (written only here), with the flag
/// [`SPLICE_RELAYED`].
#[map(name = "SPLICE_FORWARDED")]
static SPLICE_FORWARDED: HashMap<u64, u64> = HashMap::with_max_entries(SPLICE_CAPACITY, 0);

/// For each source: how many of its forwarded bytes the receiving app's
/// kernel has acknowledged, as the agent last read it (written only there).
#[map(name = "SPLICE_DELIVERED")]
static SPLICE_DELIVERED: HashMap<u64, u64> = HashMap::with_max_entries(SPLICE_CAPACITY, 0);

/// Requests to the agent: [`SpliceEvent`]s.
#[map(name = "SPLICE_EVENTS")]
static SPLICE_EVENTS: RingBuf = RingBuf::with_byte_size(SPLICE_EVENTS_BYTES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the map returned a valid pointer to this CPU's slot, and
        // no other CPU writes it.
        unsafe { *slot += 1 };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn ambit_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // connect4 may read only the IPv4 fields, connect6 only the IPv6 ones.
    // SAFETY: `sa` is the kernel's bpf_sock_addr for this call.
    let ip = IpKey::from_ipv4_be(unsafe { read_volatile(&raw const (*sa).user_ip4) });
    if let Some(listener_port) = capture_connect(&ctx, ip, false) {
        // SAFETY: connect4 may write user_ip4 and user_port of its context.
        unsafe {
            write_volatile(&raw mut (*sa).user_ip4, u32::from_ne_bytes([127, 0, 0, 1]));
            write_volatile(&raw mut (*sa).user_port, u32::from(listener_port.to_be()));
        }
        count(Counter::Connect4Captured);
    }
    CONNECT_ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn ambit_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel's bpf_sock_addr for this call.
    let ip = IpKey::from_ipv6_be(unsafe { read_ip6(&raw const (*sa).user_ip6) });
    if let Some(listener_port) = capture_connect(&ctx, ip, true) {
        // An IPv4-mapped destination goes to the IPv4 listener, reachable
        // from a v6 socket as ::ffff:127.0.0.1.
        let loopback = if ip.ipv4_octets().is_some() {
            [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), u32::from_ne_bytes([127, 0, 0, 1])]
        } else {
            [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
        };
        // SAFETY: connect6 may write user_ip6 (as four words) and user_port.
        unsafe {
            let words = (&raw mut (*sa).user_ip6).cast::<u32>();
            write_volatile(words, loopback[0]);
            write_volatile(words.add(1), loopback[1]);
            write_volatile(words.add(2), loopback[2]);
            write_volatile(words.add(3), loopback[3]);
            write_volatile(&raw mut (*sa).user_port, u32::from(listener_port.to_be()));
        }
        count(Counter::Connect6Captured);
    }
    CONNECT_ALLOW
}

/// Decides whether a connect() to `ip` is captured and, if so, records the
/// original destination and returns the pod's outbound listener port.
#[inline(always)]
fn capture_connect(ctx: &SockAddrContext, ip: IpKey, v6_socket: bool) -> Option<u16> {
    let sa = ctx.sock_addr;
    // Read context fields up front with volatile loads: the verifier rejects
    // context loads through a pointer the compiler has offset and carried
    // across branches.
    // SAFETY: `sa` is the kernel's bpf_sock_addr; these fields are readable.
    let (protocol, user_port, sk) = unsafe {
        (
            read_volatile(&raw const (*sa).protocol),
            read_volatile(&raw const (*sa).user_port),
            read_volatile(&raw const (*sa).__bindgen_anon_1.sk),
        )
    };
    if protocol != IPPROTO_TCP || ip.is_loopback() {
        return None;
    }
    // SAFETY: a helper call with this program's own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before anything can delete the entry.
    let pod = unsafe { ENROLLED.get(&netns_cookie) }?;
    // The agent's own sockets inside the pod carry its mark: never capture
    // them, or the agent's forwarded connection would loop back to itself.
    // SAFETY: `sk` is checked for null first; the kernel owns the socket.
    if sk.is_null() || is_agent_mark(unsafe { read_volatile(&raw const (*sk).mark) }) {
        return None;
    }
    let to_v4 = !v6_socket || ip.ipv4_octets().is_some();
    let listener_port = if to_v4 { pod.outbound_port_v4 } else { pod.outbound_port_v6 };
    if listener_port == 0 {
        count(Counter::Connect6NoListener);
        return None;
    }
    // SAFETY: a helper call with this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst { netns_cookie, dst: SockAddrKey { ip, port: u16::from_be(user_port as u16) }, _pad: [0; 6] };
    if ORIG_DST_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        count(Counter::MapUpdateFailed);
        return None;
    }
    Some(listener_port)
}

#[sock_ops]
pub fn ambit_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        rekey_orig_dst(&ctx);
    }
    1
}

#[inline(always)]
fn rekey_orig_dst(ctx: &SockOpsContext) {
    // SAFETY: a helper call with this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out (`*orig`) before the entry is removed.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(&cookie) }) else {
        return;
    };
    let orig = *orig;
    // Read every context field up front with volatile loads: the verifier
    // rejects context loads through a pointer that the compiler has offset
    // and carried across branches.
    let ops = ctx.ops;
    // SAFETY: `ops` is the kernel's bpf_sock_ops; these fields are readable.
    let (family, local_ip4, remote_ip4, local_ip6, remote_ip6, local_port, remote_port) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).local_ip4),
            read_volatile(&raw const (*ops).remote_ip4),
            read_ip6(&raw const (*ops).local_ip6),
            read_ip6(&raw const (*ops).remote_ip6),
            read_volatile(&raw const (*ops).local_port),
            read_volatile(&raw const (*ops).remote_port),
        )
    };
    let (local_ip, remote_ip) = match family {
        AF_INET => (IpKey::from_ipv4_be(local_ip4), IpKey::from_ipv4_be(remote_ip4)),
        AF_INET6 => (IpKey::from_ipv6_be(local_ip6), IpKey::from_ipv6_be(remote_ip6)),
        _ => return,
    };
    // local_port is in host order; remote_port holds the network-order port
    // in its upper 16 bits on little-endian machines.
    let local = SockAddrKey { ip: local_ip, port: local_port as u16 };
    let remote = SockAddrKey { ip: remote_ip, port: u16::from_be((remote_port >> 16) as u16) };
    let key = ConnKey::new(orig.netns_cookie, local, remote);
    if ORIG_DST_BY_CONN.insert(&key, &orig.dst, 0).is_err() {
        count(Counter::MapUpdateFailed);
    } else {
        count(Counter::OrigDstStored);
    }
    let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
}

/// Reads an IPv6 address field of a context struct word by word (the
/// verifier allows only 4-byte loads there).
///
/// # Safety
/// `field` must point to a readable IPv6 field of a context struct.
#[inline(always)]
unsafe fn read_ip6(field: *const [u32; 4]) -> [u32; 4] {
    let words = field.cast::<u32>();
    // SAFETY: the caller's promise covers the four words.
    unsafe {
        [read_volatile(words), read_volatile(words.add(1)), read_volatile(words.add(2)), read_volatile(words.add(3))]
    }
}

#[sk_lookup]
pub fn ambit_sk_lookup(ctx: SkLookupContext) -> u32 {
    steer_inbound(&ctx)
}

/// Runs only in enrolled pods' netns. Steers a TCP connection to any local
/// address to the pod's listener of that address: HBONE for port 15008,
/// plaintext inbound otherwise. An address the agent has not registered
/// (added after enrolment), or a listener of another netns (an IP two pods
/// briefly share), drops the connection: never plaintext to the app.
#[inline(always)]
fn steer_inbound(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: `l` is the kernel's bpf_sk_lookup; these fields are readable.
    let (family, protocol, local_port, local_ip4, remote_ip4, local_ip6, remote_ip6, remote_port) = unsafe {
        (
            read_volatile(&raw const (*l).family),
            read_volatile(&raw const (*l).protocol),
            read_volatile(&raw const (*l).local_port),
            read_volatile(&raw const (*l).local_ip4),
            read_volatile(&raw const (*l).remote_ip4),
            read_ip6(&raw const (*l).local_ip6),
            read_ip6(&raw const (*l).remote_ip6),
            read_volatile(&raw const (*l).remote_port),
        )
    };
    let (local, remote) = match family {
        AF_INET => (IpKey::from_ipv4_be(local_ip4), IpKey::from_ipv4_be(remote_ip4)),
        AF_INET6 => (IpKey::from_ipv6_be(local_ip6), IpKey::from_ipv6_be(remote_ip6)),
        _ => return SK_PASS,
    };
    // Loopback never leaves the pod.
    if local.is_loopback() {
        return SK_PASS;
    }
    let remote_port = u16::from_be(remote_port);
    // SAFETY: the flags are copied out before anything can delete the entry.
    let flags = unsafe { POD_ADDRESSES.get(&local) }.map(|a| a.flags);
    if protocol == IPPROTO_UDP {
        if flags.is_some_and(|f| f & PodAddress::DROP_INBOUND_UDP != 0) && remote_port != DNS_PORT {
            count(Counter::InboundUdpDropped);
            return SK_DROP;
        }
        return SK_PASS;
    }
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // A connection from the pod's own address to itself never crossed the
    // pod boundary: it is either the app talking to itself (already captured
    // on the way out) or the agent delivering from the pod's address.
    if local == remote {
        return SK_PASS;
    }
    // The agent delivering a connection from the client's own address.
    let delivery = DeliveryKey {
        client: SockAddrKey { ip: remote, port: remote_port },
        app: SockAddrKey { ip: local, port: local_port as u16 },
    };
    // SAFETY: only whether the entry exists is read.
    if unsafe { DELIVERIES.get(&delivery) }.is_some() {
        return SK_PASS;
    }
    let (listener, steered) = if local_port == u32::from(HBONE_PORT) {
        (HBONE_PORT, Counter::HboneSteered)
    } else {
        (INBOUND_PORT, Counter::InboundSteered)
    };
    if flags.is_some() && INBOUND_LISTENERS.redirect_sk_lookup(ctx, ListenerKey::new(local, listener), 0).is_ok() {
        count(steered);
        SK_PASS
    } else {
        count(Counter::InboundNoListener);
        SK_DROP
    }
}

/// Runs for what arrives on a source socket. Bytes go to the peer's send
/// queue (egress, not `BPF_F_INGRESS`), through a queue the kernel does
/// not bound: so at most [`SPLICE_BUDGET`] bytes may be forwarded and not
/// yet delivered. Past it, the direction is handed to the agent for good
/// (`SK_PASS` keeps the bytes on the source, where they count against its
/// receive window), which relays it in user space once the bytes already
/// forwarded are delivered.
#[stream_verdict]
pub fn ambit_splice(ctx: SkBuffContext) -> u32 {
    // A bare FIN carries nothing to forward; TCP has already marked the
    // source half-closed, which the agent sees and passes on once the
    // bytes before it are delivered. Passing it would queue it on the
    // source, where a full receive buffer turns it into EPIPE.
    let len = u64::from(ctx.len());
    if len == 0 {
        return SK_DROP;
    }
    // SAFETY: the helper reads the cookie of the skb's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain reads of u64 values.
    let (Some(peer), Some(forwarded)) = (unsafe { SPLICE_PEERS.get(&cookie) }, SPLICE_FORWARDED.get_ptr_mut(&cookie))
    else {
        // Revoked (or torn down): nothing more goes through.
        return SK_DROP;
    };
    // SAFETY: the map's value for this source, which only this program
    // writes, for one skb of the socket at a time.
    let state = unsafe { *forwarded };
    if state & SPLICE_RELAYED != 0 {
        return SK_PASS;
    }
    // SAFETY: a plain read of a u64 value.
    let delivered = unsafe { SPLICE_DELIVERED.get(&cookie) }.copied().unwrap_or(0);
    let in_flight = state.saturating_sub(delivered) + len;
    // Handed over only once the agent has been told; while its ring is
    // full, forwarding goes on past the budget rather than leave bytes on
    // the source that nobody would read.
    let relay = SpliceEvent { source: cookie, kind: SpliceEvent::RELAY };
    if in_flight > SPLICE_BUDGET && SPLICE_EVENTS.output::<SpliceEvent>(&relay, 0).is_ok() {
        // SAFETY: as above.
        unsafe { *forwarded = state | SPLICE_RELAYED };
        return SK_PASS;
    }
    let mut target = *peer;
    let verdict = SPLICE_TARGETS.redirect_skb(&ctx, &mut target, 0) as u32;
    if verdict == SK_PASS {
        // More than half the budget in flight: the agent is asked what
        // has been delivered, again each time another quarter goes out.
        let quarter = SPLICE_BUDGET / 4;
        if in_flight > SPLICE_BUDGET / 2 && state / quarter != (state + len) / quarter {
            let _ =
                SPLICE_EVENTS.output::<SpliceEvent>(&SpliceEvent { source: cookie, kind: SpliceEvent::DELIVERED }, 0);
        }
        // SAFETY: as above.
        unsafe { *forwarded = state + len };
    }
    verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
