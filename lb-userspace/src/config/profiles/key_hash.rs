//! Key-hash profiles: Kemp's sticky hash methods (`all-cookies`, `super-http`, `url-hash`,
//! `host-header`, `query-item`, `header`) and Avi's `consistent-hash` (the hash alone).

use super::{At, Common, RawFallback, fallback};
use crate::config::{ConfigError, KeySource, PersistenceKind};

profile_fields! {
    /// `all-cookies`, `url-hash`, `host-header`: the key needs no setting.
    pub struct Sticky {
        timeout_s: u32,
        fallback: RawFallback,
    }
}

profile_fields! {
    /// `super-http`: User-Agent (or Authorization for MSRPC), optionally with the address.
    pub struct SuperHttp {
        timeout_s: u32,
        fallback: RawFallback,
        /// Kemp "Super HTTP and Source IP".
        with_source_ip: bool,
    }
}

profile_fields! {
    /// `query-item`, `header`: a named query item or header.
    pub struct Item {
        timeout_s: u32,
        fallback: RawFallback,
        item: String,
    }
}

profile_fields! {
    /// `consistent-hash`: Avi's hash of `hash_key`, with no table and no fallback.
    pub struct Consistent {
        timeout_s: u32,
        hash_key: String,
    }
}

fn sticky(
    at: At<'_>,
    key: KeySource,
    f: Option<&RawFallback>,
) -> Result<PersistenceKind, ConfigError> {
    Ok(PersistenceKind::KeyHash {
        key,
        sticky: true,
        fallback: fallback(at, f)?,
    })
}

/// A query item or header name.
fn item_name(at: At<'_>, item: Option<&str>, what: &str) -> Result<String, ConfigError> {
    match item {
        Some(n)
            if !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'=' && b != b'&') =>
        {
            Ok(n.to_string())
        }
        Some(n) => Err(ConfigError::new(
            at("item"),
            format!("{n:?} is not a valid {what} name"),
        )),
        None => Err(ConfigError::new(
            at("item"),
            format!("required: the {what} to hash"),
        )),
    }
}

impl Sticky {
    pub fn common(&self) -> Common<'_> {
        Common::unprefixed(&self.name, self.timeout_s, self.select_new_server_when_down)
    }

    /// `key` is the type's: all cookies, URL or Host.
    pub fn kind(&self, at: At<'_>, key: KeySource) -> Result<PersistenceKind, ConfigError> {
        sticky(at, key, self.fallback.as_ref())
    }
}

impl SuperHttp {
    pub fn common(&self) -> Common<'_> {
        Common::unprefixed(&self.name, self.timeout_s, self.select_new_server_when_down)
    }

    pub fn kind(&self, at: At<'_>) -> Result<PersistenceKind, ConfigError> {
        let key = KeySource::SuperHttp {
            with_source_ip: self.with_source_ip.unwrap_or(false),
        };
        sticky(at, key, self.fallback.as_ref())
    }
}

impl Item {
    pub fn common(&self) -> Common<'_> {
        Common::unprefixed(&self.name, self.timeout_s, self.select_new_server_when_down)
    }

    pub fn query(&self, at: At<'_>) -> Result<PersistenceKind, ConfigError> {
        let fallback = fallback(at, self.fallback.as_ref())?;
        let key = KeySource::QueryItem(item_name(at, self.item.as_deref(), "query item")?);
        Ok(PersistenceKind::KeyHash {
            key,
            sticky: true,
            fallback,
        })
    }

    pub fn header(&self, at: At<'_>) -> Result<PersistenceKind, ConfigError> {
        let fallback = fallback(at, self.fallback.as_ref())?;
        let name = item_name(at, self.item.as_deref(), "header")?;
        Ok(PersistenceKind::KeyHash {
            key: KeySource::Header(name.to_ascii_lowercase()),
            sticky: true,
            fallback,
        })
    }
}

impl Consistent {
    pub fn common(&self) -> Common<'_> {
        Common::unprefixed(&self.name, self.timeout_s, self.select_new_server_when_down)
    }

    pub fn kind(&self, at: At<'_>) -> Result<PersistenceKind, ConfigError> {
        let key = match self.hash_key.as_deref().unwrap_or("source-ip") {
            "source-ip" => KeySource::SourceIp,
            "source-ip-port" => KeySource::SourceIpPort,
            "sni" => KeySource::Sni,
            "url" => KeySource::Url,
            "host" => KeySource::Host,
            "all-cookies" => KeySource::AllCookies,
            "super-http" => KeySource::SuperHttp {
                with_source_ip: false,
            },
            other => match other.split_once(':') {
                Some(("header", h)) if !h.is_empty() => KeySource::Header(h.to_ascii_lowercase()),
                Some(("query", q)) if !q.is_empty() => KeySource::QueryItem(q.to_string()),
                _ => {
                    return Err(ConfigError::new(
                        at("hash_key"),
                        format!(
                            "{other:?}: expected source-ip, source-ip-port, sni, url, host, all-cookies, super-http, header:NAME or query:NAME"
                        ),
                    ));
                }
            },
        };
        // Avi's consistent hash is the hash alone; Kemp's methods keep "the same value on
        // the same server for a time".
        Ok(PersistenceKind::KeyHash {
            key,
            sticky: false,
            fallback: None,
        })
    }
}
