//! The device agent's core: labelled-sample ingest, classification with the served version,
//! adaptation runs through the safety gate, and rollback. Synchronous and single-owner; the
//! daemon (`daemon`) puts it behind a lock and runs the training part of a run without it.

pub mod client;
pub mod commands;
pub mod counters;
pub mod daemon;
mod fleet_port;
pub mod folders;
pub mod http;
pub mod listen;
pub mod lock;
pub mod nearest;
pub mod policy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::Array2;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::adapt::data::SplitSet;
use crate::adapt::gate::{self, GateDecision, GateInput};
use crate::adapt::health::{self, Health};
use crate::adapt::method::{self, AdaptInput, Adapted, Hyper, Method, Traffic};
use crate::adapt::train::{AdaptError, Cancel};
use crate::config::{AdaptationConfig, DeviceConfig, GateConfig};
use crate::imaging::{self, DecodeLimits};
use crate::inference::{Calibration, Classifier, Prediction, predict, prepare_bytes};
use crate::model::Bundle;
use crate::network::{Network, weights};
use crate::protocol::VersionRef;
use crate::protocol::commands::PolicyUpdate;
use crate::store::{EventRecord, NewSample, NewVersion, Split, Store, StoreError, VersionRecord, VersionStatus};
use counters::{Counters, CountersReport};

/// Unlabelled traffic rows are written to the store in groups of this many.
const TRAFFIC_FLUSH_ROWS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error("cannot load bundle {dir}: {problem}")]
    Bundle { dir: PathBuf, problem: String },
    #[error(transparent)]
    Inference(#[from] crate::inference::InferenceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Adapt(#[from] AdaptError),
    #[error("version {id}: {problem}")]
    Version { id: i64, problem: String },
    #[error("{0}")]
    Input(String),
    /// A requested run would repeat the newest version ([`policy::repeats_last_version`]).
    #[error("{0}")]
    NothingNew(String),
}

/// Why one labelled sample was refused. Nothing of a refused sample is stored.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IngestError {
    /// `hint` names the nearest classes ([`nearest::class_hint`]).
    #[error("unknown class '{class}'; {hint}")]
    UnknownClass { class: String, hint: String },
    #[error("{what}: {problem}")]
    BadImage { what: String, problem: String },
    #[error("{what}: already stored as sample {id} of class '{class}'")]
    Duplicate { what: String, id: i64, class: String },
    #[error("{what}: {problem}")]
    Failed { what: String, problem: String },
}

