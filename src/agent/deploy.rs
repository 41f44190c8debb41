//! Deploying a new source bundle on this device (`fleet deploy`, `crate::deploy`): the bundle
//! that arrived as a transfer is written out and checked against the signed sha256, unpacked
//! beside the served one, loaded (every file's checksum) and warmed up, then shadowed on recent
//! images next to the served version. Only a healthy bundle is switched to, in one store
//! transaction; the old one stays loaded through the probation and is switched back to if the
//! new one fails there. Nothing the old bundle made is deleted.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::shared::Shared;
use super::{Agent, AgentError};
use crate::adapt::data::SplitSet;
use crate::config::DeviceConfig;
use crate::deploy::archive::{self, UnpackLimits};
use crate::deploy::health::{self, Observation};
use crate::deploy::probation::{self, Probation, Record, Verdict};
use crate::inference::{Classifier, predict, prepare_bytes};
use crate::model::Bundle;
use crate::network::Network;
use crate::protocol::commands::DeployArgs;
use crate::protocol::events::{DeploymentState, DeploymentStep, Event};
use crate::protocol::transfer::ArtefactKind;
use crate::store::{BundleSwitch, ShadowImage};

/// Deployed bundles live in this folder of the data folder, one folder each.
pub const BUNDLES_DIR: &str = "bundles";
/// Images of each kind (labelled, traffic) a new bundle is shadowed on at most.
const SHADOW_IMAGES: usize = 200;
/// Images classified at once while shadowing.
const SHADOW_BATCH: usize = 16;
/// Files a bundle archive may hold.
const MAX_BUNDLE_FILES: usize = 64;

/// The folder of the served bundle: a deployed one (`deployed`, a folder name under
/// [`BUNDLES_DIR`]) or the configured one.
pub fn bundle_folder(config: &DeviceConfig, data_dir: &Path, deployed: Option<&str>) -> PathBuf {
    match deployed {
        Some(name) => data_dir.join(BUNDLES_DIR).join(name),
        None => config.bundle.clone(),
    }
}

/// The folder of the bundle the agent on `config` serves (or would serve), read from its store
/// without changing it; the configured bundle when nothing was deployed.
pub fn served_bundle_folder(config: &DeviceConfig) -> PathBuf {
    let Some(data_dir) = config.data_dir.as_deref() else { return config.bundle.clone() };
    let deployed = crate::store::Store::peek_state(&super::store_path(data_dir), "bundle_dir");
    bundle_folder(config, data_dir, deployed.as_deref())
}

/// A folder name for a bundle id (`name@hash`): plain characters only, the hash kept whole.
fn folder_name(bundle_id: &str) -> String {
    let plain: String =
        bundle_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
    let keep = plain.len().min(96);
    plain[plain.len() - keep..].trim_start_matches('-').to_string()
}

/// What the agent serves from a bundle, as a unit that can be swapped in and out.
pub(super) struct Loaded {
    pub classifier: Classifier,
    pub source: Network,
    pub reference: Option<SplitSet>,
}

impl Loaded {
    pub fn new(classifier: Classifier) -> Result<Loaded, AgentError> {
        let bundle = &classifier.bundle;
        let reference = crate::adapt::data::reference_set(bundle)
            .map_err(|problem| AgentError::Bundle { dir: bundle.dir.clone(), problem })?;
        Ok(Loaded { source: Network::from_bundle(bundle), reference, classifier })
    }
}

fn step(transfer: &str, bundle: &str, state: DeploymentState, detail: Value) -> Event {
    Event::Deployment(DeploymentStep { transfer: transfer.into(), bundle: bundle.into(), state, detail })
}

impl Agent {
    pub fn bundle_id(&self) -> String {
        self.classifier.bundle.id()
    }

    /// Serves `incoming` from now on, switching the store with `switch`; returns what was
    /// served. The version the store restores for the bundle is served (the source if it
    /// cannot be loaded).
    fn swap_bundle(
        &mut self,
        incoming: Loaded,
        switch: &BundleSwitch<'_>,
        event: &Event,
    ) -> Result<Loaded, AgentError> {
        self.store.switch_bundle(switch, event)?;
        let old = Loaded {
            classifier: std::mem::replace(&mut self.classifier, incoming.classifier),
            source: std::mem::replace(&mut self.source, incoming.source),
            reference: std::mem::replace(&mut self.reference, incoming.reference),
        };
        self.pending_traffic.clear();
        self.traffic_rows = 0;
        let promoted = self.store.promoted()?;
        if let Err(error) = self.serve(promoted) {
            tracing::error!(%error, "cannot serve the promoted version; serving the source model");
            self.serve(0)?;
        }
        Ok(old)
    }

