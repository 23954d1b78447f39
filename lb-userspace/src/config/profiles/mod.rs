//! Persistence profiles: a serde enum tagged by `type`, one variant per method, whose fields
//! are the method's own (`deny_unknown_fields`: a field of another method is refused by serde
//! itself). Each method's fields and their validation live in a file of their own here; its
//! behaviour lives in `engine::methods`.

/// A profile type's fields: `name`, `select_new_server_when_down`, `table_capacity` and
/// `max_new_keys_per_source_per_min`, which every type has,
/// then its own, each optional (`#[serde(default)]`). Unknown fields are refused.
macro_rules! profile_fields {
    ($(#[$doc:meta])* pub struct $name:ident {
        $($(#[$fm:meta])* $field:ident: $ty:ty),* $(,)?
    }) => {
        $(#[$doc])*
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            name: String,
            #[serde(default)]
            select_new_server_when_down: Option<crate::config::DownPolicy>,
            #[serde(default)]
            table_capacity: Option<u64>,
            #[serde(default)]
            max_new_keys_per_source_per_min: Option<u32>,
            $($(#[$fm])* #[serde(default)] $field: Option<$ty>,)*
        }

        impl $name {
            /// `table_capacity` and `max_new_keys_per_source_per_min`, as given.
            pub fn limits(&self) -> (Option<u64>, Option<u32>) {
                (self.table_capacity, self.max_new_keys_per_source_per_min)
            }
        }
    };
}

mod app_cookie;
mod client_ip;
mod custom_header;
mod http_cookie;
mod key_hash;
mod script;
mod sip_header;
mod ssl_session_id;
mod tls_ticket;

use std::collections::HashMap;

use serde::{Deserialize, de::DeserializeOwned};

use super::{
    ClientIpFallback, ConfigError, DownPolicy, KeySource, MAX_TIMEOUT_S, PersistenceKind,
    PersistenceProfile, names::check_name,
};

/// One entry of `persistence_profiles`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RawProfile {
    ClientIp(client_ip::Raw),
    HttpCookie(http_cookie::Raw),
    AppCookie(app_cookie::Raw),
    AllCookies(key_hash::Sticky),
    SuperHttp(key_hash::SuperHttp),
    UrlHash(key_hash::Sticky),
    HostHeader(key_hash::Sticky),
    QueryItem(key_hash::Item),
    Header(key_hash::Item),
    ConsistentHash(key_hash::Consistent),
    CustomHeader(custom_header::Raw),
    SipHeader(sip_header::Raw),
    Script(script::Raw),
    SslSessionId(ssl_session_id::Raw),
    TlsTicket(tls_ticket::Raw),
}

/// Fields every profile has, with their defaults applied later.
pub struct Common<'a> {
    pub name: &'a str,
    pub timeout_s: Option<u32>,
    pub ipv4_prefix: Option<u8>,
    pub ipv6_prefix: Option<u8>,
    pub down_policy: Option<DownPolicy>,
}

impl<'a> Common<'a> {
    /// The common fields of a profile whose method keeps no address prefixes.
    pub fn unprefixed(
        name: &'a str,
        timeout_s: Option<u32>,
        down_policy: Option<DownPolicy>,
    ) -> Common<'a> {
        Common {
            name,
            timeout_s,
            ipv4_prefix: None,
            ipv6_prefix: None,
            down_policy,
        }
    }
}

/// Default entries per table, and the bounds of `table_capacity`.
pub const DEFAULT_TABLE_CAPACITY: u64 = 1 << 20;
pub const MAX_TABLE_CAPACITY: u64 = 64 << 20;
/// Default new keys per client source per minute.
pub const DEFAULT_NEW_KEYS_PER_SOURCE_PER_MIN: u32 = 1000;

/// The field path of a field of the profile being validated.
type At<'a> = &'a dyn Fn(&str) -> String;

impl RawProfile {
    /// The profile's `name`.
    pub fn name(&self) -> &str {
        self.common().name
    }

    fn common(&self) -> Common<'_> {
        match self {
            RawProfile::ClientIp(p) => p.common(),
            RawProfile::HttpCookie(p) => p.common(),
            RawProfile::AppCookie(p) => p.common(),
            RawProfile::AllCookies(p) | RawProfile::UrlHash(p) | RawProfile::HostHeader(p) => {
                p.common()
            }
            RawProfile::SuperHttp(p) => p.common(),
            RawProfile::QueryItem(p) | RawProfile::Header(p) => p.common(),
            RawProfile::ConsistentHash(p) => p.common(),
            RawProfile::CustomHeader(p) => p.common(),
            RawProfile::SipHeader(p) => p.common(),
            RawProfile::Script(p) => p.common(),
            RawProfile::SslSessionId(p) => p.common(),
            RawProfile::TlsTicket(p) => p.common(),
        }
    }

    /// `table_capacity` and `max_new_keys_per_source_per_min`, as given.
    fn limits(&self) -> (Option<u64>, Option<u32>) {
        match self {
            RawProfile::ClientIp(p) => p.limits(),
            RawProfile::HttpCookie(p) => p.limits(),
            RawProfile::AppCookie(p) => p.limits(),
            RawProfile::AllCookies(p) | RawProfile::UrlHash(p) | RawProfile::HostHeader(p) => {
                p.limits()
            }
            RawProfile::SuperHttp(p) => p.limits(),
            RawProfile::QueryItem(p) | RawProfile::Header(p) => p.limits(),
            RawProfile::ConsistentHash(p) => p.limits(),
            RawProfile::CustomHeader(p) => p.limits(),
            RawProfile::SipHeader(p) => p.limits(),
            RawProfile::Script(p) => p.limits(),
            RawProfile::SslSessionId(p) => p.limits(),
            RawProfile::TlsTicket(p) => p.limits(),
        }
    }

    /// The validated method.
    fn kind(&self, at: At<'_>) -> Result<PersistenceKind, ConfigError> {
        match self {
            RawProfile::ClientIp(p) => p.kind(at),
            RawProfile::HttpCookie(p) => p.kind(at),
            RawProfile::AppCookie(p) => p.kind(at),
            RawProfile::AllCookies(p) => p.kind(at, KeySource::AllCookies),
            RawProfile::SuperHttp(p) => p.kind(at),
            RawProfile::UrlHash(p) => p.kind(at, KeySource::Url),
            RawProfile::HostHeader(p) => p.kind(at, KeySource::Host),
            RawProfile::QueryItem(p) => p.query(at),
            RawProfile::Header(p) => p.header(at),
            RawProfile::ConsistentHash(p) => p.kind(at),
            RawProfile::CustomHeader(p) => p.kind(at),
            RawProfile::SipHeader(p) => p.kind(at),
            RawProfile::Script(p) => p.kind(at),
            RawProfile::SslSessionId(p) => p.kind(at),
            RawProfile::TlsTicket(p) => p.kind(at),
        }
    }
}

