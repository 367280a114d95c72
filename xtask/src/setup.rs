//! `cargo xtask setup`: everything a fresh machine needs to build and test
//! ambit. Each step checks first and does nothing when its part is there, so
//! a second run takes a second.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{exec, output};

/// bpf-linker links against the nightly toolchain's own LLVM (22); these
/// versions are the ones verified with it (see docs/DEVELOPING.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// Runs the fuzz targets (`cargo xtask fuzz`, and their corpora in `cargo xtask test`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Debian packages the end-to-end tests and the demo run (package, a command it installs).
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("bpftool", "bpftool"),
    ("iperf3", "iperf3"),
    ("curl", "curl"),
    ("tcpdump", "tcpdump"),
    ("nghttp2-client", "h2load"),
    ("python3", "python3"),
    ("openssl", "openssl"),
    ("wrk", "wrk"),
    // libfaketime: an agent on a skewed clock (tests/tests/faults.rs).
    ("faketime", "faketime"),
    // libfuzzer-sys builds libFuzzer (C++) for the fuzz targets in fuzz/.
    ("g++", "g++"),
    // `bridge` and `host-local`, chained before ambit-cni in the Kubernetes-mode tests.
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
];

/// Python modules the tests run (module, PyPI package): the JSON Schema
/// validator for custom resources, and Kubernetes' schemas, bundled for
/// offline validation of the manifests.
const PYTHON_MODULES: &[(&str, &str)] = &[("jsonschema", "jsonschema"), ("kubernetes_validate", "kubernetes-validate")];

pub fn run() -> Result<()> {
    nightly_rust_src()?;
    // The packages download and install while bpf-linker compiles: on a
    // new machine that is most of the setup's time.
    let packages = std::thread::spawn(|| debian_packages().and_then(|()| python_modules()));
    let linker = bpf_linker().and_then(|()| cargo_fuzz());
    packages.join().expect("the package installer does not panic")?;
    linker?;
    println!("setup: everything is in place");
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).context("rustup is not installed")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: installing the nightly toolchain (kernel programs build with it)");
        exec(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let components =
        output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))
            .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: adding rust-src to nightly (for -Z build-std=core)");
        exec(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's LLVM (about a minute)");
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot")?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}; is the nightly toolchain complete?", lib_dir.display()))?;
    // A prefix with two links: libLLVM.so for the linker, and the soname
    // itself for the runtime rpath.
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(".local/share/bpf-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for link in ["libLLVM.so", llvm.as_str()] {
        let path = prefix_lib.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(lib_dir.join(&llvm), &path)?;
    }
    exec(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
            ])
            .arg(BPF_LINKER_LLVM_FEATURE)
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but does not run; check `ldd $(command -v bpf-linker)`");
    }
    Ok(())
}

fn cargo_fuzz() -> Result<()> {
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_some_and(|v| v.contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    println!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    exec(Command::new("cargo").args(["install", "--locked", &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}")]))
}

fn bpf_linker_works() -> bool {
    let Some(path) = output(Command::new("sh").args(["-c", "command -v bpf-linker"])) else {
        return false;
    };
    output(Command::new("bpf-linker").arg("--version")).is_some()
        && output(Command::new("ldd").arg(path.trim())).is_some_and(|ldd| !ldd.contains("not found"))
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, command)| output(Command::new("sh").args(["-c", &format!("command -v {command}")])).is_none())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if output(Command::new("id").arg("-u")).is_none_or(|uid| uid.trim() != "0") {
        bail!("missing Debian packages {missing:?}; install them as root: apt-get install {}", missing.join(" "));
    }
    println!("setup: installing Debian packages {missing:?}");
    exec(Command::new("apt-get").args(["update", "-qq"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn python_modules() -> Result<()> {
    let missing: Vec<&str> = PYTHON_MODULES
        .iter()
        .filter(|(module, _)| output(Command::new("python3").args(["-c", &format!("import {module}")])).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Python packages {missing:?}");
    exec(Command::new("python3").args(["-m", "pip", "install", "--quiet"]).args(&missing))
}
