//! The operator's side of the fleet interface: a connection to the broker that sends commands
//! and waits for their responses, follows devices for `fleet watch`, and receives weights sets.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

use crate::protocol::broker_address::BrokerAddress;
use crate::protocol::commands;
use crate::protocol::events::EventKind;
use crate::protocol::messages::{
    AdaptationResult, CommandMessage, EventMessage, MetricsMessage, ResponseMessage, StatusMessage, WeightsManifest,
};
use crate::protocol::topics::{self, DeviceTopics};
use crate::protocol::weights::Reassembly;

/// How long a signed command stays valid unless the operator says otherwise: long enough for
/// the sender's retries to reach a device that reconnects, short enough to be useless later.
pub const DEFAULT_COMMAND_VALIDITY: Duration = Duration::from_secs(600);

/// Chunks that arrive before their manifest are kept up to this many bytes.
const EARLY_CHUNK_BYTES: usize = 64 << 20;

/// How to reach the broker as an operator.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    pub url: String,
    pub fleet: String,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// What commands are signed with (an operator key or the fleet key); `None`: unsigned.
    pub signer: Option<crate::protocol::signing::Signer>,
    /// How long a signed command stays valid.
    pub command_validity: Duration,
    /// The broker's packet limit (`mqtt.max_packet_bytes`): a larger command is refused here,
    /// since the broker would drop the connection, and the next command with it.
    pub max_packet_bytes: usize,
}

impl BrokerOptions {
    /// A broker without TLS, credentials or command signing (loopback, tests, the demo).
    pub fn plain(url: impl Into<String>, fleet: impl Into<String>) -> BrokerOptions {
        BrokerOptions {
            url: url.into(),
            fleet: fleet.into(),
            username: None,
            password_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            signer: None,
            command_validity: DEFAULT_COMMAND_VALIDITY,
            max_packet_bytes: crate::protocol::weights::DEFAULT_MAX_PACKET_BYTES,
        }
    }
}

pub struct FleetClient {
    pub(super) client: AsyncClient,
    eventloop: EventLoop,
    /// Messages that arrived while waiting for something else (e.g. retained messages during a
    /// later subscription).
    buffered: std::collections::VecDeque<rumqttc::Publish>,
    watching: bool,
    pub options: BrokerOptions,
}

