use super::*;

fn ring(id: u8, byte: u8) -> CookieKeys {
    CookieKeys::new(&[(id, [byte; 32])]).expect("ring")
}

const NOW: u64 = 1_800_000_000;

fn payload() -> CookiePayload {
    CookiePayload::issue(0xdead_beef, 7, NOW, Some(600))
}

#[test]
fn a_ticket_opens_with_the_same_ring_only_for_its_service() {
    let keys = ring(3, 1);
    let t = seal_ticket(&keys, "tls", &payload(), b"rustls state").expect("sealed");
    assert_eq!(t[0], TICKET_VERSION);
    assert_eq!(t[1], 3, "key id in clear");
    // Another process (a restart, another instance) with the same ring opens it.
    let same = ring(3, 1);
    let (p, state) = open_ticket(&same, "tls", &t, NOW + 10).expect("opens");
    assert_eq!((p, state.as_slice()), (payload(), &b"rustls state"[..]));
    assert_eq!(open_ticket(&same, "other", &t, NOW), Err(Reject::Tampered));
    assert_eq!(
        open_ticket(&ring(4, 1), "tls", &t, NOW),
        Err(Reject::UnknownKey)
    );
    assert_eq!(
        open_ticket(&ring(3, 2), "tls", &t, NOW),
        Err(Reject::Tampered)
    );
    assert_eq!(
        open_ticket(&same, "tls", &t, NOW + 600),
        Err(Reject::Expired)
    );
    // Two tickets of the same state differ (random nonce) and reveal nothing of the payload.
    let u = seal_ticket(&keys, "tls", &payload(), b"rustls state").expect("sealed");
    assert_ne!(t, u);
    assert!(!t.windows(4).any(|w| w == 0xdead_beef_u32.to_le_bytes()));
}

#[test]
fn rotated_rings_open_old_tickets_and_tampering_is_caught() {
    let old = ring(1, 9);
    let t = seal_ticket(&old, "tls", &payload(), &[5; 100]).expect("sealed");
    let rotated = CookieKeys::new(&[(2, [8; 32]), (1, [9; 32])]).expect("ring");
    assert!(
        open_ticket(&rotated, "tls", &t, NOW).is_ok(),
        "old key still opens"
    );
    assert_eq!(
        seal_ticket(&rotated, "tls", &payload(), &[])
            .expect("sealed")
            .get(1),
        Some(&2),
        "the newest key seals"
    );
    for i in 0..t.len() {
        let mut bad = t.clone();
        bad[i] ^= 0x40;
        assert!(open_ticket(&rotated, "tls", &bad, NOW).is_err(), "byte {i}");
    }
    for n in 0..t.len() {
        assert!(
            open_ticket(&rotated, "tls", &t[..n], NOW).is_err(),
            "prefix {n}"
        );
    }
    assert_eq!(
        seal_ticket(&old, "tls", &payload(), &vec![0; MAX_TICKET_LEN]),
        None,
        "too long to be a ticket"
    );
}
