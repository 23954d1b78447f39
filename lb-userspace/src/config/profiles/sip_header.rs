//! `sip-header`: a SIP header field's value (default `Call-ID`) keeps its backend.

use super::{At, Common};
use crate::config::{ConfigError, PersistenceKind};

profile_fields! {
    pub struct Raw {
        timeout_s: u32,
        /// The SIP header field (full or compact name); default `Call-ID`.
        header: String,
    }
}

impl Raw {
    pub fn common(&self) -> Common<'_> {
        Common::unprefixed(&self.name, self.timeout_s, self.select_new_server_when_down)
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
