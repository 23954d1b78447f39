//! Network-namespace topologies for the end-to-end tests and the demo.
//!
//! One [`Topology`] is a small L2 segment built only from namespaces it creates itself:
//!
//! ```text
//!            switch namespace: Linux bridge <tag>br
//!   ports:   <tag>pcl      <tag>plb           <tag>pb1 ... <tag>pbK
//!               |             |                   |            |
//!   client ns: <tag>cl    LB ns: <tag>lb     backend ns: <tag>b1 ... <tag>bK
//!   10.99.0.100..(N)      10.99.0.2/24       10.99.0.11.. /24
//!                         + VIP 10.99.0.10   + VIP on lo, arp_ignore=1, arp_announce=2
//! ```
//!
//! Only the LB answers ARP for the VIP, so clients send VIP traffic to the LB; tether's XDP
//! program rewrites the MACs and bounces each frame back out (XDP_TX) to a backend, which
//! answers the client directly (direct server return).
//!
//! Nothing is prepared for XDP: the LB's veth peer (the bridge port, in the switch namespace)
//! has no XDP program, as on a user's machine, so tether's default mode must cope with that.
//!
//! Names are unique per instance (`tether-<pid>-<n>-<role>` for namespaces, `t<pid>-<n><role>`
//! for interfaces, at most 15 bytes) and everything is removed on drop, also on panic.
//! Leftovers of processes that died without cleaning up are removed by the next build.

use std::{
    fs::File,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// The shared L2 segment.
pub const SUBNET_PREFIX: u8 = 24;
/// The LB's own address on its veth.
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// The virtual IP: on the LB's veth (it answers ARP) and on every backend's `lo`.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 10);
/// Backend `i` (0-based) has `10.99.0.(11 + i)`.
pub const FIRST_BACKEND_OCTET: u8 = 11;
/// Client address `i` (0-based) is `10.99.0.(100 + i)`.
pub const FIRST_CLIENT_OCTET: u8 = 100;
pub const MAX_BACKENDS: usize = (FIRST_CLIENT_OCTET - FIRST_BACKEND_OCTET) as usize;
pub const MAX_CLIENT_ADDRS: usize = (255 - FIRST_CLIENT_OCTET) as usize;
/// Extra LBs take 10.99.0.3 up to 10.99.0.9 (below the VIP).
pub const MAX_EXTRA_LBS: usize = 7;

/// Prefix of every namespace and bpffs directory the harness creates.
const NAME_PREFIX: &str = "tether-";
const NETNS_DIR: &str = "/run/netns";
const BPFFS: &str = "/sys/fs/bpf";
/// Linux's IFNAMSIZ - 1.
const MAX_IFNAME: usize = 15;

static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// Path of a named network namespace (as created by `ip netns add`).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn enter_netns(file: &File, name: &str) -> Result<()> {
    // SAFETY: setns on a valid namespace fd; CLONE_NEWNET affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns into network namespace {name}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn open_netns(name: &str) -> Result<File> {
    File::open(netns_path(name)).with_context(|| format!("opening {}", netns_path(name).display()))
}

