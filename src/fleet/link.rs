//! The agent's link to the fleet broker (rumqttc, MQTT 3.1.1): retained status with a Last Will,
//! periodic metrics, the event outbox, weights sets, and commands with responses. One task owns
//! the connection, so publishing, acknowledgements and reconnects never race.
//!
//! Events are delivered at least once: an event is marked delivered only when the broker has
//! acknowledged it (QoS 1 PUBACK). Every (re)connect starts a clean session, subscribes again
//! and republishes every undelivered event from the store, so an outage of any length loses
//! nothing up to the outbox limit.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};

use super::connect::{no_delay, options, status_message};
use super::link_state::{LinkState, OnConnect, follow_up};
use super::port::{AgentPort, LinkHealth, LinkPhase, Served};
use crate::config::MqttConfig;
use crate::protocol::messages::{EVENT_SCHEMA, EventMessage, ResponseMessage};
use crate::protocol::topics::DeviceTopics;

/// How often the outbox is checked for new events.
const OUTBOX_POLL: Duration = Duration::from_millis(100);

/// Something for the link to publish, from command handling.
pub enum LinkMessage {
    Response(ResponseMessage),
    Weights { version: i64, manifest: Vec<u8>, chunks: Vec<Vec<u8>> },
}

/// What arrives for the agent, in the order it arrived: a command, or a chunk of an artefact
/// (a later `offer` then sees the chunks sent before it).
pub enum Inbound {
    Command(Vec<u8>),
    Chunk { transfer: String, index: usize, bytes: Vec<u8> },
}

/// The client and what the link knows; the bookkeeping is [`LinkState`]'s.
struct Link {
    client: AsyncClient,
    topics: DeviceTopics,
    config: MqttConfig,
    device: String,
    state: LinkState,
}

impl Link {
    fn publish(&mut self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>, event: Option<i64>) -> bool {
        if !fits(&topic, &payload, self.config.max_packet_bytes) {
            // The broker would drop it and the connection with it.
            tracing::warn!(%topic, bytes = payload.len(), "not published: over the broker's packet limit");
            return false;
        }
        match self.client.try_publish(topic, qos, retain, payload) {
            Ok(()) => {
                self.state.on_queued(event);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot queue an MQTT publish");
                false
            }
        }
    }

    fn publish_json(&mut self, topic: String, qos: QoS, retain: bool, message: &impl serde::Serialize) -> bool {
        let payload = serde_json::to_vec(message).expect("messages serialise");
        self.publish(topic, qos, retain, payload, None)
    }

    async fn publish_status(&mut self, agent: &Arc<dyn AgentPort>, online: bool, reason: &str) {
        let served = served(agent).await;
        let status = status_message(&self.config, &self.device, online, reason, served);
        self.publish_json(self.topics.status(), QoS::AtLeastOnce, true, &status);
    }

    fn publish_weights(&mut self, version: i64, manifest: Vec<u8>, chunks: Vec<Vec<u8>>) {
        self.publish(self.topics.weights_manifest(version), QoS::AtLeastOnce, false, manifest, None);
        for (index, chunk) in chunks.into_iter().enumerate() {
            self.publish(self.topics.weights_chunk(version, index), QoS::AtLeastOnce, false, chunk, None);
        }
    }
}

