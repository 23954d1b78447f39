//! `mirroring`: the stored persistence tables shared between instances through Redis
//! (`crate::mirror`). Off when absent: one instance needs nothing.

use serde::Deserialize;

use super::{ConfigError, names::check_name};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMirroring {
    /// `redis://[user:password@]host[:port][/db]` or `redis+unix:///path`.
    pub redis: String,
    /// This instance's name, unique among the instances sharing the Redis.
    pub instance: String,
    /// How long an L7 local miss may wait for Redis' binding (0: never ask).
    #[serde(default)]
    pub lookup_timeout_ms: Option<u64>,
}

/// Default of `mirroring.lookup_timeout_ms`: far above a Redis round trip on a LAN (well
/// under a millisecond), so a loaded Redis still answers, yet small next to the new
/// client's own connection setup; only a local miss pays it, once per new key.
pub const DEFAULT_LOOKUP_TIMEOUT_MS: u64 = 50;
/// Most a request may be held for Redis.
pub const MAX_LOOKUP_TIMEOUT_MS: u64 = 1000;

/// Validated `mirroring`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirroring {
    pub redis: String,
    pub instance: String,
    /// How long an L7 local miss waits for Redis' binding; zero: it does not ask.
    pub lookup_timeout: std::time::Duration,
}

pub(super) fn validate(raw: Option<&RawMirroring>) -> Result<Option<Mirroring>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    check_name("mirroring.instance", &raw.instance)?;
    let url = raw.redis.trim();
    if url.starts_with("rediss://") {
        return Err(ConfigError::new(
            "mirroring.redis",
            "rediss:// (TLS) is not supported by this build: use redis:// on a trusted network or a local TLS tunnel",
        ));
    }
    if !(url.starts_with("redis://") || url.starts_with("redis+unix://")) {
        return Err(ConfigError::new(
            "mirroring.redis",
            format!("{url:?}: must start with redis:// or redis+unix://"),
        ));
    }
    redis::Client::open(url).map_err(|e| {
        ConfigError::new(
            "mirroring.redis",
            format!("{url:?} is not a Redis URL: {e}"),
        )
    })?;
    let lookup_ms = raw.lookup_timeout_ms.unwrap_or(DEFAULT_LOOKUP_TIMEOUT_MS);
    if lookup_ms > MAX_LOOKUP_TIMEOUT_MS {
        return Err(ConfigError::new(
            "mirroring.lookup_timeout_ms",
            format!(
                "{lookup_ms}: must be at most {MAX_LOOKUP_TIMEOUT_MS} (a request waits that long for Redis); 0 turns lookups off"
            ),
        ));
    }
    Ok(Some(Mirroring {
        redis: url.to_string(),
        instance: raw.instance.clone(),
        lookup_timeout: std::time::Duration::from_millis(lookup_ms),
    }))
}
