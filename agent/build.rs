//! Builds the kernel programs (ebpf/, nightly, bpfel-unknown-none) with aya-build
//! and leaves the object in OUT_DIR for `include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ebpf_dir = root.join("ebpf");
    // aya-build watches the ebpf crate; the shared map types live in common/abi.
    println!("cargo:rerun-if-changed={}", root.join("common/abi/src").display());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ambit-ebpf",
            root_dir: ebpf_dir.to_str().expect("repository path is UTF-8"),
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
