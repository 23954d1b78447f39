//! `proxy_protocol` and `trusted_forwarders`: which peers may speak for their clients.

use crate::cidr::Cidrs;

use super::ConfigError;

/// `false` or absent: off; a list of CIDRs: those peers must send a header. `true` is
/// refused: trusting every peer lets any client claim any address.
pub(super) fn proxy_protocol(
    path: &str,
    v: Option<&serde_json::Value>,
) -> Result<Option<Cidrs>, ConfigError> {
    use serde_json::Value;
    match v {
        None | Some(Value::Bool(false)) => Ok(None),
        Some(Value::Bool(true)) => Err(ConfigError::new(
            path,
            "true would let any client claim any source address: list the load balancers \
             trusted to send the header, e.g. [\"10.0.0.0/24\"] (or [\"127.0.0.1\"] for a local one)",
        )),
        Some(Value::Array(items)) => {
            let items: Vec<&str> = items
                .iter()
                .map(|i| {
                    i.as_str().ok_or_else(|| {
                        ConfigError::new(path, format!("{i}: expected an address or prefix string"))
                    })
                })
                .collect::<Result<_, _>>()?;
            if items.is_empty() {
                return Err(ConfigError::new(
                    path,
                    "an empty list trusts nobody: use false to turn the PROXY protocol off",
                ));
            }
            Ok(Some(list(path, &items)?))
        }
        Some(other) => Err(ConfigError::new(
            path,
            format!("{other}: expected false or a list of trusted sources like [\"10.0.0.0/24\"]"),
        )),
    }
}

pub(super) fn list<S: AsRef<str>>(path: &str, items: &[S]) -> Result<Cidrs, ConfigError> {
    Cidrs::parse(items).map_err(|e| ConfigError::new(path, e))
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ServiceMode};

    fn l7(extra: &str) -> Result<crate::config::L7Options, crate::config::ConfigError> {
        let c = Config::parse(&format!(
            r#"{{"interface":"eth0","virtual_services":[{{"name":"app","vip":"192.0.2.10",
            "port":80,"protocol":"tcp","mode":"l7","pool":"p"{extra}}}],
            "pools":[{{"name":"p","backends":[{{"name":"a","address":"10.0.0.1"}}]}}]}}"#
        ))?;
        match &c.services[0].mode {
            ServiceMode::L7(o) => Ok(o.clone()),
            ServiceMode::L4Dsr => panic!("l7 service"),
        }
    }

    #[test]
    fn proxy_protocol_is_a_list_of_trusted_sources() {
        let o = l7("").expect("default");
        assert_eq!(o.proxy_protocol, None);
        assert!(o.trusted_forwarders.is_empty());
        assert_eq!(
            l7(r#","proxy_protocol":false"#)
                .expect("off")
                .proxy_protocol,
            None
        );
        let o = l7(r#","proxy_protocol":["10.0.0.0/24","127.0.0.1"]"#).expect("list");
        let pp = o.proxy_protocol.expect("on");
        assert!(pp.contains("10.0.0.9".parse().expect("ip")));
        assert!(pp.contains("127.0.0.1".parse().expect("ip")));
        assert!(!pp.contains("10.0.1.9".parse().expect("ip")));
        for (v, needle) in [
            ("true", "any client claim any source address"),
            ("[]", "empty list"),
            (r#"["10.0.0.0/40"]"#, "10.0.0.0/40"),
            ("[1]", "expected an address"),
            (r#""10.0.0.0/8""#, "expected false or a list"),
        ] {
            let e = l7(&format!(r#","proxy_protocol":{v}"#)).expect_err(v);
            assert_eq!(e.path, "virtual_services[0].proxy_protocol", "{e}");
            assert!(e.reason.contains(needle), "{v}: {e}");
        }
        let e = l7(r#","trusted_forwarders":["nope"]"#).expect_err("bad forwarder");
        assert_eq!(e.path, "virtual_services[0].trusted_forwarders", "{e}");
        let o = l7(r#","trusted_forwarders":["192.0.2.0/24"]"#).expect("forwarders");
        assert!(
            o.trusted_forwarders
                .contains("192.0.2.1".parse().expect("ip"))
        );
    }
}
