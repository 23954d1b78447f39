//! `client-ip`: the client's address, masked to the prefixes, for `timeout_s`.

use serde::Deserialize;

use super::{At, Common};
use crate::config::{ConfigError, DownPolicy, PersistenceKind};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    name: String,
    #[serde(default)]
    timeout_s: Option<u32>,
    #[serde(default)]
    ipv4_prefix: Option<u8>,
    #[serde(default)]
    ipv6_prefix: Option<u8>,
    #[serde(default)]
    select_new_server_when_down: Option<DownPolicy>,
}

impl Raw {
    pub fn common(&self) -> Common<'_> {
        Common {
            name: &self.name,
            timeout_s: self.timeout_s,
            ipv4_prefix: self.ipv4_prefix,
            ipv6_prefix: self.ipv6_prefix,
            down_policy: self.select_new_server_when_down,
        }
    }

    pub fn kind(&self, _: At<'_>) -> Result<PersistenceKind, ConfigError> {
        Ok(PersistenceKind::ClientIp)
    }
}