/// Where serde's error inside profile `body` (of type `kind`) is, and why: serde buffers a
/// tagged enum before reading the variant, which loses the field path, so the variant is read
/// again on its own to find it. `None` when `kind` is no known type.
pub fn locate(kind: &str, body: serde_json::Value) -> Option<(String, String)> {
    fn read<T: DeserializeOwned>(body: serde_json::Value) -> Option<(String, String)> {
        let e = serde_path_to_error::deserialize::<_, T>(body).err()?;
        Some((e.path().to_string(), e.into_inner().to_string()))
    }
    match kind {
        "client-ip" => read::<client_ip::Raw>(body),
        "http-cookie" => read::<http_cookie::Raw>(body),
        "app-cookie" => read::<app_cookie::Raw>(body),
        "all-cookies" | "url-hash" | "host-header" => read::<key_hash::Sticky>(body),
        "super-http" => read::<key_hash::SuperHttp>(body),
        "query-item" | "header" => read::<key_hash::Item>(body),
        "consistent-hash" => read::<key_hash::Consistent>(body),
        "custom-header" => read::<custom_header::Raw>(body),
        "sip-header" => read::<sip_header::Raw>(body),
        "script" => read::<script::Raw>(body),
        "ssl-session-id" => read::<ssl_session_id::Raw>(body),
        "tls-ticket" => read::<tls_ticket::Raw>(body),
        _ => None,
    }
}

