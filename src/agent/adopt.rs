//! Adopting a version another device made (`fleet adopt`): its weights arrive as a transfer,
//! and this device judges them with its own gate on its own validation samples, traffic and
//! reference samples, then promotes or rejects them like a version of its own.

use std::time::Instant;

use super::run::{RunSummary, assess};
use super::{Agent, AgentError, StoredParams};
use crate::adapt::method::Adapted;
use crate::network::weights;
use crate::protocol::messages::WeightsManifest;
use crate::protocol::transfer::ArtefactKind;

impl Agent {
    /// Judges and records the weights set that arrived as `transfer`; the transfer is dropped
    /// once it is a version (or found unusable).
    pub fn adopt(&mut self, transfer: &str) -> Result<RunSummary, AgentError> {
        let input = |problem: String| AgentError::Input(format!("adopt: {problem}"));
        let manifest = self
            .store()
            .transfer_manifest(transfer)?
            .ok_or_else(|| input(format!("no transfer {transfer} here; offer it first")))?;
        if manifest.kind != ArtefactKind::Weights {
            return Err(input(format!("transfer {transfer} is a {:?}, not a weights set", manifest.kind)));
        }
        let chunks = self.store().transfer_chunks(transfer)?;
        if chunks.len() != manifest.chunks() {
            return Err(input(format!("transfer {transfer} has {} of {} chunks", chunks.len(), manifest.chunks())));
        }
        let outcome = self.adopt_payload(&manifest.assemble(&chunks).map_err(input)?, &manifest.meta);
        if !matches!(outcome, Err(AgentError::Store(_))) {
            self.store().drop_transfer(transfer)?;
        }
        outcome
    }

    fn adopt_payload(&mut self, payload: &[u8], meta: &serde_json::Value) -> Result<RunSummary, AgentError> {
        let started = Instant::now();
        let input = |problem: String| AgentError::Input(format!("adopt: {problem}"));
        let weights_manifest: WeightsManifest =
            serde_json::from_value(meta.clone()).map_err(|e| input(format!("the weights manifest: {e}")))?;
        if !self.classifier.bundle.is_named(&weights_manifest.bundle) {
            return Err(input(format!(
                "the weights are for bundle {}, this device runs {}",
                weights_manifest.bundle,
                self.classifier.bundle.id()
            )));
        }
        crate::protocol::weights::matches_manifest(payload, &weights_manifest).map_err(input)?;
        let params: StoredParams = serde_json::from_value(weights_manifest.params.clone())
            .map_err(|e| input(format!("the version's parameters: {e}")))?;
        if !params.gamma.is_finite() {
            return Err(input(format!("calibration γ {} is not finite", params.gamma)));
        }
        let what = format!("weights of {}@{}", weights_manifest.device, weights_manifest.version);
        let network = weights::decode(payload, &self.source, params.adapter_rank, &what).map_err(input)?;
        let classes = self.classes();
        let unseen = params
            .unseen
            .iter()
            .map(|name| classes.iter().position(|c| c == name).ok_or_else(|| input(format!("unknown class '{name}'"))))
            .collect::<Result<Vec<_>, _>>()?;
        let recalibrate = crate::fleet::merge::wants_recalibration(&weights_manifest.params);
        let name = match recalibrate {
            true => format!("merge of {}", weights_manifest.device),
            false => {
                format!(
                    "adopted {}@{} ({})",
                    weights_manifest.device, weights_manifest.version, weights_manifest.method
                )
            }
        };
        let plan = self.prepare_assessment(name)?;
        let (mut gamma, mut notes) = (params.gamma, params.notes.clone());
        // A merge's γ is this device's to compute, from its own traffic.
        if recalibrate {
            match plan.prior_matched_gamma(&network, &unseen) {
                Some(matched) => {
                    gamma = matched;
                    notes.push(format!("γ {matched:.3} by prior matching on this device's traffic"));
                }
                None => notes.push("no traffic on this device to compute γ from: served without calibration".into()),
            }
        }
        let adapted = Adapted { network, gamma, unseen, notes };
        let outcome = assess(&plan, adapted, started);
        self.commit_run(&plan, Ok(outcome))
    }
}
