# The ambit image: ambit-agent (node agent, CA, CNI installer), ambit-waypoint,
# the `ambit` CLI and the ambit-cni plugin. deploy/ runs it.
#
#   docker build -t <registry>/ambit:<tag> .
#
# Not built in ambit's CI (its machines run no container builder); the steps
# are the ones `cargo xtask setup` and `cargo xtask build --release` run there.

FROM rust:1.95-bookworm AS build
# The kernel programs build with nightly (build-std) and bpf-linker, linked
# against the nightly toolchain's own LLVM (docs/DEVELOPING.md).
# agent/build.rs asks for the toolchain named `nightly`: link it to the dated
# one the recipe was verified with.
RUN rustup toolchain install nightly-2026-05-19 --profile minimal --component rust-src \
    && rustup toolchain link nightly "$(rustc +nightly-2026-05-19 --print sysroot)" \
    && rustup target add x86_64-unknown-linux-musl
RUN SYSROOT=$(rustc +nightly --print sysroot) \
    && LIB=$(basename "$(ls "$SYSROOT"/lib/libLLVM.so.*)") \
    && mkdir -p /opt/bpf-llvm/lib \
    && ln -s "$SYSROOT/lib/$LIB" /opt/bpf-llvm/lib/libLLVM.so \
    && ln -s "$SYSROOT/lib/$LIB" "/opt/bpf-llvm/lib/$LIB" \
    && LLVM_PREFIX=/opt/bpf-llvm cargo install --locked bpf-linker@0.13.0 --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --locked --release -p ambit-agent -p ambit-waypoint -p ambit-cli \
    # The plugin runs on the host, whatever its libc: static.
    && cargo build --locked --release -p ambit-cni --target x86_64-unknown-linux-musl \
    && mkdir -p /out \
    && cp target/release/ambit-agent target/release/ambit-waypoint target/release/ambit /out/ \
    && cp target/x86_64-unknown-linux-musl/release/ambit-cni /out/

FROM gcr.io/distroless/cc-debian12
COPY --from=build /out/ /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/ambit-agent"]
