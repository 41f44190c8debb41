//! Versions and status: rollback, the policy in force, what `status` and the fleet report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::adapt::method::Method;
use crate::config::{AdaptationConfig, DeviceConfig};
use crate::model::Bundle;
use crate::protocol::VersionRef;
use crate::protocol::commands::PolicyUpdate;
use crate::protocol::counters::CountersReport;
use crate::store::{Store, VersionRecord, VersionStatus};

use super::counters::Counters;
use super::{Agent, AgentError, RunProgress, store_path};
use crate::protocol::events::Event;

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
    /// The served bundle's name, and its id: the name and a hash of what the bundle means, which
    /// tells two bundles of one name apart.
    pub bundle: String,
    pub bundle_id: String,
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

/// The status of an agent that is not running, read from its bundle and store: no model is
/// loaded and nothing is written. The served version is the one it would serve (the promoted
/// one), and the provider is the configured order, since no runtime has chosen one.
pub fn stopped_status(config: &DeviceConfig) -> Result<Status, AgentError> {
    let data_dir = config.require_data_dir().map_err(AgentError::Config)?;
    let mut store = Store::open_any(&store_path(data_dir))?;
    let dir = super::deploy::bundle_folder(config, data_dir, store.bundle_dir()?.as_deref());
    let bundle = Bundle::load(&dir).map_err(|e| AgentError::Bundle { dir: dir.clone(), problem: e.to_string() })?;
    store.claim_bundle_named(&bundle.id(), &bundle.legacy_id())?;
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
        bundle_id: bundle.id(),
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

impl Agent {
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
        self.store.promote(id, &Event::VersionRollback { from, to: id })?;
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
        self.store.push_event(&Event::PolicyChanged(serde_json::to_value(&policy).expect("policy serialises")))?;
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
}
