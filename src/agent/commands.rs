//! Fleet commands on the device: each is parsed, claimed by its id in the store (a retry gets
//! the stored answer, a reused id is refused), run on the agent and answered over the link.

use std::sync::Arc;

use super::Labelled;
use super::shared::{Origin, Shared};
use crate::store::Claim;

/// Runs each command as it arrives (several may run at once) and sends its response. A repeated
/// command id gets the stored response and runs nothing.
pub async fn handle_commands(
    shared: Arc<Shared>,
    mut incoming: tokio::sync::mpsc::Receiver<crate::fleet::link::Inbound>,
    outgoing: tokio::sync::mpsc::Sender<crate::fleet::link::LinkMessage>,
    authority: Arc<crate::protocol::signing::Authority>,
    device: String,
) {
    use crate::fleet::link::LinkMessage;
    use crate::protocol::messages::{response_error, response_ok};
    {
        // Commands a crash cut short are answered now, so a retry learns what happened.
        let shared = Arc::clone(&shared);
        let device = device.clone();
        let _ = tokio::task::spawn_blocking(move || -> Result<(), crate::store::StoreError> {
            let mut agent = shared.lock();
            for id in agent.store().unanswered_commands()? {
                let response =
                    response_error(&device, &id, "interrupted by a restart of the agent; send it again with a new id");
                agent.store().answer_command(&id, &serde_json::to_string(&response).expect("responses serialise"))?;
            }
            Ok(())
        })
        .await;
    }
    let mut refused = RefusedChunks::default();
    while let Some(inbound) = incoming.recv().await {
        let payload = match inbound {
            crate::fleet::link::Inbound::Command(payload) => payload,
            crate::fleet::link::Inbound::Chunk { transfer, index, bytes } => {
                // Stored before the next message is taken, so an offer sent after a chunk sees it.
                let shared = Arc::clone(&shared);
                let stored = tokio::task::spawn_blocking(move || {
                    let result = shared.lock().store_chunk(&transfer, index, &bytes);
                    (transfer, result)
                })
                .await;
                if let Ok((transfer, Err(error))) = stored
                    && let Some(count) = refused.count(&transfer)
                {
                    tracing::warn!(transfer = %transfer, index, %error, refused = count, "chunk refused");
                }
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let outgoing = outgoing.clone();
        let authority = Arc::clone(&authority);
        let device = device.clone();
        tokio::spawn(async move {
            let verify = crate::protocol::commands::Verify {
                authority: &authority,
                device: &device,
                now_ms: crate::store::now_ms(),
            };
            let (id, command, signed_by) = match crate::protocol::commands::parse(&payload, Some(&verify)) {
                Ok(parsed) => (parsed.id, parsed.command, parsed.signed_by),
                Err(refusal) => {
                    tracing::warn!(id = %short(&refusal.id), error = %refusal.error, "command refused");
                    let response = response_error(&device, &refusal.id, &refusal.error);
                    let _ = outgoing.send(LinkMessage::Response(response)).await;
                    return;
                }
            };
            let name = command.name();
            let fingerprint = crate::protocol::commands::fingerprint(&payload);
            let claimed = {
                let shared = Arc::clone(&shared);
                let id = id.clone();
                tokio::task::spawn_blocking(move || shared.lock().store().claim_command(&id, &fingerprint)).await
            };
            match claimed {
                Ok(Ok(Claim::New)) => {}
                Ok(Ok(Claim::Answered(stored))) => {
                    if let Ok(response) = serde_json::from_str(&stored) {
                        let _ = outgoing.send(LinkMessage::Response(response)).await;
                    }
                    return;
                }
                Ok(Ok(Claim::Running)) => return,
                Ok(Ok(Claim::Conflict)) => {
                    tracing::warn!(id = %short(&id), command = name, "command id reused for another command");
                    let error = "this command id was already used for a different command; \
                                 send each command with a new id (a retry must repeat the command exactly)";
                    let _ = outgoing.send(LinkMessage::Response(response_error(&device, &id, error))).await;
                    return;
                }
                Ok(Err(error)) => {
                    let _ = outgoing.send(LinkMessage::Response(response_error(&device, &id, error))).await;
                    return;
                }
                Err(_) => return,
            }
            tracing::info!(id = %short(&id), command = name, signed_by = signed_by.as_deref().unwrap_or("-"), "fleet command");
            let (result, weights) = shared.execute(command, signed_by).await;
            let response = match result {
                Ok(value) => response_ok(&device, &id, value),
                Err(error) => response_error(&device, &id, error),
            };
            {
                let shared = Arc::clone(&shared);
                let (id, text) = (id.clone(), serde_json::to_string(&response).expect("responses serialise"));
                let _ = tokio::task::spawn_blocking(move || shared.lock().store().answer_command(&id, &text)).await;
            }
            if let Some(weights) = weights {
                let _ = outgoing.send(weights).await;
            }
            let _ = outgoing.send(LinkMessage::Response(response)).await;
        });
    }
}

/// Refused chunks per transfer, so that a flood of bad chunks cannot flood the log: the first
/// refusal of a transfer is logged, then every hundredth, with the count. Bounded: past 1,024
/// transfers the counts start over.
#[derive(Debug, Default)]
struct RefusedChunks {
    by_transfer: std::collections::HashMap<String, u64>,
}

impl RefusedChunks {
    /// Counts a refusal; the count when this one should be logged.
    fn count(&mut self, transfer: &str) -> Option<u64> {
        if self.by_transfer.len() >= 1024 && !self.by_transfer.contains_key(transfer) {
            self.by_transfer.clear();
        }
        let count = self.by_transfer.entry(transfer.to_string()).or_default();
        *count += 1;
        (*count == 1 || count.is_multiple_of(100)).then_some(*count)
    }
}

/// A command id as logged: ids come from outside, so a long one is cut.
fn short(id: &str) -> String {
    const MAX: usize = 80;
    match id.len() <= MAX {
        true => id.to_string(),
        false => format!("{} ({} bytes)", crate::protocol::commands::clip(id, MAX), id.len()),
    }
}

impl Shared {
    /// Runs a fleet command; a `publish-weights` also returns the set to publish. `signed_by`:
    /// the operator key that signed it, recorded as the user of the run or the label.
    pub async fn execute(
        self: &Arc<Self>,
        command: crate::protocol::commands::Command,
        signed_by: Option<String>,
    ) -> (Result<serde_json::Value, String>, Option<crate::fleet::link::LinkMessage>) {
        use crate::protocol::commands::Command;
        let shared = Arc::clone(self);
        let max_packet = self.config.mqtt.max_packet_bytes;
        match command {
            Command::Adapt { method, force } => {
                // Refused before anything is recorded, as the protocol's own refusals are.
                if let Some(Err(problem)) = method.as_deref().map(str::parse::<crate::adapt::method::Method>) {
                    return (Err(format!("adapt: {problem}")), None);
                }
                let started = tokio::task::spawn_blocking(move || {
                    shared.start_run_by(method.as_deref(), force, Origin::Command, signed_by.as_deref())
                })
                .await;
                match started {
                    Ok(Ok((id, _))) => {
                        let result = self.wait_for_run(id).await;
                        (result.map(|summary| serde_json::to_value(summary).expect("summaries serialise")), None)
                    }
                    Ok(Err(error)) => (Err(error.to_string()), None),
                    Err(error) => (Err(error.to_string()), None),
                }
            }
            Command::PublishWeights { version } => {
                let outcome = tokio::task::spawn_blocking(move || {
                    let agent = shared.lock();
                    let version = version.unwrap_or(agent.serving());
                    agent.weights_set(version, max_packet).map(|set| (version, set))
                })
                .await;
                match outcome {
                    Ok(Ok((version, (manifest, chunks)))) => {
                        let bytes: usize = chunks.iter().map(Vec::len).sum();
                        let result = serde_json::json!({ "version": version, "chunks": chunks.len(), "bytes": bytes });
                        (Ok(result), Some(crate::fleet::link::LinkMessage::Weights { version, manifest, chunks }))
                    }
                    Ok(Err(error)) => (Err(error.to_string()), None),
                    Err(error) => (Err(error.to_string()), None),
                }
            }
            Command::Offer(manifest) => {
                let limits = crate::protocol::transfer::TransferLimits {
                    max_bytes: self.config.mqtt.max_transfer_bytes,
                    max_packet,
                };
                let outcome = tokio::task::spawn_blocking(move || shared.lock().offer(&manifest, &limits)).await;
                (outcome.unwrap_or_else(|e| Err(e.to_string())), None)
            }
            other => {
                let outcome = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, String> {
                    let json = |v: serde_json::Result<serde_json::Value>| v.map_err(|e| e.to_string());
                    match other {
                        Command::Rollback { to } => {
                            let serving = shared.lock().rollback(to).map_err(|e| e.to_string())?;
                            Ok(serde_json::json!({ "serving": serving }))
                        }
                        Command::Status => json(serde_json::to_value(shared.status().map_err(|e| e.to_string())?)),
                        Command::SetPolicy(update) => {
                            json(serde_json::to_value(shared.lock().set_policy(&update).map_err(|e| e.to_string())?))
                        }
                        Command::Label { class, name, image } => {
                            let item = Labelled { what: &name, bytes: &image, class: &class };
                            let result = shared.lock().ingest_by(&[item], "mqtt", signed_by.as_deref()).remove(0);
                            json(serde_json::to_value(result.map_err(|e| e.to_string())?))
                        }
                        Command::Adopt { transfer } => {
                            // One new version at a time: the run's verdict and this one would race
                            // to be served.
                            if let Some(run) = shared.run_progress() {
                                return Err(format!(
                                    "adopt: a {} run is in progress; send adopt again when it ends (the transfer is kept)",
                                    run.method
                                ));
                            }
                            let summary = shared.lock().adopt(&transfer).map_err(|e| e.to_string())?;
                            json(serde_json::to_value(summary))
                        }
                        Command::Deploy(args) => shared.deploy(&args),
                        Command::Adapt { .. } | Command::PublishWeights { .. } | Command::Offer(_) => {
                            unreachable!("handled above")
                        }
                    }
                })
                .await;
                (outcome.unwrap_or_else(|e| Err(e.to_string())), None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_refused_chunks_logs_the_first_and_every_hundredth() {
        let mut refused = RefusedChunks::default();
        let logged: Vec<u64> = (0..250).filter_map(|_| refused.count("t1")).collect();
        assert_eq!(logged, vec![1, 100, 200]);
        assert_eq!(refused.count("t2"), Some(1), "each transfer has its own count");
        for n in 0..2000 {
            refused.count(&format!("x{n}"));
        }
        assert!(refused.by_transfer.len() <= 1024, "bounded");
    }

    #[test]
    fn long_command_ids_are_cut_in_the_log() {
        assert_eq!(short("op-1"), "op-1");
        let long = "x".repeat(100_000);
        let cut = short(&long);
        assert!(cut.len() < 120 && cut.ends_with("(100000 bytes)"), "{cut}");
        // Cut on a character boundary.
        assert!(short(&"é".repeat(100)).ends_with("... (200 bytes)"));
    }
}
