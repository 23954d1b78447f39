use which::which;

/// Rebuild when bpf-linker changes (e.g. reinstalled against another LLVM).
fn main() {
    let linker = which("bpf-linker").expect(
        "bpf-linker not found: run `cargo xtask test` or `cargo xtask run`, which install it",
    );
    println!("cargo:rerun-if-changed={}", linker.display());
}
