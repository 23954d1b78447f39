//! Client IP persistence (Kemp "Source IP", Avi "Client IP"): the client's address, masked
//! to the profile's prefixes, keeps its backend for `timeout_s` after its last activity, and
//! never expires while the client has a connection open.

use std::{net::IpAddr, time::Duration, time::Instant};

use super::{Context, Lookup, Method, TableRef, from_table, masks, store};
use crate::{
    balancer::masked_addr,
    config::PersistenceProfile,
    config::Pool,
    engine::{input::Input, table::Table},
};

pub struct ClientIp {
    table: Table<[u8; 16]>,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    v4_mask: [u8; 4],
    v6_mask: [u8; 16],
}

impl ClientIp {
    pub fn new(profile: &PersistenceProfile, capacity: usize, timeout: Duration) -> Self {
        let (v4_mask, v6_mask) = masks(profile.ipv4_prefix, profile.ipv6_prefix);
        ClientIp {
            table: Table::new(capacity, timeout),
            ipv4_prefix: profile.ipv4_prefix,
            ipv6_prefix: profile.ipv6_prefix,
            v4_mask,
            v6_mask,
        }
    }

    fn key(&self, ip: IpAddr) -> [u8; 16] {
        masked_addr(ip, &self.v4_mask, &self.v6_mask)
    }
}

impl Method for ClientIp {
    fn kind(&self) -> &'static str {
        "client-ip"
    }

    fn lookup(&self, input: &mut Input<'_>, _: &Pool, cx: &Context<'_>) -> Lookup {
        Lookup {
            binding: from_table(&self.table, &self.key(input.client().ip()), cx),
            ..Lookup::default()
        }
    }

    fn record(&self, input: &Input<'_>, _: &Lookup, identity: u32, cx: &Context<'_>) {
        let ip = input.client().ip();
        store(&self.table, self.key(ip), identity, ip, cx);
    }

    fn stored_keys(&self, input: &Input<'_>, _: &Lookup) -> Vec<u128> {
        vec![u128::from_be_bytes(self.key(input.client().ip()))]
    }

    fn tables(&self) -> Vec<TableRef<'_>> {
        vec![TableRef::Clients {
            table: &self.table,
            ipv4_prefix: self.ipv4_prefix,
            ipv6_prefix: self.ipv6_prefix,
        }]
    }

    fn connection_opened(&self, client: IpAddr, now: Instant) -> bool {
        self.table.opened(&self.key(client), now)
    }

    fn connection_closed(&self, client: IpAddr, now: Instant) {
        self.table.closed(&self.key(client), now);
    }
}
