//! Install what the build and the tests need, idempotently: each step checks first and is
//! quick when its tool is present, and prints one line with the time it took.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

/// Debian packages: LLVM 22 for bpf-linker, tools to inspect and drive the balancer.
const APT_PACKAGES: &[(&str, &str)] = &[
    // (package, a file it installs: present means installed)
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    ("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    ("libzstd-dev", "/usr/include/zstd.h"),
    ("zlib1g-dev", "/usr/include/zlib.h"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("iproute2", "/usr/sbin/ip"),
    ("ethtool", "/usr/sbin/ethtool"),
    ("iperf3", "/usr/bin/iperf3"),
    ("wrk", "/usr/bin/wrk"),
    ("haproxy", "/usr/sbin/haproxy"),
    // h2load: the HTTP/2-over-TLS rows of `cargo xtask bench l7`.
    ("nghttp2-client", "/usr/bin/h2load"),
    ("curl", "/usr/bin/curl"),
    // s_server backends and s_client in the TLS end-to-end tests.
    ("openssl", "/usr/bin/openssl"),
    ("util-linux", "/usr/bin/nsenter"),
    // sipp: the SIP peers of the SIP-header persistence end-to-end test.
    ("sip-tester", "/usr/bin/sipp"),
    // The Redis server (and redis-cli) of mirroring: the multi-instance end-to-end tests and
    // `cargo xtask run` with a `mirroring` config.
    ("redis-server", "/usr/bin/redis-server"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Fuzzing driver for `cargo xtask fuzz` and the test run's fuzz step.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Licence, ban and source checks of the dependency graph (`deny.toml`).
const CARGO_DENY_VERSION: &str = "0.20.2";

pub fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    eprintln!("[xtask] {what} ...");
    let r = f();
    let secs = t.elapsed().as_secs_f64();
    match &r {
        Ok(_) => eprintln!("[xtask] {what}: ok ({secs:.1}s)"),
        Err(e) => eprintln!("[xtask] {what}: FAILED after {secs:.1}s: {e:#}"),
    }
    r
}

pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} exited with {status}");
    }
    Ok(())
}

fn cmd_ok(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

pub fn cargo_home_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        });
    home.join("bin").join(name)
}

fn ensure_apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        eprintln!("[xtask] apt packages: all present");
        return Ok(());
    }
    step(&format!("apt-get install {}", missing.join(" ")), || {
        run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
        run_cmd(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing),
        )
    })
}

fn ensure_rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        eprintln!("[xtask] rust-src (nightly): present");
        return Ok(());
    }
    step("rustup component add rust-src --toolchain nightly", || {
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
    })
}

fn ensure_bpf_linker() -> Result<()> {
    let bin = cargo_home_bin("bpf-linker");
    if cmd_ok(Command::new(&bin).arg("--version")) {
        let out = Command::new(&bin).arg("--version").output()?;
        if String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION) {
            eprintln!("[xtask] bpf-linker {BPF_LINKER_VERSION}: present");
            return Ok(());
        }
    }
    step(
        &format!(
            "cargo install bpf-linker {BPF_LINKER_VERSION} for LLVM 22 (3-4 minutes the first time)"
        ),
        || {
            run_cmd(
                Command::new("cargo")
                    .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                    .args([
                        "install",
                        "--locked",
                        "bpf-linker",
                        "--version",
                        BPF_LINKER_VERSION,
                    ])
                    .args(["--no-default-features", "--features", "llvm-22"]),
            )
        },
    )
}

/// `cargo install --locked NAME --version VERSION` unless `cargo NAME --version` says it is.
fn ensure_cargo_tool(name: &str, version: &str, note: &str) -> Result<()> {
    let bin = cargo_home_bin(&format!("cargo-{name}"));
    if let Ok(out) = Command::new(&bin).args([name, "--version"]).output()
        && out.status.success()
        && String::from_utf8_lossy(&out.stdout).contains(version)
    {
        eprintln!("[xtask] cargo-{name} {version}: present");
        return Ok(());
    }
    step(
        &format!("cargo install cargo-{name} {version} ({note})"),
        || {
            run_cmd(Command::new("cargo").args([
                "install",
                "--locked",
                &format!("cargo-{name}"),
                "--version",
                version,
            ]))
        },
    )
}

pub fn ensure_cargo_fuzz() -> Result<()> {
    ensure_rust_src()?;
    ensure_cargo_tool("fuzz", CARGO_FUZZ_VERSION, "about a minute the first time")
}

pub fn ensure_cargo_deny() -> Result<()> {
    ensure_cargo_tool(
        "deny",
        CARGO_DENY_VERSION,
        "about 18 minutes the first time on 2 shared cores",
    )
}

fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    step("mount bpffs on /sys/fs/bpf", || {
        run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
    })
}

/// Everything the build, the tests and the demo need.
pub fn ensure_all() -> Result<()> {
    let t = Instant::now();
    if !nix_is_root() {
        bail!("tether's tasks load BPF programs and create network namespaces: run them as root");
    }
    ensure_apt()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_bpffs()?;
    eprintln!(
        "[xtask] bootstrap complete ({:.1}s)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Workspace root (xtask's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

/// Build the daemon (which embeds the XDP program) and return the binary's path.
pub fn build_tether(release: bool) -> Result<PathBuf> {
    let root = workspace_root();
    step(
        &format!(
            "cargo build tether ({})",
            if release { "release" } else { "debug" }
        ),
        || {
            let mut c = Command::new("cargo");
            c.current_dir(&root).args([
                "build",
                "--locked",
                "-p",
                "lb-userspace",
                "--bin",
                "tether",
            ]);
            if release {
                c.arg("--release");
            }
            run_cmd(&mut c)
        },
    )?;
    let bin = root
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("tether");
    if !bin.exists() {
        bail!("build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}
