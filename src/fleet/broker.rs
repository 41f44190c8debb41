//! The embedded broker: rumqttd in the agent's process on a loopback port, so the default set-up
//! needs nothing installed. For fleets, point the agent at a real broker (docs/mqtt.md).

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// The broker's address could not be bound (the agent says which config key to change).
#[derive(Debug, thiserror::Error)]
#[error("embedded broker cannot listen on {address}: {source}")]
pub struct ListenError {
    pub address: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Starts the broker on `listen` in a background thread. It lives as long as the process.
pub fn start(listen: SocketAddr, max_packet_bytes: usize) -> anyhow::Result<()> {
    // Fail here, with the address, rather than inside the broker's thread.
    drop(std::net::TcpListener::bind(listen).map_err(|source| ListenError { address: listen, source })?);
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: max_packet_bytes + 1024,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "edgeadapt-embedded".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 200,
            max_segment_size: 64 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new().name("mqtt-broker".into()).spawn(move || {
        let mut broker = Broker::new(config);
        if let Err(error) = broker.start() {
            tracing::error!(%error, "embedded MQTT broker stopped");
        }
    })?;
    // Return once it accepts connections, so the agent's first connect succeeds.
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(listen).is_err() {
        if started.elapsed() > std::time::Duration::from_secs(5) {
            anyhow::bail!("embedded broker did not start listening on {listen}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(())
}
