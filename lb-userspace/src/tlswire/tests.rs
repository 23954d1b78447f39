use std::sync::Arc;

use proptest::prelude::*;
use rustls::{
    ClientConfig, ClientConnection, ServerConfig, ServerConnection,
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};

use super::*;

/// A handshake message in one record.
fn record(ct: u8, msg: &[u8]) -> Vec<u8> {
    let mut r = vec![ct, 3, 1];
    r.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    r.extend_from_slice(msg);
    r
}

fn handshake(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    m.extend_from_slice(body);
    m
}

fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
    let mut e = kind.to_be_bytes().to_vec();
    e.extend_from_slice(&(data.len() as u16).to_be_bytes());
    e.extend_from_slice(data);
    e
}

fn sni_ext(host: &str) -> Vec<u8> {
    let mut entry = vec![0u8];
    entry.extend_from_slice(&(host.len() as u16).to_be_bytes());
    entry.extend_from_slice(host.as_bytes());
    let mut list = (entry.len() as u16).to_be_bytes().to_vec();
    list.extend(entry);
    ext(EXT_SERVER_NAME, &list)
}

/// A ClientHello body by hand.
fn hello_body(session_id: &[u8], exts: &[Vec<u8>]) -> Vec<u8> {
    let mut b = vec![3, 3];
    b.extend_from_slice(&[7u8; 32]);
    b.push(session_id.len() as u8);
    b.extend_from_slice(session_id);
    b.extend_from_slice(&[0, 2, 0x13, 0x01]);
    b.extend_from_slice(&[1, 0]);
    let all: Vec<u8> = exts.concat();
    b.extend_from_slice(&(all.len() as u16).to_be_bytes());
    b.extend(all);
    b
}

/// A whole ClientHello record offering `session_id`, no extensions (other modules' tests).
pub(crate) fn client_hello_record(session_id: &[u8]) -> Vec<u8> {
    record(
        CT_HANDSHAKE,
        &handshake(HT_CLIENT_HELLO, &hello_body(session_id, &[])),
    )
}

#[test]
fn reads_sni_session_id_and_ticket() {
    let body = hello_body(
        &[9u8; 32],
        &[
            sni_ext("App.Example.com"),
            ext(EXT_SESSION_TICKET, b"ticket-bytes"),
            ext(0xff01, &[0]),
        ],
    );
    let wire = record(CT_HANDSHAKE, &handshake(HT_CLIENT_HELLO, &body));
    let h = client_hello(&wire).unwrap().expect("whole");
    assert_eq!(h.sni.as_deref(), Some("app.example.com"));
    assert_eq!(h.session_id, vec![9u8; 32]);
    assert_eq!(h.session_ticket.as_deref(), Some(&b"ticket-bytes"[..]));

    // An empty ticket extension ("I support tickets") is no ticket.
    let body = hello_body(&[], &[ext(EXT_SESSION_TICKET, &[])]);
    let h = client_hello(&record(CT_HANDSHAKE, &handshake(HT_CLIENT_HELLO, &body)))
        .unwrap()
        .unwrap();
    assert_eq!(h, ClientHello::default());
}

#[test]
fn a_hello_split_over_records_and_reads_is_reassembled() {
    let body = hello_body(&[1, 2, 3], &[sni_ext("a.test")]);
    let msg = handshake(HT_CLIENT_HELLO, &body);
    let (a, b) = msg.split_at(10);
    let wire = [record(CT_HANDSHAKE, a), record(CT_HANDSHAKE, b)].concat();
    // Byte by byte: incomplete until the last byte.
    let mut r = HelloReader::new(4096);
    for (i, byte) in wire.iter().enumerate() {
        let got = r.push(&[*byte]).unwrap();
        if i + 1 < wire.len() {
            assert_eq!(got, None, "complete early at byte {i}");
        } else {
            let h = got.expect("complete at the last byte");
            assert_eq!(h.sni.as_deref(), Some("a.test"));
            assert_eq!(h.session_id, vec![1, 2, 3]);
        }
    }
}

#[test]
fn every_prefix_is_incomplete_never_an_error() {
    let body = hello_body(&[5; 16], &[sni_ext("x.test")]);
    let wire = record(CT_HANDSHAKE, &handshake(HT_CLIENT_HELLO, &body));
    for n in 0..wire.len() {
        assert_eq!(
            HelloReader::new(4096).push(&wire[..n]),
            Ok(None),
            "prefix of {n} bytes"
        );
    }
}

