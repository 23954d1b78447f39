//! TLS persistence (Avi, TLS terminated by tether): a connection's backend travels in the
//! session tickets tether issues, sealed with the profile's key ring (`cookie::seal_ticket`).
//! The engine decides a connection's backend from its ClientHello, before the handshake: a
//! ticket that opens names the backend; otherwise the pool balances. Every ticket issued on
//! the connection (TLS 1.2 NewSessionTicket, TLS 1.3 tickets) names the connection's backend,
//! and every request on the connection goes there. Nothing is kept locally, so the binding
//! survives a restart and holds across instances given the same keys.
//!
//! TLS 1.2 session-ID resumption cannot carry it: rustls draws the session ID itself
//! (random, in its TLS 1.2 server handshake) and offers no hook to choose it. These services
//! keep no session cache instead, so TLS 1.2 clients resume by ticket (RFC 5077).

use std::{
    path::Path,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;

use super::{Binding, Context, Lookup, Method};
use crate::{
    config::{PersistenceKind, PersistenceProfile, Pool},
    cookie::{self, CookieKeys, CookiePayload, KeyError},
    engine::input::Input,
};

pub struct TlsTicket {
    service: String,
    keys: ArcSwap<CookieKeys>,
    lifetime_s: u32,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The configured ring, else the cookies' key generated once and kept in `state_dir`.
fn ring(service: &str, keys: &[(u8, String)], state_dir: &Path) -> Result<CookieKeys, KeyError> {
    if keys.is_empty() {
        log::info!(
            "profile of {service}: no ticket keys configured, using the key kept in {}",
            state_dir.display()
        );
        cookie::keyfile::load_or_create(state_dir)
    } else {
        CookieKeys::from_config(keys)
    }
}

impl TlsTicket {
    pub fn new(
        service: &str,
        keys: &[(u8, String)],
        lifetime_s: u32,
        state_dir: &Path,
    ) -> Result<Self, KeyError> {
        Ok(TlsTicket {
            service: service.to_string(),
            keys: ArcSwap::from_pointee(ring(service, keys, state_dir)?),
            lifetime_s,
        })
    }
}

impl Method for TlsTicket {
    fn kind(&self) -> &'static str {
        "tls-ticket"
    }

    fn lookup(&self, input: &mut Input<'_>, _: &Pool, cx: &Context<'_>) -> Lookup {
        // A request on a connection whose session is bound.
        if let Some(id) = input.tls_session() {
            return Lookup {
                binding: Some(Binding::Identity(id)),
                ..Lookup::default()
            };
        }
        // A ClientHello offering a ticket.
        let binding = input.session_ticket().and_then(|t| {
            match cookie::open_ticket(&self.keys.load(), &self.service, t, unix_now()) {
                Ok((p, _)) if p.pool == cx.pool_id => Some(Binding::Identity(p.backend)),
                Ok(_) => {
                    cx.stats.reject(cookie::Reject::ForeignService);
                    None
                }
                Err(r) => {
                    cx.stats.reject(r);
                    None
                }
            }
        });
        Lookup {
            binding,
            ..Lookup::default()
        }
    }

    fn issues_tickets(&self) -> bool {
        true
    }

    fn ticketer(
        &self,
        identity: u32,
        cx: &Context<'_>,
    ) -> Option<Arc<dyn rustls::server::ProducesTickets>> {
        Some(Arc::new(Ticketer {
            keys: self.keys.load_full(),
            service: self.service.clone(),
            backend: identity,
            pool: cx.pool_id,
            lifetime_s: self.lifetime_s,
        }))
    }

    /// Keys rotate in place: configured ones, or the stored one when they are removed.
    fn update(
        &self,
        service: &str,
        profile: &PersistenceProfile,
        state_dir: &Path,
    ) -> Result<(), KeyError> {
        if let PersistenceKind::TlsTicket { keys } = &profile.kind {
            self.keys.store(Arc::new(ring(service, keys, state_dir)?));
        }
        Ok(())
    }
}

/// One connection's ticketer: seals the connection's backend into every ticket, opens any
/// ticket of the service (the backend was already decided from the ClientHello).
struct Ticketer {
    keys: Arc<CookieKeys>,
    service: String,
    backend: u32,
    pool: u32,
    lifetime_s: u32,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticketer")
            .field("keys", &self.keys)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime_s
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let payload = CookiePayload::issue(
            self.backend,
            self.pool,
            unix_now(),
            Some(u64::from(self.lifetime_s)),
        );
        cookie::seal_ticket(&self.keys, &self.service, &payload, plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        cookie::open_ticket(&self.keys, &self.service, cipher, unix_now())
            .ok()
            .map(|(_, state)| state)
    }
}

#[cfg(test)]
#[path = "tls_ticket_tests.rs"]
mod tests;
