//! `cargo xtask`: ambit's developer tasks.
//!
//! - `setup`: install what building and testing need (idempotent, fast when done)
//! - `build`: build the agent (the kernel programs come with it)
//! - `test`:  every test, unit and end to end, then a leftover check
//! - `demo`:  a simulated two-node cluster with real traffic, explained
//! - `bench`: the data path against no mesh, ratios per round
//! - `crds`:  write the custom resource definitions to `deploy/crds/` and `deploy/base/ambit-crds/`
//! - `fuzz`:  run the cargo-fuzz targets in `fuzz/`
#![forbid(unsafe_code)]

mod bench;
mod cluster_bench;
mod crypto_bench;
mod demo;
mod fuzz;
mod lifecycle_bench;
mod measure;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ambit developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the nightly rust-src, bpf-linker and the Debian packages the tests use.
    Setup,
    /// Build the agent and its kernel programs.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test (unit and end to end) and check nothing was left behind.
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Measure the data path against no mesh (release builds); a Markdown table on stdout.
    Bench {
        /// Two short rounds (under two minutes) instead of five long ones.
        #[arg(long)]
        quick: bool,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write the custom resource definitions (from common/kube/src/crds.rs) to deploy/crds/ (Istio's) and deploy/base/ambit-crds/ (ambit's own).
    Crds,
    /// Fuzz what ambit parses from untrusted input (nightly, libFuzzer), growing fuzz/corpus/.
    Fuzz {
        /// How long to fuzz each target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Bring up a simulated two-node cluster, send real traffic, show what was captured.
    Demo {
        /// Keep the cluster up after the traffic, until Ctrl-C, to explore it.
        #[arg(long)]
        hold: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build { release } => build_agent(release).map(drop),
        Task::Test { cargo_args } => test::run(&cargo_args),
        Task::Demo { hold } => demo::run(hold),
        Task::Bench { quick, out } => bench::run(quick, out),
        Task::Crds => write_crds(),
        Task::Fuzz { seconds, target } => fuzz::run(seconds, target.as_deref()),
    }
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Builds the agent (agent/build.rs builds the kernel programs), and the
/// waypoint, the `ambit` CLI and the `ambit-cni` plugin next to it, and
/// returns the agent binary's path.
fn build_agent(release: bool) -> Result<PathBuf> {
    let mut cargo = cargo();
    cargo.args(["build", "--package", "ambit-agent", "--package", "ambit-waypoint", "--package", "ambit-cli"]);
    cargo.args(["--package", "ambit-cni"]);
    if release {
        cargo.arg("--release");
    }
    exec(&mut cargo)?;
    let binary = root().join("target").join(if release { "release" } else { "debug" }).join("ambit-agent");
    if !binary.exists() {
        bail!("the build finished but {} is missing", binary.display());
    }
    Ok(binary)
}

/// Writes the custom resource definitions to `deploy/crds/` and `deploy/base/ambit-crds/`.
fn write_crds() -> Result<()> {
    let (istio, own) = (root().join("deploy/crds"), root().join("deploy/base/ambit-crds"));
    exec(cargo().args(["run", "--quiet", "--package", "ambit-kube", "--example", "crds", "--"]).arg(istio).arg(own))
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs a command with inherited output; fails on a non-zero exit.
fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout, or `None` if it cannot run or fails.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