#[test]
fn malformed_hellos_are_refused_with_a_reason() {
    let good = hello_body(&[1], &[sni_ext("x.test")]);
    let wrap = |body: &[u8]| record(CT_HANDSHAKE, &handshake(HT_CLIENT_HELLO, body));
    // HTTP instead of TLS.
    assert_eq!(
        client_hello(b"GET / HTTP/1.1\r\n\r\n"),
        Err(HelloError::NotTls)
    );
    // A session ID longer than 32.
    let mut long_id = good.clone();
    long_id[34] = 33;
    assert!(matches!(
        client_hello(&wrap(&long_id)),
        Err(HelloError::Malformed(_))
    ));
    // The extensions' length overruns the message.
    let mut overrun = good.clone();
    let at = 2 + 32 + 2 + 4 + 2;
    overrun[at] = 0xff;
    assert!(matches!(
        client_hello(&wrap(&overrun)),
        Err(HelloError::Malformed(_))
    ));
    // Trailing bytes after the extensions.
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(matches!(
        client_hello(&wrap(&trailing)),
        Err(HelloError::Malformed(_))
    ));
    // A ServerHello first.
    assert!(matches!(
        client_hello(&record(CT_HANDSHAKE, &handshake(HT_SERVER_HELLO, &good))),
        Err(HelloError::Malformed(_))
    ));
    // A zero-length record.
    assert!(matches!(
        client_hello(&[22, 3, 1, 0, 0]),
        Err(HelloError::Malformed(_))
    ));
    // The same extension twice.
    let twice = hello_body(&[], &[sni_ext("a.test"), sni_ext("b.test")]);
    assert!(matches!(
        client_hello(&wrap(&twice)),
        Err(HelloError::Malformed(_))
    ));
    // A host name with a NUL.
    let nul = hello_body(&[], &[sni_ext("a\0b")]);
    assert!(matches!(
        client_hello(&wrap(&nul)),
        Err(HelloError::Malformed(_))
    ));
    // Over the caller's limit: refused as soon as the length is known.
    let big = hello_body(&[], &[ext(0x7777, &[0u8; 3000])]);
    let wire = wrap(&big);
    assert_eq!(
        HelloReader::new(1024).push(&wire[..12]),
        Err(HelloError::TooLong(1024))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random bytes, and random bytes after a valid record header, never panic; the
    /// answer is the same whether the bytes come at once or in two reads.
    #[test]
    fn random_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600),
                                 split in 0usize..600,
                                 as_tls in any::<bool>()) {
        let mut data = data;
        if as_tls && data.len() >= 5 {
            data[0] = CT_HANDSHAKE;
            data[1] = 3;
            let n = (data.len() - 5) as u16;
            data[3..5].copy_from_slice(&n.to_be_bytes());
            if data.len() >= 9 {
                data[5] = HT_CLIENT_HELLO;
                let m = (data.len() - 9) as u32;
                data[6..9].copy_from_slice(&m.to_be_bytes()[1..]);
            }
        }
        let once = HelloReader::new(4096).push(&data);
        let split = split.min(data.len());
        let mut r = HelloReader::new(4096);
        let twice = match r.push(&data[..split]) {
            Ok(None) => r.push(&data[split..]),
            other => other,
        };
        prop_assert_eq!(once, twice);
        let mut scan = ServerScan::new(4096);
        scan.push(&data[..split]);
        scan.push(&data[split..]);
    }

    /// Any truncation of a valid hello is "more needed", never an error.
    #[test]
    fn truncated_valid_hellos_wait_for_more(id in proptest::collection::vec(any::<u8>(), 0..=32),
                                            host in "[a-z]{1,20}\\.test",
                                            cut in 0usize..200) {
        let body = hello_body(&id, &[sni_ext(&host)]);
        let wire = record(CT_HANDSHAKE, &handshake(HT_CLIENT_HELLO, &body));
        let cut = cut.min(wire.len());
        let r = HelloReader::new(4096).push(&wire[..cut]);
        if cut == wire.len() {
            let h = r.unwrap().unwrap();
            prop_assert_eq!(h.session_id, id);
            prop_assert_eq!(h.sni, Some(host));
        } else {
            prop_assert_eq!(r, Ok(None));
        }
    }
}