/// Validated profiles and their indexes by name.
pub fn validate(
    raw: &[RawProfile],
) -> Result<(Vec<PersistenceProfile>, HashMap<String, usize>), ConfigError> {
    let mut profiles = Vec::new();
    let mut index = HashMap::new();
    for (i, p) in raw.iter().enumerate() {
        let at = |f: &str| format!("persistence_profiles[{i}].{f}");
        let c = p.common();
        check_name(&at("name"), c.name)?;
        if index.insert(c.name.to_string(), i).is_some() {
            return Err(ConfigError::new(
                at("name"),
                format!("duplicate profile name {:?}", c.name),
            ));
        }
        let kind = p.kind(&at)?;
        let timeout_s = c.timeout_s.unwrap_or(300);
        if timeout_s > MAX_TIMEOUT_S {
            return Err(ConfigError::new(
                at("timeout_s"),
                format!("{timeout_s}: must be 0 (no persistence) to {MAX_TIMEOUT_S}"),
            ));
        }
        let (table_capacity, max_new_keys) = p.limits();
        let table_capacity = table_capacity.unwrap_or(DEFAULT_TABLE_CAPACITY);
        if !(1..=MAX_TABLE_CAPACITY).contains(&table_capacity) {
            return Err(ConfigError::new(
                at("table_capacity"),
                format!("{table_capacity}: must be 1 to {MAX_TABLE_CAPACITY} entries"),
            ));
        }
        let table_capacity = table_capacity as usize;
        profiles.push(PersistenceProfile {
            name: c.name.to_string(),
            kind,
            timeout_s,
            ipv4_prefix: prefix(&at("ipv4_prefix"), c.ipv4_prefix, 32)?,
            ipv6_prefix: prefix(&at("ipv6_prefix"), c.ipv6_prefix, 128)?,
            down_policy: c.down_policy.unwrap_or(DownPolicy::Immediate),
            table_capacity,
            max_new_keys_per_source_per_min: max_new_keys
                .unwrap_or(DEFAULT_NEW_KEYS_PER_SOURCE_PER_MIN),
        });
    }
    Ok((profiles, index))
}

/// A prefix length, `max` when not given.
fn prefix(path: &str, v: Option<u8>, max: u8) -> Result<u8, ConfigError> {
    let v = v.unwrap_or(max);
    if v > max {
        return Err(ConfigError::new(path, format!("{v}: must be 0 to {max}")));
    }
    Ok(v)
}

/// The only fallback type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FallbackType {
    ClientIp,
}

/// Kemp's "... or source IP": source-IP persistence when the request carries no key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    #[serde(rename = "type")]
    pub kind: FallbackType,
    #[serde(default)]
    pub timeout_s: Option<u32>,
    #[serde(default)]
    pub ipv4_prefix: Option<u8>,
    #[serde(default)]
    pub ipv6_prefix: Option<u8>,
}

fn fallback(at: At<'_>, f: Option<&RawFallback>) -> Result<Option<ClientIpFallback>, ConfigError> {
    let Some(f) = f else { return Ok(None) };
    let FallbackType::ClientIp = f.kind;
    let timeout_s = f.timeout_s.unwrap_or(300);
    if timeout_s == 0 || timeout_s > MAX_TIMEOUT_S {
        return Err(ConfigError::new(
            at("fallback.timeout_s"),
            format!("{timeout_s}: must be 1 to {MAX_TIMEOUT_S}"),
        ));
    }
    Ok(Some(ClientIpFallback {
        timeout_s,
        ipv4_prefix: prefix(&at("fallback.ipv4_prefix"), f.ipv4_prefix, 32)?,
        ipv6_prefix: prefix(&at("fallback.ipv6_prefix"), f.ipv6_prefix, 128)?,
    }))
}

/// A cookie name: the configured one, else (when not `required`) one derived from the
/// profile name.
fn cookie_name(
    at: At<'_>,
    profile: &str,
    name: Option<&str>,
    required: bool,
) -> Result<String, ConfigError> {
    match name {
        None | Some("") if !required => Ok(derived_cookie_name(profile)),
        None | Some("") => Err(ConfigError::new(
            at("cookie_name"),
            "required: the name of the server's cookie, e.g. JSESSIONID",
        )),
        Some(n) if crate::cookie::valid_cookie_name(n) => Ok(n.to_string()),
        Some(n) => Err(ConfigError::new(
            at("cookie_name"),
            format!("{n:?} is not a valid cookie name (an HTTP token)"),
        )),
    }
}

/// Avi gives a blank cookie name a random 8-character one; tether derives it from the profile
/// name instead, so it survives restarts and every instance uses the same one.
fn derived_cookie_name(profile: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut h = lb_common::hash::hash_bytes(profile.as_bytes(), 0x636b_6e6d) as u64;
    (0..8)
        .map(|i| {
            if i == 4 {
                h = lb_common::hash::hash_bytes(profile.as_bytes(), h as u32) as u64;
            }
            let c = ALPHABET[(h % ALPHABET.len() as u64) as usize] as char;
            h /= ALPHABET.len() as u64;
            c
        })
        .collect()
}
