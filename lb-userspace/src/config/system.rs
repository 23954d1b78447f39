//! Built-in ("system") persistence profiles, as Avi has them: one per persistence type whose
//! fields all have defaults, named `System-Persistence-<Type>`. They exist in every config
//! without being written in the file; a profile of the same name in the file replaces the
//! built-in one (that is how an edit through the admin API is kept). They can be used and
//! edited but not deleted. Types that need a setting of their own (`app-cookie`'s cookie,
//! `query-item`, `header`, `custom-header`, `script`) have none.

use serde_json::{Value, json};

/// (name, type) of every system profile; every other field takes its documented default.
pub const SYSTEM_PROFILES: &[(&str, &str)] = &[
    ("System-Persistence-Client-IP", "client-ip"),
    ("System-Persistence-Http-Cookie", "http-cookie"),
    ("System-Persistence-All-Cookies", "all-cookies"),
    ("System-Persistence-Super-Http", "super-http"),
    ("System-Persistence-Url-Hash", "url-hash"),
    ("System-Persistence-Host-Header", "host-header"),
    ("System-Persistence-Consistent-Hash", "consistent-hash"),
    ("System-Persistence-Sip-Header", "sip-header"),
    ("System-Persistence-Ssl-Session-Id", "ssl-session-id"),
    ("System-Persistence-TLS", "tls-ticket"),
];

/// Whether `name` is a system profile's.
pub fn is_system_profile(name: &str) -> bool {
    SYSTEM_PROFILES.iter().any(|(n, _)| *n == name)
}

/// The built-in definition of the system profile `name`, in the config file's shape.
pub fn system_profile(name: &str) -> Option<Value> {
    SYSTEM_PROFILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, t)| json!({"name": n, "type": t}))
}

/// The system profiles `profiles` (the file's `persistence_profiles`) does not define, in
/// the file's shape; they go after the file's own, so the file's indexes in error paths stay.
pub fn missing_system_profiles(defined: &[&str]) -> Vec<Value> {
    SYSTEM_PROFILES
        .iter()
        .filter(|(n, _)| !defined.contains(n))
        .filter_map(|(n, _)| system_profile(n))
        .collect()
}
