//! Loads the kernel programs, attaches them, and owns their maps.
//!
//! Every attachment is a BPF link owned by this process (nothing is pinned),
//! so the kernel detaches the programs and frees the maps when the agent
//! exits, however it exits. A restarted agent starts from a clean slate and
//! attachments never pile up. See docs/ARCHITECTURE.md ("Agent restarts") for
//! what that means for traffic while the agent is down.

use std::{
    collections::HashMap as StdHashMap,
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use ambit_abi::{
    ConnKey, Counter, DeliveryKey, EnrolledPod, HBONE_PORT, INBOUND_PORT, IpKey, ListenerKey, PodAddress, SockAddrKey,
    names,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps, sk_lookup::SkLookupLinkId},
};

use crate::netns::Netns;

/// The compiled kernel programs, built by agent/build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "loading the kernel programs failed: {0}; run `bpftool feature probe kernel` and check the kernel log (dmesg) for verifier output"
    )]
    Load(#[from] aya::EbpfError),
    #[error("the kernel object has no {kind} `{name}`; the agent binary is inconsistent, rebuild it")]
    Missing { kind: &'static str, name: &'static str },
    #[error("program `{name}`: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("map `{name}`: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("cannot open cgroup {path}: {source}; pass --cgroup a cgroup v2 directory")]
    Cgroup { path: PathBuf, source: std::io::Error },
}

/// The programs and the maps the agent writes when pods come and go.
pub struct Capture {
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    addresses: HashMap<MapData, IpKey, PodAddress>,
    listeners: SockHash<MapData, ListenerKey>,
    /// The netns cookie of the pod that registered each address: while two
    /// pods share an IP (reuse), removing one must not remove the other's.
    address_owners: StdHashMap<IpKey, u64>,
    counters: Arc<CaptureCounters>,
}

/// A pod's inbound listeners (plaintext, HBONE) for one address family.
pub struct FamilyListeners<'a, L> {
    pub inbound: &'a L,
    pub hbone: &'a L,
}

/// What [`Capture::enrol`] registers for one pod.
pub struct Registration<'a, L> {
    pub netns_cookie: u64,
    pub pod: EnrolledPod,
    /// Every address of the pod's netns.
    pub addresses: &'a [IpAddr],
    pub address: PodAddress,
    pub v4: FamilyListeners<'a, L>,
    pub v6: Option<FamilyListeners<'a, L>>,
}

/// The kernel programs' per-CPU counters, readable from any task.
pub struct CaptureCounters {
    map: Mutex<PerCpuArray<MapData, u64>>,
}

impl CaptureCounters {
    /// Every counter, summed over CPUs.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        let map = self.map.lock().expect("counters lock");
        Counter::ALL.iter().map(|c| (c.name(), map.get(&(*c as u32), 0).map(|v| v.iter().sum()).unwrap_or(0))).collect()
    }
}

/// The map the proxy reads after each outbound accept().
pub struct OrigDstTable {
    map: Mutex<HashMap<MapData, ConnKey, SockAddrKey>>,
}

impl OrigDstTable {
    /// Looks up and deletes the original destination of a captured connection.
    pub fn take(&self, key: &ConnKey) -> Option<SockAddrKey> {
        let mut map = self.map.lock().expect("orig-dst map lock");
        let dst = map.get(key, 0).ok()?;
        let _ = map.remove(key);
        Some(dst)
    }
}

/// Deliveries in flight: connections the agent is opening to an app from
/// the client's address, which `ambit_sk_lookup` lets through.
pub struct DeliveryTable {
    map: Mutex<HashMap<MapData, DeliveryKey, u8>>,
}

impl DeliveryTable {
    pub fn begin(&self, key: DeliveryKey) -> std::io::Result<()> {
        self.map.lock().expect("deliveries map lock").insert(key, 1, 0).map_err(std::io::Error::other)
    }

    pub fn end(&self, key: &DeliveryKey) {
        let _ = self.map.lock().expect("deliveries map lock").remove(key);
    }
}

