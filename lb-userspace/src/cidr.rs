//! Lists of address prefixes: the sources trusted to send a PROXY protocol header or
//! forwarding headers.

use std::{fmt, net::IpAddr};

use ipnet::IpNet;

/// A set of IPv4 and IPv6 prefixes. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, what a
/// dual-stack listener reports) match the IPv4 prefixes.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Cidrs(Vec<IpNet>);

impl Cidrs {
    /// Parses `10.0.0.0/8`, `2001:db8::/32` or a bare address (a host prefix); the error
    /// names the item that is neither.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Cidrs, String> {
        items
            .iter()
            .map(|s| {
                let s = s.as_ref().trim();
                s.parse::<IpNet>()
                    .map(|n| n.trunc())
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{s:?} is not an address or prefix like 10.0.0.0/8"))
            })
            .collect::<Result<_, _>>()
            .map(Cidrs)
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.0.iter().any(|n| n.contains(&addr))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Cidrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|n| n.to_string()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership() {
        let c = Cidrs::parse(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", " 10.1.2.3/16 "])
            .expect("valid list");
        for (a, want) in [
            ("10.200.1.1", true),
            ("11.0.0.1", false),
            ("192.0.2.7", true),
            ("192.0.2.8", false),
            ("::ffff:10.9.9.9", true),
            ("2001:db8:1::5", true),
            ("2001:db9::5", false),
            ("10.1.200.1", true),
        ] {
            assert_eq!(c.contains(a.parse().expect("addr")), want, "{a}");
        }
        assert!(!Cidrs::default().contains("127.0.0.1".parse().expect("addr")));
        let e = Cidrs::parse(&["10.0.0.0/8", "10.0.0.0/33"]).expect_err("bad prefix");
        assert!(e.contains("10.0.0.0/33"), "{e}");
        assert!(Cidrs::parse(&["example.com"]).is_err());
    }
}