/// Runs `f` on a new thread that has joined network namespace `ns` and returns its result.
/// Sockets created by `f` stay in that namespace wherever they are used afterwards. A panic
/// in `f` is propagated to the caller.
pub fn run_in_netns<T: Send, F: FnOnce() -> T + Send>(ns: &str, f: F) -> Result<T> {
    let file = open_netns(ns)?;
    std::thread::scope(|s| {
        let h = s.spawn(move || -> Result<T> {
            enter_netns(&file, ns)?;
            Ok(f())
        });
        match h.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Spawns a named thread that joins network namespace `ns` and then runs `f`. Returns once
/// the thread is in the namespace (or with the error if it could not get there).
pub fn spawn_in_netns<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
    ns: &str,
    thread_name: &str,
    f: F,
) -> Result<JoinHandle<T>> {
    let file = open_netns(ns)?;
    let ns_owned = ns.to_string();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
    let h = std::thread::Builder::new()
        .name(thread_name.to_string())
        .spawn(move || {
            let entered = enter_netns(&file, &ns_owned);
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            if !ok {
                // The caller gets the error; this thread has nothing to run.
                panic!("thread {ns_owned}: could not enter the namespace");
            }
            f()
        })
        .context("spawning a thread")?;
    match rx.recv() {
        Ok(Ok(())) => Ok(h),
        Ok(Err(e)) => {
            let _ = h.join();
            Err(e)
        }
        Err(_) => bail!("thread for namespace {ns} exited before entering it"),
    }
}

/// Runs a command, returning its stdout; fails with its stderr.
pub fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip [-n ns] -batch -` with `lines` on stdin.
fn ip_batch(ns: Option<&str>, lines: &[String]) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("spawning ip (is iproute2 installed?)")?;
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        for l in lines {
            writeln!(stdin, "{l}").context("writing to ip -batch")?;
        }
    }
    let out = child.wait_with_output().context("waiting for ip -batch")?;
    if !out.status.success() {
        bail!(
            "ip {}-batch failed ({}): {}\ncommands:\n{}",
            ns.map(|n| format!("-n {n} ")).unwrap_or_default(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            lines.join("\n")
        );
    }
    Ok(())
}

/// Runs a program inside namespace `ns` (`ip netns exec`; fine for sysctl and ethtool, which
/// need neither the host's /sys nor bpffs).
fn netns_exec(ns: &str, args: &[&str]) -> Result<String> {
    run_cmd(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

/// Mounts bpffs on /sys/fs/bpf unless it is mounted (pins, and the daemon's, live there).
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(BPFFS))
    {
        return Ok(());
    }
    run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .context("mounting bpffs on /sys/fs/bpf")?;
    Ok(())
}

/// Whether process `pid` exists and is not a zombie.
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| !matches!(state, "Z" | "X")),
        Err(_) => false,
    }
}

/// The pid in a harness name `tether-<pid>-<n>-...`, if it is one.
fn harness_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid: u32 = parts.next()?.parse().ok()?;
    let _n: u32 = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(pid)
}

/// Removes namespaces and bpffs directories left by harness processes that no longer run
/// (a test killed by a signal, a demo killed with SIGKILL). Never touches a live process's.
pub fn cleanup_stale() {
    if let Ok(rd) = std::fs::read_dir(NETNS_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if harness_pid(&name).is_some_and(|p| !pid_alive(p)) {
                let _ = run_cmd(Command::new("ip").args(["netns", "del", &name]));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(BPFFS) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if harness_pid(&name).is_some_and(|p| !pid_alive(p)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// One namespace with one veth whose peer is a bridge port.
#[derive(Clone, Debug)]
pub struct Node {
    /// Network namespace name (`/run/netns/<ns>`).
    pub ns: String,
    /// The veth inside `ns`.
    pub ifname: String,
    /// Its peer, a port of the bridge in the switch namespace.
    pub port: String,
    /// The node's main address on its veth.
    pub addr: Ipv4Addr,
}

#[derive(Clone, Copy, Debug)]
pub struct TopologyBuilder {
    client_addrs: usize,
    backends: usize,
    extra_lbs: usize,
}

impl Default for TopologyBuilder {
    fn default() -> Self {
        TopologyBuilder {
            client_addrs: 1,
            backends: 3,
            extra_lbs: 0,
        }
    }
}

impl TopologyBuilder {
    /// Number of source addresses on the client's veth (10.99.0.100 ...), 1..=155.
    pub fn client_addrs(mut self, n: usize) -> Self {
        self.client_addrs = n;
        self
    }

    /// Number of backend namespaces (10.99.0.11 ...), 1..=89.
    pub fn backends(mut self, n: usize) -> Self {
        self.backends = n;
        self
    }

    /// Further LB namespaces (`lb2`, `lb3`, ... at 10.99.0.3 ...), each with the VIP on its
    /// veth too, for several tether instances behind one client (see
    /// [`Topology::steer_client`]). At most [`MAX_EXTRA_LBS`].
    pub fn extra_lbs(mut self, n: usize) -> Self {
        self.extra_lbs = n;
        self
    }

    pub fn build(self) -> Result<Topology> {
        if self.extra_lbs > MAX_EXTRA_LBS {
            bail!("extra_lbs must be 0..={MAX_EXTRA_LBS}");
        }
        if !(1..=MAX_CLIENT_ADDRS).contains(&self.client_addrs) {
            bail!("client_addrs must be 1..={MAX_CLIENT_ADDRS}");
        }
        if !(1..=MAX_BACKENDS).contains(&self.backends) {
            bail!("backends must be 1..={MAX_BACKENDS}");
        }
        ensure_bpffs()?;
        cleanup_stale();
        let pid = std::process::id();
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let ns_prefix = format!("{NAME_PREFIX}{pid}-{n}");
        let if_prefix = format!("t{pid}-{n}");
        let node = |role: &str, addr: Ipv4Addr| Node {
            ns: format!("{ns_prefix}-{role}"),
            ifname: format!("{if_prefix}{role}"),
            port: format!("{if_prefix}p{role}"),
            addr,
        };
        let client = node("cl", Ipv4Addr::new(10, 99, 0, FIRST_CLIENT_OCTET));
        let lb = node("lb", LB_ADDR);
        let backends: Vec<Node> = (0..self.backends)
            .map(|i| {
                node(
                    &format!("b{}", i + 1),
                    Ipv4Addr::new(10, 99, 0, FIRST_BACKEND_OCTET + i as u8),
                )
            })
            .collect();
        let extra_lbs: Vec<Node> = (0..self.extra_lbs)
            .map(|i| {
                node(
                    &format!("lb{}", i + 2),
                    Ipv4Addr::new(10, 99, 0, 3 + i as u8),
                )
            })
            .collect();
        let bridge = format!("{if_prefix}br");
        for name in backends
            .iter()
            .chain(&extra_lbs)
            .chain([&client, &lb])
            .flat_map(|n| [&n.ifname, &n.port])
            .chain([&bridge])
        {
            if name.len() > MAX_IFNAME {
                bail!("interface name {name} is longer than {MAX_IFNAME} bytes");
            }
        }
        let client_addrs = (0..self.client_addrs)
            .map(|i| Ipv4Addr::new(10, 99, 0, FIRST_CLIENT_OCTET + i as u8))
            .collect();

        let mut topo = Topology {
            switch_ns: format!("{ns_prefix}-sw"),
            ns_prefix,
            bridge,
            client,
            client_addrs,
            lb,
            extra_lbs,
            backends,
            vip: VIP,
            created_ns: Vec::new(),
        };
        // On error, dropping `topo` removes whatever was created so far.
        topo.create()?;
        Ok(topo)
    }
}

/// A client namespace, an LB namespace and backend namespaces on one bridge. Dropping it
/// removes every namespace (and so every interface) it created.
pub struct Topology {
    /// `tether-<pid>-<n>`: every namespace and bpffs directory of this instance starts so.
    pub ns_prefix: String,
    pub switch_ns: String,
    pub bridge: String,
    /// The client namespace; `client.addr` is the first of `client_addrs`.
    pub client: Node,
    /// Every source address on the client's veth.
    pub client_addrs: Vec<Ipv4Addr>,
    /// The LB namespace: tether runs here on `lb.ifname`.
    pub lb: Node,
    /// Further LB namespaces ([`TopologyBuilder::extra_lbs`]).
    pub extra_lbs: Vec<Node>,
    pub backends: Vec<Node>,
    pub vip: Ipv4Addr,
    created_ns: Vec<String>,
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    /// Every node (client, LB, backends).
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        [&self.client, &self.lb]
            .into_iter()
            .chain(self.extra_lbs.iter())
            .chain(self.backends.iter())
    }

    /// Backend names as used in configs and as the test servers' response bodies: b1, b2...
    pub fn backend_name(&self, i: usize) -> String {
        format!("b{}", i + 1)
    }

    /// Index of the backend with this name or address.
    pub fn backend_index_by_name(&self, name: &str) -> Option<usize> {
        (0..self.backends.len()).find(|&i| self.backend_name(i) == name)
    }

    pub fn backend_index_by_addr(&self, addr: Ipv4Addr) -> Option<usize> {
        self.backends.iter().position(|b| b.addr == addr)
    }

    /// A unique bpffs directory for this topology's daemon pins (`/sys/fs/bpf/tether-<pid>-<n>-<label>`).
    /// Removed by the daemon runner; stale ones by [`cleanup_stale`].
    pub fn pin_dir(&self, label: &str) -> PathBuf {
        Path::new(BPFFS).join(format!("{}-{label}", self.ns_prefix))
    }

    /// Runs `f` on a thread inside namespace `ns` (see [`run_in_netns`]).
    pub fn run_in<T: Send, F: FnOnce() -> T + Send>(&self, ns: &str, f: F) -> Result<T> {
        run_in_netns(ns, f)
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        run_in_netns(&self.client.ns, f)
    }

    /// LB node `i`: 0 is [`Topology::lb`], then the extra ones.
    pub fn lb_node(&self, i: usize) -> &Node {
        if i == 0 {
            &self.lb
        } else {
            &self.extra_lbs[i - 1]
        }
    }

    /// Sends the client's VIP traffic to LB node `i` (a permanent neighbour entry for the
    /// VIP with that LB's MAC), as an ECMP or anycast change moves a client between
    /// instances. With several LBs on the segment, ARP alone would pick one at random.
    pub fn steer_client(&self, i: usize) -> Result<()> {
        let lb = self.lb_node(i);
        let out = run_cmd(
            Command::new("ip").args(["-n", &lb.ns, "-j", "link", "show", "dev", &lb.ifname]),
        )?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("ip -j link output {out:?}"))?;
        let mac = v[0]["address"]
            .as_str()
            .with_context(|| format!("no MAC for {} in {out}", lb.ifname))?
            .to_string();
        ip_batch(
            Some(&self.client.ns),
            &[format!(
                "neigh replace {} lladdr {mac} dev {} nud permanent",
                self.vip, self.client.ifname
            )],
        )
    }

    /// VIP:port.
    pub fn vip_addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.vip, port)
    }

    /// XDP attachment on the LB's veth as `ip link` shows it: `Some("xdp")` for native
    /// (driver) mode, `Some("xdpgeneric")`, or `None` when no program is attached.
    pub fn lb_xdp_mode(&self) -> Result<Option<String>> {
        let out = run_cmd(Command::new("ip").args([
            "-n",
            &self.lb.ns,
            "-d",
            "link",
            "show",
            "dev",
            &self.lb.ifname,
        ]))?;
        for word in out.split_whitespace() {
            if matches!(
                word,
                "xdp" | "xdpgeneric" | "xdpdrv" | "xdpoffload" | "xdpmulti"
            ) {
                return Ok(Some(word.to_string()));
            }
        }
        Ok(None)
    }

    /// Id of the XDP program attached to the LB's veth (`ip -j -d link`), `None` when none is.
    pub fn lb_xdp_prog_id(&self) -> Result<Option<u64>> {
        let out = run_cmd(Command::new("ip").args([
            "-j",
            "-d",
            "-n",
            &self.lb.ns,
            "link",
            "show",
            "dev",
            &self.lb.ifname,
        ]))?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("ip -j link output {out:?}"))?;
        Ok(v[0]["xdp"]["prog"]["id"].as_u64())
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        if netns_path(name).exists() {
            // Only possible for a stale namespace of a recycled pid: ours are unique.
            let _ = run_cmd(Command::new("ip").args(["netns", "del", name]));
        }
        run_cmd(Command::new("ip").args(["netns", "add", name]))?;
        self.created_ns.push(name.to_string());
        Ok(())
    }

    fn create(&mut self) -> Result<()> {
        let nodes: Vec<Node> = self.nodes().cloned().collect();
        let switch_ns = self.switch_ns.clone();
        self.add_ns(&switch_ns)?;
        for n in &nodes {
            self.add_ns(&n.ns)?;
        }

        // The bridge and one veth pair per node, created in the switch namespace with the
        // node end moved straight into the node's namespace.
        let br = &self.bridge;
        let mut sw = vec![
            "link set lo up".to_string(),
            format!("link add {br} type bridge stp_state 0 forward_delay 0"),
            format!("link set {br} up"),
        ];
        for n in &nodes {
            sw.push(format!(
                "link add {} type veth peer name {} netns {}",
                n.port, n.ifname, n.ns
            ));
            sw.push(format!("link set {} master {br}", n.port));
            sw.push(format!("link set {} up", n.port));
        }
        ip_batch(Some(&switch_ns), &sw)?;

        // Addresses.
        let node_cmds = |n: &Node, extra: &[String]| {
            let mut v = vec![
                "link set lo up".to_string(),
                format!("addr add {}/{SUBNET_PREFIX} dev {}", n.addr, n.ifname),
            ];
            v.extend_from_slice(extra);
            v.push(format!("link set {} up", n.ifname));
            v
        };
        let client_extra: Vec<String> = self
            .client_addrs
            .iter()
            .skip(1)
            .map(|a| format!("addr add {a}/{SUBNET_PREFIX} dev {}", self.client.ifname))
            .collect();
        ip_batch(
            Some(&self.client.ns),
            &node_cmds(&self.client, &client_extra),
        )?;
        for lb in std::iter::once(&self.lb).chain(&self.extra_lbs) {
            ip_batch(
                Some(&lb.ns),
                &node_cmds(lb, &[format!("addr add {}/32 dev {}", self.vip, lb.ifname)]),
            )?;
        }
        for b in &self.backends {
            ip_batch(
                Some(&b.ns),
                &node_cmds(b, &[format!("addr add {}/32 dev lo", self.vip)]),
            )?;
            // Only the LB may answer ARP for the VIP; the backends' ARP requests must carry
            // their own veth address.
            netns_exec(
                &b.ns,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.conf.all.arp_ignore=1",
                    "net.ipv4.conf.all.arp_announce=2",
                ],
            )?;
        }

        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Removing the namespaces removes every veth and the bridge with them.
        for ns in self.created_ns.drain(..).rev() {
            if let Err(e) = run_cmd(Command::new("ip").args(["netns", "del", &ns])) {
                eprintln!("warning: removing namespace {ns}: {e:#}");
            }
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_names() {
        assert_eq!(harness_pid("tether-123-4-lb"), Some(123));
        assert_eq!(harness_pid("tether-123-4-pins"), Some(123));
        assert_eq!(harness_pid("tether-demo"), None);
        assert_eq!(harness_pid("tether"), None);
        assert_eq!(harness_pid("tether-12x-4-lb"), None);
        assert_eq!(harness_pid("tether-123-4"), None);
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }
}
