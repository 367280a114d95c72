//! Removing what a run created, and finding what a run left behind.

use std::{path::Path, process::Command, time::Duration};

use crate::{PREFIX, prereq::cgroup2_mount, wait_until};

/// Removes every netns and cgroup of run `run` (`<pid>-<n>`), killing the
/// processes still in its cgroups first.
pub fn remove_run(run: &str) {
    let prefix = format!("{PREFIX}{run}");
    // The pinned capture first: it stays attached after the agents exit.
    remove_pins(&Path::new(BPF_FS).join(&prefix));
    if let Ok(root) = cgroup2_mount() {
        let run_cgroup = root.join(&prefix);
        if run_cgroup.exists() {
            // cgroup.kill (Linux 5.14) kills the whole subtree at once.
            let _ = std::fs::write(run_cgroup.join("cgroup.kill"), "1");
            remove_cgroup_tree(&run_cgroup);
        }
    }
    for netns in netns_names().into_iter().filter(|n| n.starts_with(&format!("{prefix}-"))) {
        let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    }
}

/// Where the bed's agents pin their capture: `<BPF_FS>/<PREFIX><run>/<node>`.
pub const BPF_FS: &str = "/sys/fs/bpf";

/// Removes a directory of pins (links detach, maps go), as `ambit-agent uninstall` does.
fn remove_pins(path: &Path) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            remove_pins(&entry.path());
        }
        let _ = std::fs::remove_dir(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    // The kernel removes a cgroup only once its killed processes are gone.
    let _ =
        wait_until(Duration::from_secs(5), "cgroup removal", || Ok(std::fs::remove_dir(dir).is_ok() || !dir.exists()));
}

/// Removes what runs of processes that no longer exist left behind (a test
/// binary killed by a signal cannot run its destructors).
pub fn remove_stale() {
    let mut runs: Vec<String> = netns_names().iter().filter_map(|n| run_of(n)).collect();
    if let Ok(root) = cgroup2_mount()
        && let Ok(entries) = std::fs::read_dir(root)
    {
        runs.extend(entries.flatten().filter_map(|e| run_of(&e.file_name().to_string_lossy())));
    }
    if let Ok(entries) = std::fs::read_dir(BPF_FS) {
        runs.extend(entries.flatten().filter_map(|e| run_of(&e.file_name().to_string_lossy())));
    }
    runs.sort();
    runs.dedup();
    for run in runs {
        let pid = run.split('-').next().and_then(|p| p.parse::<i32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            remove_run(&run);
        }
    }
}

/// `<pid>-<n>` from a bed resource name `ambit-<pid>-<n>[-...]`.
fn run_of(name: &str) -> Option<String> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?;
    let n = parts.next()?;
    (pid.chars().all(|c| c.is_ascii_digit()) && n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty())
        .then(|| format!("{pid}-{n}"))
}

fn netns_names() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Everything of ambit's still on the machine: bed netns and cgroups, and
/// loaded kernel programs. Empty after a clean test run.
pub fn leftovers() -> Vec<String> {
    let mut found: Vec<String> =
        netns_names().into_iter().filter(|n| n.starts_with(PREFIX)).map(|n| format!("netns {n}")).collect();
    if let Ok(root) = cgroup2_mount()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        found.extend(
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
                .map(|e| format!("cgroup {}", e.path().display())),
        );
    }
    if let Ok(entries) = std::fs::read_dir(BPF_FS) {
        found.extend(
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
                .map(|e| format!("pins {}", e.path().display())),
        );
    }
    if let Ok(output) = Command::new("bpftool").args(["-j", "prog", "show"]).output()
        && let Ok(serde_json::Value::Array(progs)) = serde_json::from_slice(&output.stdout)
    {
        found.extend(progs.iter().filter_map(|p| {
            let name = p.get("name")?.as_str()?;
            let id = p.get("id")?;
            name.starts_with("ambit_").then(|| format!("BPF program {name} (id {id})"))
        }));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::run_of;

    #[test]
    fn run_ids_are_read_from_resource_names() {
        assert_eq!(run_of("ambit-123-4-node1").as_deref(), Some("123-4"));
        assert_eq!(run_of("ambit-123-4").as_deref(), Some("123-4"));
        assert_eq!(run_of("ambit-smoke"), None);
        assert_eq!(run_of("other-1-2"), None);
    }
}
