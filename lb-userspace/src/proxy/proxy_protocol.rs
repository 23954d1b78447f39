//! PROXY protocol v1 (text) and v2 (binary) on accept.
//!
//! The header is read in chunks; bytes after it (the start of the TLS handshake or of the
//! first request) are handed back to be replayed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// v2 signature.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1 prefix.
const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest v1 header, CRLF included.
const V1_MAX: usize = 107;
/// Fixed part of a v2 header.
const V2_FIXED: usize = 16;

/// What a header said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Addresses {
    /// `None`: the header carries no address (v1 `UNKNOWN`, v2 `LOCAL` or an unsupported
    /// family): the real connection's addresses stand.
    pub(super) addrs: Option<(SocketAddr, SocketAddr)>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum Error {
    #[error("connection closed before a complete PROXY header")]
    Eof,
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 header")]
    BadV1,
    #[error("malformed PROXY v2 header")]
    BadV2,
    #[error("read: {0}")]
    Io(String),
}

/// Reads one header; returns it with the bytes read past it.
pub(super) async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(Addresses, Bytes), Error> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        match parse(&buf)? {
            Some((addrs, used)) => {
                let rest = buf.split_off(used).freeze();
                return Ok((addrs, rest));
            }
            None => {
                let n = r
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| Error::Io(e.to_string()))?;
                if n == 0 {
                    return Err(Error::Eof);
                }
            }
        }
    }
}

/// Whether `buf` begins a PROXY header: `None` while too short to tell (v1 is known after 6
/// bytes, v2 after 12, anything else at its first differing byte).
pub(super) fn is_header_start(buf: &[u8]) -> Option<bool> {
    let v2 = buf[..buf.len().min(V2_SIG.len())] == V2_SIG[..buf.len().min(V2_SIG.len())];
    let v1 = buf[..buf.len().min(V1_PREFIX.len())] == V1_PREFIX[..buf.len().min(V1_PREFIX.len())];
    if buf.is_empty() {
        None
    } else if (v1 && buf.len() >= V1_PREFIX.len()) || (v2 && buf.len() >= V2_SIG.len()) {
        Some(true)
    } else if !v1 && !v2 {
        Some(false)
    } else {
        None
    }
}

/// Reads until the first bytes show whether they are a PROXY header; returns the verdict
/// and every byte read, to be replayed. The end of the stream counts as "no header".
pub(super) async fn sniff<R: AsyncRead + Unpin>(r: &mut R) -> Result<(bool, Bytes), Error> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        if let Some(v) = is_header_start(&buf) {
            return Ok((v, buf.freeze()));
        }
        let n = r
            .read_buf(&mut buf)
            .await
            .map_err(|e| Error::Io(e.to_string()))?;
        if n == 0 {
            return Ok((false, buf.freeze()));
        }
    }
}

/// `Ok(None)`: need more bytes. `Ok(Some((header, length)))`: a complete header.
pub(super) fn parse(buf: &[u8]) -> Result<Option<(Addresses, usize)>, Error> {
    let n = buf.len().min(V2_SIG.len());
    if buf[..n] == V2_SIG[..n] {
        if buf.len() < V2_FIXED {
            return Ok(None);
        }
        return parse_v2(buf);
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return parse_v1(buf);
    }
    Err(Error::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Addresses, usize)>, Error> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(Error::BadV1)
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| Error::BadV1)?;
    let mut fields = line.split(' ');
    if fields.next() != Some("PROXY") {
        return Err(Error::BadV1);
    }
    let addrs = match fields.next() {
        // "UNKNOWN" may be followed by anything, which is ignored.
        Some("UNKNOWN") => None,
        Some(proto @ ("TCP4" | "TCP6")) => {
            let mut next = || fields.next().ok_or(Error::BadV1);
            let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
            if fields.next().is_some() {
                return Err(Error::BadV1);
            }
            let ip = |s: &str| -> Result<IpAddr, Error> {
                if proto == "TCP4" {
                    s.parse::<Ipv4Addr>()
                        .map(IpAddr::V4)
                        .map_err(|_| Error::BadV1)
                } else {
                    s.parse::<Ipv6Addr>()
                        .map(IpAddr::V6)
                        .map_err(|_| Error::BadV1)
                }
            };
            let src = SocketAddr::new(ip(src)?, port(sport)?);
            let dst = SocketAddr::new(ip(dst)?, port(dport)?);
            Some((src, dst))
        }
        _ => return Err(Error::BadV1),
    };
    Ok(Some((Addresses { addrs }, end + 2)))
}

