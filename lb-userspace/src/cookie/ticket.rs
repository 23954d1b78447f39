//! TLS session tickets that carry the backend (Avi "TLS persistence"), sealed with the same
//! key ring and AEAD as the persistence cookies: a client resuming its TLS session presents
//! the ticket, and any instance holding the ring reads the backend from it, with no table.
//!
//! # Wire format (version 1)
//!
//! | bytes | field |
//! |------:|-------|
//! | 1 | version, [`TICKET_VERSION`] |
//! | 1 | key id |
//! | 12 | nonce, random per ticket |
//! | 24 + n + 16 | AES-256-GCM of `backend u32 | pool u32 | issued_at u64 | expires_at u64`
//! (little-endian, a [`CookiePayload`]) followed by the TLS library's own session state
//! (`n` bytes), then the tag |
//!
//! The associated data is `"tether-ticket" | version | key id | virtual service name`: a
//! ticket opens only for the service it was issued by, and never as a cookie.

use ring::aead::{Aad, Nonce};

use super::{CookieKeys, CookiePayload, NONCE_LEN, PAYLOAD_LEN, Reject, TAG_LEN, fill_random};

/// Version byte of the ticket format (distinct from the cookie's).
pub const TICKET_VERSION: u8 = 0x81;
const HEADER_LEN: usize = 2 + NONCE_LEN;
/// Tickets longer than this are not opened (TLS caps them at 2^16 - 1).
pub const MAX_TICKET_LEN: usize = u16::MAX as usize;

fn aad(version: u8, key_id: u8, service: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(15 + service.len());
    a.extend_from_slice(b"tether-ticket");
    a.push(version);
    a.push(key_id);
    a.extend_from_slice(service.as_bytes());
    a
}

/// Seals `payload` and the TLS library's session `state` for `service` with the newest key.
/// `None` when the ticket would exceed [`MAX_TICKET_LEN`].
pub fn seal_ticket(
    keys: &CookieKeys,
    service: &str,
    payload: &CookiePayload,
    state: &[u8],
) -> Option<Vec<u8>> {
    let len = HEADER_LEN + PAYLOAD_LEN + state.len() + TAG_LEN;
    if len > MAX_TICKET_LEN {
        return None;
    }
    let key = &keys.keys[0];
    let mut out = Vec::with_capacity(len);
    out.push(TICKET_VERSION);
    out.push(key.id);
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce);
    out.extend_from_slice(&nonce);
    let mut body = Vec::with_capacity(PAYLOAD_LEN + state.len() + TAG_LEN);
    body.extend_from_slice(&payload.to_bytes());
    body.extend_from_slice(state);
    let nonce = Nonce::assume_unique_for_key(nonce);
    key.aead
        .seal_in_place_append_tag(
            nonce,
            Aad::from(aad(TICKET_VERSION, key.id, service)),
            &mut body,
        )
        .ok()?;
    out.extend_from_slice(&body);
    Some(out)
}

/// Opens a ticket of `service` at `now_unix`: what it says and the TLS session state.
pub fn open_ticket(
    keys: &CookieKeys,
    service: &str,
    ticket: &[u8],
    now_unix: u64,
) -> Result<(CookiePayload, Vec<u8>), Reject> {
    if ticket.len() < HEADER_LEN + PAYLOAD_LEN + TAG_LEN
        || ticket.len() > MAX_TICKET_LEN
        || ticket[0] != TICKET_VERSION
    {
        return Err(Reject::Malformed);
    }
    let key = keys.get(ticket[1]).ok_or(Reject::UnknownKey)?;
    let nonce: [u8; NONCE_LEN] = ticket[2..HEADER_LEN]
        .try_into()
        .map_err(|_| Reject::Malformed)?;
    let mut body = ticket[HEADER_LEN..].to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(ticket[0], ticket[1], service)),
            &mut body,
        )
        .map_err(|_| Reject::Tampered)?;
    let (head, state) = plain.split_at(PAYLOAD_LEN);
    let head: &[u8; PAYLOAD_LEN] = head.try_into().map_err(|_| Reject::Malformed)?;
    let payload = CookiePayload::from_bytes(head);
    if payload.expires_at != 0 && now_unix >= payload.expires_at {
        return Err(Reject::Expired);
    }
    Ok((payload, state.to_vec()))
}

#[cfg(test)]
#[path = "ticket_tests.rs"]
mod tests;
