//! `app-cookie`: the backend's own session cookie, learned from its Set-Cookie.

use super::{At, Common, RawFallback, cookie_name, fallback};
use crate::config::{AppCookieProfile, ConfigError, PersistenceKind};

profile_fields! {
    pub struct Raw {
        timeout_s: u32,
        cookie_name: String,
        fallback: RawFallback,
    }
}

impl Raw {
    pub fn common(&self) -> Common<'_> {
        Common::unprefixed(&self.name, self.timeout_s, self.select_new_server_when_down)
    }

    pub fn kind(&self, at: At<'_>) -> Result<PersistenceKind, ConfigError> {
        let fallback = fallback(at, self.fallback.as_ref())?;
        Ok(PersistenceKind::AppCookie(AppCookieProfile {
            cookie_name: cookie_name(at, &self.name, self.cookie_name.as_deref(), true)?,
            fallback,
        }))
    }
}
