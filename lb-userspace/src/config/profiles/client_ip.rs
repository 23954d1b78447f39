//! `client-ip`: the client's address, masked to the prefixes, for `timeout_s`.

use super::{At, Common};
use crate::config::{ConfigError, PersistenceKind};

profile_fields! {
    pub struct Raw {
        timeout_s: u32,
        ipv4_prefix: u8,
        ipv6_prefix: u8,
    }
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
