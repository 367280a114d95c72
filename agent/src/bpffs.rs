//! The agent's directory on the BPF filesystem: what keeps capture in place
//! while no agent runs. Pinned links stay attached and pinned maps keep
//! their entries, so an enrolled pod's connections keep going to listeners
//! that are gone: they fail, they never flow in plaintext.
//!
//! ```text
//! <dir>/maps-v<MAP_ABI_VERSION>-<layout>/<MAP>   maps, adopted by the next agent of that layout
//! <dir>/links/cgroup-<cgroup id>-<program>       the cgroup programs' links
//! <dir>/links/sk_lookup-<netns cookie>-<ns>.<pod>  one pod's inbound link
//! ```
//!
//! `ambit-agent uninstall` removes the directory, which detaches everything.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
};

use ambit_abi::{MAP_ABI_VERSION, names};

/// `statfs` type of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where the kernel's BPF filesystem is usually mounted.
const BPF_FS_MOUNT: &str = "/sys/fs/bpf";
const LINKS: &str = "links";
const SK_LOOKUP_PREFIX: &str = "sk_lookup-";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "--bpf-dir {0}: not on a BPF filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`) or pick a directory under one. In Kubernetes, mount the host's /sys/fs/bpf into the agent"
    )]
    NotBpfFs(PathBuf),
    #[error("--bpf-dir {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the kernel object's maps cannot be read: {0}; the agent binary is inconsistent, rebuild it")]
    Object(String),
}

/// The directory of one agent (one node) on the BPF filesystem.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// Opens (creating it) the directory, mounting the BPF filesystem at
    /// /sys/fs/bpf first if the directory belongs there and none is mounted.
    pub fn open(root: &Path) -> Result<Self, PinError> {
        if !on_bpffs(root) {
            if root.starts_with(BPF_FS_MOUNT) && !on_bpffs(Path::new(BPF_FS_MOUNT)) {
                mount_bpffs().map_err(|source| PinError::Io { path: BPF_FS_MOUNT.into(), source })?;
                tracing::warn!(
                    path = BPF_FS_MOUNT,
                    "mounted the BPF filesystem; in a container it lasts only as long as the container, and the capture with it: mount the host's /sys/fs/bpf into the container instead"
                );
            }
            if !on_bpffs(root) {
                return Err(PinError::NotBpfFs(root.to_path_buf()));
            }
        }
        let links = root.join(LINKS);
        std::fs::create_dir_all(&links).map_err(|source| PinError::Io { path: links, source })?;
        Ok(Self { root: root.to_path_buf() })
    }

    /// The maps directory of the given layout (see [`map_layout`]), created.
    pub fn maps(&self, layout: &str) -> Result<PathBuf, PinError> {
        let dir = self.root.join(format!("maps-{layout}"));
        std::fs::create_dir_all(&dir).map_err(|source| PinError::Io { path: dir.clone(), source })?;
        Ok(dir)
    }

    /// The maps directories of every layout but `layout`: left by an agent
    /// of another version, unused once this one's programs are in.
    pub fn other_maps(&self, layout: &str) -> Vec<PathBuf> {
        let current = format!("maps-{layout}");
        self.entries(&self.root)
            .into_iter()
            .filter(|(name, _)| name.starts_with("maps-") && *name != current)
            .map(|(_, path)| path)
            .collect()
    }

    /// The pin of a cgroup program's link: one per cgroup, so links of a
    /// cgroup the agent no longer attaches to can be told apart.
    pub fn cgroup_link(&self, cgroup_id: u64, program: &str) -> PathBuf {
        self.root.join(LINKS).join(format!("cgroup-{cgroup_id}-{program}"))
    }

    /// Cgroup link pins of any cgroup but `cgroup_id`.
    pub fn other_cgroup_links(&self, cgroup_id: u64) -> Vec<PathBuf> {
        let current = format!("cgroup-{cgroup_id}-");
        self.entries(&self.root.join(LINKS))
            .into_iter()
            .filter(|(name, _)| name.starts_with("cgroup-") && !name.starts_with(&current))
            .map(|(_, path)| path)
            .collect()
    }

    /// The pin of pod `pod` (`namespace/name`)'s sk_lookup link. The name
    /// carries the pod, so the next agent knows whose link it is.
    pub fn sk_lookup_link(&self, netns_cookie: u64, pod: &str) -> PathBuf {
        self.root.join(LINKS).join(format!("{SK_LOOKUP_PREFIX}{netns_cookie}-{}", pin_name(pod)))
    }

    /// The pinned sk_lookup links: netns cookie, pod (`namespace/name`), pin.
    pub fn sk_lookup_links(&self) -> Vec<(u64, String, PathBuf)> {
        self.entries(&self.root.join(LINKS))
            .into_iter()
            .filter_map(|(name, path)| {
                let (cookie, pod) = name.strip_prefix(SK_LOOKUP_PREFIX)?.split_once('-')?;
                Some((cookie.parse().ok()?, pod_of_pin_name(pod), path))
            })
            .collect()
    }

    fn entries(&self, dir: &Path) -> Vec<(String, PathBuf)> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect()
    }
}

