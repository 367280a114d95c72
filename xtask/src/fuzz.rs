//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (nightly,
//! libFuzzer with AddressSanitizer), each for a while, growing its corpus
//! in `fuzz/corpus/<target>`; and the replay of those corpora that
//! `cargo xtask test` runs in CI.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{exec, root};

/// The targets, one per thing ambit parses from untrusted input.
pub const TARGETS: &[&str] = &["hbone_connect", "objects_yaml", "jwt", "path_normalization", "ca_request"];

fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz"]).current_dir(root());
    cmd
}

/// Fuzzes each target for `seconds` and prints what it did: executions,
/// coverage, corpus size (minimized), and whether it found a crash (which
/// fails the task, with the reproducer left in `fuzz/artifacts/<target>/`).
pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = TARGETS.iter().copied().filter(|t| only.is_none_or(|o| o == *t)).collect();
    if targets.is_empty() {
        bail!("no fuzz target {only:?}; the targets are {TARGETS:?}");
    }
    exec(cargo_fuzz().args(["build", "-O"]))?;
    let mut crashed = Vec::new();
    println!(
        "| target | executions | exec/s | coverage (edges) | corpus | crash |\n| --- | --- | --- | --- | --- | --- |"
    );
    for target in targets {
        std::fs::create_dir_all(corpus(target))?;
        let out = cargo_fuzz()
            .args(["run", "-O", target])
            .arg(corpus(target))
            .args(["--", &format!("-max_total_time={seconds}"), "-print_final_stats=1"])
            .output()
            .with_context(|| format!("run fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let stat = |name: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")).map(str::trim))
                .unwrap_or("?")
                .to_string()
        };
        let coverage =
            log.lines().rev().find_map(|l| l.split_whitespace().skip_while(|w| *w != "cov:").nth(1)).unwrap_or("?");
        let crash = !out.status.success();
        // Keeps the smallest set of inputs with the same coverage: the corpus
        // is committed and replayed in CI.
        exec(cargo_fuzz().args(["cmin", "-O", target]).arg(corpus(target)).stdout(std::process::Stdio::null()))?;
        let corpus_size = std::fs::read_dir(corpus(target)).map(|d| d.count()).unwrap_or(0);
        println!(
            "| {target} | {} | {} | {coverage} | {corpus_size} | {} |",
            stat("number_of_executed_units"),
            stat("average_exec_per_sec"),
            if crash { "YES" } else { "no" }
        );
        if crash {
            eprintln!("{log}");
            crashed.push(target);
        }
    }
    if !crashed.is_empty() {
        bail!("crashes in {crashed:?}; the reproducers are in fuzz/artifacts/");
    }
    Ok(())
}

/// Runs every target once over each input of its corpus, without fuzzing:
/// what once crashed, or found new code, still passes.
pub fn replay() -> Result<()> {
    exec(cargo_fuzz().args(["build", "-O"]))?;
    for target in TARGETS {
        exec(cargo_fuzz().args(["run", "-O", target]).arg(corpus(target)).args(["--", "-runs=0"]))
            .with_context(|| format!("replaying the corpus of fuzz target {target}"))?;
    }
    Ok(())
}

fn corpus(target: &str) -> std::path::PathBuf {
    root().join("fuzz/corpus").join(target)
}
