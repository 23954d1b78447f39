//! `http-cookie`: tether's own encrypted cookie. The cookie carries its lifetime
//! (`max_lifetime_min`); nothing is kept locally, so there is no `timeout_s` or prefix.

use serde::{Deserialize, Deserializer};

use super::{At, Common, RawFallback, cookie_name, fallback};
use crate::{
    config::{ConfigError, CookieProfile, PersistenceKind},
    cookie::SameSite,
};

/// Default server-side maximum age of a session cookie (24 h), and its bound (a year).
const DEFAULT_SESSION_MAX_AGE_S: u32 = 86_400;
const MAX_SESSION_MAX_AGE_S: u32 = 365 * 86_400;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: u8,
    pub secret: String,
}

profile_fields! {
    pub struct Raw {
        cookie_name: String,
        max_lifetime_min: u32,
        session_max_age_s: u32,
        always_send: bool,
        add_port: bool,
        http_only: bool,
        secure: bool,
        /// Outer `None`: not given (Lax); inner `None`: "omit".
        #[serde(deserialize_with = "same_site")]
        same_site: Option<SameSite>,
        path: String,
        domain: String,
        keys: Vec<RawKey>,
        fallback: RawFallback,
    }
}

/// `lax`, `strict`, `none`, or `omit` (no attribute).
fn same_site<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<SameSite>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Word {
        Lax,
        Strict,
        None,
        Omit,
    }
    Ok(Some(match Word::deserialize(d)? {
        Word::Lax => Some(SameSite::Lax),
        Word::Strict => Some(SameSite::Strict),
        Word::None => Some(SameSite::None),
        Word::Omit => None,
    }))
}

impl Raw {
    pub fn common(&self) -> Common<'_> {
        Common::unprefixed(&self.name, None, self.select_new_server_when_down)
    }

    pub fn kind(&self, at: At<'_>) -> Result<PersistenceKind, ConfigError> {
        let fallback = fallback(at, self.fallback.as_ref())?;
        let max_lifetime = match self.max_lifetime_min {
            None => None,
            Some(m) if (10..=720).contains(&m) => {
                Some(std::time::Duration::from_secs(m as u64 * 60))
            }
            Some(m) => {
                return Err(ConfigError::new(
                    at("max_lifetime_min"),
                    format!("{m}: must be 10 to 720 minutes (leave it out for a session cookie)"),
                ));
            }
        };
        let session_max_age_s = self.session_max_age_s.unwrap_or(DEFAULT_SESSION_MAX_AGE_S);
        if !(60..=MAX_SESSION_MAX_AGE_S).contains(&session_max_age_s) {
            return Err(ConfigError::new(
                at("session_max_age_s"),
                format!("{session_max_age_s}: must be 60 to {MAX_SESSION_MAX_AGE_S} seconds"),
            ));
        }
        if max_lifetime.is_some() && self.session_max_age_s.is_some() {
            return Err(ConfigError::new(
                at("session_max_age_s"),
                "applies to session cookies only: leave it out with max_lifetime_min",
            ));
        }
        let path = self.path.clone().unwrap_or_else(|| "/".into());
        if !path.starts_with('/') || path.chars().any(|c| c.is_ascii_control() || c == ';') {
            return Err(ConfigError::new(
                at("path"),
                format!("{path:?}: must start with '/' and contain no ';' or control characters"),
            ));
        }
        if let Some(d) = &self.domain
            && (d.is_empty()
                || !d
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c)))
        {
            return Err(ConfigError::new(
                at("domain"),
                format!("{d:?} is not a domain name"),
            ));
        }
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
        Ok(PersistenceKind::HttpCookie(CookieProfile {
            cookie_name: cookie_name(at, &self.name, self.cookie_name.as_deref(), false)?,
            max_lifetime,
            session_max_age: std::time::Duration::from_secs(session_max_age_s as u64),
            always_send: self.always_send.unwrap_or(false),
            add_port: self.add_port.unwrap_or(false),
            http_only: self.http_only.unwrap_or(true),
            secure: self.secure,
            same_site: self.same_site.unwrap_or(Some(SameSite::Lax)),
            path,
            domain: self.domain.clone(),
            keys,
            fallback,
        }))
    }
}
