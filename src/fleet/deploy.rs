//! `fleet deploy` over the broker: the bundle is packed once and sent to each device of a wave
//! in verified, resumable chunks (`send`), then each is told to deploy it with a signed command
//! naming the archive's sha256, and followed (`deploy::follow`) to its verdict. The rollout's
//! decisions (`deploy::rollout`) say which wave comes next and when to stop.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::json;

use super::client::FleetClient;
use crate::deploy::archive;
use crate::deploy::follow::Following;
use crate::deploy::health::Thresholds;
use crate::deploy::rollout::{Outcome, Rollout};
use crate::protocol::commands::DeployArgs;
use crate::protocol::events::DeploymentState;
use crate::protocol::messages::{EventMessage, ResponseMessage, StatusMessage};
use crate::protocol::topics::{self, DeviceTopics};
use crate::protocol::transfer::{ArtefactKind, make};

/// How often an unanswered `deploy` is sent again (same id: the device runs it once).
const RESEND: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct DeployOptions {
    pub devices: Vec<String>,
    pub canaries: usize,
    pub parallel: usize,
    pub max_failures: usize,
    pub probation_s: u64,
    pub health: Thresholds,
    /// How long a device may take to answer an offer, and to stage and shadow the bundle.
    pub timeout: Duration,
}

/// What changed, for the operator: a device and a line about it.
pub type Report<'a> = &'a mut dyn FnMut(&str, &str);

impl FleetClient {
    /// Rolls the bundle in `bundle_dir` out to the devices; the rollout as it ended.
    pub async fn deploy(
        &mut self,
        bundle_dir: &Path,
        options: &DeployOptions,
        report: Report<'_>,
    ) -> anyhow::Result<Rollout> {
        let bundle = crate::model::Bundle::load(bundle_dir)?;
        let id = bundle.id();
        let packed = archive::pack(bundle_dir).map_err(anyhow::Error::msg)?;
        let (manifest, chunks) =
            make(ArtefactKind::Bundle, &id, &packed, self.options.max_packet_bytes, json!({ "bundle": id }));
        let args = DeployArgs {
            transfer: manifest.transfer.clone(),
            sha256: manifest.sha256.clone(),
            bundle: id.clone(),
            probation_s: options.probation_s,
            health: options.health,
        };
        let args = serde_json::to_value(&args)?;
        let mut rollout = Rollout::new(&options.devices, options.canaries, options.parallel, options.max_failures)
            .map_err(anyhow::Error::msg)?;
        let fleet = self.options.fleet.clone();
        for leaf in ["response", "events"] {
            self.subscribe(topics::fleet_filter(&fleet, leaf)).await?;
        }
        report("", &format!("bundle {id}: {} bytes in {} chunks", packed.len(), chunks.len()));
        let mut subscribed = false;
        loop {
            let wave = rollout.next_wave();
            if wave.is_empty() {
                return Ok(rollout);
            }
            // A device whose retained status names this bundle already serves it: nothing is
            // sent (the status is published again on every deployment step and at each start).
            let serving = self.retained_bundles(&fleet, subscribed).await?;
            subscribed = true;
            let (already, wave): (Vec<String>, Vec<String>) =
                wave.into_iter().partition(|device| serving.get(device) == Some(&id));
            for device in already {
                report(&device, &format!("already serves {id}; nothing sent"));
                rollout.record(&device, Outcome::InService);
            }
            // Every device of the wave gets the bundle first, then every one is told to deploy
            // it: no answer to a deploy can arrive while a transfer's exchange is under way.
            let mut received = Vec::new();
            for device in wave {
                let sent = self
                    .send_artefact(&device, &manifest, &chunks, options.timeout, &mut |held, total| {
                        report(&device, &format!("holds {held} of {total} chunks"))
                    })
                    .await;
                match sent {
                    Ok(_) => received.push(device),
                    Err(error) => {
                        let outcome = Outcome::Failed(format!("transfer: {error:#}"));
                        report(&device, &describe(&outcome));
                        rollout.record(&device, outcome);
                    }
                }
            }
            let mut following = BTreeMap::new();
            for device in received {
                let canary = if rollout.is_canary(&device) { " (canary)" } else { "" };
                report(&device, &format!("bundle received{canary}; deploying"));
                let command_id = format!("deploy-{}-{}", crate::store::now_ms(), rand::random::<u32>());
                let payload = self.command_payload(&device, &command_id, "deploy", args.clone())?;
                let topic = DeviceTopics::new(&fleet, &device).commands();
                self.client.publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone()).await?;
                let timeout_ms = options.timeout.as_millis() as i64;
                let now = crate::store::now_ms();
                let follow = Following::new(&command_id, &manifest.transfer, options.probation_s, now, timeout_ms);
                following.insert(device, (follow, topic, payload, Instant::now()));
            }
            while !following.is_empty() {
                let mut ended = Vec::new();
                if let Some(publish) = self.next_publish(Duration::from_millis(500)).await?
                    && let Some((device, leaf)) = topics::parse(&fleet, &publish.topic)
                    && let Some((follow, ..)) = following.get_mut(&device)
                {
                    let outcome = match leaf.as_str() {
                        "response" => match serde_json::from_slice::<ResponseMessage>(&publish.payload) {
                            Ok(response) if response.id == follow.command_id => {
                                let result = response.result.clone().unwrap_or_default();
                                let was_on_probation = follow.on_probation();
                                let outcome = follow.on_answer(
                                    response.ok,
                                    &result,
                                    response.error.as_deref(),
                                    crate::store::now_ms(),
                                );
                                // Answers can arrive twice (at-least-once delivery): reported once.
                                if follow.on_probation() && !was_on_probation {
                                    report(&device, &switched(&result, options.probation_s));
                                }
                                outcome
                            }
                            _ => None,
                        },
                        "events" => match serde_json::from_slice::<EventMessage>(&publish.payload) {
                            Ok(event) if event.kind == "deployment" => {
                                deployment_step(&event).and_then(|(transfer, state)| {
                                    follow.on_event(&transfer, state, &event.payload["detail"])
                                })
                            }
                            _ => None,
                        },
                        _ => None,
                    };
                    if let Some(outcome) = outcome {
                        ended.push((device, outcome));
                    }
                }
                let now = crate::store::now_ms();
                for (device, (follow, topic, payload, sent)) in following.iter_mut() {
                    if let Some(outcome) = follow.on_tick(now) {
                        ended.push((device.clone(), outcome));
                    } else if !follow.on_probation() && sent.elapsed() >= RESEND {
                        self.client.publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone()).await?;
                        *sent = Instant::now();
                    }
                }
                for (device, outcome) in ended {
                    if following.remove(&device).is_some() {
                        report(&device, &describe(&outcome));
                        rollout.record(&device, outcome);
                    }
                }
            }
        }
    }
}

