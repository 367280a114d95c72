//! What the benchmarks share: the servers' ports in the bench's pods, and
//! the CPU time of processes.

use anyhow::{Context as _, Result};

pub const IPERF_PORT: u16 = 5201;
pub const ECHO_PORT: u16 = 7000;
pub const HTTP_PORT: u16 = 8000;

/// User and system CPU seconds of `pids`, summed.
pub fn cpu_seconds(pids: &[u32]) -> Result<f64> {
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces): utime is
        // field 14, stime 15, counting from 1.
        let after = stat.rsplit_once(')').context("/proc/pid/stat format")?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        total += (fields[11].parse::<f64>()? + fields[12].parse::<f64>()?) / ticks_per_second;
    }
    Ok(total)
}