impl Capture {
    /// Loads the programs and attaches the cgroup ones under `cgroup`. They act
    /// only for sockets of enrolled pods, which the ENROLLED map names.
    pub fn attach(cgroup: &Path) -> Result<(Capture, OrigDstTable, DeliveryTable), CaptureError> {
        // The programs use no CO-RE relocations, so the kernel's BTF is not
        // needed: skipping it saves parsing several MB at start-up, which
        // would otherwise stay in the agent's resident memory.
        let mut ebpf = EbpfLoader::new().btf(None).load(PROGRAMS)?;
        let cgroup_dir =
            File::open(cgroup).map_err(|source| CaptureError::Cgroup { path: cgroup.to_path_buf(), source })?;
        // Attached as BPF links (Linux >= 5.7), which always coexist with the
        // other programs at this cgroup (a CNI's, another node's agent in the
        // test bed); the link API takes no attach flags, hence `Single` (0).
        for name in [names::PROG_CONNECT4, names::PROG_CONNECT6] {
            let program: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            program.load().map_err(|source| CaptureError::Program { name, source })?;
            program
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(|source| CaptureError::Program { name, source })?;
        }
        let sock_ops: &mut SockOps = program(&mut ebpf, names::PROG_SOCK_OPS)?;
        sock_ops.load().map_err(|source| CaptureError::Program { name: names::PROG_SOCK_OPS, source })?;
        sock_ops
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(|source| CaptureError::Program { name: names::PROG_SOCK_OPS, source })?;
        let sk_lookup: &mut SkLookup = program(&mut ebpf, names::PROG_SK_LOOKUP)?;
        sk_lookup.load().map_err(|source| CaptureError::Program { name: names::PROG_SK_LOOKUP, source })?;

        let orig_dst = OrigDstTable { map: Mutex::new(map(&mut ebpf, names::ORIG_DST_BY_CONN)?) };
        let deliveries = DeliveryTable { map: Mutex::new(map(&mut ebpf, names::DELIVERIES)?) };
        let capture = Capture {
            enrolled: map(&mut ebpf, names::ENROLLED)?,
            addresses: map(&mut ebpf, names::POD_ADDRESSES)?,
            listeners: map(&mut ebpf, names::INBOUND_LISTENERS)?,
            address_owners: StdHashMap::new(),
            counters: Arc::new(CaptureCounters { map: Mutex::new(map(&mut ebpf, names::COUNTERS)?) }),
            ebpf,
        };
        Ok((capture, orig_dst, deliveries))
    }

    /// Starts capturing a pod: outbound by its netns cookie, inbound by
    /// steering each of its addresses (every address of its netns) to the
    /// listeners of its family. An address of a family with no listeners is
    /// left out, so the kernel program drops connections to it. On error the
    /// caller removes what was registered with [`Capture::remove_entries`].
    pub fn enrol<L: AsRawFd>(
        &mut self,
        netns: &Netns,
        registration: &Registration<'_, L>,
    ) -> Result<SkLookupLinkId, CaptureError> {
        let Registration { netns_cookie, pod, addresses, address, v4, v6 } = registration;
        for ip in *addresses {
            let Some(listeners) = (if ip.is_ipv4() { Some(v4) } else { v6.as_ref() }) else { continue };
            let key = IpKey::from(*ip);
            for (port, listener) in [(INBOUND_PORT, listeners.inbound), (HBONE_PORT, listeners.hbone)] {
                self.listeners
                    .insert(ListenerKey::new(key, port), listener.as_raw_fd(), 0)
                    .map_err(|source| CaptureError::Map { name: names::INBOUND_LISTENERS, source })?;
            }
            self.address_owners.insert(key, *netns_cookie);
            self.addresses
                .insert(key, *address, 0)
                .map_err(|source| CaptureError::Map { name: names::POD_ADDRESSES, source })?;
        }
        self.enrolled
            .insert(*netns_cookie, *pod, 0)
            .map_err(|source| CaptureError::Map { name: names::ENROLLED, source })?;
        let sk_lookup: &mut SkLookup = program(&mut self.ebpf, names::PROG_SK_LOOKUP)?;
        sk_lookup.attach(netns).map_err(|source| CaptureError::Program { name: names::PROG_SK_LOOKUP, source })
    }

    /// Stops capturing a pod. Connections already open keep running.
    pub fn unenrol(&mut self, netns_cookie: u64, link: SkLookupLinkId) {
        self.remove_entries(netns_cookie);
        if let Ok(sk_lookup) = program::<SkLookup>(&mut self.ebpf, names::PROG_SK_LOOKUP)
            && let Err(e) = sk_lookup.detach(link)
        {
            tracing::warn!(error = %e, "detaching sk_lookup failed");
        }
    }

    /// Removes a pod's map entries, and only its own: an address another
    /// pod registered since (IP reuse) stays (a missing entry is not an error).
    pub fn remove_entries(&mut self, netns_cookie: u64) {
        let _ = self.enrolled.remove(&netns_cookie);
        let owned: Vec<IpKey> =
            self.address_owners.iter().filter(|(_, owner)| **owner == netns_cookie).map(|(ip, _)| *ip).collect();
        for ip in owned {
            self.address_owners.remove(&ip);
            let _ = self.addresses.remove(&ip);
            for port in [INBOUND_PORT, HBONE_PORT] {
                let _ = self.listeners.remove(&ListenerKey::new(ip, port));
            }
        }
    }

    /// The kernel-side counters, shareable with the admin endpoint.
    pub fn counters(&self) -> Arc<CaptureCounters> {
        self.counters.clone()
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name).and_then(|p| p.try_into().ok()).ok_or(CaptureError::Missing { kind: "program", name })
}

fn map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, CaptureError> {
    let map = ebpf.take_map(name).ok_or(CaptureError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}
