//! `tls-ticket`: Avi's TLS persistence for services that terminate TLS (`tls`): the backend
//! travels in the session tickets tether issues, sealed with `keys` (the cookie key format),
//! valid `timeout_s`. Nothing is kept locally.

use serde::Deserialize;

use super::{At, Common, http_cookie::RawKey};
use crate::config::{ConfigError, DownPolicy, PersistenceKind};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    name: String,
    #[serde(default)]
    timeout_s: Option<u32>,
    #[serde(default)]
    select_new_server_when_down: Option<DownPolicy>,
    #[serde(default)]
    keys: Option<Vec<RawKey>>,
}

impl Raw {
    pub fn common(&self) -> Common<'_> {
        Common {
            name: &self.name,
            timeout_s: self.timeout_s,
            ipv4_prefix: None,
            ipv6_prefix: None,
            down_policy: self.select_new_server_when_down,
        }
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
