//! What the benchmarks share: the servers' ports in the bench's pods, and
//! the CPU time of processes.

use anyhow::{Context as _, Result};

pub const IPERF_PORT: u16 = 5201;
pub const ECHO_PORT: u16 = 7000;
pub const HTTP_PORT: u16 = 8000;

/// User and system CPU seconds of `pids`, summed.
/// Busy CPU seconds of the whole machine so far (every process, the
/// kernel's threads and interrupts; idle and iowait left out), from /proc/stat.
pub fn machine_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let total = stat.lines().find_map(|l| l.strip_prefix("cpu ")).context("/proc/stat has no cpu line")?;
    let fields: Vec<f64> = total.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: f64 = fields.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    Ok(busy / 100.0) // USER_HZ
}

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
