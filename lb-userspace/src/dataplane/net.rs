//! Interface and neighbour facts, read through sockets and /proc/self/net so they are correct
//! in whatever network namespace the daemon runs (sysfs would show the mounting namespace's).

use std::{
    ffi::CString,
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    balancer::L2,
    config::{BackendConfig, Config, ServiceMode},
};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("interface {0:?} does not exist in this network namespace")]
    NoInterface(String),
    #[error("reading the MAC address of {iface}: {source}")]
    Mac { iface: String, source: io::Error },
    #[error("no route to backend {addr}: {reason}")]
    NoRoute { addr: IpAddr, reason: String },
    #[error(
        "backend {addr} is reached through gateway {gateway}: L2 direct server return needs backends on a directly connected network"
    )]
    NotOnLink { addr: IpAddr, gateway: String },
    #[error(
        "no neighbour entry for {addr} after {waited_ms} ms (is the backend up and on the same L2 segment as {iface}?); set \"mac\" for it to skip resolution"
    )]
    Unresolved {
        addr: IpAddr,
        iface: String,
        waited_ms: u128,
    },
    #[error("pool {pool:?} backend {backend:?}: {source}")]
    Backend {
        pool: String,
        backend: String,
        source: Box<NetError>,
    },
}

pub fn ifindex(iface: &str) -> Result<u32, NetError> {
    let c = CString::new(iface).map_err(|_| NetError::NoInterface(iface.into()))?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(NetError::NoInterface(iface.into()))
    } else {
        Ok(idx)
    }
}

/// The interface's hardware address (SIOCGIFHWADDR on a datagram socket).
pub fn mac_of(iface: &str) -> Result<[u8; 6], NetError> {
    let err = |source| NetError::Mac {
        iface: iface.into(),
        source,
    };
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(err)?;
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = iface.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return Err(NetError::NoInterface(iface.into()));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: valid socket fd and a properly initialised ifreq.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFHWADDR filled ifru_hwaddr.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}

/// The interface the kernel would send to `addr` through (`ip -j route get`), which must be
/// a direct route: L2 DSR rewrites only MACs, so a backend behind a gateway is unreachable.
pub fn egress_interface(addr: IpAddr) -> Result<String, NetError> {
    let out = Command::new("ip")
        .args(["-j", "route", "get", &addr.to_string()])
        .output()
        .map_err(|e| NetError::NoRoute {
            addr,
            reason: format!("running ip: {e}"),
        })?;
    if !out.status.success() {
        return Err(NetError::NoRoute {
            addr,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    parse_route_get(addr, &out.stdout)
}

fn parse_route_get(addr: IpAddr, json: &[u8]) -> Result<String, NetError> {
    let routes: Vec<serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| NetError::NoRoute {
            addr,
            reason: format!("unreadable ip output: {e}"),
        })?;
    let r = routes.first().ok_or_else(|| NetError::NoRoute {
        addr,
        reason: "empty answer".into(),
    })?;
    if let Some(gw) = r.get("gateway").and_then(|g| g.as_str()) {
        return Err(NetError::NotOnLink {
            addr,
            gateway: gw.into(),
        });
    }
    if r.get("type").and_then(|t| t.as_str()) == Some("local") {
        return Err(NetError::NoRoute {
            addr,
            reason: "it is an address of this host".into(),
        });
    }
    r.get("dev")
        .and_then(|d| d.as_str())
        .map(str::to_owned)
        .ok_or_else(|| NetError::NoRoute {
            addr,
            reason: "no device in the route".into(),
        })
}

/// A complete IPv4 entry from /proc/self/net/arp on `iface`.
fn arp_lookup(addr: std::net::Ipv4Addr, iface: &str) -> Option<[u8; 6]> {
    let text = std::fs::read_to_string("/proc/self/net/arp").ok()?;
    parse_arp(&text, addr, iface)
}

fn parse_arp(text: &str, addr: std::net::Ipv4Addr, iface: &str) -> Option<[u8; 6]> {
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // IP address, HW type, Flags, HW address, Mask, Device
        if f.len() < 6 || f[5] != iface || f[0].parse::<std::net::Ipv4Addr>().ok() != Some(addr) {
            continue;
        }
        let flags = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).unwrap_or(0);
        if flags & 0x2 == 0 {
            continue; // ATF_COM: incomplete
        }
        let mac = crate::config::parse_mac(f[3])?;
        if mac != [0; 6] {
            return Some(mac);
        }
    }
    None
}

/// IPv6 neighbours have no /proc file; ask iproute2 (netlink) for the one entry.
fn ndp_lookup(addr: std::net::Ipv6Addr, iface: &str) -> Option<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-6", "neigh", "show", &addr.to_string(), "dev", iface])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "lladdr" {
            return words.next().and_then(crate::config::parse_mac);
        }
    }
    None
}

fn lookup(addr: IpAddr, iface: &str) -> Option<[u8; 6]> {
    match addr {
        IpAddr::V4(a) => arp_lookup(a, iface),
        IpAddr::V6(a) => ndp_lookup(a, iface),
    }
}

/// Resolve a backend's MAC: the neighbour table, or provoke resolution with a datagram to
/// the discard port and poll until `wait` has passed.
pub fn resolve_mac(addr: IpAddr, iface: &str, wait: Duration) -> Result<[u8; 6], NetError> {
    if let Some(m) = lookup(addr, iface) {
        return Ok(m);
    }
    let start = Instant::now();
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let poke = || {
        if let Ok(s) = UdpSocket::bind(bind) {
            let _ = s.send_to(&[], SocketAddr::new(addr, 9));
        }
    };
    poke();
    let mut tries = 0u32;
    while start.elapsed() < wait {
        std::thread::sleep(Duration::from_millis(20));
        if let Some(m) = lookup(addr, iface) {
            return Ok(m);
        }
        tries += 1;
        if tries.is_multiple_of(25) {
            poke();
        }
    }
    Err(NetError::Unresolved {
        addr,
        iface: iface.into(),
        waited_ms: start.elapsed().as_millis(),
    })
}

