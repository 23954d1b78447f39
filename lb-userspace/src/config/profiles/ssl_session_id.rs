//! `ssl-session-id`: Kemp's SSL session ID persistence for services that pass TLS through
//! (`"tls_passthrough": true`): {session ID or TLS 1.2 ticket -> backend} learned from the
//! server's cleartext handshake, for `timeout_s`. TLS 1.3 has no such ID (the client's
//! legacy ID is random each time): the `fallback` (client IP) decides those.

use super::{At, Common, RawFallback, fallback};
use crate::config::{ConfigError, PersistenceKind};

profile_fields! {
    pub struct Raw {
        timeout_s: u32,
        fallback: RawFallback,
    }
}

impl Raw {
    pub fn common(&self) -> Common<'_> {
        Common::unprefixed(&self.name, self.timeout_s, self.select_new_server_when_down)
    }

    pub fn kind(&self, at: At<'_>) -> Result<PersistenceKind, ConfigError> {
        Ok(PersistenceKind::SslSessionId {
            fallback: fallback(at, self.fallback.as_ref())?,
        })
    }
}