    /// The served version's prediction for each image, changing nothing (no traffic, no counts).
    fn predict_quietly(&mut self, images: &[(&str, &[u8])]) -> Vec<Option<(String, f32)>> {
        predict_with(&mut self.classifier, images)
    }

    /// Counts a classification while a new bundle is on probation.
    pub(super) fn note_probation(&mut self, classified: usize, failed: usize) {
        if let Some((_, record)) = self.probation.as_mut() {
            record.classified += classified as u64;
            record.failed += failed as u64;
        }
    }

    /// At start: a probation still recorded means the agent stopped during it, so the store
    /// switches back to the bundle served before, which the agent then loads.
    pub(super) fn switch_back_at_start(store: &mut crate::store::Store) -> Result<(), AgentError> {
        let Some(text) = store.probation()? else { return Ok(()) };
        let probation: Probation = serde_json::from_str(&text)
            .map_err(|e| AgentError::Input(format!("the stored probation is not valid: {e}")))?;
        if let Verdict::SwitchBack(reason) = probation::at_start(&probation) {
            tracing::warn!(%reason, bundle = %probation.previous_bundle, "switching back to the previous bundle");
            let event = step(
                &probation.transfer,
                &probation.bundle,
                DeploymentState::SwitchedBack,
                json!({ "reason": reason }),
            );
            let switch = BundleSwitch {
                bundle: &probation.previous_bundle,
                dir: probation.previous_dir.as_deref(),
                probation: None,
            };
            store.switch_bundle(&switch, &event)?;
        }
        Ok(())
    }
}

/// Whether the bundle folder packs to the archive with this sha256 ([`archive::pack`] is
/// deterministic).
fn packs_to(folder: &Path, sha256: &str) -> bool {
    archive::pack(folder).is_ok_and(|packed| hex::encode(Sha256::digest(&packed)).eq_ignore_ascii_case(sha256))
}

/// Predictions of `classifier`'s served model; `None` for an image it failed on or whose
/// output is not finite.
fn predict_with(classifier: &mut Classifier, images: &[(&str, &[u8])]) -> Vec<Option<(String, f32)>> {
    let limits = crate::imaging::DecodeLimits::default();
    let prepared = prepare_bytes(images, &classifier.bundle.manifest.input, &limits);
    let mut results = vec![None; images.len()];
    let ready: Vec<(usize, ndarray::Array3<f32>)> =
        prepared.into_iter().enumerate().filter_map(|(i, p)| p.ok().map(|input| (i, input))).collect();
    if ready.is_empty() {
        return results;
    }
    let batch = crate::imaging::stack(&ready.iter().map(|(_, input)| input.view()).collect::<Vec<_>>());
    let logits = classifier.split(batch.view()).and_then(|split| classifier.logits_from_split(split.view()));
    if let Ok(logits) = logits {
        let classes = classifier.bundle.head.classes.clone();
        for ((index, _), prediction) in ready.iter().zip(predict(logits.view(), &classes, 1)) {
            if prediction.confidence.is_finite() {
                results[*index] = Some((prediction.class, prediction.confidence));
            }
        }
    }
    results
}

