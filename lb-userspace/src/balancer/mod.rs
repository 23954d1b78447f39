//! Turns a validated config into what the kernel reads: backend ids and entries, one Maglev
//! table per service built by lb-common over the pool's usable backends, and service entries.
//! Pure (no maps, no sockets), so it is unit-tested here and applied by `dataplane`.

use std::net::IpAddr;

use lb_common::{
    BACKEND_UP, Backend, MAGLEV_TABLE_SIZE, Service, ServiceKey,
    maglev::{MaglevBackend, build_table},
    prefix_mask, v4_mapped,
};

use crate::config::Config;

/// Link-layer facts for one backend, resolved by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2 {
    pub mac_dst: [u8; 6],
    pub mac_src: [u8; 6],
    pub ifindex: u32,
}

/// Everything the kernel maps must hold for a config.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// (backend id, entry), ids dense from 0.
    pub backends: Vec<(u32, Backend)>,
    pub services: Vec<ServicePlan>,
    /// Every egress interface of a backend (devmap entries; the attach interface itself is
    /// served by XDP_TX and never looked up, but listing it is harmless).
    pub tx_ports: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServicePlan {
    pub name: String,
    pub key: ServiceKey,
    /// `maglev_slot` is chosen when applied.
    pub value: Service,
    /// MAGLEV_TABLE_SIZE backend ids (or NO_BACKEND).
    pub table: Vec<u32>,
}

pub fn addr_bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Backend ids in config order: pool by pool, backend by backend.
pub fn backend_ids(cfg: &Config) -> Vec<Vec<u32>> {
    let mut next = 0u32;
    cfg.pools
        .iter()
        .map(|p| {
            p.backends
                .iter()
                .map(|_| {
                    next += 1;
                    next - 1
                })
                .collect()
        })
        .collect()
}

