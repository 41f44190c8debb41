//! One simulated device for `fleet simulate`: the messages an agent sends and its answers to
//! the fleet's commands, without a model. Transfers are checked chunk by chunk as on a real
//! device, but the bytes are dropped once checked, so a thousand devices fit in memory; a
//! deployment switches at once and reports `in_service` after its probation.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::protocol::commands::{self, Command};
use crate::protocol::counters::CountersReport;
use crate::protocol::events::DeploymentState;
use crate::protocol::messages::{
    EVENT_SCHEMA, EventMessage, METRICS_SCHEMA, MetricsMessage, ResponseMessage, STATUS_SCHEMA, StatusMessage,
    response_error, response_ok,
};
use crate::protocol::transfer::{TransferLimits, TransferManifest, missing};

/// A simulated device's answer to a command: the response, the events that follow at once,
/// and a deployment that ends its probation at a time (Unix ms).
pub struct Reply {
    pub response: ResponseMessage,
    pub events: Vec<EventMessage>,
    pub in_service_at: Option<(i64, String, String)>,
}

pub struct SimDevice {
    pub name: String,
    fleet: String,
    bundle: String,
    next_event: i64,
    transfers: HashMap<String, (TransferManifest, Vec<bool>)>,
    limits: TransferLimits,
    /// Answers by command id, so a repeated command is answered again and not run again, as
    /// an agent does; the oldest go past [`ANSWERS_KEPT`].
    answered: HashMap<String, ResponseMessage>,
    answer_order: std::collections::VecDeque<String>,
}

const ANSWERS_KEPT: usize = 256;

impl SimDevice {
    pub fn new(name: &str, fleet: &str, max_packet: usize) -> SimDevice {
        SimDevice {
            name: name.into(),
            fleet: fleet.into(),
            bundle: "simulated@0000000000000000".into(),
            next_event: 1,
            transfers: HashMap::new(),
            limits: TransferLimits { max_bytes: 512 << 20, max_packet },
            answered: HashMap::new(),
            answer_order: Default::default(),
        }
    }

    pub fn status(&self, online: bool, reason: &str, now_ms: i64) -> StatusMessage {
        StatusMessage {
            schema: STATUS_SCHEMA.into(),
            device: self.name.clone(),
            fleet: self.fleet.clone(),
            online,
            reason: reason.into(),
            version: online.then_some(0),
            bundle: online.then(|| self.bundle.split('@').next().unwrap_or_default().to_string()),
            bundle_id: online.then(|| self.bundle.clone()),
            provider: online.then(|| "simulated".into()),
            agent: env!("CARGO_PKG_VERSION").into(),
            at_ms: now_ms,
        }
    }

    pub fn metrics(&self, now_ms: i64) -> MetricsMessage {
        MetricsMessage {
            schema: METRICS_SCHEMA.into(),
            device: self.name.clone(),
            at_ms: now_ms,
            serving: 0,
            samples: [("A".to_string(), (4, 1))].into(),
            new_labels_since_last_run: 0,
            traffic_samples: 0,
            undelivered_events: 0,
            classification: CountersReport {
                classified: 0,
                failed: 0,
                per_class: Default::default(),
                per_class_confidence: Default::default(),
                confidence_histogram: [0; crate::protocol::counters::CONFIDENCE_BINS],
                latency_ms: None,
            },
            adaptation: None,
            last_adaptation: None,
        }
    }

    pub fn event(&mut self, kind: &str, payload: Value, now_ms: i64) -> EventMessage {
        let id = self.next_event;
        self.next_event += 1;
        EventMessage {
            schema: EVENT_SCHEMA.into(),
            device: self.name.clone(),
            id,
            at_ms: now_ms,
            kind: kind.into(),
            payload,
        }
    }

    /// Checks and records one chunk of an offered transfer.
    pub fn on_chunk(&mut self, transfer: &str, index: usize, bytes: &[u8]) -> Result<(), String> {
        let (manifest, held) = self.transfers.get_mut(transfer).ok_or("a chunk no offer announced")?;
        manifest.verify_chunk(index, bytes)?;
        held[index] = true;
        Ok(())
    }

    pub fn on_command(&mut self, payload: &[u8], now_ms: i64) -> Reply {
        let parsed = match commands::parse(payload, None) {
            Ok(parsed) => parsed,
            Err(refusal) => return self.reply(response_error(&self.name, &refusal.id, refusal.error)),
        };
        let id = parsed.id;
        if let Some(response) = self.answered.get(&id) {
            return self.reply(response.clone());
        }
        let reply = self.run(&id, parsed.command, now_ms);
        self.answered.insert(id.clone(), reply.response.clone());
        self.answer_order.push_back(id);
        if self.answer_order.len() > ANSWERS_KEPT
            && let Some(oldest) = self.answer_order.pop_front()
        {
            self.answered.remove(&oldest);
        }
        reply
    }

