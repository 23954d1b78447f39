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
}

/// Validated `mirroring`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirroring {
    pub redis: String,
    pub instance: String,
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
    Ok(Some(Mirroring {
        redis: url.to_string(),
        instance: raw.instance.clone(),
    }))
}