impl Shared {
    /// Runs a deployment up to the switch (or the refusal); the answer for the fleet.
    pub fn deploy(self: &Arc<Self>, args: &DeployArgs) -> Result<Value, String> {
        let _deploying = self.begin_deployment(&args.transfer)?;
        let current = self.lock().bundle_id();
        if current == args.bundle {
            return Ok(json!({ "state": "in_service", "bundle": current, "already": true }));
        }
        let data_dir = self.config.require_data_dir().map_err(|e| e.to_string())?.to_path_buf();
        let outcome = self.stage(args, &data_dir);
        let event = |state, detail| step(&args.transfer, &args.bundle, state, detail);
        let (loaded, name) = match outcome {
            Ok(staged) => staged,
            Err(problem) => {
                let _ = self.lock().store().push_event(&event(DeploymentState::Failed, json!({ "error": problem })));
                return Err(format!("deploy: {problem}"));
            }
        };
        let (loaded, report) = self.shadow(loaded);
        let reasons = health::judge(&report, &args.health);
        let mut agent = self.lock();
        if !reasons.is_empty() {
            drop(loaded);
            // Gone before the refusal is told, so whoever hears of it finds no trace of the bundle.
            let _ = std::fs::remove_dir_all(data_dir.join(BUNDLES_DIR).join(&name));
            let detail = json!({ "reasons": reasons, "shadow": report });
            agent.store().push_event(&event(DeploymentState::Refused, detail)).map_err(|e| e.to_string())?;
            agent.store().drop_transfer(&args.transfer).map_err(|e| e.to_string())?;
            drop(agent);
            tracing::warn!(bundle = %args.bundle, ?reasons, "new bundle refused by its health check");
            return Ok(json!({ "state": "refused", "bundle": args.bundle, "reasons": reasons, "shadow": report }));
        }
        let probation = Probation {
            transfer: args.transfer.clone(),
            bundle: args.bundle.clone(),
            previous_bundle: current,
            previous_dir: agent.store().bundle_dir().map_err(|e| e.to_string())?,
            until_ms: crate::store::now_ms() + (args.probation_s * 1000) as i64,
        };
        let text = serde_json::to_string(&probation).expect("probations serialise");
        let switch = BundleSwitch { bundle: &args.bundle, dir: Some(&name), probation: Some(&text) };
        let detail = json!({ "shadow": report, "probation_s": args.probation_s });
        let old =
            agent.swap_bundle(loaded, &switch, &event(DeploymentState::Switched, detail)).map_err(|e| e.to_string())?;
        agent.previous = Some(old);
        agent.probation = Some((probation, Record::default()));
        agent.store().drop_transfer(&args.transfer).map_err(|e| e.to_string())?;
        tracing::info!(bundle = %args.bundle, probation_s = args.probation_s, "serving the new bundle on probation");
        Ok(json!({ "state": "switched", "bundle": args.bundle, "probation_s": args.probation_s, "shadow": report }))
    }

    /// Writes the transfer out, checks it against the signed sha256, unpacks, loads and warms
    /// up the bundle; its folder name.
    fn stage(&self, args: &DeployArgs, data_dir: &Path) -> Result<(Loaded, String), String> {
        let bundles = data_dir.join(BUNDLES_DIR);
        std::fs::create_dir_all(&bundles).map_err(|e| format!("{}: {e}", bundles.display()))?;
        let name = folder_name(&args.bundle);
        let folder = bundles.join(&name);
        // A folder from an earlier deployment is used only if it packs to the signed archive.
        if folder.is_dir() && !packs_to(&folder, &args.sha256) {
            tracing::warn!(folder = %folder.display(), "a bundle folder that is not the signed archive is replaced");
            std::fs::remove_dir_all(&folder).map_err(|e| format!("{}: {e}", folder.display()))?;
        }
        // Loaded once: its checksums are read where it is unpacked, and it keeps them when renamed.
        let bundle = if folder.is_dir() {
            Bundle::load(&folder).map_err(|e| e.to_string())?
        } else {
            let archive = bundles.join(format!("{}.tar.partial", args.transfer));
            self.write_transfer(args, &archive)?;
            let unpacking = bundles.join(format!("{name}.partial"));
            let _ = std::fs::remove_dir_all(&unpacking);
            let limits = UnpackLimits { max_files: MAX_BUNDLE_FILES, max_bytes: self.config.mqtt.max_transfer_bytes };
            let file = std::fs::File::open(&archive).map_err(|e| format!("{}: {e}", archive.display()))?;
            let unpacked = archive::unpack(std::io::BufReader::new(file), &unpacking, limits);
            let _ = std::fs::remove_file(&archive);
            let loaded = unpacked
                .map_err(|problem| format!("the bundle archive: {problem}"))
                .and_then(|_| Bundle::load(&unpacking).map_err(|error| format!("the unpacked bundle: {error}")));
            let mut bundle = match loaded {
                Ok(bundle) if bundle.id() == args.bundle => bundle,
                other => {
                    let _ = std::fs::remove_dir_all(&unpacking);
                    return Err(match other {
                        Ok(bundle) => format!("the archive holds bundle {}, not {}", bundle.id(), args.bundle),
                        Err(problem) => problem,
                    });
                }
            };
            std::fs::rename(&unpacking, &folder).map_err(|e| format!("{}: {e}", folder.display()))?;
            let _ = std::fs::File::open(&bundles).and_then(|dir| dir.sync_all());
            bundle.dir = folder.clone();
            bundle
        };
        if bundle.id() != args.bundle {
            return Err(format!("{} holds bundle {}, not {}", folder.display(), bundle.id(), args.bundle));
        }
        self.lock()
            .store()
            .push_event(&step(&args.transfer, &args.bundle, DeploymentState::Unpacked, json!({ "folder": name })))
            .map_err(|e| e.to_string())?;
        let (classifier, warmup) =
            Classifier::open_warm(bundle, &self.config.runtime, &super::log_warmup).map_err(|e| e.to_string())?;
        let detail = serde_json::to_value(&warmup).expect("warm-ups serialise");
        self.lock()
            .store()
            .push_event(&step(&args.transfer, &args.bundle, DeploymentState::WarmedUp, detail))
            .map_err(|e| e.to_string())?;
        Ok((Loaded::new(classifier).map_err(|e| e.to_string())?, name))
    }