/// Build the plan. `l2(pool, backend)` gives each backend's link-layer facts.
pub fn plan<E>(cfg: &Config, mut l2: impl FnMut(usize, usize) -> Result<L2, E>) -> Result<Plan, E> {
    let ids = backend_ids(cfg);
    let mut backends = Vec::new();
    for (pi, pool) in cfg.pools.iter().enumerate() {
        for (bi, b) in pool.backends.iter().enumerate() {
            let l = l2(pi, bi)?;
            backends.push((
                ids[pi][bi],
                Backend {
                    addr_be: addr_bytes(b.address),
                    mac_dst: l.mac_dst,
                    mac_src: l.mac_src,
                    ifindex: l.ifindex,
                    state: BACKEND_UP,
                    _pad: 0,
                },
            ));
        }
    }
    let services = cfg
        .services
        .iter()
        .enumerate()
        .map(|(index, s)| {
            let pool = &cfg.pools[s.pool];
            let members: Vec<MaglevBackend<'_>> = pool
                .backends
                .iter()
                .enumerate()
                .map(|(bi, b)| MaglevBackend {
                    id: ids[s.pool][bi],
                    name: &b.name,
                    weight: b.weight,
                })
                .collect();
            let (timeout_ns, v4, v6, down) = match cfg.profile(s) {
                Some(p) => (
                    p.timeout_s as u64 * 1_000_000_000,
                    p.ipv4_prefix,
                    p.ipv6_prefix,
                    p.down_policy.to_kernel(),
                ),
                None => (0, 32, 128, lb_common::DOWN_POLICY_IMMEDIATE),
            };
            ServicePlan {
                name: s.name.clone(),
                key: ServiceKey {
                    addr_be: addr_bytes(s.vip),
                    port_be: s.port.to_be(),
                    proto: s.protocol.number(),
                    _pad: 0,
                },
                value: Service {
                    index: index as u32,
                    // L4 services only so far; SERVICE_F_L7 arrives with the proxy.
                    flags: 0,
                    timeout_ns,
                    maglev_slot: 0,
                    down_policy: down,
                    v4_mask_be: prefix_mask::<4>(v4),
                    _pad0: [0; 4],
                    v6_mask_be: prefix_mask::<16>(v6),
                },
                table: build_table(&members, MAGLEV_TABLE_SIZE),
            }
        })
        .collect();
    let mut tx_ports: Vec<u32> = backends.iter().map(|(_, b)| b.ifindex).collect();
    tx_ports.sort_unstable();
    tx_ports.dedup();
    Ok(Plan {
        backends,
        services,
        tx_ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::NO_BACKEND;

    fn cfg() -> Config {
        Config::parse(
            r#"{"interface":"eth0",
            "virtual_services":[
              {"name":"web","vip":"192.0.2.10","port":80,"protocol":"tcp","mode":"l4-dsr","pool":"web","persistence":"p"},
              {"name":"dns","vip":"2001:db8::53","port":53,"protocol":"udp","mode":"l4-dsr","pool":"dns"}],
            "pools":[
              {"name":"web","backends":[{"name":"a","address":"10.0.0.1"},{"name":"b","address":"10.0.0.2","weight":0},{"name":"c","address":"10.0.0.3","weight":3}]},
              {"name":"dns","backends":[{"name":"d","address":"2001:db8::1"}]}],
            "persistence_profiles":[{"name":"p","type":"client-ip","timeout_s":60,"ipv4_prefix":24,"ipv6_prefix":48}]}"#,
        )
        .expect("valid")
    }

    fn l2(_: usize, bi: usize) -> Result<L2, ()> {
        Ok(L2 {
            mac_dst: [2, 0, 0, 0, 0, bi as u8],
            mac_src: [2, 0, 0, 0, 0, 0xff],
            ifindex: 7,
        })
    }

    #[test]
    fn backends_get_dense_ids_and_their_l2() {
        let p = plan(&cfg(), l2).unwrap();
        let ids: Vec<u32> = p.backends.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
        assert_eq!(p.backends[2].1.addr_be, v4_mapped([10, 0, 0, 3]));
        assert_eq!(p.backends[2].1.mac_dst, [2, 0, 0, 0, 0, 2]);
        assert_eq!(
            p.backends[3].1.addr_be,
            "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert!(
            p.backends
                .iter()
                .all(|(_, b)| b.state == BACKEND_UP && b.ifindex == 7)
        );
    }

    #[test]
    fn service_entries_carry_profile_and_key_in_network_order() {
        let p = plan(&cfg(), l2).unwrap();
        let web = &p.services[0];
        assert_eq!(web.key.addr_be, v4_mapped([192, 0, 2, 10]));
        assert_eq!(web.key.port_be.to_ne_bytes(), [0, 80]);
        assert_eq!(web.key.proto, 6);
        assert_eq!(web.value.index, 0);
        assert_eq!(web.value.timeout_ns, 60_000_000_000);
        assert_eq!(web.value.v4_mask_be, [255, 255, 255, 0]);
        assert_eq!(
            &web.value.v6_mask_be[..7],
            &[255, 255, 255, 255, 255, 255, 0]
        );
        let dns = &p.services[1];
        assert_eq!(
            (dns.value.index, dns.value.timeout_ns, dns.key.proto),
            (1, 0, 17)
        );
        assert_eq!(dns.value.v6_mask_be, [255; 16]);
    }

    #[test]
    fn tables_hold_only_the_pools_weighted_backends_in_proportion() {
        let p = plan(&cfg(), l2).unwrap();
        let web = &p.services[0].table;
        assert_eq!(web.len(), MAGLEV_TABLE_SIZE as usize);
        let count = |id| web.iter().filter(|&&e| e == id).count() as f64;
        assert_eq!(count(1), 0.0, "weight 0 takes no new clients");
        assert!(!web.contains(&NO_BACKEND) && !web.contains(&3));
        let ratio = count(2) / count(0);
        assert!(
            (ratio - 3.0).abs() < 0.05,
            "weight 3 vs 1 gave ratio {ratio}"
        );
        assert!(p.services[1].table.iter().all(|&e| e == 3));
    }

    #[test]
    fn resolution_errors_propagate() {
        let r = plan(&cfg(), |_, bi| {
            if bi == 1 {
                Err("unresolved")
            } else {
                l2(0, bi).map_err(|_| "x")
            }
        });
        assert_eq!(r.unwrap_err(), "unresolved");
    }
}
