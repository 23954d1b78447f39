//! Persistence cookies for the L7 proxy ("active cookie" / "HTTP cookie" persistence): when a
//! request carries no valid persistence cookie, the proxy picks a backend and adds a
//! `Set-Cookie` naming that backend; later requests carrying the cookie go to the same
//! backend. The client holds the state, so instances need no shared table: any instance with
//! the same [`CookieKeys`] makes the same decision.
//!
//! The cookie names the backend by its stable id ([`lb_common::backend_identity`]), never by
//! its address, and that id is encrypted and authenticated (AES-256-GCM): clients can neither
//! read which server they are on nor steer themselves to another one.
//!
//! # Wire format (version 1)
//!
//! The value is the URL-safe base64 without padding (RFC 4648 section 5, 78 characters) of 58
//! bytes:
//!
//! | bytes | field |
//! |------:|-------|
//! | 1 | version, `1` |
//! | 1 | key id: which key of the ring sealed it |
//! | 4 | service tag: [`service_tag`] of the virtual service name, little-endian |
//! | 12 | nonce, random per cookie |
//! | 24 + 16 | AES-256-GCM ciphertext of the payload, then the tag |
//!
//! The payload is `backend u32 | pool u32 | issued_at u64 | expires_at u64`, little-endian.
//! The associated data is `version | key id | service tag | len(cookie name) as u32 LE |
//! cookie name | virtual service name`: a cookie only decodes under the name and for the
//! service it was issued for, and no header byte can change without failing authentication.
//! The clear service tag only lets [`decode`] tell a cookie of another service
//! ([`Reject::ForeignService`]) from a forged one ([`Reject::Tampered`]).
//!
//! # Use
//!
//! Per request: [`find`] the cookie in the `Cookie` headers and [`decode`] it; on `Ok`, use
//! the backend if it is still eligible, on `Err` count [`Reject::as_str`] and balance as
//! usual, then [`encode`] a [`CookiePayload`] for the chosen backend and send
//! [`SetCookie::render`]. Forward [`strip`]ped `Cookie` headers so backends never see it.
//!
//! Nonces are random: with 96-bit nonces, keep each key below about 2^32 cookies issued (the
//! AES-GCM bound for random nonces) by rotating keys, which also limits the damage of a
//! leaked key.

use std::fmt;

use lb_common::hash::hash_bytes;
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey},
    rand::{SecureRandom as _, SystemRandom},
};

mod b64;
mod header;
pub mod keyfile;
#[cfg(test)]
mod tests;
mod ticket;

pub use ticket::{MAX_TICKET_LEN, TICKET_VERSION, open_ticket, seal_ticket};

pub use header::{
    Cookies, SameSite, SetCookie, SetCookieError, cookies, find, find_all, private_cache_control,
    strip, valid_cookie_name,
};

/// Version byte of the only wire format.
pub const COOKIE_VERSION: u8 = 1;
/// Length of a secret key in bytes.
pub const KEY_LEN: usize = 32;
/// Longer values are [`Reject::Malformed`] without being decoded.
pub const MAX_COOKIE_VALUE_LEN: usize = 256;

const NONCE_LEN: usize = 12;
/// version, key id, service tag: the part of the header that is not the nonce.
const PREFIX_LEN: usize = 1 + 1 + 4;
const HEADER_LEN: usize = PREFIX_LEN + NONCE_LEN;
const PAYLOAD_LEN: usize = 4 + 4 + 8 + 8;
const TAG_LEN: usize = 16;
/// Decoded length of a version 1 cookie.
pub const COOKIE_RAW_LEN: usize = HEADER_LEN + PAYLOAD_LEN + TAG_LEN;
/// Length of a version 1 cookie value as it appears in the header.
pub const COOKIE_VALUE_LEN: usize = b64::encoded_len(COOKIE_RAW_LEN);

const SERVICE_TAG_SEED: u32 = 0x636f_6f6b; // "cook"
const POOL_ID_SEED: u32 = 0x706f_6f6c; // "pool"

/// Tag of a virtual service name in the clear part of a cookie.
pub fn service_tag(service: &str) -> u32 {
    hash_bytes(service.as_bytes(), SERVICE_TAG_SEED)
}

/// A stable id for a pool name, for [`CookiePayload::pool`].
pub fn pool_id(pool: &str) -> u32 {
    hash_bytes(pool.as_bytes(), POOL_ID_SEED)
}

