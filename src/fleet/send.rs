//! Sending an artefact to a device (`protocol::transfer`): offer the signed manifest, publish
//! the chunks the device says it lacks, and offer again until it has them all. A resumed send
//! (after a disconnect, or the device's restart) sends only what is missing.

use std::time::Duration;

use rumqttc::QoS;

use super::client::FleetClient;
use crate::protocol::topics::DeviceTopics;
use crate::protocol::transfer::TransferManifest;

/// Offers without a new chunk arriving after which the send gives up: the device refuses the
/// chunks (they do not match the manifest) or cannot store them.
const STALLED_ROUNDS: usize = 3;

impl FleetClient {
    /// Sends `chunks` under `manifest` to `device`; returns the device's last answer, which says
    /// the transfer is complete and verified. `progress(received, total)` after each offer.
    pub async fn send_artefact(
        &mut self,
        device: &str,
        manifest: &TransferManifest,
        chunks: &[&[u8]],
        timeout: Duration,
        progress: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<serde_json::Value> {
        anyhow::ensure!(
            chunks.len() == manifest.chunks(),
            "{} chunks for a manifest of {}",
            chunks.len(),
            manifest.chunks()
        );
        let topics = DeviceTopics::new(&self.options.fleet, device);
        let args = serde_json::to_value(manifest)?;
        let (mut best, mut stalled) = (None, 0);
        loop {
            let response = self.command(device, "offer", args.clone(), timeout).await?;
            if !response.ok {
                anyhow::bail!("{device} refused the offer: {}", response.error.unwrap_or_default());
            }
            let answer = response.result.unwrap_or_default();
            let received = answer["received"].as_u64().unwrap_or(0) as usize;
            progress(received, chunks.len());
            if answer["complete"] == true {
                return Ok(answer);
            }
            if best.is_some_and(|b| received <= b) {
                stalled += 1;
                anyhow::ensure!(
                    stalled < STALLED_ROUNDS,
                    "{device} stored no new chunk in {STALLED_ROUNDS} rounds ({received} of {}); see its log",
                    chunks.len()
                );
            } else {
                (best, stalled) = (Some(received), 0);
            }
            let missing: Vec<usize> = answer["missing"]
                .as_array()
                .map(|m| m.iter().filter_map(|i| i.as_u64()).map(|i| i as usize).collect())
                .unwrap_or_default();
            anyhow::ensure!(!missing.is_empty(), "{device} lists no missing chunk but is not complete: {answer}");
            for index in missing {
                let chunk = chunks.get(index).ok_or_else(|| anyhow::anyhow!("{device} asks for chunk {index}"))?;
                let topic = topics.inbound_chunk(&manifest.transfer, index);
                self.client.publish(topic, QoS::AtLeastOnce, false, chunk.to_vec()).await?;
            }
        }
    }
}
