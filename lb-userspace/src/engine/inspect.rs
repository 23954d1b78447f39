//! The engine's tables as the admin API sees them ([`L7Tables`]): list, flush, count.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    time::Instant,
};

use super::{Engine, methods::TableRef};
use crate::{
    balancer::masked_addr,
    engine::methods::masks,
    state::{L7Binding, L7Filter, L7TableSize, L7Tables},
};

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("service", &self.service)
            .field("method", &self.method.as_ref().map(|m| m.kind()))
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Every table: (name for listings, id across reloads and restarts, table). The method's
    /// tables, then the fallback's.
    pub(super) fn tables(&self) -> Vec<(&'static str, String, TableRef<'_>)> {
        let mut out: Vec<(&'static str, String, TableRef<'_>)> = match &self.method {
            Some(m) => m
                .tables()
                .into_iter()
                .map(|t| (m.kind(), m.table_id(), t))
                .collect(),
            None => Vec::new(),
        };
        if let Some(f) = &self.fallback {
            out.push((
                "fallback",
                "fallback".into(),
                TableRef::Clients {
                    table: &f.table,
                    ipv4_prefix: f.ipv4_prefix,
                    ipv6_prefix: f.ipv6_prefix,
                },
            ));
        }
        out
    }
}

/// Does a client table's key match the filter's client (masked as the table masks)?
fn client_matches(key: &[u8; 16], client: Option<IpAddr>, v4: u8, v6: u8) -> bool {
    let (v4_mask, v6_mask) = masks(v4, v6);
    client.is_none_or(|c| masked_addr(c, &v4_mask, &v6_mask) == *key)
}

/// The stored address for display, and the prefix length that applies to it.
fn client_of(key: &[u8; 16], v4: u8, v6: u8) -> (IpAddr, u8) {
    match Ipv6Addr::from(*key).to_canonical() {
        a @ IpAddr::V4(_) => (a, v4),
        a => (a, v6),
    }
}

impl L7Tables for Engine {
    fn bindings(&self, f: &L7Filter) -> Vec<L7Binding> {
        let now = Instant::now();
        let mut out = Vec::new();
        for (name, _, t) in self.tables() {
            match t {
                TableRef::Clients {
                    table,
                    ipv4_prefix,
                    ipv6_prefix,
                } => {
                    for (k, backend, idle, open, expired) in table.entries(now) {
                        if f.backend.is_none_or(|b| b == backend)
                            && client_matches(&k, f.client, ipv4_prefix, ipv6_prefix)
                        {
                            out.push(L7Binding {
                                table: name,
                                client: Some(client_of(&k, ipv4_prefix, ipv6_prefix)),
                                key_digest: None,
                                backend,
                                idle,
                                open_connections: open,
                                expired,
                            });
                        }
                    }
                }
                TableRef::Keys(table) if f.client.is_none() => {
                    for (k, backend, idle, open, expired) in table.entries(now) {
                        if f.backend.is_none_or(|b| b == backend) {
                            out.push(L7Binding {
                                table: name,
                                client: None,
                                key_digest: Some(k),
                                backend,
                                idle,
                                open_connections: open,
                                expired,
                            });
                        }
                    }
                }
                TableRef::Keys(_) => {}
            }
        }
        out
    }

    fn flush(&self, f: &L7Filter) -> usize {
        let backend_ok = |b: u32| f.backend.is_none_or(|want| want == b);
        self.tables()
            .into_iter()
            .map(|(_, _, t)| match t {
                TableRef::Clients {
                    table,
                    ipv4_prefix,
                    ipv6_prefix,
                } => table.remove_where(|k, b| {
                    backend_ok(b) && client_matches(k, f.client, ipv4_prefix, ipv6_prefix)
                }),
                TableRef::Keys(table) if f.client.is_none() => {
                    table.remove_where(|_, b| backend_ok(b))
                }
                TableRef::Keys(_) => 0,
            })
            .sum()
    }

    fn bound(&self) -> HashMap<u32, u64> {
        let now = Instant::now();
        let mut out = HashMap::new();
        for (_, _, t) in self.tables() {
            match t {
                TableRef::Clients { table, .. } => table.count_live(now, &mut out),
                TableRef::Keys(table) => table.count_live(now, &mut out),
            }
        }
        out
    }

    fn method(&self) -> &'static str {
        self.method.as_ref().map_or("none", |m| m.kind())
    }

    fn sizes(&self) -> Vec<L7TableSize> {
        self.tables()
            .into_iter()
            .map(|(table, _, t)| {
                let (entries, capacity) = match t {
                    TableRef::Clients { table, .. } => (table.len(), table.capacity()),
                    TableRef::Keys(table) => (table.len(), table.capacity()),
                };
                L7TableSize {
                    table,
                    entries: entries as u64,
                    capacity: capacity as u64,
                }
            })
            .collect()
    }
}
