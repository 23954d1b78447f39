//! `custom-header`: a header's value matched against each backend's `header_value`.

use super::{At, Common};
use crate::config::{ConfigError, PersistenceKind};

profile_fields! {
    pub struct Raw {
        timeout_s: u32,
        ipv4_prefix: u8,
        ipv6_prefix: u8,
        /// The header whose value selects the backend.
        item: String,
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

    pub fn kind(&self, at: At<'_>) -> Result<PersistenceKind, ConfigError> {
        let header = match self.item.as_deref() {
            Some(h)
                if !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
            {
                h.to_ascii_lowercase()
            }
            Some(h) => {
                return Err(ConfigError::new(
                    at("item"),
                    format!("{h:?} is not a valid header name"),
                ));
            }
            None => {
                return Err(ConfigError::new(
                    at("item"),
                    "required: the header whose value selects the backend",
                ));
            }
        };
        Ok(PersistenceKind::CustomHeader { header })
    }
}
