//! Reaching the broker: client options (identity, credentials, TLS, Last Will), the retained
//! status message, and the status a starting agent announces while it warms up.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::watch;

use super::port::Served;
use crate::config::MqttConfig;
use crate::protocol::broker_address::BrokerAddress;
use crate::protocol::messages::{STATUS_SCHEMA, StatusMessage};
use crate::protocol::topics::DeviceTopics;

/// Builds the client options: identity, credentials, TLS, and the Last Will when `with_will`.
pub fn options(
    config: &MqttConfig,
    device: &str,
    embedded_port: Option<u16>,
    with_will: bool,
) -> anyhow::Result<MqttOptions> {
    let client_id = config.client_id.clone().unwrap_or_else(|| device.to_string());
    let (host, port, tls) = match BrokerAddress::parse(&config.broker).map_err(anyhow::Error::msg)? {
        BrokerAddress::Embedded => ("127.0.0.1".to_string(), embedded_port.unwrap_or(1883), false),
        BrokerAddress::Tcp { host, port } => (host, port, false),
        BrokerAddress::Tls { host, port } => (host, port, true),
    };
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_keep_alive(Duration::from_secs(config.keep_alive_s));
    options.set_clean_session(true);
    options.set_max_packet_size(config.max_packet_bytes, config.max_packet_bytes);
    options.set_request_channel_capacity(10_000);
    options.set_inflight(100);
    let topics = DeviceTopics::new(&config.fleet, device);
    if with_will {
        let will = serde_json::to_vec(&status_message(config, device, false, "connection lost", None))?;
        options.set_last_will(LastWill::new(topics.status(), will, QoS::AtLeastOnce, true));
    }
    if let Some(user) = &config.username {
        let password = match &config.password_file {
            Some(file) => std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("mqtt.password_file {}: {e}", file.display()))?
                .trim_end()
                .to_string(),
            None => String::new(),
        };
        options.set_credentials(user.clone(), password);
    }
    if tls {
        // rustls without a compiled-in default: use ring, once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let read = |key: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("mqtt.{key} {}: {e}", path.display()))
        };
        let ca = read("ca_file", config.ca_file.as_deref().expect("validated: mqtts needs a CA"))?;
        let client_auth = match (&config.client_cert, &config.client_key) {
            (Some(cert), Some(key)) => Some((read("client_cert", cert)?, read("client_key", key)?)),
            _ => None,
        };
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth }));
    }
    Ok(options)
}

/// Small messages (commands, responses) go out at once instead of waiting on Nagle's algorithm,
/// which with delayed acknowledgements adds about 40 ms to each hop.
pub fn no_delay(eventloop: &mut rumqttc::EventLoop) {
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
}

pub fn status_message(
    config: &MqttConfig,
    device: &str,
    online: bool,
    reason: &str,
    served: Option<Served>,
) -> StatusMessage {
    let (version, bundle, bundle_id, provider) = match served {
        Some(Served { version, bundle, bundle_id, provider }) => {
            (Some(version), Some(bundle), Some(bundle_id), Some(provider))
        }
        None => (None, None, None, None),
    };
    StatusMessage {
        schema: STATUS_SCHEMA.into(),
        device: device.into(),
        fleet: config.fleet.clone(),
        online,
        reason: reason.into(),
        version,
        bundle,
        bundle_id,
        provider,
        agent: env!("CARGO_PKG_VERSION").into(),
        at_ms: crate::store::now_ms(),
    }
}

/// How the agent's start is going, for [`announce_start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartProgress {
    /// Warming up the model for this many seconds so far.
    WarmingUp(u64),
    /// Ready: the link proper takes over.
    Ready,
    Failed(String),
}

/// Seconds between two refreshes of the starting status.
const START_REFRESH_S: u64 = 5;

/// While the agent warms up its model (minutes, for a first TensorRT engine build), keeps a
/// retained offline status on the broker that says so and for how long, so that the fleet sees
/// a device starting rather than one that is gone. Returns once `progress` says ready (after a
/// clean disconnect, for the link proper to connect) or failed (after publishing why).
pub async fn announce_start(
    config: MqttConfig,
    device: String,
    embedded_port: Option<u16>,
    mut progress: watch::Receiver<StartProgress>,
) {
    let options = match options(&config, &device, embedded_port, true) {
        Ok(options) => options,
        Err(error) => {
            tracing::debug!(%error, "no start-up status");
            return;
        }
    };
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    no_delay(&mut eventloop);
    // The event loop runs in a task of its own: cancelled half-way through a connect, it would
    // drop a connection the broker has accepted, and the broker would publish the Last Will.
    let (connected_tx, mut connected) = watch::channel(false);
    let driver = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = connected_tx.send(true);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = connected_tx.send(false);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    let topic = DeviceTopics::new(&config.fleet, &device).status();
    let publish = |reason: String| {
        let status = status_message(&config, &device, false, &reason, None);
        let payload = serde_json::to_vec(&status).expect("messages serialise");
        let _ = client.try_publish(topic.clone(), QoS::AtLeastOnce, true, payload);
    };
    let warming = |seconds: u64| format!("starting: warming up the model ({seconds} s)");
    let mut last_sent: Option<u64> = None;
    let outcome = loop {
        tokio::select! {
            changed = progress.changed() => {
                let state = if changed.is_ok() { progress.borrow_and_update().clone() } else { StartProgress::Ready };
                match state {
                    StartProgress::WarmingUp(seconds) => {
                        if *connected.borrow() && last_sent.is_none_or(|sent| seconds >= sent + START_REFRESH_S) {
                            publish(warming(seconds));
                            last_sent = Some(seconds);
                        }
                    }
                    done => break done,
                }
            }
            Ok(()) = connected.changed() => {
                if *connected.borrow_and_update() {
                    let seconds = match *progress.borrow() {
                        StartProgress::WarmingUp(seconds) => seconds,
                        _ => 0,
                    };
                    publish(warming(seconds));
                    last_sent = Some(seconds);
                }
            }
        }
    };
    // A connection still being set up is finished first, then closed cleanly: no Last Will.
    let handshake = tokio::time::timeout(Duration::from_secs(2), async { connected.wait_for(|up| *up).await.is_ok() });
    if !matches!(handshake.await, Ok(true)) {
        driver.abort();
        return;
    }
    if let StartProgress::Failed(error) = outcome {
        publish(format!("start failed: {error}"));
    }
    let _ = client.try_disconnect();
    if tokio::time::timeout(Duration::from_secs(2), driver).await.is_err() {
        tracing::debug!("start-up status connection did not close in time");
    }
}