/// A decimal port: digits only, no sign, no leading zero.
fn port(s: &str) -> Result<u16, Error> {
    if s.is_empty()
        || s.len() > 5
        || !s.bytes().all(|b| b.is_ascii_digit())
        || (s.len() > 1 && s.starts_with('0'))
    {
        return Err(Error::BadV1);
    }
    s.parse().map_err(|_| Error::BadV1)
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Addresses, usize)>, Error> {
    let ver_cmd = buf[12];
    let fam = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(Error::BadV2);
    }
    let total = V2_FIXED + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[V2_FIXED..total];
    let addrs = match ver_cmd & 0x0f {
        // LOCAL: health checks and the like from the proxy itself.
        0x0 => None,
        // PROXY
        0x1 => match fam {
            // TCP or UDP over IPv4
            0x11 | 0x12 => {
                let a = body.get(..12).ok_or(Error::BadV2)?;
                let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
                let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                Some((
                    SocketAddr::new(ip(0), port(8)),
                    SocketAddr::new(ip(4), port(10)),
                ))
            }
            // TCP or UDP over IPv6
            0x21 | 0x22 => {
                let a = body.get(..36).ok_or(Error::BadV2)?;
                let ip = |o: usize| {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(&a[o..o + 16]);
                    IpAddr::V6(Ipv6Addr::from(b))
                };
                let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
                Some((
                    SocketAddr::new(ip(0), port(32)),
                    SocketAddr::new(ip(16), port(34)),
                ))
            }
            // UNSPEC, AF_UNIX: no usable address.
            0x00 | 0x31 | 0x32 => None,
            _ => return Err(Error::BadV2),
        },
        _ => return Err(Error::BadV2),
    };
    Ok(Some((Addresses { addrs }, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let h = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\nGET";
        let (a, n) = parse(h).unwrap().unwrap();
        assert_eq!(n, h.len() - 3);
        assert_eq!(
            a.addrs,
            Some((v4("203.0.113.7:56324"), v4("192.0.2.1:443")))
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n";
        let (a, _) = parse(h).unwrap().unwrap();
        assert_eq!(
            a.addrs,
            Some((v4("[2001:db8::1]:1"), v4("[2001:db8::2]:65535")))
        );
        let (a, n) = parse(b"PROXY UNKNOWN whatever\r\n").unwrap().unwrap();
        assert_eq!((a.addrs, n), (None, 24));
    }

    #[test]
    fn v1_incomplete_and_malformed() {
        assert_eq!(parse(b"PRO"), Ok(None));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(None));
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 120]].concat();
        assert_eq!(parse(&long), Err(Error::BadV1));
    }

    #[test]
    fn header_start_is_known_early() {
        assert_eq!(is_header_start(b""), None);
        assert_eq!(is_header_start(b"PROX"), None);
        assert_eq!(is_header_start(b"PROXY "), Some(true));
        assert_eq!(is_header_start(b"PROXY TCP4 1.2.3.4"), Some(true));
        assert_eq!(is_header_start(b"POST / HTTP/1.1"), Some(false));
        assert_eq!(is_header_start(b"PROXYZ"), Some(false));
        assert_eq!(is_header_start(b"\x16\x03\x01"), Some(false), "TLS");
        assert_eq!(is_header_start(b"\r\n\r\n\0"), None);
        assert_eq!(is_header_start(&V2_SIG[..]), Some(true));
        assert_eq!(is_header_start(b"\r\n\r\nGET"), Some(false));
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIG.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v2_families() {
        let body = [10, 0, 0, 1, 10, 0, 0, 2, 0x1f, 0x90, 0x01, 0xbb, 0xaa, 0xbb];
        let h = v2(1, 0x11, &body);
        let (a, n) = parse(&h).unwrap().unwrap();
        assert_eq!(n, h.len(), "TLVs after the addresses are skipped");
        assert_eq!(a.addrs, Some((v4("10.0.0.1:8080"), v4("10.0.0.2:443"))));
        let mut body6 = vec![0u8; 36];
        body6[15] = 1;
        body6[31] = 2;
        body6[32..34].copy_from_slice(&1234u16.to_be_bytes());
        body6[34..36].copy_from_slice(&80u16.to_be_bytes());
        let (a, _) = parse(&v2(1, 0x21, &body6)).unwrap().unwrap();
        assert_eq!(a.addrs, Some((v4("[::1]:1234"), v4("[::2]:80"))));
        let (a, _) = parse(&v2(0, 0x00, &[])).unwrap().unwrap();
        assert_eq!(a.addrs, None, "LOCAL");
        assert_eq!(parse(&h[..20]), Ok(None));
        assert_eq!(parse(&v2(1, 0x11, &body[..8])), Err(Error::BadV2));
        assert_eq!(parse(&v2(2, 0x11, &body)), Err(Error::BadV2));
        let mut bad_version = h.clone();
        bad_version[12] = 0x11;
        assert_eq!(parse(&bad_version), Err(Error::BadV2));
    }
}