    /// Writes the transfer's chunks to `path` one at a time, and checks the whole against the
    /// sha256 the operator signed.
    fn write_transfer(&self, args: &DeployArgs, path: &Path) -> Result<(), String> {
        let manifest = self
            .lock()
            .store()
            .transfer_manifest(&args.transfer)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no transfer {} here; offer it first", args.transfer))?;
        if manifest.kind != ArtefactKind::Bundle {
            return Err(format!("transfer {} is a {:?}, not a bundle", args.transfer, manifest.kind));
        }
        if !manifest.sha256.eq_ignore_ascii_case(&args.sha256) {
            return Err(format!(
                "transfer {}'s sha256 is not the one the deploy command was signed for",
                args.transfer
            ));
        }
        let mut file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut hasher = Sha256::new();
        for index in 0..manifest.chunks() {
            let chunk = self.lock().store().transfer_chunk(&args.transfer, index).map_err(|e| e.to_string())?;
            let chunk =
                chunk.ok_or_else(|| format!("transfer {} lacks chunk {index}; offer it again", args.transfer))?;
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        file.sync_all().map_err(|e| format!("{}: {e}", path.display()))?;
        let actual = hex::encode(hasher.finalize());
        if !actual.eq_ignore_ascii_case(&args.sha256) {
            let _ = std::fs::remove_file(path);
            self.lock().store().drop_transfer(&args.transfer).map_err(|e| e.to_string())?;
            return Err(format!(
                "the bundle's sha256 is {actual}, not the signed {}; the transfer starts over",
                args.sha256
            ));
        }
        Ok(())
    }

    /// Classifies recent images with the served version and the new bundle.
    fn shadow(&self, mut candidate: Loaded) -> (Loaded, health::ShadowReport) {
        let images = self.lock().store().shadow_images(SHADOW_IMAGES).unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot list the images to shadow the new bundle on");
            Vec::new()
        });
        let mut observations = Vec::new();
        for batch in images.chunks(SHADOW_BATCH) {
            let mut agent = self.lock();
            let bytes: Vec<(ShadowImage, Vec<u8>)> = batch
                .iter()
                .filter_map(|image| agent.store().shadow_image_bytes(image).ok().flatten().map(|b| (image.clone(), b)))
                .collect();
            let named: Vec<(&str, &[u8])> = bytes.iter().map(|(_, b)| ("shadow image", b.as_slice())).collect();
            let served = agent.predict_quietly(&named);
            drop(agent);
            let new = predict_with(&mut candidate.classifier, &named);
            for (((image, _), served), new) in bytes.iter().zip(served).zip(new) {
                // An image the served model cannot read says nothing about the new one.
                if let Some(served) = served {
                    observations.push(Observation { served, candidate: new, label: image.label().map(String::from) });
                }
            }
        }
        (candidate, health::report(&observations))
    }

    /// Ends a probation that is due: in service, or switched back. Called each second.
    pub fn check_probation(self: &Arc<Self>) -> Result<(), AgentError> {
        let mut agent = self.lock();
        let Some((probation, record)) = agent.probation.clone() else { return Ok(()) };
        let event = |state, detail| step(&probation.transfer, &probation.bundle, state, detail);
        match probation::judge(&probation, record, crate::store::now_ms()) {
            Verdict::Continue => Ok(()),
            Verdict::InService => {
                let lost = agent.store().samples_of_other_bundles()?;
                let detail = json!({ "classified": record.classified, "samples_without_images": lost });
                agent.store().set_probation(None, Some(&event(DeploymentState::InService, detail)))?;
                agent.probation = None;
                agent.previous = None;
                tracing::info!(bundle = %probation.bundle, "the new bundle is in service");
                drop(agent);
                self.spawn_reextraction();
                Ok(())
            }
            Verdict::SwitchBack(reason) => {
                tracing::warn!(%reason, "switching back to the previous bundle");
                let previous = agent.previous.take().expect("a probation keeps the previous bundle loaded");
                let switch = BundleSwitch {
                    bundle: &probation.previous_bundle,
                    dir: probation.previous_dir.as_deref(),
                    probation: None,
                };
                agent.probation = None;
                agent.swap_bundle(
                    previous,
                    &switch,
                    &event(DeploymentState::SwitchedBack, json!({ "reason": reason })),
                )?;
                Ok(())
            }
        }
    }
}

