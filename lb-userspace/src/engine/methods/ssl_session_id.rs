//! SSL session ID persistence (Kemp, on a service that passes TLS through): the binding of a
//! TLS session to its backend is learned from the server's cleartext handshake, keyed by the
//! session ID the ServerHello assigns and by a TLS 1.2 NewSessionTicket's ticket, and kept
//! for `timeout_s` after its last use. A client that offers either one to resume goes back to
//! the server that holds the session.
//!
//! TLS 1.3 has no resumable session ID (the client's legacy ID is random on every
//! connection and the server only echoes it) and its tickets travel encrypted: such
//! handshakes are counted (`tls13_unpersisted`) and only the profile's client-IP fallback
//! keeps those clients in place.

use std::time::Duration;

use super::{Context, Decision, Lookup, Method, Reply, TableRef, from_table, store};
use crate::{
    config::Pool,
    engine::{
        input::Input,
        table::{Table, digest},
    },
    state::RouterStats,
    tlswire::ServerEvent,
};

pub struct SslSessionId {
    /// digest(kind | session ID or ticket) -> backend identity.
    table: Table<u128>,
}

/// Table keys: a session ID and a ticket never collide.
fn session_key(id: &[u8]) -> u128 {
    digest(&[b"id:", id].concat())
}

fn ticket_key(ticket: &[u8]) -> u128 {
    digest(&[b"tk:", ticket].concat())
}

impl SslSessionId {
    pub fn new(capacity: usize, timeout: Duration) -> Self {
        SslSessionId {
            table: Table::new(capacity, timeout),
        }
    }
}

impl Method for SslSessionId {
    fn kind(&self) -> &'static str {
        "ssl-session-id"
    }

    fn lookup(&self, input: &mut Input<'_>, _: &Pool, cx: &Context<'_>) -> Lookup {
        // A ticket decides first: a client resuming by ticket sends a fresh random session ID
        // (RFC 5077 3.4).
        let by_ticket = input
            .session_ticket()
            .and_then(|t| from_table(&self.table, &ticket_key(t), cx));
        let binding = by_ticket.or_else(|| {
            input
                .session_id()
                .and_then(|id| from_table(&self.table, &session_key(id), cx))
        });
        Lookup {
            binding,
            ..Lookup::default()
        }
    }

    fn stored_keys(&self, input: &Input<'_>, _: &Lookup) -> Vec<u128> {
        let ticket = input.session_ticket().map(ticket_key);
        let id = input.session_id().map(session_key);
        ticket.into_iter().chain(id).collect()
    }

    /// Saved and listed like the other key tables (session IDs and tickets as digests).
    fn tables(&self) -> Vec<TableRef<'_>> {
        vec![TableRef::Keys(&self.table)]
    }

    fn on_reply(&self, d: &Decision, reply: &mut Reply<'_>, cx: &Context<'_>) {
        let Reply::TlsServer(event) = reply else {
            return;
        };
        match event {
            ServerEvent::Hello(h) if h.is_tls13() => RouterStats::bump(&cx.stats.tls13_unpersisted),
            ServerEvent::Hello(h) if !h.session_id.is_empty() => {
                let key = session_key(&h.session_id);
                if store(&self.table, key, d.identity, d.client, cx) {
                    RouterStats::bump(&cx.stats.tls_sessions_learned);
                }
            }
            ServerEvent::Hello(_) => {}
            ServerEvent::Ticket(t) => {
                if store(&self.table, ticket_key(t), d.identity, d.client, cx) {
                    RouterStats::bump(&cx.stats.tls_sessions_learned);
                }
            }
        }
    }
}
