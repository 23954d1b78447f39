//! How bindings look in Redis.
//!
//! - key: `tether:b:<service>:<table id>:<32 hex digits>`: the table key (a masked client
//!   address, IPv4-mapped, or a key digest) as a u128. Service names cannot hold `:`, table
//!   ids can (`app-cookie:JSESSIONID`), the key part cannot: the key splits unambiguously.
//!   The XDP source-IP table is `tether:b:<service>:xdp:<key>`.
//! - value: `<backend identity>:<instance>`, the instance that won the binding.
//! - channel `tether:bindings`: `<key>\n<value>` for every binding written.

/// Prefix of every binding key.
pub const PREFIX: &str = "tether:b:";
/// Where every binding written is announced.
pub const CHANNEL: &str = "tether:bindings";
/// The table id of the XDP source-IP persistence table.
pub const XDP_TABLE: &str = "xdp";

/// The Redis key of one binding.
pub fn key(service: &str, table: &str, k: u128) -> String {
    format!("{PREFIX}{service}:{table}:{k:032x}")
}

/// (service, table id, table key) of a Redis key written by [`key`].
pub fn parse_key(s: &str) -> Option<(&str, &str, u128)> {
    let rest = s.strip_prefix(PREFIX)?;
    let (service, rest) = rest.split_once(':')?;
    let (table, hex) = rest.rsplit_once(':')?;
    if service.is_empty() || table.is_empty() || hex.len() != 32 {
        return None;
    }
    Some((service, table, u128::from_str_radix(hex, 16).ok()?))
}

/// The value of a binding to `backend` won by `instance`.
pub fn value(backend: u32, instance: &str) -> String {
    format!("{backend}:{instance}")
}

/// (backend identity, instance) of a value written by [`value`].
pub fn parse_value(s: &str) -> Option<(u32, &str)> {
    let (b, inst) = s.split_once(':')?;
    Some((b.parse().ok()?, inst))
}

/// (key, value) of a channel message.
pub fn parse_message(s: &str) -> Option<(&str, &str)> {
    s.split_once('\n')
}

/// The one write every instance makes, atomically per key (a Lua script runs alone):
/// KEYS are binding keys; ARGV\[1\] the channel, then per key its value, TTL in ms and the
/// backend it replaces locally (`""` for a new binding or a refresh).
/// - no binding in Redis: ours is written (with the TTL) and announced;
/// - Redis holds the backend we replace, and we re-bound the key elsewhere (the old backend
///   went down or left): ours replaces it (compare-and-swap) and is announced;
/// - Redis holds our backend: its TTL is refreshed (the value, and the instance that won
///   it, stay);
/// - Redis holds another backend: nothing is written; the caller adopts Redis' value.
///
/// Returns, per key, the value Redis holds afterwards: the first writer wins, and every
/// instance ends with Redis' value.
pub const BIND_SCRIPT: &str = r#"
local out = {}
for i, k in ipairs(KEYS) do
  local base = 1 + (i - 1) * 3
  local val, ttl, prev = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local mine = string.match(val, '^(%d+):')
  local cur = redis.call('GET', k)
  local theirs = cur and string.match(cur, '^(%d+):')
  if (not cur) or (prev ~= '' and theirs == prev and theirs ~= mine) then
    redis.call('SET', k, val, 'PX', ttl)
    redis.call('PUBLISH', ARGV[1], k .. '\n' .. val)
    out[i] = val
  else
    if theirs == mine then
      redis.call('PEXPIRE', k, ttl)
    end
    out[i] = cur
  end
end
return out
"#;
