//! `tls-ticket`: Avi's TLS persistence for services that terminate TLS (`tls`): the backend
//! travels in the session tickets tether issues, sealed with `keys` (the cookie key format),
//! valid `timeout_s` (without `keys`: the cookies' key kept in `state_dir`). Nothing else is kept.

use super::{At, Common, http_cookie::RawKey};
use crate::config::{ConfigError, PersistenceKind};

profile_fields! {
    pub struct Raw {
        timeout_s: u32,
        keys: Vec<RawKey>,
    }
}

impl Raw {
    pub fn common(&self) -> Common<'_> {
        Common::unprefixed(&self.name, self.timeout_s, self.select_new_server_when_down)
    }

    pub fn kind(&self, at: At<'_>) -> Result<PersistenceKind, ConfigError> {
        let keys: Vec<(u8, String)> = self
            .keys
            .iter()
            .flatten()
            .map(|k| (k.id, k.secret.clone()))
            .collect();
        if !keys.is_empty() {
            crate::cookie::CookieKeys::from_config(&keys)
                .map_err(|e| ConfigError::new(at("keys"), e.to_string()))?;
        }
        if self.timeout_s == Some(0) {
            return Err(ConfigError::new(
                at("timeout_s"),
                "0: a ticket needs a lifetime (1 or more seconds)",
            ));
        }
        Ok(PersistenceKind::TlsTicket { keys })
    }
}
