//! Types shared by the kernel programs (`ebpf/`) and the node agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields, because
//! the kernel compares keys byte for byte: an uninitialised padding byte would
//! make two equal keys differ. Constructors zero the padding.
#![no_std]
#![deny(unsafe_code)]

/// Map and program names, as the agent finds them in the loaded object.
pub mod names {
    pub const ENROLLED: &str = "ENROLLED";
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    pub const ORIG_DST_BY_CONN: &str = "ORIG_DST_BY_CONN";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const POD_ADDRESSES: &str = "POD_ADDRESSES";
    pub const DELIVERIES: &str = "DELIVERIES";
    pub const COUNTERS: &str = "COUNTERS";
    /// Every map: each is pinned, so it outlives the agent.
    pub const MAPS: [&str; 7] =
        [ENROLLED, ORIG_DST_BY_COOKIE, ORIG_DST_BY_CONN, INBOUND_LISTENERS, POD_ADDRESSES, DELIVERIES, COUNTERS];

    pub const PROG_CONNECT4: &str = "ambit_connect4";
    pub const PROG_CONNECT6: &str = "ambit_connect6";
    pub const PROG_SOCK_OPS: &str = "ambit_sock_ops";
    pub const PROG_SK_LOOKUP: &str = "ambit_sk_lookup";

    /// The same-node fast path's maps and program: not pinned, they live
    /// and die with the agent that joined the sockets.
    pub const SPLICE_SOURCES: &str = "SPLICE_SOURCES";
    pub const SPLICE_TARGETS: &str = "SPLICE_TARGETS";
    pub const SPLICE_PEERS: &str = "SPLICE_PEERS";
    pub const SPLICE_FORWARDED: &str = "SPLICE_FORWARDED";
    pub const SPLICE_DELIVERED: &str = "SPLICE_DELIVERED";
    pub const SPLICE_EVENTS: &str = "SPLICE_EVENTS";
    pub const PROG_SPLICE: &str = "ambit_splice";
}

/// Socket mark the agent puts on every socket it opens inside a pod, so the
/// capture programs leave the agent's own connections alone (no loops).
pub const AGENT_SOCKET_MARK: u32 = 0x616d_6274; // "ambt"
/// The mark of the agent's delivery sockets (connections to a pod's app
/// from the client's address): the agent mark with its low bit set. The
/// pod's replies on these connections inherit it and are routed back to
/// the agent inside the pod.
pub const DELIVERY_SOCKET_MARK: u32 = AGENT_SOCKET_MARK | 1;

/// Whether a socket mark is one of the agent's.
pub const fn is_agent_mark(mark: u32) -> bool {
    mark & !1 == AGENT_SOCKET_MARK
}

/// HBONE port: steered to the pod's HBONE listener, never to the plaintext one.
pub const HBONE_PORT: u16 = 15008;
/// Port of a pod's plaintext inbound listener (inside the pod's netns).
pub const INBOUND_PORT: u16 = 15006;
/// The DNS port: with [`EnrolledPod::DROP_INBOUND_UDP`], UDP from it (DNS
/// replies) still reaches the pod.
pub const DNS_PORT: u16 = 53;

/// The meaning of the maps' keys and values. Bump it when a field changes
/// meaning without changing size; size changes are caught without it. An
/// agent adopts pinned maps only of its own version and layout.
pub const MAP_ABI_VERSION: u32 = 1;

/// Capacity of the per-connection original-destination maps. They are LRU
/// maps, so a connection the agent never accepts cannot exhaust them.
pub const ORIG_DST_CAPACITY: u32 = 65_536;
/// Enrolled pods per node.
pub const MAX_PODS: u32 = 4_096;
/// Agent sockets joined in the kernel at once (two per connection).
pub const SPLICE_CAPACITY: u32 = 65_536;
/// Bytes one direction of a joined connection may have forwarded and not
/// yet delivered (acknowledged by the receiving app's kernel). The
/// kernel's redirect queue has no bound of its own: past this, the
/// direction is relayed by the agent.
pub const SPLICE_BUDGET: u64 = 1024 * 1024;
/// In a SPLICE_FORWARDED value: the direction is relayed by the agent.
pub const SPLICE_RELAYED: u64 = 1 << 63;
/// Size of the SPLICE_EVENTS ring buffer: about 2,700 events. Its pages
/// are mapped into the agent (twice) and count in its resident memory.
pub const SPLICE_EVENTS_BYTES: u32 = 64 * 1024;

