//! `sip-header`: a SIP header field's value (default `Call-ID`) keeps its backend.

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
    select_new_server_when_down: Option<DownPolicy>,
    #[serde(default)]
    table_capacity: Option<u64>,
    #[serde(default)]
    max_new_keys_per_source_per_min: Option<u32>,
    /// The SIP header field (full or compact name); default `Call-ID`.
    #[serde(default)]
    header: Option<String>,
}

impl Raw {
    /// `table_capacity` and `max_new_keys_per_source_per_min`, as given.
    pub fn limits(&self) -> (Option<u64>, Option<u32>) {
        (self.table_capacity, self.max_new_keys_per_source_per_min)
    }

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
        let header = self.header.as_deref().unwrap_or("Call-ID");
        // RFC 3261 token characters.
        if header.is_empty()
            || !header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
        {
            return Err(ConfigError::new(
                at("header"),
                format!("{header:?} is not a valid SIP header name"),
            ));
        }
        Ok(PersistenceKind::SipHeader {
            header: header.to_string(),
        })
    }
}
