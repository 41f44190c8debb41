//! The device agent's core: labelled-sample ingest (`ingest`), classification with the served
//! version (`traffic`), adaptation runs through the safety gate (`run`), versions, rollback and
//! status (`versions`). Synchronous and single-owner; the daemon (`daemon`) puts it behind a
//! lock and runs the training part of a run without it.

mod adopt;
pub mod client;
pub mod commands;
pub mod console;
pub mod counters;
pub mod daemon;
pub mod deploy;
mod fleet_port;
pub mod folders;
pub mod http;
mod ingest;
pub mod listen;
pub mod lock;
pub mod nearest;
pub mod policy;
mod run;
pub mod shared;
mod traffic;
mod transfers;
mod versions;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adapt::data::SplitSet;
use crate::adapt::train::AdaptError;
use crate::config::DeviceConfig;
use crate::imaging::DecodeLimits;
use crate::inference::{Calibration, Classifier};
use crate::model::Bundle;
use crate::network::{Network, weights};
use crate::protocol::events::{Event, EventKind};
use crate::store::{Store, StoreError};
use counters::Counters;

pub use ingest::{IngestError, Ingested, Labelled};
pub use run::{RunOutcome, RunPlan, RunProgress, RunSummary, execute};
pub use versions::{Status, VersionSummary, stopped_status};

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

pub struct Agent {
    config: DeviceConfig,
    classifier: Classifier,
    store: Store,
    source: Network,
    serving: i64,
    counters: Counters,
    pending_traffic: Vec<Vec<u8>>,
    /// Classified images not yet written to the store, for the console.
    pending_images: Vec<crate::store::NewTrafficImage>,
    traffic_rows: usize,
    reference: Option<SplitSet>,
    limits: DecodeLimits,
    /// A new bundle's first minutes of service, and what it did so far.
    probation: Option<(crate::deploy::probation::Probation, crate::deploy::probation::Record)>,
    /// The bundle served before, kept loaded through the probation for a switch back.
    previous: Option<deploy::Loaded>,
}

/// Logs the start-up warm-up every ten seconds: a first TensorRT engine build takes minutes.
pub fn log_warmup(elapsed: std::time::Duration) {
    let seconds = elapsed.as_secs();
    if seconds.is_multiple_of(10) {
        tracing::info!(seconds, "warming up the model");
    }
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
        let mut store = Store::open_any(&store_path(data_dir))?;
        Agent::switch_back_at_start(&mut store)?;
        let dir = deploy::bundle_folder(config, data_dir, store.bundle_dir()?.as_deref());
        let bundle = Bundle::load(&dir).map_err(|e| AgentError::Bundle { dir: dir.clone(), problem: e.to_string() })?;
        store.claim_bundle_named(&bundle.id(), &bundle.legacy_id())?;
        let (classifier, warmup) = Classifier::open_warm(bundle, &config.runtime, warming_up)?;
        let deploy::Loaded { classifier, source, reference } = deploy::Loaded::new(classifier)?;
        let traffic_rows = store.traffic()?.len();
        let mut agent = Agent {
            config: config.clone(),
            classifier,
            store,
            source,
            serving: 0,
            counters: Counters::default(),
            pending_traffic: Vec::new(),
            pending_images: Vec::new(),
            traffic_rows,
            reference,
            limits: DecodeLimits::default(),
            probation: None,
            previous: None,
        };
        agent.note_interrupted_run()?;
        agent.store.push_event(&Event::RuntimeWarmedUp(serde_json::to_value(&warmup).expect("serialises")))?;
        let promoted = agent.store.promoted()?;
        if let Err(error) = agent.serve(promoted) {
            tracing::error!(%error, "cannot serve the promoted version; serving the source model");
            agent.store.push_event(&Event::VersionLoadFailed { version: promoted, error: error.to_string() })?;
            agent.serve(0)?;
        }
        Ok(agent)
    }

    /// A run that started but never ended was cut short by a crash or power loss. It is recorded
    /// as ended, so a run that takes the process down is not started again until new labels come.
    fn note_interrupted_run(&mut self) -> Result<(), AgentError> {
        let started = EventKind::AdaptationStarted;
        let mut run_kinds = vec![started];
        run_kinds.extend(EventKind::RUN_ENDS);
        if let Some(started) = self.store.last_event_of(&run_kinds)?.filter(|e| e.kind == started.as_str()) {
            let last_sample_id = started.payload["samples"]["last_sample_id"].as_i64().unwrap_or(0);
            let method = started.payload["method"].clone();
            tracing::warn!(%method, "the last adaptation run was interrupted");
            let interrupted = Event::AdaptationInterrupted { method, started_event: started.id };
            self.store.record_failed_run(last_sample_id, &interrupted)?;
        }
        Ok(())
    }

    /// Takes the sections a running agent can change (see [`DeviceConfig::reload_plan`]).
    pub fn reload(&mut self, new: &DeviceConfig) -> Result<(Vec<&'static str>, Vec<&'static str>), AgentError> {
        let (applied, restart) = self.config.reload_plan(new);
        self.config.gate = new.gate.clone();
        self.config.adaptation = new.adaptation.clone();
        self.config.labelling = new.labelling.clone();
        self.store.push_event(&Event::ConfigReloaded {
            applied: applied.iter().map(|s| s.to_string()).collect(),
            needs_restart: restart.iter().map(|s| s.to_string()).collect(),
        })?;
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
        if let (Some(made_on), Some(serving)) = (self.store.version_bundle(id)?, self.store.bundle()?)
            && made_on != serving
        {
            return Err(problem(format!("was made on bundle {made_on}; this device now serves {serving}")));
        }
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

/// The data folder's layout.
pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("store.db")
}