/// Invalid cookie key configuration. Never includes secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no cookie keys given")]
    Empty,
    #[error("cookie key id {0} is given twice")]
    DuplicateId(u8),
    #[error("cookie key {id}: the secret is neither 64 hex characters nor base64")]
    Encoding { id: u8 },
    #[error(
        "cookie key {id}: the secret is {len} bytes, need {KEY_LEN} \
         (64 hex characters, or 43 base64 characters without padding)"
    )]
    Length { id: u8, len: usize },
    #[error("cookie key file {}: {reason}", path.display())]
    Stored {
        path: std::path::PathBuf,
        reason: String,
    },
}

#[derive(Clone)]
struct Key {
    id: u8,
    aead: LessSafeKey,
}

/// The cookie key ring: the first (newest) key seals new cookies, every key opens them, so a
/// new key can be put in front while cookies sealed with the previous ones stay valid until
/// that key is dropped.
///
/// Every instance serving a virtual service must hold the same ring (same ids, same secrets,
/// same order) to agree on cookies; nothing else is shared.
#[derive(Clone)]
pub struct CookieKeys {
    /// Newest first; never empty; ids unique.
    keys: Vec<Key>,
}

impl fmt::Debug for CookieKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CookieKeys")
            .field("ids", &self.keys.iter().map(|k| k.id).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl CookieKeys {
    /// A ring from `(key id, secret)` pairs, newest first.
    pub fn new(keys: &[(u8, [u8; KEY_LEN])]) -> Result<Self, KeyError> {
        Self::build(keys.iter().map(|&key| Ok(key)))
    }

    /// A ring from configured `(key id, secret)` pairs, newest first. A secret is 64 hex
    /// characters or base64 of 32 bytes (standard or URL-safe alphabet, padding optional);
    /// surrounding whitespace is ignored.
    pub fn from_config<S: AsRef<str>>(keys: &[(u8, S)]) -> Result<Self, KeyError> {
        Self::build(
            keys.iter()
                .map(|(id, secret)| Ok((*id, parse_secret(*id, secret.as_ref())?))),
        )
    }

    /// A ring of one random key with a random id, for tests and for a daemon with no
    /// configured keys. Cookies sealed with it do not survive a restart (clients holding one
    /// are then balanced afresh, counted as [`Reject::UnknownKey`] or, one time in 256,
    /// [`Reject::Tampered`]), and two instances never agree: configure keys for anything
    /// behind more than one instance.
    pub fn generate() -> Self {
        let mut secret = [0u8; KEY_LEN + 1];
        fill_random(&mut secret);
        let id = secret[KEY_LEN];
        let secret: [u8; KEY_LEN] = secret[..KEY_LEN].try_into().expect("length KEY_LEN");
        Self::build([Ok((id, secret))].into_iter()).expect("one key is a valid ring")
    }

    fn build(
        keys: impl Iterator<Item = Result<(u8, [u8; KEY_LEN]), KeyError>>,
    ) -> Result<Self, KeyError> {
        let mut ring: Vec<Key> = Vec::new();
        for key in keys {
            let (id, secret) = key?;
            if ring.iter().any(|k| k.id == id) {
                return Err(KeyError::DuplicateId(id));
            }
            let unbound = UnboundKey::new(&AES_256_GCM, &secret).expect("AES-256 key is 32 bytes");
            ring.push(Key {
                id,
                aead: LessSafeKey::new(unbound),
            });
        }
        if ring.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Self { keys: ring })
    }

    /// Id of the key new cookies are sealed with.
    pub fn current_id(&self) -> u8 {
        self.keys[0].id
    }

    /// Ids of the ring, newest first.
    pub fn ids(&self) -> impl Iterator<Item = u8> + '_ {
        self.keys.iter().map(|k| k.id)
    }

    fn get(&self, id: u8) -> Option<&LessSafeKey> {
        self.keys.iter().find(|k| k.id == id).map(|k| &k.aead)
    }
}

fn parse_secret(id: u8, secret: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let secret = secret.trim().as_bytes();
    // An even number of hex digits is hex (base64 of 32 bytes is 43 characters, or 44 with
    // '='), so a hex secret of the wrong length is reported as such.
    if secret.len().is_multiple_of(2)
        && !secret.is_empty()
        && secret.iter().all(u8::is_ascii_hexdigit)
    {
        return b64::decode_hex::<KEY_LEN>(secret).ok_or(KeyError::Length {
            id,
            len: secret.len() / 2,
        });
    }
    let mut buf = [0u8; 3 * KEY_LEN];
    let len = b64::decode(secret, &mut buf, b64::Mode::Lenient).ok_or(KeyError::Encoding { id })?;
    buf[..len]
        .try_into()
        .map_err(|_| KeyError::Length { id, len })
}