/// What `ambit_splice` asks of the agent about one source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpliceEvent {
    /// The source socket's cookie.
    pub source: u64,
    /// [`SpliceEvent::DELIVERED`] or [`SpliceEvent::RELAY`].
    pub kind: u64,
}

impl SpliceEvent {
    /// Half the budget is in flight: update SPLICE_DELIVERED.
    pub const DELIVERED: u64 = 1;
    /// The budget is spent: relay this direction from now on.
    pub const RELAY: u64 = 2;
}

/// An IP address as 16 bytes: IPv6 as is, IPv4 as IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`). One layout for both families keeps every key the same
/// size and matches how the kernel reports a dual-stack socket's IPv4 peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    pub octets: [u8; 16],
}

impl IpKey {
    /// From an IPv4 address as the kernel's context structs hold it: a `u32`
    /// whose in-memory bytes are in network order.
    pub const fn from_ipv4_be(ip: u32) -> Self {
        let b = ip.to_ne_bytes();
        Self::from_ipv4_octets(b)
    }

    pub const fn from_ipv4_octets(b: [u8; 4]) -> Self {
        Self { octets: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3]] }
    }

    /// From an IPv6 address as the kernel's context structs hold it: four
    /// `u32` words whose in-memory bytes are in network order.
    pub const fn from_ipv6_be(words: [u32; 4]) -> Self {
        let mut octets = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let w = words[i].to_ne_bytes();
            octets[i * 4] = w[0];
            octets[i * 4 + 1] = w[1];
            octets[i * 4 + 2] = w[2];
            octets[i * 4 + 3] = w[3];
            i += 1;
        }
        Self { octets }
    }

    /// The IPv4 address if this is an IPv4-mapped key.
    pub const fn ipv4_octets(&self) -> Option<[u8; 4]> {
        let o = &self.octets;
        if o[0] == 0
            && o[1] == 0
            && o[2] == 0
            && o[3] == 0
            && o[4] == 0
            && o[5] == 0
            && o[6] == 0
            && o[7] == 0
            && o[8] == 0
            && o[9] == 0
            && o[10] == 0xff
            && o[11] == 0xff
        {
            Some([o[12], o[13], o[14], o[15]])
        } else {
            None
        }
    }

    /// Loopback in either family (127.0.0.0/8 or ::1). Connections to it stay
    /// inside the pod and are never captured.
    pub const fn is_loopback(&self) -> bool {
        match self.ipv4_octets() {
            Some(v4) => v4[0] == 127,
            None => {
                let o = &self.octets;
                let mut i = 0;
                while i < 15 {
                    if o[i] != 0 {
                        return false;
                    }
                    i += 1;
                }
                o[15] == 1
            }
        }
    }
}

/// An IP address and a TCP port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddrKey {
    pub ip: IpKey,
    pub port: u16,
}

/// Key of the deliveries map: a connection the agent is opening to an app
/// from the client's address, which `ambit_sk_lookup` must let through
/// instead of steering it back to the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DeliveryKey {
    pub client: SockAddrKey,
    pub app: SockAddrKey,
}

/// Per enrolled pod, keyed by the pod's network-namespace cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EnrolledPod {
    /// Port of the pod's IPv4 outbound listener on 127.0.0.1; 0 if none.
    pub outbound_port_v4: u16,
    /// Port of the pod's IPv6 outbound listener on ::1; 0 if none, in which
    /// case pure IPv6 connections are not captured (and the agent said so).
    pub outbound_port_v6: u16,
    pub _pad: u32,
}