impl FleetClient {
    /// Connects and waits for the broker's acknowledgement.
    pub async fn connect(options: BrokerOptions, timeout: Duration) -> anyhow::Result<FleetClient> {
        let (host, port, tls) = match BrokerAddress::parse(&options.url).map_err(anyhow::Error::msg)? {
            BrokerAddress::Embedded => ("127.0.0.1".to_string(), 1883, false),
            BrokerAddress::Tcp { host, port } => (host, port, false),
            BrokerAddress::Tls { host, port } => (host, port, true),
        };
        let client_id = format!("edgeadapt-fleet-{}-{}", std::process::id(), rand::random::<u32>());
        let mut mqtt = MqttOptions::new(client_id, host, port);
        mqtt.set_keep_alive(Duration::from_secs(30));
        mqtt.set_max_packet_size(64 << 20, 64 << 20);
        if let Some(user) = &options.username {
            let password = match &options.password_file {
                Some(file) => std::fs::read_to_string(file)?.trim_end().to_string(),
                None => String::new(),
            };
            mqtt.set_credentials(user.clone(), password);
        }
        if tls {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let ca_file = options.ca_file.as_ref().ok_or_else(|| anyhow::anyhow!("an mqtts:// broker needs --ca"))?;
            let ca = std::fs::read(ca_file).map_err(|e| anyhow::anyhow!("{}: {e}", ca_file.display()))?;
            let client_auth = match (&options.client_cert, &options.client_key) {
                (Some(cert), Some(key)) => Some((std::fs::read(cert)?, std::fs::read(key)?)),
                _ => None,
            };
            mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth }));
        }
        let (client, mut eventloop) = AsyncClient::new(mqtt, 1000);
        super::connect::no_delay(&mut eventloop);
        let connected = tokio::time::timeout(timeout, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(error) => return Err(error),
                }
            }
        })
        .await;
        match connected {
            Ok(Ok(())) => Ok(FleetClient { client, eventloop, buffered: Default::default(), watching: false, options }),
            Ok(Err(error)) => Err(anyhow::anyhow!("cannot connect to {}: {error}", options.url)),
            Err(_) => Err(anyhow::anyhow!("no answer from {} within {timeout:?}", options.url)),
        }
    }

    /// Waits until the broker has acknowledged a subscription.
    pub(super) async fn subscribe(&mut self, filter: String) -> anyhow::Result<()> {
        self.client.subscribe(filter, QoS::AtLeastOnce).await?;
        loop {
            match self.eventloop.poll().await? {
                Event::Incoming(Packet::SubAck(_)) => return Ok(()),
                Event::Incoming(Packet::Publish(publish)) => self.buffered.push_back(publish),
                _ => {}
            }
        }
    }

    /// Drops the subscription to `filter` and makes it again, so that the broker sends its
    /// retained messages again (not every broker does for a repeated subscription).
    pub(super) async fn resubscribe(&mut self, filter: String) -> anyhow::Result<()> {
        self.client.unsubscribe(filter.clone()).await?;
        loop {
            match self.eventloop.poll().await? {
                Event::Incoming(Packet::UnsubAck(_)) => break,
                Event::Incoming(Packet::Publish(publish)) => self.buffered.push_back(publish),
                _ => {}
            }
        }
        self.subscribe(filter).await
    }

    /// The next message, buffered ones first; `None` when `wait` passes without one.
    pub(super) async fn next_publish(&mut self, wait: Duration) -> anyhow::Result<Option<rumqttc::Publish>> {
        if let Some(publish) = self.buffered.pop_front() {
            return Ok(Some(publish));
        }
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.eventloop.poll()).await {
                Err(_) => return Ok(None),
                Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => return Ok(Some(publish)),
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(anyhow::anyhow!("lost the broker: {error}")),
            }
        }
    }

    /// Sends a command and waits for its response. Retries with the same id are safe: the
    /// device answers a repeated id from its store without running the command again.
    pub async fn command(
        &mut self,
        device: &str,
        command: &str,
        args: serde_json::Value,
        timeout: Duration,
    ) -> anyhow::Result<ResponseMessage> {
        let id = format!("{}-{}", crate::store::now_ms(), rand::random::<u32>());
        self.command_with_id(device, &id, command, args, timeout).await
    }

    /// As [`FleetClient::command`], with the caller's command id.
    pub async fn command_with_id(
        &mut self,
        device: &str,
        id: &str,
        command: &str,
        args: serde_json::Value,
        timeout: Duration,
    ) -> anyhow::Result<ResponseMessage> {
        let device_topics = DeviceTopics::new(&self.options.fleet, device);
        self.subscribe(device_topics.responses()).await?;
        let id = id.to_string();
        let payload = self.command_payload(device, &id, command, args)?;
        let deadline = Instant::now() + timeout;
        let mut resend = Instant::now();
        loop {
            if Instant::now() >= resend {
                self.client.publish(device_topics.commands(), QoS::AtLeastOnce, false, payload.clone()).await?;
                resend = Instant::now() + Duration::from_secs(10);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                anyhow::bail!("no response from device '{device}' within {timeout:?} (is it online?)");
            }
            if let Some(publish) = self.next_publish(left.min(Duration::from_secs(1))).await?
                && publish.topic == device_topics.responses()
                && let Ok(response) = serde_json::from_slice::<ResponseMessage>(&publish.payload)
                && response.id == id
            {
                return Ok(response);
            }
        }
    }

    /// A command's bytes for `device`, refused here when the broker would not take them.
    pub(super) fn command_payload(
        &self,
        device: &str,
        id: &str,
        command: &str,
        args: serde_json::Value,
    ) -> anyhow::Result<Vec<u8>> {
        let device_topics = DeviceTopics::new(&self.options.fleet, device);
        let payload = serde_json::to_vec(&self.build(device, id, command, args))?;
        let packet = payload.len() + device_topics.commands().len();
        anyhow::ensure!(
            super::link::fits(&device_topics.commands(), &payload, self.options.max_packet_bytes),
            "the {command} command is {packet} bytes, over the broker's packet limit of {} bytes \
             (`mqtt.max_packet_bytes`); the broker would drop it and the connection{}",
            self.options.max_packet_bytes,
            if command == "label" { "; send a smaller image, or label it on the device" } else { "" }
        );
        Ok(payload)
    }

    /// A command for `device`, signed for it alone when there is a signer.
    fn build(&self, device: &str, id: &str, command: &str, args: serde_json::Value) -> CommandMessage {
        let signing = self.options.signer.as_ref().map(|signer| commands::Signing {
            signer,
            to: vec![device.to_string()],
            expires_ms: crate::store::now_ms() + self.options.command_validity.as_millis() as i64,
        });
        commands::build(id, command, args, signing.as_ref())
    }

    /// Asks a device to publish a version's weights and reassembles and verifies them.
    pub async fn fetch_weights(
        &mut self,
        device: &str,
        version: Option<i64>,
        timeout: Duration,
    ) -> anyhow::Result<(WeightsManifest, Vec<u8>)> {
        let device_topics = DeviceTopics::new(&self.options.fleet, device);
        self.subscribe(device_topics.weights_filter()).await?;
        self.subscribe(device_topics.responses()).await?;
        let id = format!("{}-{}", crate::store::now_ms(), rand::random::<u32>());
        let args = match version {
            Some(v) => serde_json::json!({ "version": v }),
            None => serde_json::json!({}),
        };
        let message = self.build(device, &id, "publish-weights", args);
        self.client.publish(device_topics.commands(), QoS::AtLeastOnce, false, serde_json::to_vec(&message)?).await?;
        let deadline = Instant::now() + timeout;
        let mut wanted: Option<i64> = version;
        let mut sets: HashMap<i64, Reassembly> = HashMap::new();
        let mut early: HashMap<i64, Vec<(usize, Vec<u8>)>> = HashMap::new();
        let mut early_bytes = 0usize;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                anyhow::bail!("the weights did not arrive within {timeout:?}");
            }
            let Some(publish) = self.next_publish(left).await? else { continue };
            let Some((_, leaf)) = topics::parse(&self.options.fleet, &publish.topic) else { continue };
            let parts: Vec<&str> = leaf.split('/').collect();
            match parts.as_slice() {
                ["response"] => {
                    let response: ResponseMessage = serde_json::from_slice(&publish.payload)?;
                    if response.id == id {
                        if !response.ok {
                            anyhow::bail!("device '{device}': {}", response.error.unwrap_or_default());
                        }
                        wanted = response.result.as_ref().and_then(|r| r["version"].as_i64());
                    }
                }
                ["weights", v, "manifest"] => {
                    let manifest: WeightsManifest = serde_json::from_slice(&publish.payload)?;
                    let v: i64 = v.parse()?;
                    let mut set = Reassembly::new(manifest).map_err(anyhow::Error::msg)?;
                    for (index, bytes) in early.remove(&v).unwrap_or_default() {
                        set.add(index, bytes).map_err(anyhow::Error::msg)?;
                    }
                    sets.insert(v, set);
                }
                ["weights", v, "chunk", n] => {
                    let (v, n): (i64, usize) = (v.parse()?, n.parse()?);
                    match sets.get_mut(&v) {
                        Some(set) => set.add(n, publish.payload.to_vec()).map_err(anyhow::Error::msg)?,
                        None => {
                            early_bytes += publish.payload.len();
                            anyhow::ensure!(
                                early_bytes <= EARLY_CHUNK_BYTES,
                                "over {EARLY_CHUNK_BYTES} bytes of weights chunks arrived without their manifest"
                            );
                            early.entry(v).or_default().push((n, publish.payload.to_vec()));
                        }
                    }
                }
                _ => {}
            }
            if let Some(v) = wanted
                && let Some(set) = sets.get(&v)
                && let Some(result) = set.finish()
            {
                let payload = result.map_err(|e| anyhow::anyhow!("weights of version {v}: {e}"))?;
                return Ok((set.manifest.clone(), payload));
            }
        }
    }

    /// Follows the fleet for `duration` more, continuing `view`.
    pub async fn watch_more(&mut self, mut view: FleetView, duration: Duration) -> anyhow::Result<FleetView> {
        let fleet = self.options.fleet.clone();
        if !self.watching {
            for leaf in ["status", "metrics", "events"] {
                self.subscribe(topics::fleet_filter(&fleet, leaf)).await?;
            }
            self.watching = true;
        }
        let started = Instant::now();
        while started.elapsed() < duration {
            if let Some(publish) = self.next_publish(duration.saturating_sub(started.elapsed())).await? {
                view.apply(&fleet, &publish.topic, &publish.payload);
            }
        }
        Ok(view)
    }

    /// Follows every device of the fleet for `duration` (forever if `None`), calling `render`
    /// with the current view about once a second.
    pub async fn watch(
        &mut self,
        duration: Option<Duration>,
        mut render: impl FnMut(&FleetView),
    ) -> anyhow::Result<FleetView> {
        let fleet = self.options.fleet.clone();
        for leaf in ["status", "metrics", "events"] {
            self.subscribe(topics::fleet_filter(&fleet, leaf)).await?;
        }
        let mut view = FleetView::default();
        let started = Instant::now();
        let mut rendered = Instant::now();
        loop {
            if duration.is_some_and(|d| started.elapsed() >= d) {
                render(&view);
                return Ok(view);
            }
            if let Some(publish) = self.next_publish(Duration::from_millis(200)).await? {
                view.apply(&fleet, &publish.topic, &publish.payload);
            }
            if rendered.elapsed() >= Duration::from_secs(1) {
                render(&view);
                rendered = Instant::now();
            }
        }
    }
}

