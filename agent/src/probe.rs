//! Start-up checks of the kernel features the agent depends on. A missing
//! feature stops the agent with a message that names it and the kernel
//! version that has it: the agent never runs without capture.

use std::path::Path;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

/// One missing prerequisite, said for an operator.
#[derive(Debug)]
pub struct Missing(pub String);

/// Checks everything; returns what is missing (empty when all is there).
pub fn missing_features(cgroup: &Path) -> Vec<Missing> {
    let mut missing = Vec::new();
    let mut need = |ok: Result<bool, String>, what: &str| need(&mut missing, ok, what);
    for (program, what) in [
        (ProgramType::CgroupSockAddr, "BPF program type cgroup_sock_addr (Linux 4.17) for outbound capture"),
        (ProgramType::SockOps, "BPF program type sock_ops (Linux 4.13) to key original destinations"),
        (ProgramType::SkLookup, "BPF program type sk_lookup (Linux 5.9) for inbound capture"),
    ] {
        need(is_program_supported(program).map_err(|e| e.to_string()), what);
    }
    for (map, what) in [
        (MapType::SockHash, "BPF map type sockhash (Linux 4.18)"),
        (MapType::LruHash, "BPF map type lru_hash (Linux 4.10)"),
        (MapType::PerCpuArray, "BPF map type percpu_array (Linux 4.6)"),
    ] {
        need(is_map_supported(map).map_err(|e| e.to_string()), what);
    }
    for (program, helper, what) in [
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
            "bpf_get_netns_cookie in cgroup_sock_addr (Linux 5.7)",
        ),
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "bpf_get_socket_cookie in cgroup_sock_addr (Linux 4.12)",
        ),
        (ProgramType::SockOps, BpfHelper::BPF_FUNC_get_socket_cookie, "bpf_get_socket_cookie in sock_ops (Linux 5.10)"),
        (ProgramType::SkLookup, BpfHelper::BPF_FUNC_sk_assign, "bpf_sk_assign in sk_lookup (Linux 5.9)"),
    ] {
        need(is_helper_supported(program, helper).map_err(|e| e.to_string()), what);
    }
    need(netns_cookie_sockopt(), "getsockopt SO_NETNS_COOKIE (Linux 5.14) to match pods to their netns");
    need(is_cgroup2(cgroup), &format!("{} must be a cgroup v2 directory (pass --cgroup)", cgroup.display()));
    missing
}

/// What the same-node fast path in the kernel needs beyond capture;
/// without it the agent relays same-node connections in user space.
pub fn missing_for_splice() -> Vec<Missing> {
    let mut missing = Vec::new();
    let checks = [
        (is_program_supported(ProgramType::SkSkb), "BPF program type sk_skb (Linux 4.14)"),
        (
            is_helper_supported(ProgramType::SkSkb, BpfHelper::BPF_FUNC_sk_redirect_hash),
            "bpf_sk_redirect_hash in sk_skb (Linux 4.18)",
        ),
        (
            is_helper_supported(ProgramType::SkSkb, BpfHelper::BPF_FUNC_get_socket_cookie),
            "bpf_get_socket_cookie in sk_skb (Linux 4.12)",
        ),
    ];
    for (ok, what) in checks {
        need(&mut missing, ok.map_err(|e| e.to_string()), what);
    }
    missing
}

/// Records `what` as missing unless the probe said it is there.
fn need(missing: &mut Vec<Missing>, ok: Result<bool, String>, what: &str) {
    match ok {
        Ok(true) => {}
        Ok(false) => missing.push(Missing(what.to_string())),
        Err(e) => missing.push(Missing(format!("{what} (probe failed: {e})"))),
    }
}

fn netns_cookie_sockopt() -> Result<bool, String> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(crate::netns::netns_cookie(&socket).is_ok())
}

fn is_cgroup2(path: &Path) -> Result<bool, String> {
    match nix::sys::statfs::statfs(path) {
        Ok(fs) => Ok(fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}