impl IngestError {
    /// What is wrong, without the file's name, for messages that name the file themselves.
    pub fn problem(&self) -> String {
        let full = self.to_string();
        match self {
            IngestError::UnknownClass { .. } => full,
            IngestError::BadImage { what, .. }
            | IngestError::Duplicate { what, .. }
            | IngestError::Failed { what, .. } => {
                full.strip_prefix(&format!("{what}: ")).map(str::to_string).unwrap_or(full)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingested {
    pub id: i64,
    pub class: String,
    pub split: Split,
    pub sha256: String,
}

/// One labelled image offered for ingest.
pub struct Labelled<'a> {
    /// File name or other description, for messages.
    pub what: &'a str,
    pub bytes: &'a [u8],
    pub class: &'a str,
}

/// Everything a run needs, copied out of the agent so training runs without holding it.
pub struct RunPlan {
    pub method_name: String,
    method: Method,
    pub parent: i64,
    pub seen: Vec<String>,
    /// Classes with labels but too few training samples to count as seen in this run.
    pub skipped: Vec<String>,
    train: SplitSet,
    validation: SplitSet,
    traffic: Option<Traffic>,
    reference: Option<SplitSet>,
    source: Network,
    current: Adapted,
    classes: usize,
    hyper: Hyper,
    seed: u64,
    gate: GateConfig,
    last_sample_id: i64,
    pub sample_set: serde_json::Value,
}

impl RunPlan {
    /// Training steps the run takes, for progress reports.
    pub fn planned_steps(&self) -> usize {
        method::planned_steps(&self.method, &self.hyper)
    }
}

/// The result of the compute part of a run.
pub struct RunOutcome {
    adapted: Adapted,
    adapter_rank: usize,
    pub gate_input: GateInput,
    pub decision: GateDecision,
    pub health: Health,
    /// The source model's accuracy on the seen classes' validation samples: the gate compares
    /// with the served version, reports compare every figure with the source model.
    pub source_seen_validation: Option<f32>,
    pub seconds: f64,
}

/// What a finished run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub version: i64,
    pub promoted: bool,
    pub method: String,
    pub reasons: Vec<String>,
    pub metrics: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionSummary {
    pub id: i64,
    pub parent: Option<i64>,
    pub status: VersionStatus,
    pub method: String,
    pub created_ms: i64,
    pub reasons: Vec<String>,
    pub metrics: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub device_id: String,
    pub bundle: String,
    pub provider: String,
    /// The version being served.
    pub serving: i64,
    pub versions: Vec<VersionSummary>,
    /// Labelled samples per class: training, validation.
    pub samples: BTreeMap<String, (usize, usize)>,
    pub new_labels_since_last_run: usize,
    pub last_run_ms: Option<i64>,
    pub traffic_samples: usize,
    pub undelivered_events: usize,
    pub classification: CountersReport,
    /// The run in progress, set by the daemon.
    pub running: Option<RunProgress>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunProgress {
    pub method: String,
    pub step: usize,
    pub steps: usize,
}

pub struct Agent {
    config: DeviceConfig,
    classifier: Classifier,
    store: Store,
    source: Network,
    serving: i64,
    counters: Counters,
    pending_traffic: Vec<Vec<u8>>,
    traffic_rows: usize,
    reference: Option<SplitSet>,
    limits: DecodeLimits,
}

/// Logs the start-up warm-up every ten seconds: a first TensorRT engine build takes minutes.
pub fn log_warmup(elapsed: std::time::Duration) {
    let seconds = elapsed.as_secs();
    if seconds.is_multiple_of(10) {
        tracing::info!(seconds, "warming up the model");
    }
}

pub fn event(kind: &str, payload: serde_json::Value) -> EventRecord {
    EventRecord { kind: kind.to_string(), payload }
}

impl Agent {
    /// Opens the bundle, the runtime and the store, and serves the promoted version. A promoted
    /// version that cannot be loaded is reported and the source model is served instead.
    pub fn open(config: &DeviceConfig) -> Result<Agent, AgentError> {
        Agent::open_with_progress(config, &log_warmup)
    }

    /// [`Agent::open`], calling `warming_up` about once a second while the model warms up.
    pub fn open_with_progress(
        config: &DeviceConfig,
        warming_up: &(dyn Fn(std::time::Duration) + Sync),
    ) -> Result<Agent, AgentError> {
        let data_dir = config.require_data_dir().map_err(AgentError::Config)?;
        let bundle = Bundle::load(&config.bundle)
            .map_err(|e| AgentError::Bundle { dir: config.bundle.clone(), problem: e.to_string() })?;
        let reference = match bundle.reference() {
            Ok(Some((split, labels))) => Some(SplitSet::from_onnx(split.view(), labels).map_err(AgentError::Input)?),
            Ok(None) => None,
            Err(e) => return Err(AgentError::Bundle { dir: config.bundle.clone(), problem: e.to_string() }),
        };
        let store = Store::open(&store_path(data_dir), &bundle.id())?;
        let (classifier, warmup) = Classifier::open_warm(bundle, &config.runtime, warming_up)?;
        let source = Network::from_bundle(&classifier.bundle);
        let traffic_rows = store.traffic()?.len();
        let mut agent = Agent {
            config: config.clone(),
            classifier,
            store,
            source,
            serving: 0,
            counters: Counters::default(),
            pending_traffic: Vec::new(),
            traffic_rows,
            reference,
            limits: DecodeLimits::default(),
        };
        agent.note_interrupted_run()?;
        agent.store.push_event(&event("runtime.warmed_up", serde_json::to_value(&warmup).expect("serialises")))?;
        let promoted = agent.store.promoted()?;
        if let Err(error) = agent.serve(promoted) {
            tracing::error!(%error, "cannot serve the promoted version; serving the source model");
            agent.store.push_event(&event(
                "version.load_failed",
                serde_json::json!({ "version": promoted, "error": error.to_string() }),
            ))?;
            agent.serve(0)?;
        }
        Ok(agent)
    }

    /// A run that started but never ended was cut short by a crash or power loss. It is recorded
    /// as ended, so a run that takes the process down is not started again until new labels come.
    fn note_interrupted_run(&mut self) -> Result<(), AgentError> {
        let run_kinds = [
            "adaptation.started",
            "adaptation.failed",
            "adaptation.cancelled",
            "adaptation.source_kept",
            "version.promoted",
            "version.rejected",
        ];
        if let Some(started) = self.store.last_event_of(&run_kinds)?.filter(|e| e.kind == "adaptation.started") {
            let last_sample_id = started.payload["samples"]["last_sample_id"].as_i64().unwrap_or(0);
            let payload = serde_json::json!({ "method": started.payload["method"], "started_event": started.id });
            tracing::warn!(method = %started.payload["method"], "the last adaptation run was interrupted");
            self.store.record_failed_run(last_sample_id, &event("adaptation.interrupted", payload))?;
        }
        Ok(())
    }

    /// Takes the sections a running agent can change (see [`DeviceConfig::reload_plan`]).
    pub fn reload(&mut self, new: &DeviceConfig) -> Result<(Vec<&'static str>, Vec<&'static str>), AgentError> {
        let (applied, restart) = self.config.reload_plan(new);
        self.config.gate = new.gate.clone();
        self.config.adaptation = new.adaptation.clone();
        self.config.labelling = new.labelling.clone();
        self.store.push_event(&event(
            "config.reloaded",
            serde_json::json!({ "applied": applied, "needs_restart": restart }),
        ))?;
        Ok((applied, restart))
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    pub fn classes(&self) -> &[String] {
        &self.classifier.bundle.head.classes
    }

    pub fn store(&mut self) -> &mut Store {
        &mut self.store
    }

    pub fn serving(&self) -> i64 {
        self.serving
    }

    /// Loads version `id` into the classifier (without changing what is promoted).
    fn serve(&mut self, id: i64) -> Result<(), AgentError> {
        let (network, calibration) = self.load_version(id)?;
        self.classifier.set_model(network, calibration);
        self.serving = id;
        Ok(())
    }

    fn load_version(&self, id: i64) -> Result<(Network, Calibration), AgentError> {
        if id == 0 {
            return Ok((self.source.clone(), Calibration::default()));
        }
        let record = self.store.version(id)?;
        let problem = |problem: String| AgentError::Version { id, problem };
        let bytes = record.weights.as_deref().ok_or_else(|| problem("has no weights".into()))?;
        let stored: StoredParams =
            serde_json::from_value(record.params.clone()).map_err(|e| problem(format!("parameters: {e}")))?;
        let network = weights::decode(bytes, &self.source, stored.adapter_rank, &format!("version {id} weights"))
            .map_err(problem)?;
        let classes = self.classes();
        let unseen = stored
            .unseen
            .iter()
            .map(|name| {
                classes.iter().position(|c| c == name).ok_or_else(|| problem(format!("unknown unseen class '{name}'")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !stored.gamma.is_finite() {
            return Err(problem(format!("calibration γ {} is not finite", stored.gamma)));
        }
        Ok((network, Calibration { gamma: stored.gamma, unseen }))
    }

    /// Ingests labelled images: decodes them, extracts their split tensors in one trunk batch
    /// and stores them in one transaction. Each image gets its own result; an `Ok` is durable.
    pub fn ingest(&mut self, items: &[Labelled<'_>], origin: &str) -> Vec<Result<Ingested, IngestError>> {
        let classes = self.classes().to_vec();
        let mut results: Vec<Option<Result<Ingested, IngestError>>> = vec![None; items.len()];
        let mut candidates = Vec::new();
        for (index, item) in items.iter().enumerate() {
            if !classes.iter().any(|c| c == item.class) {
                results[index] = Some(Err(IngestError::UnknownClass {
                    class: item.class.to_string(),
                    hint: nearest::class_hint(item.class, &classes),
                }));
                continue;
            }
            let sha = hex::encode(Sha256::digest(item.bytes));
            match self.store.find_sample(&sha) {
                Ok(Some((id, class))) => {
                    results[index] = Some(Err(IngestError::Duplicate { what: item.what.to_string(), id, class }))
                }
                Ok(None) => candidates.push((index, sha)),
                Err(e) => {
                    results[index] = Some(Err(IngestError::Failed { what: item.what.into(), problem: e.to_string() }))
                }
            }
        }
        let encoded: Vec<(&str, &[u8])> = candidates.iter().map(|(i, _)| (items[*i].what, items[*i].bytes)).collect();
        let prepared = prepare_bytes(&encoded, &self.classifier.bundle.manifest.input, &self.limits);
        let mut ready = Vec::new();
        for ((index, sha), outcome) in candidates.into_iter().zip(prepared) {
            match outcome {
                Ok(input) => ready.push((index, sha, input)),
                Err(e) => {
                    results[index] =
                        Some(Err(IngestError::BadImage { what: items[index].what.to_string(), problem: e.problem() }))
                }
            }
        }
        if !ready.is_empty() {
            let outcome = self.extract(ready.iter().map(|(_, _, input)| input.view()).collect());
            match outcome {
                Err(e) => {
                    for (index, _, _) in &ready {
                        results[*index] = Some(Err(IngestError::Failed {
                            what: items[*index].what.to_string(),
                            problem: e.to_string(),
                        }));
                    }
                }
                Ok(rows) => self.store_samples(items, &ready, rows, origin, &mut results),
            }
        }
        results.into_iter().map(|r| r.expect("every item has a result")).collect()
    }

    fn store_samples(
        &mut self,
        items: &[Labelled<'_>],
        ready: &[(usize, String, ndarray::Array3<f32>)],
        rows: Vec<Vec<u8>>,
        origin: &str,
        results: &mut [Option<Result<Ingested, IngestError>>],
    ) {
        let keep_images = self.config.labelling.keep_images;
        let site = self.config.labelling.site.clone();
        let samples: Vec<NewSample<'_>> = ready
            .iter()
            .zip(&rows)
            .map(|((index, sha, _), features)| NewSample {
                sha256: sha,
                class: items[*index].class,
                origin,
                site: site.as_deref(),
                image: keep_images.then_some(items[*index].bytes),
                features,
            })
            .collect();
        let every = self.config.labelling.validation_every;
        let stored = self.store.insert_samples(
            &samples,
            |n| policy::split_for(n, every),
            |sample, id, split| {
                event(
                    "sample.ingested",
                    serde_json::json!({ "id": id, "class": sample.class, "split": split, "origin": sample.origin }),
                )
            },
        );
        match stored {
            Ok(outcomes) => {
                for (((index, sha, _), outcome), sample) in ready.iter().zip(outcomes).zip(&samples) {
                    results[*index] = Some(match outcome {
                        Ok((id, split)) => {
                            Ok(Ingested { id, class: sample.class.to_string(), split, sha256: sha.clone() })
                        }
                        Err(StoreError::Duplicate { id, class, .. }) => {
                            Err(IngestError::Duplicate { what: items[*index].what.to_string(), id, class })
                        }
                        Err(e) => Err(IngestError::Failed { what: items[*index].what.into(), problem: e.to_string() }),
                    });
                }
            }
            Err(e) => {
                for (index, _, _) in ready {
                    results[*index] =
                        Some(Err(IngestError::Failed { what: items[*index].what.into(), problem: e.to_string() }));
                }
            }
        }
    }

    /// Split tensors of prepared inputs, one f16 row block per sample.
    fn extract(&mut self, inputs: Vec<ndarray::ArrayView3<'_, f32>>) -> Result<Vec<Vec<u8>>, AgentError> {
        let batch = imaging::stack(&inputs);
        let split = self.classifier.split(batch.view())?;
        let set = SplitSet::from_onnx(split.view(), vec![0; inputs.len()]).map_err(AgentError::Input)?;
        Ok((0..set.len()).map(|i| encode_features(&set, i)).collect())
    }

    /// Classifies encoded images with the served version. Counts each result and keeps the
    /// split tensors as unlabelled traffic.
    pub fn classify(&mut self, images: &[(&str, &[u8])], top_k: usize) -> Vec<Result<Prediction, String>> {
        let started = Instant::now();
        let mut results: Vec<Option<Result<Prediction, String>>> = vec![None; images.len()];
        let mut ready = Vec::new();
        let prepared = prepare_bytes(images, &self.classifier.bundle.manifest.input, &self.limits);
        for (index, outcome) in prepared.into_iter().enumerate() {
            match outcome {
                Ok(input) => ready.push((index, input)),
                Err(e) => results[index] = Some(Err(e.to_string())),
            }
        }
        if !ready.is_empty() {
            let batch = imaging::stack(&ready.iter().map(|(_, input)| input.view()).collect::<Vec<_>>());
            let outcome = self.classifier.split(batch.view()).and_then(|split| {
                let logits = self.classifier.logits_from_split(split.view())?;
                Ok((split, logits))
            });
            match outcome {
                Ok((split, logits)) => {
                    let predictions = predict(logits.view(), self.classes(), top_k);
                    if let Ok(set) = SplitSet::from_onnx(split.view(), vec![0; ready.len()]) {
                        self.pending_traffic.extend((0..set.len()).map(|i| encode_features(&set, i)));
                    }
                    for ((index, _), prediction) in ready.iter().zip(predictions) {
                        results[*index] = Some(Ok(prediction));
                    }
                }
                Err(e) => {
                    for (index, _) in &ready {
                        results[*index] = Some(Err(e.to_string()));
                    }
                }
            }
        }
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let results: Vec<_> = results.into_iter().map(|r| r.expect("every image has a result")).collect();
        for result in &results {
            match result {
                Ok(prediction) => self.counters.record(&prediction.class, prediction.confidence, latency_ms),
                Err(_) => self.counters.record_failure(),
            }
        }
        if self.pending_traffic.len() >= TRAFFIC_FLUSH_ROWS
            && let Err(error) = self.flush_traffic()
        {
            tracing::warn!(%error, "cannot store unlabelled traffic");
        }
        results
    }

    /// Writes buffered traffic rows to the store.
    pub fn flush_traffic(&mut self) -> Result<(), AgentError> {
        if self.pending_traffic.is_empty() {
            return Ok(());
        }
        let keep = self.config.watch.keep_traffic;
        self.store.add_traffic(&self.pending_traffic, keep)?;
        self.traffic_rows = (self.traffic_rows + self.pending_traffic.len()).min(keep);
        self.pending_traffic.clear();
        Ok(())
    }

    /// Serves another version: `source` or an earlier promoted one. Atomic: the store's pointer
    /// moves in one transaction, then the classifier swaps weights.
    /// Serves version `to`. Asking for the version already served changes nothing and records
    /// no event, so repeated requests cannot flood the outbox.
    pub fn rollback(&mut self, to: VersionRef) -> Result<i64, AgentError> {
        let id = to.id();
        if id == self.serving {
            return Ok(id);
        }
        let (network, calibration) = self.load_version(id)?;
        let from = self.serving;
        self.store.promote(id, &event("version.rollback", serde_json::json!({ "from": from, "to": id })))?;
        self.classifier.set_model(network, calibration);
        self.serving = id;
        Ok(id)
    }

    pub fn status(&self) -> Result<Status, AgentError> {
        let provider = format!("{:?}", self.classifier.provider()).to_lowercase();
        let traffic = self.traffic_rows + self.pending_traffic.len();
        let mut status = store_status(&self.store, &self.config, &self.classifier.bundle, provider, traffic)?;
        status.serving = self.serving;
        status.classification = self.counters.report();
        Ok(status)
    }

    /// Labels added since the last run.
    pub fn new_labels(&self) -> Result<usize, AgentError> {
        let since = self.store.last_run()?.map_or(0, |(sample, _)| sample);
        Ok(self.store.count_samples_after(since)?)
    }

    /// When the last run ended (ms since the epoch).
    pub fn last_run_ms(&self) -> Result<Option<i64>, AgentError> {
        Ok(self.store.last_run()?.map(|(_, at)| at))
    }

    /// The adaptation policy in force: the config's, with changes made by fleet commands.
    pub fn policy(&self) -> Result<AdaptationConfig, AgentError> {
        match self.store.state("policy")? {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| AgentError::Input(format!("stored policy is not valid: {e}; remove it with set-policy"))),
            None => Ok(self.config.adaptation.clone()),
        }
    }

    /// Changes the policy durably; it holds across restarts until changed again.
    pub fn set_policy(&mut self, update: &PolicyUpdate) -> Result<AdaptationConfig, AgentError> {
        let mut policy = self.policy()?;
        if let Some(method) = &update.method {
            method.parse::<Method>().map_err(AgentError::Input)?;
            policy.method = method.clone();
        }
        if let Some(n) = update.after_new_labels {
            policy.after_new_labels = n;
        }
        if let Some(minutes) = update.every_minutes {
            policy.every_minutes = minutes;
        }
        let text = serde_json::to_string(&policy).expect("policy serialises");
        self.store.set_state("policy", &text)?;
        self.store.push_event(&event("policy.changed", serde_json::to_value(&policy).expect("policy serialises")))?;
        Ok(policy)
    }

    /// The served version's gate figures, method, γ and parent; `None` for the source model.
    pub fn served_version_metrics(&self) -> Result<Option<serde_json::Value>, AgentError> {
        if self.serving == 0 {
            return Ok(None);
        }
        let record = self.store.version(self.serving)?;
        Ok(Some(serde_json::json!({
            "version": record.id,
            "parent": record.parent,
            "method": record.method,
            "gamma": record.params["gamma"],
            "gate": record.metrics["gate"],
            "health": record.metrics["health"],
        })))
    }

    /// The newest adaptation run's version, promoted or rejected; `None` before the first run.
    pub fn last_adaptation(&self) -> Result<Option<crate::store::VersionRecord>, AgentError> {
        Ok(self.store.versions()?.into_iter().rev().find(|v| v.status != crate::store::VersionStatus::Source))
    }

    /// A version's weights as sent to the fleet: the JSON manifest and the chunks of the f16
    /// safetensors payload, each fitting `max_packet` bytes.
    pub fn weights_set(&self, version: i64, max_packet: usize) -> Result<(Vec<u8>, Vec<Vec<u8>>), AgentError> {
        if version == 0 {
            return Err(AgentError::Input(
                "version 0 is the source model: its weights are the bundle's own, there is nothing to publish".into(),
            ));
        }
        let record = self.store.version(version)?;
        let stored = record
            .weights
            .as_deref()
            .ok_or_else(|| AgentError::Version { id: version, problem: "has no weights".into() })?;
        let (payload, tensors) =
            crate::protocol::weights::to_f16(stored).map_err(|problem| AgentError::Version { id: version, problem })?;
        let bundle = self.classifier.bundle.id();
        let (manifest, chunks) =
            crate::protocol::weights::chunk(&payload, max_packet, |chunk_bytes, chunks, sha256| {
                crate::protocol::messages::WeightsManifest {
                    schema: crate::protocol::messages::WEIGHTS_SCHEMA.into(),
                    device: self.config.device_id.clone(),
                    version,
                    parent: record.parent,
                    method: record.method.clone(),
                    bundle,
                    dtype: "f16".into(),
                    tensors,
                    params: record.params.clone(),
                    total_bytes: payload.len(),
                    chunk_bytes,
                    chunks,
                    sha256,
                }
            });
        let manifest = serde_json::to_vec(&manifest).expect("manifests serialise");
        Ok((manifest, chunks.into_iter().map(<[u8]>::to_vec).collect()))
    }

    /// Copies what a run needs out of the store. `method` overrides the policy's. A run that
    /// would repeat the newest version (no new labels, same method) is refused with
    /// [`AgentError::NothingNew`] unless `force` is set.
    pub fn prepare_run(&mut self, method_name: Option<&str>, force: bool) -> Result<RunPlan, AgentError> {
        let policy = self.policy()?;
        let method_name = method_name.unwrap_or(&policy.method).to_string();
        let method: Method = method_name.parse().map_err(AgentError::Input)?;
        self.flush_traffic()?;
        let classes = self.classes().to_vec();
        let last_sample_id = self.store.last_sample_id()?;
        // Version 0, the source model, was trained on nothing here.
        let newest = self.store.versions()?.into_iter().filter(|v| v.id > 0).max_by_key(|v| v.id);
        let last = newest.as_ref().map(|v| policy::LastVersion {
            id: v.id,
            method: &v.method,
            last_sample_id: v.sample_set["last_sample_id"].as_i64().unwrap_or(0),
        });
        if let Some(reason) = policy::repeats_last_version(last, &method_name, last_sample_id, force) {
            return Err(AgentError::NothingNew(reason));
        }
        let samples = self.store.samples(None)?;
        let mut train_counts: BTreeMap<&str, usize> = BTreeMap::new();
        for sample in samples.iter().filter(|s| s.split == Split::Train) {
            *train_counts.entry(sample.class.as_str()).or_default() += 1;
        }
        let minimum = policy.min_samples_per_class;
        let seen: Vec<String> =
            train_counts.iter().filter(|(_, n)| **n >= minimum).map(|(c, _)| c.to_string()).collect();
        let skipped: Vec<String> =
            train_counts.iter().filter(|(_, n)| **n < minimum).map(|(c, _)| c.to_string()).collect();
        let (positions, channels) = self.split_layout();
        let build = |split: Split| -> Result<SplitSet, AgentError> {
            let chosen: Vec<_> = samples.iter().filter(|s| s.split == split && seen.contains(&s.class)).collect();
            let labels = chosen
                .iter()
                .map(|s| classes.iter().position(|c| *c == s.class).ok_or_else(|| unknown_label(&s.class)))
                .collect::<Result<Vec<_>, _>>()?;
            let rows: Vec<(i64, &[u8])> = chosen.iter().map(|s| (s.id, s.features.as_slice())).collect();
            decode_features(&rows, labels, positions, channels).map_err(AgentError::Input)
        };
        let train = build(Split::Train)?;
        let validation = build(Split::Validation)?;
        crate::adapt::train::validate(&self.source, &train, classes.len(), &classes)?;
        let traffic_rows: Vec<(i64, Vec<u8>)> =
            self.store.traffic()?.into_iter().enumerate().map(|(i, r)| (i as i64, r)).collect();
        let traffic = if traffic_rows.is_empty() {
            None
        } else {
            let rows: Vec<(i64, &[u8])> = traffic_rows.iter().map(|(i, r)| (*i, r.as_slice())).collect();
            let set = decode_features(&rows, vec![0; rows.len()], positions, channels).map_err(AgentError::Input)?;
            Some(Traffic::new(set, &self.source))
        };
        let (network, calibration) = self.classifier.model();
        let current = Adapted {
            network: network.clone(),
            gamma: calibration.gamma,
            unseen: calibration.unseen.clone(),
            notes: vec![],
        };
        let per_class: BTreeMap<&str, usize> = seen.iter().map(|c| (c.as_str(), train_counts[c.as_str()])).collect();
        let sample_set = serde_json::json!({
            "last_sample_id": last_sample_id,
            "train": train.len(),
            "validation": validation.len(),
            "train_per_class": per_class,
            "traffic": traffic.as_ref().map_or(0, |t| t.splits.len()),
        });
        Ok(RunPlan {
            method_name,
            method,
            parent: self.serving,
            seen,
            skipped,
            train,
            validation,
            traffic,
            reference: self.reference.clone(),
            source: self.source.clone(),
            current,
            classes: classes.len(),
            hyper: Hyper { gate: self.config.gate.clone(), ..Hyper::default() },
            seed: policy.seed,
            gate: self.config.gate.clone(),
            last_sample_id,
            sample_set,
        })
    }

    fn split_layout(&self) -> (usize, usize) {
        let shape = &self.classifier.bundle.manifest.trunk.output_shape;
        match shape.as_slice() {
            [c, h, w] => (h * w, *c),
            [d] => (1, *d),
            other => (1, other.iter().product()),
        }
    }

    /// Records a finished run: a new version, promoted or rejected by the gate, or, for a failed
    /// or cancelled run, an event and no version.
    pub fn commit_run(
        &mut self,
        plan: &RunPlan,
        outcome: Result<RunOutcome, AdaptError>,
    ) -> Result<RunSummary, AgentError> {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                let kind = match error {
                    AdaptError::Cancelled { .. } => "adaptation.cancelled",
                    // Not a fault: the method's own guards found nothing safer than the source.
                    AdaptError::SourceKept { .. } => "adaptation.source_kept",
                    _ => "adaptation.failed",
                };
                self.store.record_failed_run(
                    plan.last_sample_id,
                    &event(kind, serde_json::json!({ "method": plan.method_name, "error": error.to_string() })),
                )?;
                return Err(error.into());
            }
        };
        let classes = self.classes().to_vec();
        let weights = weights::encode(&outcome.adapted.network, &plan.source).map_err(AgentError::Input)?;
        let params = serde_json::to_value(StoredParams {
            seed: plan.seed,
            gamma: outcome.adapted.gamma,
            unseen: outcome.adapted.unseen.iter().map(|&c| classes[c].clone()).collect(),
            adapter_rank: outcome.adapter_rank,
            notes: outcome.adapted.notes.clone(),
        })
        .expect("parameters serialise");
        let metrics = serde_json::json!({
            "seen_classes": plan.seen,
            "gate": outcome.gate_input,
            "health": outcome.health,
            "source_seen_validation": outcome.source_seen_validation,
            "seconds": outcome.seconds,
            "skipped_classes": plan.skipped,
            "gate_skipped": outcome.decision.skipped,
        });
        let status = if outcome.decision.promote { VersionStatus::Promoted } else { VersionStatus::Rejected };
        let kind = if outcome.decision.promote { "version.promoted" } else { "version.rejected" };
        let payload = serde_json::json!({
            "method": plan.method_name,
            "parent": plan.parent,
            "reasons": outcome.decision.reasons,
            "metrics": metrics,
        });
        let id = self.store.insert_version(
            &NewVersion {
                parent: plan.parent,
                method: &plan.method_name,
                params: &params,
                sample_set: &plan.sample_set,
                metrics: &metrics,
                status,
                reasons: &outcome.decision.reasons,
                weights: &weights,
                last_sample_id: plan.last_sample_id,
            },
            &[event(kind, payload)],
        )?;
        if outcome.decision.promote {
            let calibration = Calibration { gamma: outcome.adapted.gamma, unseen: outcome.adapted.unseen.clone() };
            self.classifier.set_model(outcome.adapted.network, calibration);
            self.serving = id;
        }
        Ok(RunSummary {
            version: id,
            promoted: outcome.decision.promote,
            method: plan.method_name.clone(),
            reasons: outcome.decision.reasons,
            metrics,
        })
    }

    /// Records a run that could not start, so the policy waits for new labels before retrying.
    pub fn record_refused_run(&mut self, origin: &str, error: &AgentError) -> Result<(), AgentError> {
        let last = self.store.last_sample_id()?;
        let payload = serde_json::json!({ "origin": origin, "error": error.to_string() });
        Ok(self.store.record_failed_run(last, &event("adaptation.failed", payload))?)
    }

    /// Runs a whole adaptation in the calling thread (for the offline CLI); `force` as in
    /// [`Agent::prepare_run`].
    pub fn adapt_now(
        &mut self,
        method: Option<&str>,
        force: bool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<RunSummary, AgentError> {
        let plan = match self.prepare_run(method, force) {
            Ok(plan) => plan,
            // Nothing was tried: no failed run to record.
            Err(error @ AgentError::NothingNew(_)) => return Err(error),
            Err(error) => {
                self.record_refused_run("command", &error)?;
                return Err(error);
            }
        };
        let payload =
            serde_json::json!({ "method": plan.method_name, "origin": "command", "samples": plan.sample_set });
        self.store.push_event(&event("adaptation.started", payload))?;
        let outcome = execute(&plan, &Cancel::default(), progress);
        self.commit_run(&plan, outcome)
    }
}

/// The status of an agent that is not running, read from its bundle and store: no model is
/// loaded and nothing is written. The served version is the one it would serve (the promoted
/// one), and the provider is the configured order, since no runtime has chosen one.
pub fn stopped_status(config: &DeviceConfig) -> Result<Status, AgentError> {
    let data_dir = config.require_data_dir().map_err(AgentError::Config)?;
    let bundle = Bundle::load(&config.bundle)
        .map_err(|e| AgentError::Bundle { dir: config.bundle.clone(), problem: e.to_string() })?;
    let store = Store::open(&store_path(data_dir), &bundle.id())?;
    let providers: Vec<String> = config.runtime.providers.iter().map(ToString::to_string).collect();
    let provider = format!("{} (configured)", providers.join(", "));
    let traffic = store.traffic()?.len();
    let mut status = store_status(&store, config, &bundle, provider, traffic)?;
    status.serving = store.promoted()?;
    Ok(status)
}

/// What `status` reports from the store alone; the caller fills in the served version and the
/// counters.
fn store_status(
    store: &Store,
    config: &DeviceConfig,
    bundle: &Bundle,
    provider: String,
    traffic_samples: usize,
) -> Result<Status, AgentError> {
    let versions = store.versions()?.into_iter().map(summary).collect();
    let last_run = store.last_run()?;
    let since = last_run.map_or(0, |(sample, _)| sample);
    Ok(Status {
        device_id: config.device_id.clone(),
        bundle: bundle.manifest.name.clone(),
        provider,
        serving: 0,
        versions,
        samples: store.sample_counts()?,
        new_labels_since_last_run: store.count_samples_after(since)?,
        last_run_ms: last_run.map(|(_, at)| at),
        traffic_samples,
        undelivered_events: store.pending_events(100_000)?.len(),
        classification: Counters::default().report(),
        running: None,
    })
}

/// The compute part of a run: adapt, then measure what the gate needs. Needs no agent.
pub fn execute(
    plan: &RunPlan,
    cancel: &Cancel,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<RunOutcome, AdaptError> {
    let started = Instant::now();
    let teacher =
        Adapted { network: plan.source.clone(), gamma: 0.0, unseen: vec![], notes: vec![] }.logits_of(&plan.train);
    let input = AdaptInput {
        source: &plan.source,
        data: &plan.train,
        teacher: &teacher,
        classes: plan.classes,
        unlabelled: plan.traffic.as_ref(),
        reference: plan.reference.as_ref(),
    };
    let hyper = Hyper { cancel: cancel.clone(), ..plan.hyper.clone() };
    let steps = plan.planned_steps();
    let adapted = method::adapt(&plan.method, &input, &hyper, plan.seed, &mut |step| progress(step, steps))?;
    let source = Adapted { network: plan.source.clone(), gamma: 0.0, unseen: adapted.unseen.clone(), notes: vec![] };
    let health = health::estimate(&adapted, &source, plan.reference.as_ref(), plan.traffic.as_ref());
    let seen_validation = (!plan.validation.is_empty()).then(|| {
        (
            accuracy(&adapted.logits_of(&plan.validation), &plan.validation.labels),
            accuracy(&plan.current.logits_of(&plan.validation), &plan.validation.labels),
        )
    });
    let source_seen_validation =
        (!plan.validation.is_empty()).then(|| accuracy(&source.logits_of(&plan.validation), &plan.validation.labels));
    let gate_input = GateInput {
        seen_validation,
        unseen_rate: health.predicted_unseen_rate,
        reference_unseen: health.reference_unseen,
    };
    let decision = gate::decide(&gate_input, &plan.gate);
    // `recommended` trains an adapter on bundles without a trainable tail, so the network says.
    let adapter_rank = adapted.network.adapter_rank();
    Ok(RunOutcome {
        adapted,
        adapter_rank,
        gate_input,
        decision,
        health,
        source_seen_validation,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What a version needs besides its weights to be served again.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredParams {
    seed: u64,
    gamma: f32,
    unseen: Vec<String>,
    adapter_rank: usize,
    notes: Vec<String>,
}

fn summary(record: VersionRecord) -> VersionSummary {
    VersionSummary {
        id: record.id,
        parent: record.parent,
        status: record.status,
        method: record.method,
        created_ms: record.created_ms,
        reasons: record.reasons,
        metrics: record.metrics,
    }
}

fn accuracy(logits: &Array2<f32>, labels: &[usize]) -> f32 {
    crate::metrics::accuracy(labels, &crate::metrics::argmax_rows(logits.view())).unwrap_or(0.0) as f32
}

fn unknown_label(class: &str) -> AgentError {
    AgentError::Input(format!("stored sample of class '{class}', which this bundle does not have"))
}

/// One sample's rows of a split set as f16 little-endian bytes.
pub fn encode_features(set: &SplitSet, sample: usize) -> Vec<u8> {
    let rows = set.data.slice(ndarray::s![sample * set.positions..(sample + 1) * set.positions, ..]);
    rows.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Rebuilds a split set from stored rows, checking each row's size.
pub fn decode_features(
    rows: &[(i64, &[u8])],
    labels: Vec<usize>,
    positions: usize,
    channels: usize,
) -> Result<SplitSet, String> {
    let per_sample = positions * channels;
    let mut values = Vec::with_capacity(rows.len() * per_sample);
    for (id, bytes) in rows {
        if bytes.len() != per_sample * 2 {
            return Err(format!(
                "stored features of sample {id} have {} bytes, the bundle's split tensor needs {}",
                bytes.len(),
                per_sample * 2
            ));
        }
        values.extend(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])));
    }
    let data = Array2::from_shape_vec((rows.len() * positions, channels), values).map_err(|e| e.to_string())?;
    Ok(SplitSet { data, positions, labels })
}

/// The data folder's layout.
pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("store.db")
}
