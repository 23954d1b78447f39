//! Turns a validated config into what the kernel reads: backend ids and entries, one Maglev
//! table per service built by lb-common over the pool's usable backends, and service entries.
//! Pure (no maps, no sockets), so it is unit-tested here and applied by `dataplane`.

use std::net::IpAddr;

pub mod select;

use std::collections::{HashMap, HashSet};

use lb_common::{
    Backend, MAGLEV_TABLE_SIZE, MAX_BACKENDS, MAX_SERVICES, SERVICE_F_L7, Service, ServiceKey,
    backend_identity,
    maglev::{MaglevBackend, build_table},
    prefix_mask, v4_mapped,
};

use crate::{
    config::{Config, ServiceMode},
    state::BackendState,
};

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
    /// Data-path settings (`TETHER_GLOBALS`).
    pub globals: lb_common::Globals,
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

/// A client address masked to its family's prefix, in the one 16-byte layout the persistence
/// tables use (IPv4 as IPv4-mapped): the key of the kernel table and of the L7 client tables.
pub fn masked_addr(a: IpAddr, v4_mask: &[u8; 4], v6_mask: &[u8; 16]) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4_mapped(std::array::from_fn(|i| o[i] & v4_mask[i]))
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            std::array::from_fn(|i| o[i] & v6_mask[i])
        }
    }
}

/// Kernel ids of a config: service indexes (persistence keys and Maglev slots) and backend
/// ids (persistence values). They must not change for a service or backend that stays, or
/// persisted clients would be sent elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub services: Vec<u32>,
    pub backends: Vec<Vec<u32>>,
}

/// What the kernel maps held before: services by key, backend ids by identity.
#[derive(Debug, Clone, Default)]
pub struct Previous {
    pub services: Vec<(ServiceKey, u32)>,
    /// (id, identity) of every used backend slot.
    pub backends: Vec<(u32, u32)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("no free backend slot (at most {MAX_BACKENDS})")]
    Backends,
    #[error("no free service slot (at most {MAX_SERVICES})")]
    Services,
}

/// Keep every id `prev` gave to the same service key or backend identity; give new ones the
/// lowest slot nobody used before, and only when those run out a slot freed now (whose stale
/// persistence entries the caller flushes).
pub fn assign_ids(cfg: &Config, prev: &Previous) -> Result<Ids, IdError> {
    fn pick(taken: &HashSet<u32>, previously: &HashSet<u32>, max: u32) -> Option<u32> {
        (0..max)
            .find(|i| !taken.contains(i) && !previously.contains(i))
            .or_else(|| (0..max).find(|i| !taken.contains(i)))
    }
    let keys = service_keys(cfg);
    let prev_svc: HashMap<ServiceKey, u32> = prev.services.iter().copied().collect();
    let mut taken: HashSet<u32> = HashSet::new();
    let mut services: Vec<Option<u32>> = keys
        .iter()
        .map(|k| {
            prev_svc
                .get(k)
                .copied()
                .filter(|i| *i < MAX_SERVICES && taken.insert(*i))
        })
        .collect();
    let previously: HashSet<u32> = prev_svc.values().copied().collect();
    for s in services.iter_mut().filter(|s| s.is_none()) {
        let i = pick(&taken, &previously, MAX_SERVICES).ok_or(IdError::Services)?;
        taken.insert(i);
        *s = Some(i);
    }

    let prev_be: HashMap<u32, u32> = prev
        .backends
        .iter()
        .map(|(id, ident)| (*ident, *id))
        .collect();
    let mut taken: HashSet<u32> = HashSet::new();
    let mut backends: Vec<Vec<Option<u32>>> = cfg
        .pools
        .iter()
        .map(|p| {
            p.backends
                .iter()
                .map(|b| {
                    prev_be
                        .get(&backend_identity(&p.name, &b.name))
                        .copied()
                        .filter(|id| *id < MAX_BACKENDS && taken.insert(*id))
                })
                .collect()
        })
        .collect();
    let previously: HashSet<u32> = prev.backends.iter().map(|(id, _)| *id).collect();
    for id in backends.iter_mut().flatten().filter(|id| id.is_none()) {
        let i = pick(&taken, &previously, MAX_BACKENDS).ok_or(IdError::Backends)?;
        taken.insert(i);
        *id = Some(i);
    }
    Ok(Ids {
        services: services.into_iter().map(|s| s.expect("assigned")).collect(),
        backends: backends
            .into_iter()
            .map(|p| p.into_iter().map(|b| b.expect("assigned")).collect())
            .collect(),
    })
}

