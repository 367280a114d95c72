//! Loads the kernel programs, attaches them, and owns their maps.
//!
//! Programs, links and maps are pinned under the agent's directory on the
//! BPF filesystem ([`crate::bpffs`]), so capture outlives the agent: while
//! none runs, an enrolled pod's connections go to listeners that are gone
//! and fail. The next agent adopts the maps (when their layout is its own),
//! swaps its programs in with BPF_LINK_UPDATE, enrols the pods again and
//! removes what no pod needs any more ([`Capture::sweep`]). See
//! docs/ARCHITECTURE.md ("Agent restarts and upgrades").
use std::{
    collections::HashMap as StdHashMap,
    fs::File,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
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
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SkSkb, SockOps, links::FdLink},
};

use crate::{
    bpffs::{self, PinDir, PinError},
    netns::Netns,
};

/// The compiled kernel programs, built by agent/build.rs.
pub(crate) static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit"));

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
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error("pinning {path}: {source}; is --bpf-dir on a BPF filesystem, and is the agent root?")]
    Pin { path: PathBuf, source: Box<dyn std::error::Error + Send + Sync> },
}

/// The programs and the maps the agent writes when pods come and go.
pub struct Capture {
    ebpf: Ebpf,
    pins: PinDir,
    layout: String,
    /// The sk_lookup link pins of the pods this agent enrolled, by netns
    /// cookie: with their entries, what [`Capture::sweep`] keeps.
    links: StdHashMap<u64, PathBuf>,
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
    /// `namespace/name`.
    pub pod_id: &'a str,
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

    /// Forgets every delivery: at start-up, those of an agent that died
    /// mid-delivery would let that 4-tuple past the inbound steering.
    pub fn clear(&self) {
        let mut map = self.map.lock().expect("deliveries map lock");
        let keys: Vec<DeliveryKey> = map.keys().flatten().collect();
        for key in keys {
            let _ = map.remove(&key);
        }
    }
}