/// What a persistence cookie says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CookiePayload {
    /// [`lb_common::backend_identity`] of the chosen backend.
    pub backend: u32,
    /// Stable id of the backend's pool, e.g. [`pool_id`] of its name.
    pub pool: u32,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; 0: no expiry (session cookie).
    pub expires_at: u64,
}

impl CookiePayload {
    /// A payload issued at `now_unix`, valid for `lifetime` seconds (`None`: no expiry).
    pub fn issue(backend: u32, pool: u32, now_unix: u64, lifetime: Option<u64>) -> Self {
        Self {
            backend,
            pool,
            issued_at: now_unix,
            expires_at: lifetime.map_or(0, |l| now_unix.saturating_add(l).max(1)),
        }
    }

    fn to_bytes(self) -> [u8; PAYLOAD_LEN] {
        let mut b = [0u8; PAYLOAD_LEN];
        b[0..4].copy_from_slice(&self.backend.to_le_bytes());
        b[4..8].copy_from_slice(&self.pool.to_le_bytes());
        b[8..16].copy_from_slice(&self.issued_at.to_le_bytes());
        b[16..24].copy_from_slice(&self.expires_at.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; PAYLOAD_LEN]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Self {
            backend: u32_at(0),
            pool: u32_at(4),
            issued_at: u64_at(8),
            expires_at: u64_at(16),
        }
    }
}

/// Why a cookie value was not accepted. The request is then balanced as if it had no
/// cookie; count these per reason ([`Reject::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Reject {
    /// Too long, not unpadded URL-safe base64, wrong length or unknown version.
    #[error("malformed persistence cookie")]
    Malformed,
    /// Sealed with a key id the ring does not hold (rotated out, or another ring).
    #[error("persistence cookie sealed with an unknown key")]
    UnknownKey,
    /// Issued for another virtual service.
    #[error("persistence cookie of another service")]
    ForeignService,
    /// Authentication failed: altered, forged, renamed, or sealed with another secret under
    /// the same key id.
    #[error("persistence cookie failed authentication")]
    Tampered,
    /// Past its `expires_at`.
    #[error("persistence cookie expired")]
    Expired,
}

impl Reject {
    /// Every reason, for registering metric label values up front.
    pub const ALL: [Reject; 5] = [
        Reject::Malformed,
        Reject::UnknownKey,
        Reject::ForeignService,
        Reject::Tampered,
        Reject::Expired,
    ];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::UnknownKey => "unknown_key",
            Reject::ForeignService => "foreign_service",
            Reject::Tampered => "tampered",
            Reject::Expired => "expired",
        }
    }
}

/// Seals `payload` into a cookie value for cookie `cookie_name` of virtual service
/// `service`, with the newest key of `keys`. The value is [`COOKIE_VALUE_LEN`] characters
/// of the URL-safe base64 alphabet (valid RFC 6265 cookie octets, never quoted).
///
/// # Panics
///
/// If the operating system's random generator fails (`getrandom(2)` does not, once the
/// kernel's pool is initialised).
pub fn encode(
    keys: &CookieKeys,
    cookie_name: &str,
    service: &str,
    payload: &CookiePayload,
) -> String {
    let key = &keys.keys[0];
    let mut raw = [0u8; COOKIE_RAW_LEN];
    let (header, sealed) = raw.split_at_mut(HEADER_LEN);
    let (prefix, nonce) = header.split_at_mut(PREFIX_LEN);
    prefix[0] = COOKIE_VERSION;
    prefix[1] = key.id;
    prefix[2..].copy_from_slice(&service_tag(service).to_le_bytes());
    fill_nonce(nonce);
    let nonce = Nonce::try_assume_unique_for_key(nonce).expect("nonce is 12 bytes");
    let (body, tag_out) = sealed.split_at_mut(PAYLOAD_LEN);
    body.copy_from_slice(&payload.to_bytes());
    let tag = with_aad(prefix, cookie_name, service, |aad| {
        key.aead.seal_in_place_separate_tag(nonce, aad, body)
    })
    .expect("AES-GCM sealing of 24 bytes cannot fail");
    tag_out.copy_from_slice(tag.as_ref());

    let mut out = String::with_capacity(COOKIE_VALUE_LEN);
    b64::encode_url(&raw, &mut out);
    out
}