/// Value of the pod-address map: one entry per address of an enrolled
/// pod's netns (listed, unlisted and link-local alike).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodAddress {
    /// [`PodAddress::DROP_INBOUND_UDP`] or 0.
    pub flags: u32,
}

impl PodAddress {
    /// Inbound UDP to the address is dropped, except from port 53 (DNS replies).
    pub const DROP_INBOUND_UDP: u32 = 1;
}

/// Key of the inbound listener map: the listener that takes connections to
/// one address of an enrolled pod. sk_lookup programs cannot read their
/// netns cookie (the kernel refuses `bpf_get_netns_cookie` there), so the
/// key is the address; the agent records which pod owns each entry, and the
/// kernel refuses to hand a connection to a listener of another netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ListenerKey {
    pub ip: IpKey,
    /// The listener: [`INBOUND_PORT`] (plaintext) or [`HBONE_PORT`].
    pub port: u16,
    pub _pad: u16,
}

impl ListenerKey {
    pub const fn new(ip: IpKey, port: u16) -> Self {
        Self { ip, port, _pad: 0 }
    }
}

/// Written by `connect4`/`connect6`, keyed by socket cookie: where the app
/// wanted to go, and from which pod (netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub netns_cookie: u64,
    pub dst: SockAddrKey,
    pub _pad: [u8; 6],
}

/// Key of the original-destination map the agent reads after `accept()`:
/// the app's side of the captured connection, as seen from the app.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    pub netns_cookie: u64,
    /// The app's socket address (the agent's peer address after accept).
    pub src: SockAddrKey,
    /// The outbound listener's address (the agent's local address).
    pub dst: SockAddrKey,
    pub _pad: [u8; 4],
}

impl ConnKey {
    pub const fn new(netns_cookie: u64, src: SockAddrKey, dst: SockAddrKey) -> Self {
        Self { netns_cookie, src, dst, _pad: [0; 4] }
    }
}

/// Indexes of the per-CPU counter array the kernel programs bump.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Outbound IPv4 connect() redirected to a pod's outbound listener.
    Connect4Captured = 0,
    /// Outbound IPv6 connect() redirected to a pod's outbound listener.
    Connect6Captured = 1,
    /// Enrolled pod, IPv6 destination, but no IPv6 listener: left alone.
    Connect6NoListener = 2,
    /// Original destination moved from the cookie map to the connection map.
    OrigDstStored = 3,
    /// Inbound connection steered to a pod's plaintext inbound listener.
    InboundSteered = 4,
    /// Storing an original destination failed (map full or helper error).
    MapUpdateFailed = 5,
    /// Inbound TCP to an address of an enrolled pod that has no listener
    /// (an address added after enrolment, say): dropped (fail closed),
    /// never delivered in plaintext.
    InboundNoListener = 6,
    /// Inbound UDP dropped for a pod that opted in to it.
    InboundUdpDropped = 7,
    /// Inbound connection to port 15008 steered to a pod's HBONE listener.
    HboneSteered = 8,
}

