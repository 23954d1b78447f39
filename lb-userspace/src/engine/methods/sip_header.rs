//! SIP header persistence (Kemp's UDP service with "Force L7"): the value of a configured
//! SIP header field (default `Call-ID`, compact forms understood) is hashed onto the pool's
//! Maglev table and keeps its backend for `timeout_s`, so every datagram of a call reaches
//! one backend. A message without the field is placed by its source address (hashed the
//! same way, in the same table under a distinct prefix), so it too stays put.

use std::{net::IpAddr, time::Duration};

use super::{Context, Key, Lookup, Method, TableRef, from_table, store};
use crate::{
    config::Pool,
    engine::{
        input::Input,
        table::{Table, digest},
    },
};

pub struct SipHeader {
    /// The field's name as configured (its compact or full form also matches).
    header: String,
    /// digest(key) -> backend identity.
    table: Table<u128>,
}

impl SipHeader {
    pub fn new(header: &str, capacity: usize, timeout: Duration) -> Self {
        SipHeader {
            header: header.to_string(),
            table: Table::new(capacity, timeout),
        }
    }

    /// The input's key: `h` and the header's value, else `a` and the source address (the
    /// prefixes keep a value from ever colliding with an address).
    fn key(&self, input: &Input<'_>) -> Vec<u8> {
        match input.sip_header(&self.header).filter(|v| !v.is_empty()) {
            Some(v) => {
                let mut k = Vec::with_capacity(v.len() + 1);
                k.push(b'h');
                k.extend_from_slice(v);
                k
            }
            None => {
                let mut k = vec![b'a'];
                match input.client().ip() {
                    IpAddr::V4(a) => k.extend_from_slice(&a.octets()),
                    IpAddr::V6(a) => k.extend_from_slice(&a.octets()),
                }
                k
            }
        }
    }
}

impl Method for SipHeader {
    fn kind(&self) -> &'static str {
        "sip-header"
    }

    fn lookup(&self, input: &mut Input<'_>, _: &Pool, cx: &Context<'_>) -> Lookup {
        let k = self.key(input);
        Lookup {
            binding: from_table(&self.table, &digest(&k), cx),
            key: Key::Hash(k),
        }
    }

    fn record(&self, input: &Input<'_>, lookup: &Lookup, identity: u32, cx: &Context<'_>) {
        if let Key::Hash(k) = &lookup.key {
            store(&self.table, digest(k), identity, input.client().ip(), cx);
        }
    }

    fn stored_keys(&self, _: &Input<'_>, lookup: &Lookup) -> Vec<u128> {
        match &lookup.key {
            Key::Hash(k) => vec![digest(k)],
            _ => Vec::new(),
        }
    }

    /// Its keys' table: listed, saved across restarts and mirrored like the others.
    fn tables(&self) -> Vec<TableRef<'_>> {
        vec![TableRef::Keys(&self.table)]
    }
}
