//! `cargo xtask bench veth`: TCP throughput with iperf3 through the VIP in tether's default
//! `xdp_mode` on a veth (the e2e topology: client, LB and backends on one bridge, the LB's
//! veth peer without any XDP program, the daemon started with `ip netns exec` and a config
//! that sets no xdp_mode), against iperf3 straight to the backend, side by side: rounds
//! alternate direct and VIP, and the figure is the ratio of the medians. Both directions:
//! upload (the data crosses the XDP program) and download (`-R`: with direct server return
//! only the client's ACKs cross it).
//!
//! Not a test: it asserts nothing about speed, it reports. Results go to stdout and
//! target/bench/veth.md.

use std::{
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tether_tests::{
    bench::Args,
    daemon::{ConfigBuilder, Daemon, tether_bin},
    netns::Topology,
};

const PORT: u16 = 5201;

struct Opts {
    rounds: usize,
    secs: u32,
}

fn opts() -> Opts {
    let mut o = Opts { rounds: 5, secs: 5 };
    let mut args = Args::from_env("--rounds N --secs N --quick");
    while let Some(a) = args.next_flag() {
        match a.as_str() {
            "--rounds" => o.rounds = args.value(&a),
            "--secs" => o.secs = args.value(&a),
            "--quick" => {
                o.rounds = 3;
                o.secs = 2;
            }
            other => args.unknown(other),
        }
    }
    o
}

/// iperf3 servers in the backend namespaces, stopped by pid on drop.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        for c in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(3);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One iperf3 run from `src` in the client namespace to `dst` (`reverse`: the server sends):
/// received bits per second.
fn iperf(topo: &Topology, src: Ipv4Addr, dst: Ipv4Addr, secs: u32, reverse: bool) -> f64 {
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.client.ns, "iperf3", "-J", "-c"])
        .arg(dst.to_string())
        .args(["-p", &PORT.to_string(), "-B", &src.to_string(), "-t"])
        .arg(secs.to_string())
        .args(reverse.then_some("-R"))
        .stdin(Stdio::null())
        .output()
        .expect("running iperf3");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 to {dst}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 to {dst} failed: {}", v["error"]))
}

fn median(v: Vec<f64>) -> f64 {
    tether_tests::bench::median(v).expect("a finite value from at least one round")
}

fn main() {
    let o = opts();
    let bin = tether_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let topo = Topology::builder()
        .client_addrs(1)
        .backends(1)
        .build()
        .unwrap_or_else(|e| panic!("building the topology: {e:#}"));
    let servers = Servers(
        topo.backends
            .iter()
            .map(|b| {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &b.ns, "iperf3", "-s", "-p"])
                    .arg(PORT.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                c.spawn()
                    .expect("starting iperf3 -s (cargo xtask bootstrap installs it)")
            })
            .collect(),
    );
    // Default xdp_mode: the daemon picks it, as for a user.
    let cfg = ConfigBuilder::new(&topo, &topo.pin_dir("bench"))
        .service("iperf", PORT, Some(1800))
        .build();
    let daemon = Daemon::start(&bin, &topo.lb.ns, &cfg, false)
        .unwrap_or_else(|e| panic!("starting tether: {e:#}"));
    let mode = topo
        .lb_xdp_mode()
        .expect("ip link show")
        .unwrap_or_else(|| "none".into());
    std::thread::sleep(Duration::from_millis(500));

    let (src, backend) = (topo.client.addr, topo.backends[0].addr);
    // [upload direct, upload VIP, download direct, download VIP], one run of each per round.
    let mut runs: [Vec<f64>; 4] = Default::default();
    for r in 0..o.rounds {
        for (i, (dst, reverse)) in [
            (backend, false),
            (topo.vip, false),
            (backend, true),
            (topo.vip, true),
        ]
        .into_iter()
        .enumerate()
        {
            runs[i].push(iperf(&topo, src, dst, o.secs, reverse));
        }
        eprintln!(
            "round {r}: upload direct {:.2} VIP {:.2}, download direct {:.2} VIP {:.2} Gbit/s",
            runs[0][r] / 1e9,
            runs[1][r] / 1e9,
            runs[2][r] / 1e9,
            runs[3][r] / 1e9
        );
    }
    drop(daemon);
    drop(servers);
    let [ud, uv, dd, dv] = runs.map(median);
    let report = format!(
        "| iperf3 on veth, {} rounds of {} s, medians | Gbit/s |\n| --- | ---: |\n\
         | upload, direct to the backend | {:.2} |\n\
         | upload through the VIP, default xdp_mode (`{mode}`) | {:.2} (**{:.2}x direct**) |\n\
         | download (-R), direct | {:.2} |\n\
         | download (-R) through the VIP (DSR: replies bypass the LB) | {:.2} (**{:.2}x direct**) |\n",
        o.rounds,
        o.secs,
        ud / 1e9,
        uv / 1e9,
        uv / ud,
        dd / 1e9,
        dv / 1e9,
        dv / dd
    );
    println!("{report}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("veth.md"), &report);
}
