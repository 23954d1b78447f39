//! The persistence methods: one [`Method`] implementation per file, and the registry that
//! builds the one a profile names. A method only says what an input means (a binding, a key)
//! and keeps its own table or cookie; the engine does the rest (backend states, the down
//! policy, the fallback, balancing new clients, counters).
//!
//! Adding a method: a file here implementing [`Method`], its profile type in `config`, and
//! one line in [`build`].

mod app_cookie;
mod client_ip;
mod custom_header;
mod http_cookie;
mod key_hash;
mod script;
mod sip_header;

#[cfg(test)]
mod sip_script_tests;
mod ssl_session_id;
mod tls_ticket;

use std::{net::IpAddr, path::Path, time::Instant};

use crate::{
    config::{PersistenceKind, PersistenceProfile, Pool},
    cookie::KeyError,
    engine::{
        input::Input,
        quota::SourceQuota,
        table::{Inserted, Table},
    },
    state::RouterStats,
};

pub use app_cookie::session_value;
pub use http_cookie::StrippedCookie;

/// What a method may read while deciding.
pub struct Context<'a> {
    /// The virtual service's name.
    pub service: &'a str,
    /// `cookie::pool_id` of the pool.
    pub pool_id: u32,
    pub stats: &'a RouterStats,
    pub now: Instant,
    /// The service's per-source quota of new table entries.
    pub quota: &'a SourceQuota,
}

/// A backend named by a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// By stable identity (`lb_common::backend_identity`), as tables and cookies keep it.
    Identity(u32),
    /// By index in the pool (a static mapping such as custom-header's).
    Index(usize),
}

/// Whether the method hashes a key of the input onto the pool (Maglev).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Key {
    /// The method keeps bindings, not keys: without a binding the input counts as having
    /// none of the method's (the fallback may decide).
    #[default]
    NotKeyed,
    /// A keyed method found no key in the input (the fallback may decide).
    Missing,
    /// The key: a new client is placed by its Maglev entry, the same on every instance.
    Hash(Vec<u8>),
}

/// What a method found in an input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lookup {
    pub binding: Option<Binding>,
    pub key: Key,
}

/// The engine's decision, as methods see it after the fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Backend identity.
    pub identity: u32,
    /// Index of the pool backend.
    pub index: usize,
    /// The method's own binding was honoured (not the fallback, not a new or moved client).
    pub by_method: bool,
    /// The client's address (for the new-key quota of what a reply teaches).
    pub client: IpAddr,
}

/// The head going back to the client, for methods that add to it or learn from it.
pub enum Reply<'a> {
    Http {
        head: &'a mut http::response::Parts,
        /// The client connection is TLS.
        tls: bool,
    },
    /// What a passed-through TLS server said in cleartext.
    TlsServer(&'a crate::tlswire::ServerEvent),
}

/// A table a method keeps, for listing and flushing.
pub enum TableRef<'a> {
    /// Client addresses masked to these prefix lengths.
    Clients {
        table: &'a Table<[u8; 16]>,
        ipv4_prefix: u8,
        ipv6_prefix: u8,
    },
    /// Digests of keys (cookie values, headers, ...).
    Keys(&'a Table<u128>),
}

/// One persistence method.
pub trait Method: Send + Sync {
    /// The profile `type` it implements (for listings and logs).
    fn kind(&self) -> &'static str;

    /// What the input says about its client's backend. May edit an HTTP request (a method
    /// that owns a cookie removes it before the request is forwarded).
    /// `pool` is the service's pool in the snapshot the decision is made on.
    fn lookup(&self, input: &mut Input<'_>, pool: &Pool, cx: &Context<'_>) -> Lookup;

    /// The engine sent the input to `identity` (kept, moved or new): remember it where the
    /// method keeps bindings.
    fn record(&self, input: &Input<'_>, lookup: &Lookup, identity: u32, cx: &Context<'_>) {
        let _ = (input, lookup, identity, cx);
    }

    /// The keys of its table that `lookup` looked `input` up by, in the order it looks (none
    /// for a method without a table): what the mirror is asked about when none was bound
    /// here.
    fn stored_keys(&self, input: &Input<'_>, lookup: &Lookup) -> Vec<u128> {
        let _ = (input, lookup);
        Vec::new()
    }

    /// Mixed into the pool's choice for a new client (Kemp's cookie "add port").
    fn selection_hint(&self, input: &Input<'_>) -> u64 {
        let _ = input;
        0
    }

    /// Add to, or learn from, the reply to a decided input.
    fn on_reply(&self, d: &Decision, reply: &mut Reply<'_>, cx: &Context<'_>) {
        let _ = (d, reply, cx);
    }

