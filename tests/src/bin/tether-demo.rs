//! `cargo xtask run`: tether balancing real TCP in network namespaces.
//!
//! Builds a client namespace with many source addresses, an LB namespace running the real
//! daemon (`$TETHER_BIN`) and backend namespaces with small HTTP servers (and iperf3 servers),
//! all on one bridge; prints what to try, waits for Ctrl-C and removes everything.
//! `--smoke` instead sends a bounded amount of traffic from every client address, prints
//! where it went and exits 0 only if every connection succeeded, every backend got clients
//! and every client stayed on one backend.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use lb_common::maps::PROTO_TCP;
use tether_tests::{
    daemon::{ConfigBuilder, Daemon, tether_bin},
    http::BackendServers,
    multilab::RedisServer,
    netns::{Topology, VIP, wait_until},
    pinned::Pins,
};

const HTTP_PORT: u16 = 80;
const IPERF_PORT: u16 = 5201;
const DEMO_PIN_DIR: &str = "/sys/fs/bpf/tether-demo";
/// Written while the demo runs; scripts/*.sh read it.
const ENV_FILE: &str = "/run/tether-demo.env";
/// A copy of the daemon's config while the demo runs.
const CONFIG_FILE: &str = "/run/tether-demo.json";

#[derive(Parser, Debug)]
#[command(
    name = "tether-demo",
    about = "tether in network namespaces: a client with many addresses, the LB, backends"
)]
struct Args {
    /// Send a bounded amount of traffic, report, tear down and exit (0 = all good).
    #[arg(long)]
    smoke: bool,
    /// Source addresses in the client namespace (10.99.0.100 ...).
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Backend namespaces (10.99.0.11 ...).
    #[arg(long, default_value_t = 3)]
    backends: usize,
    /// XDP attach mode for the daemon: auto, native or generic.
    #[arg(long, default_value = "auto")]
    xdp_mode: String,
    /// Persistence timeout of the demo's services, seconds.
    #[arg(long, default_value_t = 300)]
    persistence_timeout: u64,
    /// Connections per client address in --smoke.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Show the daemon's log lines as they come.
    #[arg(long)]
    daemon_logs: bool,
    /// Mirror the persistence table through Redis: starts `redis-server` in the LB
    /// namespace (no persistence, stopped at the end) and adds a `mirroring` section to the
    /// daemon's config; --smoke then also checks that the bindings reached Redis.
    #[arg(long)]
    mirror: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

/// iperf3 servers (one per backend namespace), stopped by pid.
struct Iperf {
    children: Vec<Child>,
}

impl Iperf {
    fn start(topo: &Topology) -> Iperf {
        let mut children = Vec::new();
        if which("iperf3").is_none() {
            eprintln!(
                "(iperf3 not installed: no iperf3 servers; `cargo xtask bootstrap` installs it)"
            );
            return Iperf { children };
        }
        for b in &topo.backends {
            let mut cmd = Command::new("ip");
            cmd.args([
                "netns",
                "exec",
                &b.ns,
                "iperf3",
                "-s",
                "-p",
                &IPERF_PORT.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            match cmd.spawn() {
                Ok(c) => children.push(c),
                Err(e) => eprintln!("warning: starting iperf3 in {}: {e}", b.ns),
            }
        }
        Iperf { children }
    }
}

impl Drop for Iperf {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        for c in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(3);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

fn main() {
    let args = Args::parse();
    install_signal_handlers();
    match run(&args) {
        Ok(true) => std::process::exit(0),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("tether-demo: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: &Args) -> Result<bool> {
    let bin = tether_bin()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads XDP programs: run it as root");
    }
    let t = Instant::now();
    let topo = Topology::builder()
        .client_addrs(args.clients)
        .backends(args.backends)
        .build()
        .context("building the namespaces")?;
    let servers = BackendServers::start(&topo, HTTP_PORT).context("starting the HTTP backends")?;
    let iperf = if args.smoke {
        None
    } else {
        Some(Iperf::start(&topo))
    };
    let pin_dir = Path::new(DEMO_PIN_DIR);
    let redis = if args.mirror {
        Some(RedisServer::start(&topo.lb.ns).context("starting redis-server for --mirror")?)
    } else {
        None
    };
    let mut builder = ConfigBuilder::new(&topo, pin_dir)
        .xdp_mode(&args.xdp_mode)
        .service("web", HTTP_PORT, Some(args.persistence_timeout))
        .service("iperf", IPERF_PORT, Some(args.persistence_timeout));
    if redis.is_some() {
        builder = builder.top_field(
            "mirroring",
            serde_json::json!({"redis": RedisServer::url(), "instance": "demo"}),
        );
    }
    let config = builder.build();
    let daemon =
        Daemon::start(&bin, &topo.lb.ns, &config, args.daemon_logs).context("starting tether")?;
    let mode = topo
        .lb_xdp_mode()
        .ok()
        .flatten()
        .unwrap_or_else(|| "none?".into());
    eprintln!(
        "tether-demo: {} client addresses, {} backends, XDP attached as `{mode}` on {} ({:.1}s)",
        topo.client_addrs.len(),
        topo.backends.len(),
        topo.lb.ifname,
        t.elapsed().as_secs_f64()
    );

    let ok = if args.smoke {
        let ok = smoke(args, &topo, &servers, &daemon);
        match (&redis, ok) {
            (Some(r), Ok(true)) => Ok(mirrored(r, topo.client_addrs.len() as u64)),
            (_, ok) => ok,
        }
    } else {
        interactive(&topo, &config, &daemon)
    };

    // Teardown, in order: daemon (detaches XDP), Redis, servers, namespaces.
    let stopped = daemon.stop();
    drop(redis);
    drop(iperf);
    drop(servers);
    drop(topo);
    let _ = std::fs::remove_file(ENV_FILE);
    let _ = std::fs::remove_file(CONFIG_FILE);
    match stopped {
        Ok(_) => eprintln!("tether-demo: tether stopped, namespaces and {DEMO_PIN_DIR} removed"),
        Err(e) => {
            eprintln!("tether-demo: stopping tether: {e:#}");
            return Ok(false);
        }
    }
    ok
}

fn interactive(topo: &Topology, config: &serde_json::Value, daemon: &Daemon) -> Result<bool> {
    let pid = daemon.pid().unwrap_or(0);
    let cl = &topo.client.ns;
    let first = topo.client_addrs[0];
    let last = *topo.client_addrs.last().expect("at least one");
    let env = format!(
        "# written by tether-demo (pid {}); removed when it exits\n\
         CLIENT_NS={cl}\nLB_NS={}\nLB_IF={}\nBACKEND_NS=\"{}\"\nVIP={VIP}\nHTTP_PORT={HTTP_PORT}\n\
         IPERF_PORT={IPERF_PORT}\nCLIENT_ADDRS=\"{}\"\nFIRST_CLIENT={first}\nPIN_DIR={DEMO_PIN_DIR}\n",
        std::process::id(),
        topo.lb.ns,
        topo.lb.ifname,
        topo.backends
            .iter()
            .map(|b| b.ns.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        topo.client_addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" "),
    );
    std::fs::write(ENV_FILE, env).with_context(|| format!("writing {ENV_FILE}"))?;
    let root = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let scripts = root.join("scripts");
    std::fs::write(CONFIG_FILE, serde_json::to_vec_pretty(config)?)
        .with_context(|| format!("writing {CONFIG_FILE}"))?;
    let s = scripts.display();
    println!(
        r#"
tether (pid {pid}) balances {VIP}:{HTTP_PORT} (HTTP) and {VIP}:{IPERF_PORT} (iperf3) over {nb} backends
with client-IP persistence ({timeout} s) and direct server return. Its config: {CONFIG_FILE}

Try, in another terminal (as root):
  ip netns exec {cl} curl -s --interface {first} http://{VIP}/   # -> a backend's name
  ip netns exec {cl} curl -s --interface {last} http://{VIP}/
  {bin} status --config {CONFIG_FILE}        # services, backends, bound clients, counters (Unix socket)
  {bin} persist list --config {CONFIG_FILE}  # client -> backend entries with their age
  bpftool map dump pinned {DEMO_PIN_DIR}/TETHER_PERSIST4   # the same table (IPv4 clients; shard 0 of it), raw
  bpftool map dump pinned {DEMO_PIN_DIR}/TETHER_SVC_STAT   # per-service counters, per CPU
  ip -n {lbns} -d link show dev {lbif}   # the attached XDP program
  {s}/curl-all.sh   # one request from every client address, tallied per backend
  {s}/wrk.sh        # HTTP load with wrk (one source address, so one backend)
  {s}/iperf3.sh     # TCP throughput with iperf3 through the XDP path
Namespaces: {cl} (client), {lbns} (LB), {bns} (backends); all names in {ENV_FILE}.

Press Ctrl-C to stop and remove everything."#,
        nb = topo.backends.len(),
        bin = tether_bin()
            .map(|b| b.display().to_string())
            .unwrap_or_else(|_| "tether".into()),
        timeout = config["persistence_profiles"][0]["timeout_s"],
        lbns = topo.lb.ns,
        lbif = topo.lb.ifname,
        bns = topo
            .backends
            .iter()
            .map(|b| b.ns.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    );
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: signal 0 only checks that the process exists.
        if pid != 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
            eprintln!(
                "tether-demo: tether exited unexpectedly; its output:\n{}",
                daemon.logs()
            );
            return Ok(false);
        }
    }
    eprintln!("\ntether-demo: stopping");
    Ok(true)
}

/// --smoke --mirror: every client's binding reached Redis (one key each).
fn mirrored(redis: &RedisServer, clients: u64) -> bool {
    let ok = wait_until(Duration::from_secs(10), || redis.dbsize() >= clients);
    println!(
        "  mirroring: {} bindings in Redis: {}",
        redis.dbsize(),
        if ok { "PASS" } else { "FAIL" }
    );
    ok
}

fn smoke(args: &Args, topo: &Topology, servers: &BackendServers, daemon: &Daemon) -> Result<bool> {
    let plan: Vec<Ipv4Addr> = (0..args.rounds)
        .flat_map(|_| topo.client_addrs.iter().copied())
        .collect();
    let t = Instant::now();
    let fetches = topo.fetch_all(&plan, HTTP_PORT, Duration::from_secs(3))?;
    let secs = t.elapsed().as_secs_f64();

    let mut per_client: BTreeMap<Ipv4Addr, BTreeMap<String, usize>> = BTreeMap::new();
    let mut per_backend: BTreeMap<String, (usize, usize)> = BTreeMap::new(); // (connections, clients)
    let mut failures = Vec::new();
    for f in &fetches {
        match &f.result {
            Ok(b) => {
                *per_client
                    .entry(f.src)
                    .or_default()
                    .entry(b.clone())
                    .or_default() += 1;
                per_backend.entry(b.clone()).or_default().0 += 1;
            }
            Err(e) => failures.push(format!("{}: {e}", f.src)),
        }
    }
    for backends in per_client.values() {
        if backends.len() == 1 {
            per_backend
                .get_mut(backends.keys().next().expect("one"))
                .expect("seen")
                .1 += 1;
        }
    }
    let moved: Vec<_> = per_client.iter().filter(|(_, b)| b.len() > 1).collect();

    println!(
        "smoke: {} connections ({} client addresses x {} rounds) to {VIP}:{HTTP_PORT} in {secs:.2}s",
        plan.len(),
        topo.client_addrs.len(),
        args.rounds
    );
    println!(
        "  {:<8} {:>11} {:>8} {:>13}",
        "backend", "connections", "clients", "server-side"
    );
    let server_side: BTreeMap<String, u64> = servers.connections().into_iter().collect();
    for i in 0..topo.backends.len() {
        let name = topo.backend_name(i);
        let (c, n) = per_backend.get(&name).copied().unwrap_or((0, 0));
        println!(
            "  {name:<8} {c:>11} {n:>8} {:>13}",
            server_side.get(&name).copied().unwrap_or(0)
        );
    }
    let sticky = moved.is_empty();
    println!(
        "  every client stayed on one backend: {}",
        if sticky {
            "yes".to_string()
        } else {
            format!("NO ({} moved: {moved:?})", moved.len())
        }
    );
    println!("  failed connections: {}", failures.len());
    for f in failures.iter().take(5) {
        println!("    {f}");
    }

    let pins = Pins::new(daemon.pin_dir());
    match pins.service_index(VIP, HTTP_PORT, PROTO_TCP).and_then(|i| {
        Ok((
            pins.service_counters(i)?,
            pins.persist_entries()?
                .iter()
                .filter(|(k, _)| k.service == i)
                .count(),
        ))
    }) {
        Ok((c, entries)) => println!(
            "  tether counters (web): packets {} bytes {} new_assignments {} persist_hits {} expired {} no_backend {}; persistence entries {entries}",
            c.packets, c.bytes, c.new_assignments, c.persist_hits, c.expired, c.no_backend
        ),
        Err(e) => println!("  tether counters: unavailable ({e:#})"),
    }
    if let Ok(r) = pins.reasons() {
        let nonzero: Vec<String> = r
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        println!("  verdicts: {}", nonzero.join(" "));
    }

    // (Only expected when there are at least as many clients as backends.)
    let all_backends_used = topo.client_addrs.len() < topo.backends.len()
        || (0..topo.backends.len()).all(|i| per_backend.contains_key(&topo.backend_name(i)));
    if !all_backends_used {
        println!("  some backend got no client");
    }
    let pass = failures.is_empty() && sticky && all_backends_used;
    println!("smoke: {}", if pass { "PASS" } else { "FAIL" });
    Ok(pass)
}