impl FleetClient {
    /// The bundle each device serves by its retained status (online devices only), read until
    /// the retained messages stop arriving. A new subscription makes the broker send them
    /// again, so each wave judges by the newest statuses.
    async fn retained_bundles(&mut self, fleet: &str, again: bool) -> anyhow::Result<BTreeMap<String, String>> {
        let filter = topics::fleet_filter(fleet, "status");
        if again {
            self.resubscribe(filter).await?
        } else {
            self.subscribe(filter).await?
        }
        let mut serving = BTreeMap::new();
        let started = Instant::now();
        while started.elapsed() < RETAINED_WAIT_MAX {
            let Some(publish) = self.next_publish(RETAINED_QUIET).await? else { break };
            if let Some((device, leaf)) = topics::parse(fleet, &publish.topic)
                && leaf == "status"
            {
                note_serving(&mut serving, &device, &publish.payload);
            }
        }
        Ok(serving)
    }
}

/// Retained statuses arrive right after subscribing; this long without one ends the wait.
const RETAINED_QUIET: Duration = Duration::from_millis(500);
const RETAINED_WAIT_MAX: Duration = Duration::from_secs(5);

/// Records the bundle a status says `device` serves; an offline status (the Last Will) says
/// nothing about it.
fn note_serving(serving: &mut BTreeMap<String, String>, device: &str, payload: &[u8]) {
    match serde_json::from_slice::<StatusMessage>(payload) {
        Ok(status) if status.online && status.bundle_id.is_some() => {
            serving.insert(device.to_string(), status.bundle_id.unwrap_or_default());
        }
        _ => {
            serving.remove(device);
        }
    }
}

/// The transfer and state of a `deployment` event.
fn deployment_step(event: &EventMessage) -> Option<(String, DeploymentState)> {
    let transfer = event.payload["transfer"].as_str()?.to_string();
    let state = serde_json::from_value(event.payload["state"].clone()).ok()?;
    Some((transfer, state))
}

fn switched(result: &serde_json::Value, probation_s: u64) -> String {
    let shadow = &result["shadow"];
    let images = shadow["images"].as_u64().unwrap_or(0);
    let agreement = shadow["agreement"].as_f64().unwrap_or(0.0) * 100.0;
    let shadowed = match images {
        0 => "with no recent images to shadow on".to_string(),
        n => format!("after shadowing on {n} images ({agreement:.0} % agreement)"),
    };
    format!("switched {shadowed}; on probation for {probation_s} s")
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::InService => "in service".into(),
        Outcome::Failed(reason) => format!("failed: {reason}"),
        Outcome::Skipped => "skipped".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_online_status_naming_a_bundle_says_what_a_device_serves() {
        let mut serving = BTreeMap::new();
        let status = |online: bool, id: Option<&str>| {
            serde_json::to_vec(&json!({"schema": "edgeadapt.status/1", "device": "d", "fleet": "f",
                "online": online, "reason": "started", "bundle_id": id, "agent": "0", "at_ms": 1}))
            .unwrap()
        };
        note_serving(&mut serving, "d", &status(true, Some("b@1")));
        assert_eq!(serving.get("d").map(String::as_str), Some("b@1"));
        note_serving(&mut serving, "d", &status(false, None));
        assert_eq!(serving.get("d"), None, "the Last Will forgets it");
        note_serving(&mut serving, "d", &status(true, Some("b@1")));
        note_serving(&mut serving, "d", b"not json");
        assert_eq!(serving.get("d"), None, "an unreadable status forgets it");
    }
}