impl Counter {
    pub const ALL: [Counter; 9] = [
        Counter::Connect4Captured,
        Counter::Connect6Captured,
        Counter::Connect6NoListener,
        Counter::OrigDstStored,
        Counter::InboundSteered,
        Counter::MapUpdateFailed,
        Counter::InboundNoListener,
        Counter::InboundUdpDropped,
        Counter::HboneSteered,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Connect4Captured => "connect4_captured",
            Counter::Connect6Captured => "connect6_captured",
            Counter::Connect6NoListener => "connect6_no_listener",
            Counter::OrigDstStored => "orig_dst_stored",
            Counter::InboundSteered => "inbound_steered",
            Counter::MapUpdateFailed => "map_update_failed",
            Counter::InboundNoListener => "inbound_no_listener",
            Counter::InboundUdpDropped => "inbound_udp_dropped",
            Counter::HboneSteered => "hbone_steered",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (for every impl below): the types are `repr(C)`, `Copy`, hold only
    // integers and byte arrays, and name their padding explicitly, so every
    // bit pattern is valid and no byte is uninitialised.
    #![allow(unsafe_code)]
    use super::*;
    unsafe impl aya::Pod for IpKey {}
    unsafe impl aya::Pod for SockAddrKey {}
    unsafe impl aya::Pod for EnrolledPod {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for DeliveryKey {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for PodAddress {}
}

#[cfg(feature = "user")]
mod convert {
    extern crate std;
    use super::{IpKey, SockAddrKey};
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};

    impl From<IpAddr> for IpKey {
        fn from(ip: IpAddr) -> Self {
            match ip {
                IpAddr::V4(v4) => IpKey::from_ipv4_octets(v4.octets()),
                IpAddr::V6(v6) => IpKey { octets: v6.octets() },
            }
        }
    }

    impl From<IpKey> for IpAddr {
        fn from(key: IpKey) -> Self {
            match key.ipv4_octets() {
                Some(v4) => IpAddr::from(v4),
                None => IpAddr::V6(Ipv6Addr::from(key.octets)),
            }
        }
    }

    impl From<SocketAddr> for SockAddrKey {
        fn from(addr: SocketAddr) -> Self {
            // A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d; both
            // spellings map to the same key.
            let ip = match addr.ip() {
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(v6),
                },
                v4 => v4,
            };
            SockAddrKey { ip: ip.into(), port: addr.port() }
        }
    }

    impl From<SockAddrKey> for SocketAddr {
        fn from(key: SockAddrKey) -> Self {
            SocketAddr::new(key.ip.into(), key.port)
        }
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;
    use std::net::{IpAddr, SocketAddr};

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<IpKey>(), 16);
        assert_eq!(size_of::<SockAddrKey>(), 18);
        assert_eq!(size_of::<EnrolledPod>(), 8);
        assert_eq!(size_of::<OrigDst>(), 8 + 18 + 6);
        assert_eq!(size_of::<ConnKey>(), 8 + 18 + 18 + 4);
        assert_eq!(size_of::<ListenerKey>(), 20);
    }

    #[test]
    fn ipv4_from_kernel_word_matches_std() {
        // The kernel stores 10.1.2.3 as the bytes 0a 01 02 03 in memory.
        let word = u32::from_ne_bytes([10, 1, 2, 3]);
        let key = IpKey::from_ipv4_be(word);
        assert_eq!(key, IpKey::from("10.1.2.3".parse::<IpAddr>().unwrap()));
        assert_eq!(IpAddr::from(key), "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(&key.octets[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
    }

    #[test]
    fn ipv6_from_kernel_words_matches_std() {
        let ip: std::net::Ipv6Addr = "fd00:1::2".parse().unwrap();
        let o = ip.octets();
        let words = [0, 1, 2, 3].map(|i| u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]));
        assert_eq!(IpKey::from_ipv6_be(words), IpKey::from(IpAddr::V6(ip)));
    }

    #[test]
    fn mapped_and_plain_ipv4_socket_addrs_share_a_key() {
        let plain: SocketAddr = "10.1.2.3:80".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(SockAddrKey::from(plain), SockAddrKey::from(mapped));
        assert_eq!(SocketAddr::from(SockAddrKey::from(mapped)), plain);
    }

    #[test]
    fn loopback_detection() {
        for (addr, want) in [
            ("127.0.0.1", true),
            ("127.9.9.9", true),
            ("::1", true),
            ("10.0.0.1", false),
            ("::2", false),
            ("::", false),
        ] {
            assert_eq!(IpKey::from(addr.parse::<IpAddr>().unwrap()).is_loopback(), want, "{addr}");
        }
    }

    #[test]
    fn conn_key_zeroes_padding() {
        let k = ConnKey::new(7, SockAddrKey::default(), SockAddrKey::default());
        assert_eq!(k._pad, [0; 4]);
    }
}
