use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Builds the XDP program (lb-ebpf) for the BPF target with the nightly toolchain and leaves
/// the object in OUT_DIR, where `dataplane` embeds it. The build-dependency on lb-ebpf makes
/// cargo rerun this when the program changes.
fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "lb-ebpf",
        root_dir: "../lb-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Nightly).context("building the XDP program (lb-ebpf)")
}