/// Runs the link until `shutdown` turns true, then publishes the offline status and disconnects.
pub async fn run(
    agent: Arc<dyn AgentPort>,
    config: MqttConfig,
    device: String,
    embedded_port: Option<u16>,
    mut commands_out: mpsc::Receiver<LinkMessage>,
    commands_in: mpsc::Sender<Inbound>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let options = options(&config, &device, embedded_port, true)?;
    let (client, mut eventloop) = AsyncClient::new(options, 10_000);
    no_delay(&mut eventloop);
    let state =
        LinkState::new(Duration::from_millis(config.reconnect_min_ms), Duration::from_millis(config.reconnect_max_ms));
    let mut link =
        Link { client, topics: DeviceTopics::new(&config.fleet, &device), config: config.clone(), device, state };
    let mut outbox = tokio::time::interval(OUTBOX_POLL);
    outbox.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut metrics = tokio::time::interval(Duration::from_secs(config.metrics_every_s));
    let health = |state, error| LinkHealth { state, since_ms: crate::store::now_ms(), error };
    agent.link_changed(health(LinkPhase::Connecting, None));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(broker = %config.broker, "connected to the fleet broker");
                    agent.link_changed(health(LinkPhase::Connected, None));
                    for action in link.state.on_connected() {
                        match action {
                            OnConnect::SubscribeCommands => {
                                // Chunks first: once a command is answered, chunks reach the device too.
                                for filter in [link.topics.inbound_filter(), link.topics.commands()] {
                                    if let Err(error) = link.client.try_subscribe(filter, QoS::AtLeastOnce) {
                                        tracing::warn!(%error, "cannot subscribe to commands");
                                    }
                                }
                            }
                            OnConnect::PublishStatus(reason) => link.publish_status(&agent, true, reason).await,
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    // A full queue drops what arrives: a command is retried by its sender, a
                    // chunk is sent again once the next offer lists it missing.
                    let inbound = if publish.topic == link.topics.commands() {
                        Some(Inbound::Command(publish.payload.to_vec()))
                    } else {
                        link.topics.parse_inbound(&publish.topic).map(|(transfer, index)| Inbound::Chunk {
                            transfer,
                            index,
                            bytes: publish.payload.to_vec(),
                        })
                    };
                    if let Some(inbound) = inbound && commands_in.try_send(inbound).is_err() {
                        tracing::warn!("inbound queue full; a command or chunk dropped");
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(id) = link.state.on_puback(ack.pkid) {
                        let port = Arc::clone(&agent);
                        let marked = tokio::task::spawn_blocking(move || port.mark_delivered(&[id])).await;
                        if !matches!(marked, Ok(Ok(()))) {
                            if let Ok(Err(error)) = marked {
                                tracing::warn!(%error, "cannot mark an event delivered; trying again");
                            }
                            link.state.on_mark_failed(&[id]);
                        }
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => link.state.on_outgoing_publish(pkid),
                Ok(_) => {}
                Err(error) => {
                    let retry = link.state.on_connection_error(rand::rng().random_range(0.5..1.0));
                    if retry.log {
                        tracing::warn!(%error, broker = %config.broker, "fleet broker unreachable; retrying");
                        agent.link_changed(health(LinkPhase::Unreachable, Some(error.to_string())));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(retry.delay) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            },
            _ = outbox.tick(), if link.state.connected() => publish_events(&agent, &mut link).await,
            _ = metrics.tick(), if link.state.connected() => {
                if let Some(message) = metrics_message(&agent, &link.device).await {
                    // Retained: a watcher that starts late sees the device's figures at once.
                    link.publish_json(link.topics.metrics(), QoS::AtMostOnce, true, &message);
                }
            }
            Some(item) = commands_out.recv() => {
                if !link.state.connected() {
                    // Responses are kept with their command id; a retried command gets it again.
                    continue;
                }
                match item {
                    LinkMessage::Response(response) => {
                        let payload = serde_json::to_vec(&response).expect("responses serialise");
                        let payload = if fits(&link.topics.responses(), &payload, config.max_packet_bytes) {
                            payload
                        } else {
                            let error = format!("the response ({} bytes) exceeds the broker's packet limit", payload.len());
                            let id: String = response.id.chars().take(128).collect();
                            serde_json::to_vec(&crate::protocol::messages::response_error(&link.device, &id, error))
                                .expect("responses serialise")
                        };
                        link.publish(link.topics.responses(), QoS::AtLeastOnce, false, payload, None);
                    }
                    LinkMessage::Weights { version, manifest, chunks } => link.publish_weights(version, manifest, chunks),
                }
            }
        }
    }
    if link.state.connected() {
        link.publish_status(&agent, false, "shutdown").await;
        let _ = link.client.try_disconnect();
        let drained = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("the broker did not take the offline status within 3 s");
        }
    }
    Ok(())
}

async fn served(agent: &Arc<dyn AgentPort>) -> Option<Served> {
    let agent = Arc::clone(agent);
    tokio::task::spawn_blocking(move || agent.served()).await.ok()?
}

async fn metrics_message(
    agent: &Arc<dyn AgentPort>,
    device: &str,
) -> Option<crate::protocol::messages::MetricsMessage> {
    let agent = Arc::clone(agent);
    let device = device.to_string();
    tokio::task::spawn_blocking(move || agent.metrics(&device)).await.ok()?
}

/// Whether a publish of `payload` on `topic` fits in a packet of `max_packet` bytes.
pub fn fits(topic: &str, payload: &[u8], max_packet: usize) -> bool {
    payload.len() + topic.len() + PUBLISH_HEADER <= max_packet
}

/// A PUBLISH packet's bytes besides its topic and payload: the fixed header (at most 5) and the
/// topic length and packet id (2 each), rounded up.
const PUBLISH_HEADER: usize = 16;

/// Publishes undelivered events beyond those already in flight; a promoted version's weights
/// follow its event.
async fn publish_events(agent: &Arc<dyn AgentPort>, link: &mut Link) {
    let Some(request) = link.state.outbox_request() else { return };
    let limit = link.config.outbox_limit;
    let max_packet = link.config.max_packet_bytes;
    let port = Arc::clone(agent);
    let retry = request.remark.clone();
    let remarked = tokio::task::spawn_blocking(move || retry.is_empty() || port.mark_delivered(&retry).is_ok());
    if !matches!(remarked.await, Ok(true)) {
        link.state.on_mark_failed(&request.remark);
        return;
    }
    let port = Arc::clone(agent);
    let fetched =
        tokio::task::spawn_blocking(move || port.outbox(request.after, request.room, limit, max_packet)).await;
    let (events, weights) = match fetched {
        Ok(Ok(outbox)) => (outbox.events, outbox.weights),
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot read the outbox");
            return;
        }
        Err(_) => return,
    };
    let mut weights = weights.into_iter();
    for event in events {
        let follow = follow_up(&event.kind);
        let message = EventMessage {
            schema: EVENT_SCHEMA.into(),
            device: link.device.clone(),
            id: event.id,
            at_ms: event.at_ms,
            kind: event.kind,
            payload: event.payload,
        };
        let mut payload = serde_json::to_vec(&message).expect("events serialise");
        if !fits(&link.topics.events(), &payload, link.config.max_packet_bytes) {
            // An event too big for the broker is sent without its payload, so the outbox moves on.
            let bytes = payload.len();
            let stub =
                EventMessage { payload: serde_json::json!({ "truncated": true, "payload_bytes": bytes }), ..message };
            payload = serde_json::to_vec(&stub).expect("events serialise");
        }
        if !link.publish(link.topics.events(), QoS::AtLeastOnce, false, payload, Some(event.id)) {
            return;
        }
        if follow.status {
            link.publish_status(agent, true, "version changed").await;
        }
        if follow.weights
            && let Some((version, (manifest, chunks))) = weights.next()
        {
            link.publish_weights(version, manifest, chunks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_chunks_fit_the_packet_limit_they_were_cut_for() {
        let topic = format!("edgeadapt/v1/{}/{}/weights/12/chunk/3", "f".repeat(64), "d".repeat(64));
        for max_packet in [4096, 65_536, 262_144] {
            let payload = vec![0u8; 3 * max_packet];
            let chunk_bytes = max_packet - crate::protocol::weights::PACKET_OVERHEAD;
            assert!(fits(&topic, &payload[..chunk_bytes], max_packet), "{max_packet}");
            assert!(!fits(&topic, &payload[..max_packet], max_packet), "{max_packet}");
        }
    }
}