/// Opens cookie `value` of cookie `cookie_name` for virtual service `service` at time
/// `now_unix` (seconds). No allocation.
pub fn decode(
    keys: &CookieKeys,
    cookie_name: &str,
    service: &str,
    value: &str,
    now_unix: u64,
) -> Result<CookiePayload, Reject> {
    let value = value.as_bytes();
    if value.len() > MAX_COOKIE_VALUE_LEN {
        return Err(Reject::Malformed);
    }
    let mut buf = [0u8; b64::max_decoded_len(MAX_COOKIE_VALUE_LEN)];
    let len = b64::decode(value, &mut buf, b64::Mode::UrlStrict).ok_or(Reject::Malformed)?;
    let raw = &mut buf[..len];
    if raw.first() != Some(&COOKIE_VERSION) || raw.len() != COOKIE_RAW_LEN {
        return Err(Reject::Malformed);
    }
    let key = keys.get(raw[1]).ok_or(Reject::UnknownKey)?;
    if raw[2..PREFIX_LEN] != service_tag(service).to_le_bytes() {
        return Err(Reject::ForeignService);
    }
    let (header, sealed) = raw.split_at_mut(HEADER_LEN);
    let (prefix, nonce) = header.split_at(PREFIX_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).expect("nonce is 12 bytes");
    let plain = with_aad(prefix, cookie_name, service, |aad| {
        key.open_in_place(nonce, aad, sealed)
    })
    .map_err(|_| Reject::Tampered)?;
    let plain: &[u8; PAYLOAD_LEN] = (&*plain).try_into().map_err(|_| Reject::Malformed)?;
    let payload = CookiePayload::from_bytes(plain);
    if payload.expires_at != 0 && now_unix >= payload.expires_at {
        return Err(Reject::Expired);
    }
    Ok(payload)
}

/// Calls `f` with the associated data `prefix | len(name) u32 LE | name | service`, built on
/// the stack unless the names are unusually long.
fn with_aad<R>(prefix: &[u8], name: &str, service: &str, f: impl FnOnce(Aad<&[u8]>) -> R) -> R {
    const STACK: usize = 256;
    let len = prefix.len() + 4 + name.len() + service.len();
    let fill = |out: &mut [u8]| {
        let (p, rest) = out.split_at_mut(prefix.len());
        p.copy_from_slice(prefix);
        let (l, rest) = rest.split_at_mut(4);
        // Cookie names are far below 4 GiB; saturate rather than wrap regardless.
        l.copy_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_le_bytes());
        let (n, s) = rest.split_at_mut(name.len());
        n.copy_from_slice(name.as_bytes());
        s.copy_from_slice(service.as_bytes());
    };
    if len <= STACK {
        let mut buf = [0u8; STACK];
        fill(&mut buf[..len]);
        f(Aad::from(&buf[..len]))
    } else {
        let mut buf = vec![0u8; len];
        fill(&mut buf);
        f(Aad::from(&buf[..]))
    }
}

fn fill_random(out: &mut [u8]) {
    SystemRandom::new()
        .fill(out)
        .expect("the operating system's random generator failed");
}

/// OS randomness fetched this many bytes at a time for nonces (one `getrandom(2)` per 40
/// cookies instead of one per cookie, which was a tenth of the miss path's system time).
const NONCE_POOL: usize = NONCE_LEN * 40;

thread_local! {
    /// Unused OS random bytes of this thread and how many are left; each byte is handed out
    /// once. tether never forks without exec, so no two processes share a pool.
    static NONCE_BYTES: std::cell::RefCell<([u8; NONCE_POOL], usize)> =
        const { std::cell::RefCell::new(([0; NONCE_POOL], 0)) };
}

/// Fills `out` (at most [`NONCE_POOL`] bytes) with OS randomness from the thread's pool.
fn fill_nonce(out: &mut [u8]) {
    NONCE_BYTES.with_borrow_mut(|(pool, left)| {
        if *left < out.len() {
            fill_random(pool);
            *left = NONCE_POOL;
        }
        let start = NONCE_POOL - *left;
        out.copy_from_slice(&pool[start..start + out.len()]);
        *left -= out.len();
    });
}