impl DeviceView {
    /// Keeps the newer of the known and the reported result.
    fn note_adaptation(&mut self, reported: Option<AdaptationResult>) {
        if let Some(reported) = reported
            && self.last_adaptation.as_ref().is_none_or(|known| reported.version >= known.version)
        {
            self.last_adaptation = Some(reported);
        }
    }
}

/// What `fleet watch` knows of each device.
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    pub devices: BTreeMap<String, DeviceView>,
}

#[derive(Debug, Clone, Default)]
pub struct DeviceView {
    pub status: Option<StatusMessage>,
    pub metrics: Option<MetricsMessage>,
    /// The newest adaptation result (`version.promoted` or `version.rejected`).
    /// From the newest `version.promoted`/`version.rejected` event, or the retained metrics.
    pub last_adaptation: Option<AdaptationResult>,
    pub alerts: Vec<String>,
    /// The newest deployment step: the bundle and its state (`switched`, `in_service`, ...).
    pub deployment: Option<(String, String)>,
    /// Event ids seen, to drop repeats (delivery is at least once).
    pub last_event_id: i64,
    pub events: usize,
}

impl FleetView {
    pub fn apply(&mut self, fleet: &str, topic: &str, payload: &[u8]) {
        let Some((device, leaf)) = topics::parse(fleet, topic) else { return };
        let entry = self.devices.entry(device).or_default();
        match leaf.as_str() {
            "status" => entry.status = serde_json::from_slice(payload).ok(),
            "metrics" => {
                entry.metrics = serde_json::from_slice::<MetricsMessage>(payload).ok();
                let reported = entry.metrics.as_ref().and_then(|m| m.last_adaptation.clone());
                entry.note_adaptation(reported);
            }
            "events" => {
                let Ok(event) = serde_json::from_slice::<EventMessage>(payload) else { return };
                if event.id <= entry.last_event_id {
                    return;
                }
                entry.last_event_id = event.id;
                entry.events += 1;
                let kind = EventKind::parse(&event.kind);
                match kind {
                    Some(EventKind::VersionPromoted | EventKind::VersionRejected) => {
                        entry.note_adaptation(AdaptationResult::from_event(&event))
                    }
                    Some(
                        EventKind::AdaptationFailed
                        | EventKind::AdaptationSourceKept
                        | EventKind::VersionLoadFailed
                        | EventKind::OutboxDropped
                        | EventKind::AdaptationInterrupted,
                    ) => {
                        entry.alerts.push(format!("{}: {}", event.kind, event.payload["error"].as_str().unwrap_or("")));
                        if entry.alerts.len() > 3 {
                            entry.alerts.remove(0);
                        }
                    }
                    _ => {}
                }
                if kind == Some(EventKind::Deployment) {
                    let text = |key: &str| event.payload[key].as_str().unwrap_or("?").to_string();
                    entry.deployment = Some((text("bundle"), text("state")));
                }
                if kind == Some(EventKind::VersionRejected) {
                    entry.alerts.push(format!("version {} rejected", event.payload["version"]));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(last_version: Option<i64>) -> Vec<u8> {
        let mut message = serde_json::json!({
            "schema": "edgeadapt.metrics/1", "device": "d", "at_ms": 5, "serving": 1,
            "samples": {"A": [4, 1]}, "new_labels_since_last_run": 0, "traffic_samples": 0,
            "undelivered_events": 0,
            "classification": {"classified": 0, "failed": 0, "per_class": {}, "per_class_confidence": {},
                "confidence_histogram": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "latency_ms": null},
        });
        if let Some(version) = last_version {
            message["last_adaptation"] = serde_json::json!({
                "version": version, "promoted": true, "at_ms": 4, "gate": {"seen_validation": [0.8, 0.7]}
            });
        }
        serde_json::to_vec(&message).unwrap()
    }

    fn event(id: i64, kind: &str, version: i64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schema": "edgeadapt.event/1", "device": "d", "id": id, "at_ms": 6, "kind": kind,
            "payload": {"version": version, "metrics": {"gate": {"seen_validation": [0.6, 0.7]}}},
        }))
        .unwrap()
    }

    #[test]
    fn a_late_watcher_takes_the_last_adaptation_from_retained_metrics_and_newer_events_win() {
        let mut view = FleetView::default();
        view.apply("f", "edgeadapt/v1/f/d/metrics", &metrics(None));
        assert!(view.devices["d"].metrics.is_some());
        assert_eq!(view.devices["d"].last_adaptation, None);
        view.apply("f", "edgeadapt/v1/f/d/metrics", &metrics(Some(1)));
        let last = view.devices["d"].last_adaptation.clone().unwrap();
        assert_eq!((last.version, last.promoted), (1, true));
        view.apply("f", "edgeadapt/v1/f/d/events", &event(9, "version.rejected", 2));
        let last = view.devices["d"].last_adaptation.clone().unwrap();
        assert_eq!((last.version, last.promoted, last.gate["seen_validation"][0].as_f64()), (2, false, Some(0.6)));
        // Metrics from before that run do not take it back.
        view.apply("f", "edgeadapt/v1/f/d/metrics", &metrics(Some(1)));
        assert_eq!(view.devices["d"].last_adaptation.as_ref().unwrap().version, 2);
    }

    #[test]
    fn the_watcher_shows_each_devices_newest_deployment_step() {
        let mut view = FleetView::default();
        let step = |id: i64, state: &str| {
            serde_json::to_vec(&serde_json::json!({
                "schema": "edgeadapt.event/1", "device": "d", "id": id, "at_ms": 6, "kind": "deployment",
                "payload": {"transfer": "t", "bundle": "v2@ab", "state": state},
            }))
            .unwrap()
        };
        view.apply("f", "edgeadapt/v1/f/d/events", &step(1, "switched"));
        assert_eq!(view.devices["d"].deployment, Some(("v2@ab".into(), "switched".into())));
        view.apply("f", "edgeadapt/v1/f/d/events", &step(2, "in_service"));
        view.apply("f", "edgeadapt/v1/f/d/events", &step(1, "switched"));
        assert_eq!(view.devices["d"].deployment.as_ref().unwrap().1, "in_service", "a repeat changes nothing");
    }
}