impl Capture {
    /// Loads the programs, adopting the pinned maps of this layout or
    /// pinning new ones, and puts them on the cgroup hooks under `cgroup`:
    /// a pinned link of an earlier agent gets the new program in place,
    /// otherwise a new link is attached and pinned. The programs act only
    /// for sockets of enrolled pods, which the ENROLLED map names.
    pub fn attach(cgroup: &Path, pins: PinDir) -> Result<(Capture, OrigDstTable, DeliveryTable), CaptureError> {
        let layout = bpffs::map_layout(PROGRAMS)?;
        let maps_dir = pins.maps(&layout)?;
        let pin_paths: Vec<(&str, PathBuf)> = names::MAPS.iter().map(|name| (*name, maps_dir.join(name))).collect();
        let mut loader = EbpfLoader::new();
        // The programs use no CO-RE relocations, so the kernel's BTF is not
        // needed: skipping it saves parsing several MB at start-up, which
        // would otherwise stay in the agent's resident memory.
        loader.btf(None);
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(PROGRAMS)?;
        let cgroup_dir =
            File::open(cgroup).map_err(|source| CaptureError::Cgroup { path: cgroup.to_path_buf(), source })?;
        let cgroup_id =
            bpffs::cgroup_id(cgroup).map_err(|source| CaptureError::Cgroup { path: cgroup.to_path_buf(), source })?;
        // Attached as BPF links (Linux >= 5.7), which always coexist with the
        // other programs at this cgroup (a CNI's, another node's agent in the
        // test bed); the link API takes no attach flags, hence `Single` (0).
        // The cgroup program types share no trait for attaching: one body, per type.
        macro_rules! put_on_cgroup {
            ($kind:ty, $name:expr) => {{
                let name = $name;
                let err = |source| CaptureError::Program { name, source };
                let program: &mut $kind = program(&mut ebpf, name)?;
                program.load().map_err(err)?;
                let pin = pins.cgroup_link(cgroup_id, name);
                if !update_pinned(&pin, program.fd().map_err(err)?.as_fd()) {
                    let id = program.attach(&cgroup_dir, CgroupAttachMode::Single).map_err(err)?;
                    pin_link(&pin, fd_link(program.take_link(id).map_err(err)?, name))?;
                }
            }};
        }
        put_on_cgroup!(CgroupSockAddr, names::PROG_CONNECT4);
        put_on_cgroup!(CgroupSockAddr, names::PROG_CONNECT6);
        put_on_cgroup!(SockOps, names::PROG_SOCK_OPS);
        // Links to a cgroup this agent no longer attaches to (--cgroup changed).
        for stale in pins.other_cgroup_links(cgroup_id) {
            tracing::info!(pin = %stale.display(), "detaching the capture from a cgroup no longer configured");
            let _ = bpffs::remove(&stale);
        }
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
            pins,
            layout,
            links: StdHashMap::new(),
        };
        Ok((capture, orig_dst, deliveries))
    }

    /// Starts capturing a pod: outbound by its netns cookie, inbound by
    /// steering each of its addresses (every address of its netns) to the
    /// listeners of its family. An address of a family with no listeners is
    /// left out, so the kernel program drops connections to it. On error the
    /// caller removes what was registered with [`Capture::remove_entries`].
    pub fn enrol<L: AsRawFd>(&mut self, netns: &Netns, registration: &Registration<'_, L>) -> Result<(), CaptureError> {
        let Registration { pod_id, netns_cookie, pod, addresses, address, v4, v6 } = registration;
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
        let err = |source| CaptureError::Program { name: names::PROG_SK_LOOKUP, source };
        let pin = self.pins.sk_lookup_link(*netns_cookie, pod_id);
        if !update_pinned(&pin, sk_lookup.fd().map_err(err)?.as_fd()) {
            let id = sk_lookup.attach(netns).map_err(err)?;
            pin_link(&pin, Ok(FdLink::from(sk_lookup.take_link(id).map_err(err)?)))?;
        }
        self.links.insert(*netns_cookie, pin);
        Ok(())
    }

    /// Stops capturing a pod: its entries go, and its sk_lookup link is
    /// detached. Connections already open keep running.
    pub fn unenrol(&mut self, netns_cookie: u64) {
        self.remove_entries(netns_cookie);
        if let Some(pin) = self.links.remove(&netns_cookie)
            && let Err(e) = bpffs::remove(&pin)
        {
            tracing::warn!(pin = %pin.display(), error = %e, "detaching sk_lookup failed");
        }
    }

    /// Once the pods are enrolled after start-up: removes what earlier
    /// agents left that no pod needs any more (entries and sk_lookup links
    /// of pods that went while no agent ran, maps of another layout). A
    /// pod that should be captured but failed to enrol (`failing`) keeps
    /// its capture: its connections fail until it is enrolled.
    pub fn sweep(&mut self, failing: impl Fn(&str) -> bool) {
        let mut keep: std::collections::HashSet<u64> = self.links.keys().copied().collect();
        let mut stale_pins = Vec::new();
        for (cookie, pod, pin) in self.pins.sk_lookup_links() {
            if keep.contains(&cookie) && self.links.get(&cookie) == Some(&pin) {
                continue;
            }
            if failing(&pod) && !keep.contains(&cookie) {
                keep.insert(cookie);
            } else {
                stale_pins.push(pin);
            }
        }
        let stale_pods: Vec<u64> = self.enrolled.keys().flatten().filter(|cookie| !keep.contains(cookie)).collect();
        for cookie in &stale_pods {
            let _ = self.enrolled.remove(cookie);
        }
        let stale_addresses: Vec<IpKey> =
            self.addresses.keys().flatten().filter(|ip| !self.address_owners.contains_key(ip)).collect();
        for ip in &stale_addresses {
            let _ = self.addresses.remove(ip);
            for port in [INBOUND_PORT, HBONE_PORT] {
                let _ = self.listeners.remove(&ListenerKey::new(*ip, port));
            }
        }
        stale_pins.extend(self.pins.other_maps(&self.layout));
        for pin in &stale_pins {
            if let Err(e) = bpffs::remove(pin) {
                tracing::warn!(pin = %pin.display(), error = %e, "cannot remove a stale pin");
            }
        }
        if !stale_pods.is_empty() || !stale_addresses.is_empty() || !stale_pins.is_empty() {
            tracing::info!(
                pods = stale_pods.len(),
                addresses = stale_addresses.len(),
                pins = stale_pins.len(),
                "removed what earlier agents left for pods no longer enrolled"
            );
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

    /// The same-node fast path: attaches `ambit_splice` to its sources map
    /// and hands over the maps. The program stays attached while this
    /// agent runs (its link lives in `self.ebpf`); nothing is pinned.
    pub fn splicer(&mut self) -> Result<crate::splice::Splicer, CaptureError> {
        let maps = crate::splice::SpliceMaps {
            sources: map(&mut self.ebpf, names::SPLICE_SOURCES)?,
            targets: map(&mut self.ebpf, names::SPLICE_TARGETS)?,
            peers: map(&mut self.ebpf, names::SPLICE_PEERS)?,
            forwarded: map(&mut self.ebpf, names::SPLICE_FORWARDED)?,
            delivered: map(&mut self.ebpf, names::SPLICE_DELIVERED)?,
        };
        let events = map(&mut self.ebpf, names::SPLICE_EVENTS)?;
        let err = |source| CaptureError::Program { name: names::PROG_SPLICE, source };
        let splice: &mut SkSkb = program(&mut self.ebpf, names::PROG_SPLICE)?;
        splice.load().map_err(err)?;
        splice.attach(maps.sources.fd()).map_err(err)?;
        crate::splice::Splicer::new(maps, events).map_err(|source| CaptureError::Map {
            name: names::SPLICE_EVENTS,
            source: aya::maps::MapError::from(source),
        })
    }

    /// The kernel-side counters, shareable with the admin endpoint.
    pub fn counters(&self) -> Arc<CaptureCounters> {
        self.counters.clone()
    }
}

/// Puts `program` on the hook of the link pinned at `pin` in place
/// (BPF_LINK_UPDATE), if an earlier agent pinned one; false if there is
/// none. A pinned link that cannot take it (its netns or cgroup is gone)
/// is removed, and false returned: the caller attaches a new one.
fn update_pinned(pin: &Path, program: BorrowedFd<'_>) -> bool {
    match bpffs::open_pinned(pin).and_then(|link| bpffs::update_link(link.as_fd(), program)) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::info!(pin = %pin.display(), error = %e, "a pinned link cannot take the new program; replacing it");
            let _ = bpffs::remove(pin);
            false
        }
    }
}

/// Pins a new link at `pin`: it stays attached after the agent exits.
/// A cgroup link as an [`FdLink`]: always one, since they are attached
/// with the link API.
fn fd_link<L>(link: L, name: &'static str) -> Result<FdLink, CaptureError>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    FdLink::try_from(link).map_err(|source| CaptureError::Pin { path: name.into(), source: source.into() })
}

fn pin_link(pin: &Path, link: Result<FdLink, CaptureError>) -> Result<(), CaptureError> {
    link?.pin(pin).map_err(|source| CaptureError::Pin { path: pin.to_path_buf(), source: source.into() })?;
    Ok(())
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
