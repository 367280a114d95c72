//! Finding the network namespaces of pods that already run, from `/proc`:
//! at start-up (the agent was restarted or upgraded and no CNI ADD will
//! come again for them) and whenever an ambient pod of the node has none.
//!
//! A process's pod is the uid in its cgroup path (`.../pod<uid>/...` with
//! cgroupfs, `...-pod<uid with _>.slice` with systemd). A netns found that
//! way is accepted only if it holds one of the pod's addresses: a uid in a
//! path is a hint, an address in the namespace is the fact.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::netns::Netns;

/// For each pod uid of `wanted`, a netns path under `proc_root` that
/// holds one of the pod's addresses. The agent's own netns is skipped.
pub fn find_pod_netns(proc_root: &Path, wanted: &HashMap<String, Vec<IpAddr>>) -> HashMap<String, PathBuf> {
    let mut found = HashMap::new();
    let Ok(entries) = fs::read_dir(proc_root) else {
        tracing::warn!(proc = %proc_root.display(), "cannot read the process list; running pods are not found again");
        return found;
    };
    let own = fs::metadata(proc_root.join("self/ns/net")).map(|m| m.ino()).ok();
    let mut seen = HashSet::new();
    for entry in entries.flatten() {
        if found.len() == wanted.len() {
            break;
        }
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let process = entry.path();
        let netns = process.join("ns/net");
        // Processes come and go while the scan runs: skip what vanished.
        let Ok(inode) = fs::metadata(&netns).map(|m| m.ino()) else { continue };
        if Some(inode) == own || seen.contains(&inode) {
            continue;
        }
        let Some(uid) = fs::read_to_string(process.join("cgroup")).ok().and_then(|c| pod_uid_in(&c)) else {
            continue;
        };
        seen.insert(inode);
        let Some(ips) = wanted.get(&uid) else { continue };
        if !found.contains_key(&uid) && holds_any(&netns, ips) {
            found.insert(uid, netns);
        }
    }
    found
}

/// Whether the netns at `path` has one of `ips` as a local address (one a
/// socket there can bind to).
pub fn holds_any(path: &Path, ips: &[IpAddr]) -> bool {
    let Ok(netns) = Netns::open(path) else { return false };
    ips.iter().any(|ip| netns.listen(SocketAddr::new(*ip, 0)).is_ok())
}

/// The pod uid in a `/proc/<pid>/cgroup` text, if any.
fn pod_uid_in(cgroup: &str) -> Option<String> {
    cgroup.match_indices("pod").find_map(|(at, _)| {
        let candidate = cgroup.get(at + 3..at + 3 + 36)?.replace('_', "-");
        is_uuid(&candidate).then_some(candidate)
    })
}

fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uids_come_from_either_cgroup_driver() {
        let uid = "0f1e2d3c-4b5a-4697-8877-665544332211";
        let cases = [
            ("0::/kubepods/besteffort/pod0f1e2d3c-4b5a-4697-8877-665544332211/3f9a\n", Some(uid)),
            (
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_4697_8877_665544332211.slice/cri-containerd-ab.scope\n",
                Some(uid),
            ),
            ("0::/system.slice/kubelet.service\n", None),
            ("0::/kubepods/podnot-a-uid/x\n", None),
            ("0::/pod0f1e2d3c", None),
        ];
        for (cgroup, expected) in cases {
            assert_eq!(pod_uid_in(cgroup).as_deref(), expected, "{cgroup}");
        }
    }
}