    /// A client connection opened: `true` when that expired the client's entry.
    fn connection_opened(&self, client: IpAddr, now: Instant) -> bool {
        let _ = (client, now);
        false
    }

    /// A client connection closed.
    fn connection_closed(&self, client: IpAddr, now: Instant) {
        let _ = (client, now);
    }

    /// TLS persistence: the method keeps each connection's backend in the TLS session
    /// tickets tether issues (the proxy then decides a connection from its ClientHello).
    fn issues_tickets(&self) -> bool {
        false
    }

    /// The ticketer of one connection bound to backend `identity`.
    fn ticketer(
        &self,
        identity: u32,
        cx: &Context<'_>,
    ) -> Option<std::sync::Arc<dyn rustls::server::ProducesTickets>> {
        let _ = (identity, cx);
        None
    }

    /// What identifies the method's tables across a reload or restart: its type and key
    /// source. A successor with another id starts with empty tables.
    fn table_id(&self) -> String {
        self.kind().to_string()
    }

    /// The tables the method keeps (for the admin API and the saved state).
    fn tables(&self) -> Vec<TableRef<'_>> {
        Vec::new()
    }

    /// Take what a reload may change in place (cookie keys); the rest of the profile is
    /// the same, or the engine would have been replaced.
    fn update(
        &self,
        service: &str,
        profile: &PersistenceProfile,
        state_dir: &Path,
    ) -> Result<(), KeyError> {
        let _ = (service, profile, state_dir);
        Ok(())
    }
}

/// The method a profile names; `state_dir` keeps a generated cookie key.
pub fn build(
    service: &str,
    profile: &PersistenceProfile,
    state_dir: &Path,
) -> Result<Box<dyn Method>, KeyError> {
    let timeout = std::time::Duration::from_secs(profile.timeout_s as u64);
    let cap = profile.table_capacity;
    Ok(match &profile.kind {
        PersistenceKind::ClientIp => Box::new(client_ip::ClientIp::new(profile, cap, timeout)),
        PersistenceKind::HttpCookie(c) => {
            Box::new(http_cookie::HttpCookie::new(service, c, state_dir)?)
        }
        PersistenceKind::AppCookie(a) => Box::new(app_cookie::AppCookie::new(a, cap, timeout)),
        PersistenceKind::KeyHash { key, sticky, .. } => {
            Box::new(key_hash::KeyHash::new(key, *sticky, cap, timeout))
        }
        PersistenceKind::CustomHeader { header } => {
            Box::new(custom_header::CustomHeader::new(header))
        }
        PersistenceKind::SipHeader { header } => {
            Box::new(sip_header::SipHeader::new(header, cap, timeout))
        }
        PersistenceKind::Script(s) => Box::new(script::Script::new(s, cap, timeout)),
        PersistenceKind::SslSessionId { .. } => {
            Box::new(ssl_session_id::SslSessionId::new(cap, timeout))
        }
        PersistenceKind::TlsTicket { keys } => Box::new(tls_ticket::TlsTicket::new(
            service,
            keys,
            profile.timeout_s,
            state_dir,
        )?),
    })
}

/// The masks of a prefix pair, for [`crate::balancer::masked_addr`].
pub fn masks(v4: u8, v6: u8) -> ([u8; 4], [u8; 16]) {
    (
        lb_common::prefix_mask::<4>(v4),
        lb_common::prefix_mask::<16>(v6),
    )
}

/// Bind `k` in `table` for `client`'s request: a key already there is refreshed; a new one
/// is stored only within the client's new-key quota (else counted and not stored), and a live
/// entry evicted to make room is counted. `false` when nothing was stored.
pub fn store<K: std::hash::Hash + Eq + Clone>(
    table: &Table<K>,
    k: K,
    identity: u32,
    client: IpAddr,
    cx: &Context<'_>,
) -> bool {
    match table.insert_admitted(k, identity, cx.now, || cx.quota.allow(client, cx.now)) {
        Inserted::Refused => {
            RouterStats::bump(&cx.stats.keys_refused);
            return false;
        }
        Inserted::Evicted => RouterStats::bump(&cx.stats.table_evictions),
        Inserted::Added | Inserted::Refreshed => {}
    }
    true
}

/// A table's binding for `k`; an expired entry is counted and is no binding.
fn from_table<K: std::hash::Hash + Eq + Clone>(
    table: &Table<K>,
    k: &K,
    cx: &Context<'_>,
) -> Option<Binding> {
    match table.get(k, cx.now) {
        Ok(id) => Some(Binding::Identity(id)),
        Err(expired) => {
            if expired {
                RouterStats::bump(&cx.stats.expired);
            }
            None
        }
    }
}
