//! The crypto-provider comparison of `cargo xtask bench`: rustls with ring
//! and with aws-lc-rs, AES-128-GCM and AES-256-GCM, sealing and opening
//! 16 KiB records in memory on one core (`ambit-bench tls-throughput`),
//! next to what OpenSSL reaches on the same machine.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde_json::Value;

/// One JSON object per provider and suite, measured alternately `rounds` times.
pub fn run(tool: &Path, rounds: usize, megabytes: usize) -> Result<Vec<Value>> {
    let mut runs = Vec::new();
    for _ in 0..rounds {
        let out = Command::new(tool).args(["tls-throughput", "--megabytes", &megabytes.to_string()]).output()?;
        anyhow::ensure!(out.status.success(), "tls-throughput: {}", String::from_utf8_lossy(&out.stderr));
        for line in String::from_utf8(out.stdout)?.lines() {
            runs.push(serde_json::from_str(line).context("tls-throughput output")?);
        }
    }
    Ok(runs)
}

/// `openssl speed -evp` for both AES-GCM sizes: the last line of each,
/// kB/s per block size (16 B to 16 KiB). `None` without openssl.
pub fn openssl_speed() -> Option<Value> {
    let mut speeds = serde_json::Map::new();
    for cipher in ["aes-128-gcm", "aes-256-gcm"] {
        let out = Command::new("openssl").args(["speed", "-seconds", "1", "-evp", cipher]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last()?.to_string();
        speeds.insert(cipher.to_string(), Value::String(line));
    }
    Some(Value::Object(speeds))
}