    fn run(&mut self, id: &str, command: Command, now_ms: i64) -> Reply {
        match command {
            Command::Status => {
                let result = json!({ "device_id": self.name, "bundle": self.bundle, "serving": 0 });
                self.reply(response_ok(&self.name, id, result))
            }
            Command::Offer(manifest) => match manifest.check(&self.limits) {
                Err(problem) => self.reply(response_error(&self.name, id, format!("offer: {problem}"))),
                Ok(()) => {
                    let entry = self
                        .transfers
                        .entry(manifest.transfer.clone())
                        .or_insert_with(|| ((*manifest).clone(), vec![false; manifest.chunks()]));
                    let held: Vec<usize> = entry.1.iter().enumerate().filter(|(_, h)| **h).map(|(i, _)| i).collect();
                    let missing = missing(manifest.chunks(), &held);
                    let result = json!({
                        "transfer": manifest.transfer, "kind": manifest.kind, "chunks": manifest.chunks(),
                        "received": held.len(), "missing": missing.iter().take(512).collect::<Vec<_>>(),
                        "complete": missing.is_empty(),
                    });
                    self.reply(response_ok(&self.name, id, result))
                }
            },
            Command::Deploy(args) => {
                let complete = self
                    .transfers
                    .get(&args.transfer)
                    .filter(|(manifest, held)| manifest.sha256 == args.sha256 && held.iter().all(|h| *h));
                if complete.is_none() {
                    let error = format!("deploy: transfer {} is not here whole with that sha256", args.transfer);
                    return self.reply(response_error(&self.name, id, error));
                }
                self.transfers.remove(&args.transfer);
                self.bundle = args.bundle.clone();
                let shadow = json!({ "images": 0 });
                let step = json!({ "transfer": args.transfer, "bundle": args.bundle,
                    "state": DeploymentState::Switched, "detail": { "shadow": shadow } });
                let event = self.event("deployment", step, now_ms);
                let result = json!({ "state": "switched", "bundle": args.bundle, "probation_s": args.probation_s,
                    "shadow": shadow });
                let ends = now_ms + args.probation_s as i64 * 1000;
                Reply {
                    response: response_ok(&self.name, id, result),
                    events: vec![event],
                    in_service_at: Some((ends, args.transfer.clone(), args.bundle.clone())),
                }
            }
            other => {
                let error =
                    format!("{}: not simulated (fleet simulate answers status, offer and deploy)", other.name());
                self.reply(response_error(&self.name, id, error))
            }
        }
    }

    /// The event that ends a simulated probation.
    pub fn in_service(&mut self, transfer: &str, bundle: &str, now_ms: i64) -> EventMessage {
        let step = json!({ "transfer": transfer, "bundle": bundle, "state": DeploymentState::InService });
        self.event("deployment", step, now_ms)
    }

    fn reply(&self, response: ResponseMessage) -> Reply {
        Reply { response, events: Vec::new(), in_service_at: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::transfer::{ArtefactKind, make};

    fn command(id: &str, name: &str, args: Value) -> Vec<u8> {
        serde_json::to_vec(&commands::build(id, name, args, None)).unwrap()
    }

    #[test]
    fn a_simulated_device_takes_a_transfer_in_checked_chunks_and_deploys_it() {
        let mut device = SimDevice::new("sim-0001", "f", 65536);
        let payload = vec![7u8; 200_000];
        let (manifest, chunks) = make(ArtefactKind::Bundle, "b@1", &payload, 65536, Value::Null);
        let offer = device.on_command(&command("c1", "offer", serde_json::to_value(&manifest).unwrap()), 0);
        assert_eq!(offer.response.result.unwrap()["missing"].as_array().unwrap().len(), chunks.len());
        let mut forged = chunks[0].to_vec();
        forged[0] ^= 1;
        assert!(device.on_chunk(&manifest.transfer, 0, &forged).is_err());
        for (index, chunk) in chunks.iter().enumerate() {
            device.on_chunk(&manifest.transfer, index, chunk).unwrap();
        }
        let again = device.on_command(&command("c2", "offer", serde_json::to_value(&manifest).unwrap()), 0);
        assert_eq!(again.response.result.unwrap()["complete"], true);
        let args =
            json!({ "transfer": manifest.transfer, "sha256": manifest.sha256, "bundle": "b@1", "probation_s": 2 });
        let deployed = device.on_command(&command("c3", "deploy", args), 1000);
        assert_eq!(deployed.response.result.unwrap()["state"], "switched");
        assert_eq!(deployed.in_service_at.unwrap().0, 3000);
        assert_eq!(deployed.events[0].kind, "deployment");
        let status = device.status(true, "started", 0);
        assert_eq!((status.bundle.as_deref(), status.bundle_id.as_deref()), (Some("b"), Some("b@1")));
        let adapt = device.on_command(&command("c4", "adapt", json!({})), 0);
        assert!(adapt.response.error.unwrap().contains("not simulated"));
        let args =
            json!({ "transfer": manifest.transfer, "sha256": manifest.sha256, "bundle": "b@1", "probation_s": 2 });
        let repeated = device.on_command(&command("c3", "deploy", args), 5000);
        assert_eq!(repeated.response.result.unwrap()["state"], "switched", "a repeat gets the first answer");
        assert!(repeated.in_service_at.is_none(), "and runs nothing");
    }
}
