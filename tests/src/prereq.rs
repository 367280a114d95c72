//! What the bed needs from the machine, and the rule for when it is missing:
//! skip loudly on a developer machine, fail in CI (CI=true).

use std::path::PathBuf;

use anyhow::{Context as _, Result};

use crate::{Bed, agent::agent_binary};

/// Commands the bed and the tests run; `cargo xtask setup` installs them.
const TOOLS: &[&str] = &["ip", "ss", "python3", "curl", "iperf3", "bpftool", "sha256sum", "tcpdump", "openssl"];

/// The CNI plugins the Kubernetes-mode bed runs before ambit-cni.
const CNI_PLUGINS: &[&str] = &["/usr/lib/cni/loopback", "/usr/lib/cni/bridge", "/usr/lib/cni/host-local"];

/// Why the bed cannot run here, or `None` when it can.
pub fn missing_prerequisites() -> Option<String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (network namespaces, cgroups and BPF need it)".to_string());
    }
    if cgroup2_mount().is_err() {
        missing.push("a cgroup v2 mount".to_string());
    }
    for tool in TOOLS {
        if !on_path(tool) {
            missing.push(format!("the `{tool}` command (run `cargo xtask setup`)"));
        }
    }
    for plugin in CNI_PLUGINS {
        if !std::path::Path::new(plugin).is_file() {
            missing.push(format!("the CNI plugin {plugin} (containernetworking-plugins; run `cargo xtask setup`)"));
        }
    }
    if !std::path::Path::new(crate::FAKETIME_LIBRARY).is_file() {
        missing.push(format!("libfaketime at {} (faketime; run `cargo xtask setup`)", crate::FAKETIME_LIBRARY));
    }
    let agent = agent_binary();
    if !agent.exists() {
        missing.push(format!("the agent binary at {} (run `cargo xtask test`, which builds it)", agent.display()));
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// A bed with the given nodes, or `None` (after saying why) when this
/// machine cannot run one and this is not CI. In CI it panics instead: an
/// end-to-end test must never pass by skipping there.
pub fn bed_or_skip(nodes: &[&str]) -> Option<Bed> {
    can_run().then(|| Bed::new(nodes).expect("create the test bed"))
}

/// Like [`bed_or_skip`], dual-stack ([`Bed::dual_stack`]).
pub fn dual_stack_bed_or_skip(nodes: &[&str]) -> Option<Bed> {
    can_run().then(|| Bed::dual_stack(nodes).expect("create the dual-stack test bed"))
}

/// Like [`bed_or_skip`], for a bed in Kubernetes mode ([`Bed::kubernetes`]).
pub fn kubernetes_bed_or_skip(nodes: &[&str]) -> Option<Bed> {
    can_run().then(|| Bed::kubernetes(nodes).expect("create the Kubernetes test bed"))
}

fn can_run() -> bool {
    let Some(missing) = missing_prerequisites() else { return true };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true, and the end-to-end test bed cannot run: missing {missing}");
    }
    eprintln!("SKIPPED end-to-end test (not CI): missing {missing}");
    false
}

/// Where cgroup v2 is mounted, read from /proc/self/mountinfo (it differs
/// between machines: /sys/fs/cgroup, /sys/fs/cgroup/unified, ...).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split_whitespace().nth(4)?;
            (after.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup2 filesystem is mounted")
}

/// Mounts the BPF filesystem at /sys/fs/bpf if none is (systemd does on
/// most machines), once per test process: agents started at the same time
/// would each mount one, and a later mount hides the pins under it.
pub fn ensure_bpffs() -> Result<()> {
    static MOUNTED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut mounted = MOUNTED.lock().map_err(|_| anyhow::anyhow!("bpffs lock poisoned"))?;
    if *mounted {
        return Ok(());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let present = mountinfo.lines().any(|line| {
        line.split_once(" - ").is_some_and(|(before, after)| {
            before.split_whitespace().nth(4) == Some(crate::cleanup::BPF_FS) && after.starts_with("bpf ")
        })
    });
    if !present {
        let status = std::process::Command::new("mount").args(["-t", "bpf", "bpf", crate::cleanup::BPF_FS]).status()?;
        anyhow::ensure!(status.success(), "mount -t bpf bpf {} failed ({status})", crate::cleanup::BPF_FS);
    }
    *mounted = true;
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}