/// A pod's `namespace/name` as a pin name: the BPF filesystem refuses dots
/// in names (they are its own), and Kubernetes names hold neither `_` nor `+`.
fn pin_name(pod: &str) -> String {
    pod.replace('/', "_").replace('.', "+")
}

fn pod_of_pin_name(name: &str) -> String {
    name.replace('_', "/").replace('+', ".")
}

/// Removes a pin or a directory of pins. A pinned link is detached once its
/// pin and every descriptor of it are gone; a map is freed once no program
/// uses it either.
pub fn remove(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            remove(&entry?.path())?;
        }
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// The name of the maps' layout: [`MAP_ABI_VERSION`] and a digest of every
/// map's type, key and value sizes, capacity and flags, as the kernel
/// object declares them. Two agents share pinned maps only if they agree
/// on both, so an agent never reads maps laid out by another version.
pub fn map_layout(object: &[u8]) -> Result<String, PinError> {
    let object = aya_obj::Object::parse(object).map_err(|e| PinError::Object(e.to_string()))?;
    let mut description = String::new();
    for name in names::MAPS {
        let map = object.maps.get(name).ok_or_else(|| PinError::Object(format!("no map `{name}`")))?;
        description.push_str(&format!(
            "{name}:{}:{}:{}:{}:{};",
            map.map_type(),
            map.key_size(),
            map.value_size(),
            map.max_entries(),
            map.map_flags()
        ));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, description.as_bytes());
    let hex: String = digest.as_ref()[..6].iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("v{MAP_ABI_VERSION}-{hex}"))
}

/// The cgroup id of a cgroup v2 directory: its inode number.
pub fn cgroup_id(cgroup: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(cgroup)?.ino())
}

/// Replaces the program of an attached link in one step (BPF_LINK_UPDATE):
/// the hook is never empty, so no connection passes uncaptured. aya keeps
/// this call to itself for the link types used here.
pub fn update_link(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    /// `union bpf_attr`'s `link_update` member.
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: bpf(2) reads `size_of::<LinkUpdate>()` bytes of `attr`, a live
    // value laid out as the kernel's link_update attribute; both fds are
    // borrowed for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, &raw const attr, std::mem::size_of::<LinkUpdate>() as u32)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a pinned object (BPF_OBJ_GET), e.g. a link to update; aya
/// gives no access to a pinned link's descriptor.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    /// `union bpf_attr`'s `obj_get` member, up to `file_flags`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = CString::new(path.as_os_str().as_bytes())?;
    let attr = ObjGet { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: bpf(2) reads `attr` and the NUL-terminated string it points
    // to, both live for the call; on success it returns a new descriptor,
    // which nothing else owns.
    #[allow(unsafe_code)]
    let fd = unsafe {
        let rc = libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &raw const attr, std::mem::size_of::<ObjGet>() as u32);
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(rc as i32)
    };
    Ok(fd)
}

/// Whether `path`, or the nearest directory above it that exists, is on a
/// BPF filesystem.
fn on_bpffs(path: &Path) -> bool {
    path.ancestors()
        .find(|p| p.exists())
        .and_then(|p| nix::sys::statfs::statfs(p).ok())
        .is_some_and(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
}

fn mount_bpffs() -> io::Result<()> {
    std::fs::create_dir_all(BPF_FS_MOUNT)?;
    nix::mount::mount(Some("bpf"), BPF_FS_MOUNT, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_names_the_version_and_changes_with_the_maps() {
        let layout = map_layout(crate::capture::PROGRAMS).unwrap();
        assert!(layout.starts_with(&format!("v{MAP_ABI_VERSION}-")), "{layout}");
        assert_eq!(layout, map_layout(crate::capture::PROGRAMS).unwrap(), "stable");
    }

    #[test]
    fn a_link_pin_names_its_pod() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(LINKS)).unwrap();
        let pins = PinDir { root: dir.path().to_path_buf() };
        for (cookie, pod) in [(7, "shop/web"), (8, "a/b.c-d")] {
            std::fs::write(pins.sk_lookup_link(cookie, pod), "").unwrap();
        }
        let mut found: Vec<(u64, String)> = pins.sk_lookup_links().into_iter().map(|(c, p, _)| (c, p)).collect();
        found.sort();
        assert_eq!(found, [(7, "shop/web".to_string()), (8, "a/b.c-d".to_string())]);
    }
}
