//! Where the fleet broker is: the embedded one, or `mqtt://` / `mqtts://` HOST[:PORT].

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerAddress {
    Embedded,
    Tcp { host: String, port: u16 },
    Tls { host: String, port: u16 },
}

impl BrokerAddress {
    pub fn parse(text: &str) -> Result<BrokerAddress, String> {
        if text == "embedded" {
            return Ok(BrokerAddress::Embedded);
        }
        let (tls, rest) = if let Some(rest) = text.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(format!("'{text}' is not \"embedded\", mqtt://HOST:PORT or mqtts://HOST:PORT"));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => {
                (host, port.parse::<u16>().map_err(|_| format!("'{text}': the port must be a number"))?)
            }
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() {
            return Err(format!("'{text}' has no host"));
        }
        let host = host.to_string();
        Ok(if tls { BrokerAddress::Tls { host, port } } else { BrokerAddress::Tcp { host, port } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_parse_with_default_ports() {
        assert_eq!(BrokerAddress::parse("embedded"), Ok(BrokerAddress::Embedded));
        assert_eq!(
            BrokerAddress::parse("mqtt://broker.lan"),
            Ok(BrokerAddress::Tcp { host: "broker.lan".into(), port: 1883 })
        );
        assert_eq!(
            BrokerAddress::parse("mqtts://10.0.0.2:9883/"),
            Ok(BrokerAddress::Tls { host: "10.0.0.2".into(), port: 9883 })
        );
        assert!(BrokerAddress::parse("tcp://x:1").is_err());
        assert!(BrokerAddress::parse("mqtt://:1883").is_err());
        assert!(BrokerAddress::parse("mqtt://host:port").is_err());
    }
}