/// Kernel key of each service.
pub fn service_keys(cfg: &Config) -> Vec<ServiceKey> {
    cfg.services
        .iter()
        .map(|s| ServiceKey {
            addr_be: addr_bytes(s.vip),
            port_be: s.port.to_be(),
            proto: s.protocol.number(),
            _pad: 0,
        })
        .collect()
}

/// Possible CPUs: `BPF_F_NO_COMMON_LRU` gives each one an equal share of the persistence
/// table (a CPU that fills its share evicts from it even while others have room).
pub fn possible_cpus() -> u32 {
    aya::util::nr_cpus().map_or(1, |n| n.max(1) as u32)
}

/// New bindings each CPU may make per second. Unset: a 64th of the CPU's share of the table,
/// so a flood of new sources needs over a minute to turn the table over while bound clients
/// (whose lookups keep them recent in the LRU) stay; an unbound client is still sent where
/// its binding would have sent it (Maglev), so the cap costs legitimate clients little.
pub fn new_binding_cap(configured: Option<u32>, table_entries: u32, cpus: u32) -> u32 {
    configured.unwrap_or_else(|| (table_entries / cpus.max(1) / 64).max(1000))
}

/// Build the plan. `states[p][b]` is each backend's effective state: it is written to the
/// kernel, and only `Up` backends enter the Maglev tables (with their weights).
/// `l2(pool, backend)` gives each backend's link-layer facts.
pub fn plan<E>(
    cfg: &Config,
    ids: &Ids,
    states: &[Vec<BackendState>],
    mut l2: impl FnMut(usize, usize) -> Result<L2, E>,
) -> Result<Plan, E> {
    let mut backends = Vec::new();
    for (pi, pool) in cfg.pools.iter().enumerate() {
        for (bi, b) in pool.backends.iter().enumerate() {
            let l = l2(pi, bi)?;
            backends.push((
                ids.backends[pi][bi],
                Backend {
                    addr_be: addr_bytes(b.address),
                    mac_dst: l.mac_dst,
                    mac_src: l.mac_src,
                    ifindex: l.ifindex,
                    state: states[pi][bi].to_kernel(),
                    identity: backend_identity(&pool.name, &b.name),
                },
            ));
        }
    }
    let keys = service_keys(cfg);
    let services = cfg
        .services
        .iter()
        .enumerate()
        .map(|(si, s)| {
            let pool = &cfg.pools[s.pool];
            let members: Vec<MaglevBackend<'_>> = pool
                .backends
                .iter()
                .enumerate()
                .filter(|(bi, _)| states[s.pool][*bi].in_table())
                .map(|(bi, b)| MaglevBackend {
                    id: ids.backends[s.pool][bi],
                    name: &b.name,
                    weight: b.weight,
                })
                .collect();
            let l7 = matches!(s.mode, ServiceMode::L7(_));
            let (timeout_ns, v4, v6, down) = match cfg.profile(s).filter(|_| !l7) {
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
                key: keys[si],
                value: Service {
                    index: ids.services[si],
                    // L7 services are passed to the stack, where the proxy listens.
                    flags: if l7 { SERVICE_F_L7 } else { 0 },
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
    // ifindex 0: a backend only the L7 proxy reaches (no L2 facts, no devmap entry).
    let mut tx_ports: Vec<u32> = backends
        .iter()
        .map(|(_, b)| b.ifindex)
        .filter(|i| *i != 0)
        .collect();
    tx_ports.sort_unstable();
    tx_ports.dedup();
    Ok(Plan {
        backends,
        services,
        tx_ports,
        globals: lb_common::Globals {
            new_bindings_per_cpu: new_binding_cap(
                cfg.persist_new_bindings_per_cpu_s,
                cfg.persist_table_entries,
                possible_cpus(),
            ),
            emit_bindings: u32::from(cfg.mirroring.is_some()),
        },
    })
}

/// Every backend up (no health information).
pub fn all_up(cfg: &Config) -> Vec<Vec<BackendState>> {
    cfg.pools
        .iter()
        .map(|p| {
            p.backends
                .iter()
                .map(|b| BackendState::effective(b.admin_state, b.weight, true))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdminState;
    use lb_common::{BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UP, NO_BACKEND};

    const CFG: &str = r#"{"interface":"eth0",
        "virtual_services":[
          {"name":"web","vip":"192.0.2.10","port":80,"protocol":"tcp","mode":"l4-dsr","pool":"web","persistence":"p"},
          {"name":"dns","vip":"2001:db8::53","port":53,"protocol":"udp","mode":"l4-dsr","pool":"dns"}],
        "pools":[
          {"name":"web","backends":[{"name":"a","address":"10.0.0.1"},{"name":"b","address":"10.0.0.2","weight":0},{"name":"c","address":"10.0.0.3","weight":3}]},
          {"name":"dns","backends":[{"name":"d","address":"2001:db8::1"}]}],
        "persistence_profiles":[{"name":"p","type":"client-ip","timeout_s":60,"ipv4_prefix":24,"ipv6_prefix":48}]}"#;

    fn cfg() -> Config {
        Config::parse(CFG).expect("valid")
    }

    fn l2(_: usize, bi: usize) -> Result<L2, ()> {
        Ok(L2 {
            mac_dst: [2, 0, 0, 0, 0, bi as u8],
            mac_src: [2, 0, 0, 0, 0, 0xff],
            ifindex: 7,
        })
    }

    fn fresh(c: &Config) -> Ids {
        assign_ids(c, &Previous::default()).expect("ids")
    }

    fn plan_of(c: &Config) -> Plan {
        plan(c, &fresh(c), &all_up(c), l2).unwrap()
    }

    #[test]
    fn backends_carry_l2_identity_and_state() {
        let c = cfg();
        let p = plan_of(&c);
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
        assert_eq!(p.backends[0].1.identity, backend_identity("web", "a"));
        let states: Vec<u32> = p.backends.iter().map(|(_, b)| b.state).collect();
        assert_eq!(
            states,
            vec![BACKEND_UP, BACKEND_DRAINING, BACKEND_UP, BACKEND_UP],
            "weight 0 drains"
        );
        assert_eq!(p.tx_ports, vec![7]);
    }

    #[test]
    fn the_data_path_writes_binding_events_only_when_mirroring() {
        assert_eq!(plan_of(&cfg()).globals.emit_bindings, 0);
        let mirrored = CFG.replacen(
            r#"{"interface":"eth0","#,
            r#"{"interface":"eth0","mirroring":{"redis":"redis://10.0.0.9","instance":"lb-a"},"#,
            1,
        );
        let c = Config::parse(&mirrored).expect("valid");
        assert_eq!(plan_of(&c).globals.emit_bindings, 1);
    }

    #[test]
    fn service_entries_carry_profile_and_key_in_network_order() {
        let p = plan_of(&cfg());
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
    fn tables_hold_only_up_backends_in_proportion_to_weight() {
        let c = cfg();
        let p = plan_of(&c);
        let web = &p.services[0].table;
        assert_eq!(web.len(), MAGLEV_TABLE_SIZE as usize);
        let count = |t: &[u32], id| t.iter().filter(|&&e| e == id).count() as f64;
        assert_eq!(count(web, 1), 0.0, "weight 0 takes no new clients");
        assert!(!web.contains(&NO_BACKEND) && !web.contains(&3));
        let ratio = count(web, 2) / count(web, 0);
        assert!(
            (ratio - 3.0).abs() < 0.05,
            "weight 3 vs 1 gave ratio {ratio}"
        );
        assert!(p.services[1].table.iter().all(|&e| e == 3));

        // Backend c down: out of the table, marked down; a keeps its entries (Maglev).
        let mut st = all_up(&c);
        st[0][2] = BackendState::Down;
        let p2 = plan(&c, &fresh(&c), &st, l2).unwrap();
        assert_eq!(p2.backends[2].1.state, BACKEND_DOWN);
        assert!(!p2.services[0].table.contains(&2) && p2.services[0].table.iter().all(|&e| e == 0));
        // The whole pool down: the table says NO_BACKEND (the XDP program drops and counts).
        st[1][0] = BackendState::Down;
        let p3 = plan(&c, &fresh(&c), &st, l2).unwrap();
        assert!(p3.services[1].table.iter().all(|&e| e == NO_BACKEND));
    }

    #[test]
    fn admin_states_reach_the_kernel() {
        let mut c = cfg();
        c.pools[0].backends[0].admin_state = AdminState::Disabled;
        c.pools[0].backends[2].admin_state = AdminState::Draining;
        let p = plan_of(&c);
        assert_eq!(p.backends[0].1.state, lb_common::BACKEND_DISABLED);
        assert_eq!(p.backends[2].1.state, BACKEND_DRAINING);
        assert!(
            p.services[0].table.iter().all(|&e| e == NO_BACKEND),
            "no backend of web takes new clients"
        );
    }

    #[test]
    fn ids_survive_reorder_removal_and_addition() {
        let c = cfg();
        let ids = fresh(&c);
        let p = plan_of(&c);
        let prev = Previous {
            services: p.services.iter().map(|s| (s.key, s.value.index)).collect(),
            backends: p.backends.iter().map(|(id, b)| (*id, b.identity)).collect(),
        };
        // Reorder services and backends, drop backend "a", add "e" and a new service.
        let text = CFG
            .replace(r#"{"name":"a","address":"10.0.0.1"},"#, "")
            .replace(r#"{"name":"c","address":"10.0.0.3","weight":3}"#, r#"{"name":"c","address":"10.0.0.3","weight":3},{"name":"e","address":"10.0.0.5"}"#)
            .replace(
                r#"{"name":"web","vip":"192.0.2.10""#,
                r#"{"name":"new","vip":"192.0.2.11","port":80,"protocol":"tcp","mode":"l4-dsr","pool":"web"},{"name":"web","vip":"192.0.2.10""#,
            );
        let c2 = Config::parse(&text).expect("valid");
        let ids2 = assign_ids(&c2, &prev).unwrap();
        assert_eq!(ids2.services[1], ids.services[0], "web keeps its index");
        assert_eq!(ids2.services[2], ids.services[1], "dns keeps its index");
        assert_eq!(
            ids2.services[0], 2,
            "the new service takes a never-used index"
        );
        assert_eq!(ids2.backends[0][0], ids.backends[0][1], "b keeps its id");
        assert_eq!(ids2.backends[0][1], ids.backends[0][2], "c keeps its id");
        assert_eq!(ids2.backends[1][0], ids.backends[1][0], "d keeps its id");
        assert_eq!(
            ids2.backends[0][2], 4,
            "e does not inherit a's id 0 (a's clients must not follow)"
        );
    }

    #[test]
    fn freed_ids_are_reused_only_when_nothing_else_is_left() {
        let c = cfg();
        let prev = Previous {
            services: vec![],
            backends: (0..MAX_BACKENDS).map(|id| (id, 0xdead_0000 + id)).collect(),
        };
        let ids = assign_ids(&c, &prev).expect("reuses freed slots");
        assert_eq!(ids.backends, vec![vec![0, 1, 2], vec![3]]);
    }

    /// A crash after `apply` cleared a removed backend's slot and before `forget` deleted its
    /// bindings: the next start sees the slot as never used and may give it to a new backend.
    /// The bindings carry the removed backend's identity, which the new one's slot does not
    /// match, so the data path treats them as absent.
    #[test]
    fn a_reused_id_after_a_crash_inherits_no_clients() {
        let c = cfg();
        let p = plan_of(&c);
        let (a_id, a) = p.backends[0];
        let tag_of_a_clients = a.identity;
        // What the pinned maps hold after the crash: "a" removed (its slot cleared), its
        // bindings still there.
        let prev = Previous {
            services: p.services.iter().map(|s| (s.key, s.value.index)).collect(),
            backends: p.backends[1..]
                .iter()
                .map(|(id, b)| (*id, b.identity))
                .collect(),
        };
        let text = CFG.replace(
            r#"{"name":"a","address":"10.0.0.1"}"#,
            r#"{"name":"e","address":"10.0.0.5"}"#,
        );
        let c2 = Config::parse(&text).expect("valid");
        let ids = assign_ids(&c2, &prev).unwrap();
        assert_eq!(
            ids.backends[0][0], a_id,
            "e gets the slot that looks unused"
        );
        let p2 = plan(&c2, &ids, &all_up(&c2), l2).unwrap();
        let (_, e) = p2
            .backends
            .iter()
            .find(|(id, _)| *id == a_id)
            .expect("e is planned");
        assert_eq!(e.identity, backend_identity("web", "e"));
        assert!(
            !lb_common::identity_matches(tag_of_a_clients, e),
            "a's bindings must not match e"
        );
        let (_, b) = p2.backends[1];
        assert!(
            lb_common::identity_matches(backend_identity("web", "b"), &b),
            "b keeps its clients"
        );
    }

    #[test]
    fn resolution_errors_propagate() {
        let c = cfg();
        let r = plan(&c, &fresh(&c), &all_up(&c), |_, bi| {
            if bi == 1 {
                Err("unresolved")
            } else {
                l2(0, bi).map_err(|_| "x")
            }
        });
        assert_eq!(r.unwrap_err(), "unresolved");
    }
}
