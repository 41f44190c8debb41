//! What to say when the agent cannot listen on a configured address: the address, the config
//! key and file to change, and a fix. On Debian a Mosquitto installed for the tests holds 1883,
//! the embedded broker's default; a bare "Address already in use" left the user guessing.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::Path;

/// The ports the agent listens on, by config key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `http.listen`: the loopback endpoint.
    Http,
    /// `mqtt.embedded_listen`: the embedded MQTT broker.
    EmbeddedBroker,
    /// `console.listen`: the console on the site network.
    Console,
}

impl Listener {
    pub fn key(self) -> &'static str {
        match self {
            Listener::Http => "http.listen",
            Listener::EmbeddedBroker => "mqtt.embedded_listen",
            Listener::Console => "console.listen",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Listener::Http => "the HTTP endpoint",
            Listener::EmbeddedBroker => "the embedded MQTT broker",
            Listener::Console => "the console",
        }
    }
}

/// The message for `listener` failing to bind `address` with `error`. `config` is the file the
/// key is in (if known); `free` a nearby address that was free a moment ago (if one was found).
pub fn listen_error(
    listener: Listener,
    address: SocketAddr,
    config: Option<&Path>,
    error: &std::io::Error,
    free: Option<SocketAddr>,
) -> String {
    let key = listener.key();
    let place = config.map_or_else(|| format!("`{key}`"), |file| format!("`{key}` in {}", file.display()));
    let head = format!("{} cannot listen on {address} ({place}): {error}", listener.what());
    let example = free.map_or_else(String::new, |free| format!(", e.g. {key} = \"{free}\" (free just now)"));
    let fix = match error.kind() {
        ErrorKind::AddrInUse => {
            let port = address.port();
            let who = match listener {
                // 1883 and 8883 are MQTT's own ports, where a broker service is the usual holder.
                Listener::EmbeddedBroker if [1883, 8883].contains(&port) => {
                    "another program holds the port, often a Mosquitto service"
                }
                Listener::EmbeddedBroker => "another program holds the port",
                Listener::Http | Listener::Console => "another program (or another agent) holds the port",
            };
            let alternative = match listener {
                Listener::EmbeddedBroker => {
                    format!("; or use that broker instead of the embedded one: broker = \"mqtt://{address}\" in [mqtt]")
                }
                Listener::Http | Listener::Console => String::new(),
            };
            format!(
                "{who} (`ss -ltnp 'sport = :{port}'` shows which). Set `{key}` to a free address{example}{alternative}"
            )
        }
        ErrorKind::PermissionDenied => {
            format!("ports below 1024 need privileges. Set `{key}` to a port above 1023{example}")
        }
        ErrorKind::AddrNotAvailable => {
            format!("the address is not one of this machine's. Set `{key}` to one of its addresses{example}")
        }
        _ => return head,
    };
    format!("{head}; {fix}")
}

/// A free address on the same host a little above `address`'s port, to suggest; probing binds
/// and releases each candidate, so it may be taken again by the time the user tries it.
pub fn nearby_free(address: SocketAddr) -> Option<SocketAddr> {
    (1..=20u16)
        .filter_map(|step| address.port().checked_add(step))
        .map(|port| SocketAddr::new(address.ip(), port))
        .find(|candidate| std::net::TcpListener::bind(candidate).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_taken_broker_port_names_the_key_the_file_and_both_ways_out() {
        let error = std::io::Error::from(ErrorKind::AddrInUse);
        let message = listen_error(
            Listener::EmbeddedBroker,
            addr("127.0.0.1:1883"),
            Some(Path::new("/etc/edgeadapt/config.toml")),
            &error,
            Some(addr("127.0.0.1:1884")),
        );
        assert!(message.starts_with(
            "the embedded MQTT broker cannot listen on 127.0.0.1:1883 (`mqtt.embedded_listen` in /etc/edgeadapt/config.toml)"
        ));
        assert!(message.contains("Mosquitto") && message.contains("sport = :1883"), "{message}");
        assert_eq!(message.matches("config.toml").count(), 1, "the file once: {message}");
        assert!(message.contains("mqtt.embedded_listen = \"127.0.0.1:1884\""), "{message}");
        assert!(message.contains("broker = \"mqtt://127.0.0.1:1883\""), "{message}");
    }

    #[test]
    fn a_taken_http_port_names_its_key_without_a_free_example_where_none_was_found() {
        let error = std::io::Error::from(ErrorKind::AddrInUse);
        let message = listen_error(Listener::Http, addr("127.0.0.1:8470"), None, &error, None);
        assert!(message.contains("(`http.listen`)") && message.ends_with("Set `http.listen` to a free address"));
        let broker = listen_error(Listener::EmbeddedBroker, addr("127.0.0.1:11883"), None, &error, None);
        assert!(!broker.contains("Mosquitto"), "only MQTT's own ports suggest a broker service: {broker}");
        assert!(!message.contains("broker"), "{message}");
    }

    #[test]
    fn other_failures_say_what_to_change_or_only_what_happened() {
        let denied = std::io::Error::from(ErrorKind::PermissionDenied);
        let message = listen_error(Listener::Http, addr("0.0.0.0:80"), None, &denied, None);
        assert!(message.contains("ports below 1024 need privileges"), "{message}");
        let other = std::io::Error::other("something else");
        let message = listen_error(Listener::Http, addr("127.0.0.1:8470"), None, &other, None);
        assert_eq!(message, "the HTTP endpoint cannot listen on 127.0.0.1:8470 (`http.listen`): something else");
    }

    #[test]
    fn a_free_port_nearby_is_found() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free = nearby_free(held.local_addr().unwrap());
        assert!(free.is_some_and(|f| f.port() > held.local_addr().unwrap().port()));
    }
}