impl Agent {
    /// Gives up to `batch` samples whose kept images another bundle's trunk read this bundle's
    /// split tensors; how many were done (0: none left). An image that no longer decodes keeps
    /// its old tensors, so the sample stays out of this bundle's training.
    pub fn reextract_samples(&mut self, batch: usize) -> Result<usize, AgentError> {
        let pending = self.store.samples_to_reextract(batch)?;
        if pending.is_empty() {
            return Ok(0);
        }
        let named: Vec<(&str, &[u8])> =
            pending.iter().map(|(_, image)| ("kept sample image", image.as_slice())).collect();
        let prepared = prepare_bytes(&named, &self.classifier.bundle.manifest.input, &self.limits);
        let ready: Vec<(i64, ndarray::Array3<f32>)> =
            pending.iter().zip(prepared).filter_map(|((id, _), p)| p.ok().map(|input| (*id, input))).collect();
        if ready.len() < pending.len() {
            tracing::warn!(
                count = pending.len() - ready.len(),
                "kept sample images that no longer decode stay with the old bundle"
            );
        }
        let rows = self.extract(ready.iter().map(|(_, input)| input.view()).collect())?;
        let updates: Vec<(i64, Vec<u8>)> = ready.iter().map(|(id, _)| *id).zip(rows).collect();
        self.store.set_sample_features(&updates)?;
        Ok(pending.len())
    }
}

impl Shared {
    /// Re-extracts the samples another bundle made, on a thread of its own (taking the lock a
    /// batch at a time), then adapts the new bundle with them through the gate.
    pub fn spawn_reextraction(self: &Arc<Self>) {
        let shared = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("re-extraction".into()).spawn(move || {
            let mut done = 0;
            loop {
                match shared.lock().reextract_samples(SHADOW_BATCH) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(error) => {
                        tracing::warn!(%error, "cannot re-extract the kept sample images");
                        return;
                    }
                }
            }
            if done == 0 {
                return;
            }
            tracing::info!(samples = done, "kept sample images read again with the new bundle; adapting it");
            if let Err(error) = shared.start_run(None, true, super::shared::Origin::Deploy) {
                tracing::warn!(%error, "the new bundle's adaptation did not start");
            }
        });
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the re-extraction");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_folders_have_plain_names_that_keep_the_hash() {
        assert_eq!(folder_name("fonts36@0123456789abcdef"), "fonts36-0123456789abcdef");
        assert_eq!(folder_name("../../etc@00ff"), "etc-00ff");
        let long = format!("{}@{}", "x".repeat(300), "ab".repeat(8));
        assert!(folder_name(&long).ends_with("abababababababab") && folder_name(&long).len() <= 96);
    }
}