/// A self-signed server config and a client trusting it, with tickets when `tickets`.
pub(crate) fn configs(
    versions: &[&'static rustls::SupportedProtocolVersion],
    tickets: bool,
) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["backend.test".to_string()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    if tickets {
        server.ticketer = rustls::crypto::ring::Ticketer::new().unwrap();
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// A full handshake in memory; returns (client bytes, server bytes) as sent.
fn handshake_bytes(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> (Vec<u8>, Vec<u8>) {
    let (c, s, _) = run_handshake(server, client);
    (c, s)
}

/// A full handshake in memory; returns what each side sent and whether the server resumed.
pub(crate) fn run_handshake(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
) -> (Vec<u8>, Vec<u8>, rustls::HandshakeKind) {
    let mut c = ClientConnection::new(
        client.clone(),
        ServerName::try_from("backend.test").unwrap(),
    )
    .unwrap();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let (mut from_client, mut from_server) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        from_client.extend_from_slice(&buf);
        s.read_tls(&mut &buf[..]).unwrap();
        s.process_new_packets().unwrap();
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        from_server.extend_from_slice(&buf);
        c.read_tls(&mut &buf[..]).unwrap();
        c.process_new_packets().unwrap();
        if !c.is_handshaking() && !s.is_handshaking() && !s.wants_write() && !c.wants_write() {
            break;
        }
    }
    assert!(!c.is_handshaking(), "the in-memory handshake completed");
    let kind = s.handshake_kind().expect("handshake done");
    (from_client, from_server, kind)
}

#[test]
fn reads_real_rustls_handshakes_tls12_session_id_and_ticket_and_tls13() {
    // TLS 1.2 with a server session cache: the ServerHello assigns a session ID, and the
    // resuming ClientHello offers it again.
    let (server, client) = configs(&[&rustls::version::TLS12], false);
    let (hello, flight) = handshake_bytes(&server, &client);
    let h = client_hello(&hello).unwrap().unwrap();
    assert_eq!(h.sni.as_deref(), Some("backend.test"));
    let mut scan = ServerScan::new(1 << 16);
    let events = scan.push(&flight);
    assert!(
        scan.done() && !scan.malformed(),
        "stops at ChangeCipherSpec"
    );
    let ServerEvent::Hello(sh) = &events[0] else {
        panic!("first event is the ServerHello: {events:?}")
    };
    assert!(!sh.is_tls13());
    assert_eq!(sh.session_id.len(), 32, "a session ID is assigned");
    let (hello2, flight2) = handshake_bytes(&server, &client);
    let h2 = client_hello(&hello2).unwrap().unwrap();
    assert_eq!(
        h2.session_id, sh.session_id,
        "the client offers it to resume"
    );
    let mut scan2 = ServerScan::new(1 << 16);
    assert_eq!(
        scan2.push(&flight2)[0],
        ServerEvent::Hello(sh.clone()),
        "and the server echoes it"
    );

    // TLS 1.2 with tickets: the cleartext NewSessionTicket is read, the client offers it.
    let (server, client) = configs(&[&rustls::version::TLS12], true);
    let (_, flight) = handshake_bytes(&server, &client);
    let events = ServerScan::new(1 << 16).push(&flight);
    let ticket = events
        .iter()
        .find_map(|e| match e {
            ServerEvent::Ticket(t) => Some(t.clone()),
            ServerEvent::Hello(_) => None,
        })
        .expect("a NewSessionTicket");
    let (hello2, _) = handshake_bytes(&server, &client);
    assert_eq!(
        client_hello(&hello2).unwrap().unwrap().session_ticket,
        Some(ticket)
    );

    // TLS 1.3: supported_versions selects 0x0304, the scan stops there.
    let (server, client) = configs(&[&rustls::version::TLS13], false);
    let (_, flight) = handshake_bytes(&server, &client);
    let mut scan = ServerScan::new(1 << 16);
    let events = scan.push(&flight);
    assert!(scan.done() && !scan.malformed());
    assert!(
        matches!(&events[..], [ServerEvent::Hello(h)] if h.is_tls13()),
        "{events:?}"
    );
    // A resuming TLS 1.3 client offers its ticket as a pre_shared_key identity.
    let (server, client) = configs(&[&rustls::version::TLS13], true);
    let (first, _) = handshake_bytes(&server, &client);
    assert_eq!(client_hello(&first).unwrap().unwrap().session_ticket, None);
    let (again, _) = handshake_bytes(&server, &client);
    let offered = client_hello(&again).unwrap().unwrap().session_ticket;
    assert!(
        offered
            .as_ref()
            .is_some_and(|t| server.ticketer.decrypt(t).is_some()),
        "the PSK identity is the server's ticket: {offered:?}"
    );
}