/// Resolve every backend's link-layer facts: the egress interface from its route (a backend
/// behind a gateway is refused: L2 DSR only rewrites MACs), that interface's MAC as source,
/// and the backend's MAC from the neighbour table. Resolution runs in parallel threads.
pub fn resolve_l2(cfg: &Config, wait: Duration) -> Result<Vec<Vec<L2>>, NetError> {
    let one = |b: &BackendConfig| -> Result<L2, NetError> {
        let egress = match (egress_interface(b.address), b.mac) {
            (Ok(dev), _) => dev,
            // An explicit MAC says the operator vouches for L2 reachability.
            (Err(e), Some(_)) => {
                log::warn!("{e}; using {} for {}", cfg.interface, b.address);
                cfg.interface.clone()
            }
            (Err(e), None) => return Err(e),
        };
        let mac_dst = match b.mac {
            Some(m) => m,
            None => resolve_mac(b.address, &egress, wait)?,
        };
        if egress != cfg.interface {
            log::info!(
                "backend {} is behind {egress}: forwarded by devmap redirect",
                b.address
            );
        }
        Ok(L2 {
            mac_dst,
            mac_src: mac_of(&egress)?,
            ifindex: ifindex(&egress)?,
        })
    };
    ifindex(&cfg.interface)?;
    let l4_pool = l4_pools(cfg);
    std::thread::scope(|s| {
        let handles: Vec<Vec<_>> = cfg
            .pools
            .iter()
            .enumerate()
            .map(|(pi, p)| {
                p.backends
                    .iter()
                    .map(|b| {
                        let l4 = l4_pool[pi];
                        s.spawn(move || {
                            if l4 {
                                one(b)
                            } else {
                                Ok(L2 {
                                    mac_dst: [0; 6],
                                    mac_src: [0; 6],
                                    ifindex: 0,
                                })
                            }
                        })
                    })
                    .collect()
            })
            .collect();
        handles
            .into_iter()
            .zip(&cfg.pools)
            .map(|(hs, p)| {
                hs.into_iter()
                    .zip(&p.backends)
                    .map(|(h, b)| {
                        h.join()
                            .expect("resolver thread panicked")
                            .map_err(|source| NetError::Backend {
                                pool: p.name.clone(),
                                backend: b.name.clone(),
                                source: Box::new(source),
                            })
                    })
                    .collect()
            })
            .collect()
    })
}

/// Which pools serve an L4 service: only their backends must be on the attach interface's
/// L2 segment; the proxy reaches the others through the routing table.
pub fn l4_pools(cfg: &Config) -> Vec<bool> {
    (0..cfg.pools.len())
        .map(|p| {
            cfg.services
                .iter()
                .any(|s| s.pool == p && s.mode == ServiceMode::L4Dsr)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_table_parsing_takes_complete_entries_on_the_interface() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    10.0.0.11        0x1         0x2         02:00:00:00:00:0b     *        eth0\n\
                    10.0.0.12        0x1         0x0         00:00:00:00:00:00     *        eth0\n\
                    10.0.0.13        0x1         0x2         02:00:00:00:00:0d     *        eth1\n";
        assert_eq!(
            parse_arp(text, "10.0.0.11".parse().unwrap(), "eth0"),
            Some([2, 0, 0, 0, 0, 0x0b])
        );
        assert_eq!(
            parse_arp(text, "10.0.0.12".parse().unwrap(), "eth0"),
            None,
            "incomplete entry"
        );
        assert_eq!(
            parse_arp(text, "10.0.0.13".parse().unwrap(), "eth0"),
            None,
            "other interface"
        );
        assert_eq!(parse_arp(text, "10.0.0.14".parse().unwrap(), "eth0"), None);
    }

    #[test]
    fn route_answers_give_the_device_or_a_clear_refusal() {
        let a: IpAddr = "10.0.0.11".parse().unwrap();
        let direct = br#"[{"dst":"10.0.0.11","dev":"eth1","prefsrc":"10.0.0.2","flags":[],"uid":0,"cache":[]}]"#;
        assert_eq!(parse_route_get(a, direct).unwrap(), "eth1");
        let via = br#"[{"dst":"10.0.0.11","gateway":"192.0.2.1","dev":"eth0","flags":[],"uid":0,"cache":[]}]"#;
        assert!(matches!(
            parse_route_get(a, via),
            Err(NetError::NotOnLink { .. })
        ));
        let local = br#"[{"type":"local","dst":"10.0.0.11","dev":"lo","flags":[],"uid":0,"cache":["local"]}]"#;
        assert!(matches!(
            parse_route_get(a, local),
            Err(NetError::NoRoute { .. })
        ));
        assert!(matches!(
            parse_route_get(a, b"[]"),
            Err(NetError::NoRoute { .. })
        ));
        assert!(matches!(
            parse_route_get(a, b"garbage"),
            Err(NetError::NoRoute { .. })
        ));
    }

    #[test]
    fn loopback_exists_and_unknown_interface_is_an_error() {
        assert_eq!(ifindex("lo").expect("lo"), 1);
        assert!(matches!(
            ifindex("no-such-if0"),
            Err(NetError::NoInterface(_))
        ));
        assert_eq!(mac_of("lo").expect("lo has a (zero) MAC"), [0; 6]);
    }
}
