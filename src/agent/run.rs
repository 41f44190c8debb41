//! An adaptation run: planned from the store, executed without the agent (so training does
//! not hold it), committed as a version the gate promotes or rejects.

use std::collections::BTreeMap;
use std::time::Instant;

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::adapt::data::{SplitSet, decode_features};
use crate::adapt::gate::{GateDecision, GateInput};
use crate::adapt::health::Health;
use crate::adapt::method::{AdaptInput, Adapted, Hyper, Method, Traffic};
use crate::adapt::train::{AdaptError, Cancel};
use crate::adapt::{gate, health, method};
use crate::config::GateConfig;
use crate::inference::Calibration;
use crate::network::{Network, weights};
use crate::store::{NewVersion, Split, VersionStatus};

use super::ingest::unknown_label;
use super::{Agent, AgentError, StoredParams, policy};
use crate::protocol::events::{Event, RunEnded, VersionMade};

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
    /// γ for `network` by prior matching on this device's traffic: the share of traffic it
    /// predicts as one of `unseen` is brought to the source model's. `None` without traffic.
    pub fn prior_matched_gamma(&self, network: &Network, unseen: &[usize]) -> Option<f32> {
        let traffic = self.traffic.as_ref()?;
        let seen: Vec<usize> = (0..self.classes).filter(|c| !unseen.contains(c)).collect();
        let source_share = method::share_predicted(&traffic.source_logits, unseen);
        let unshifted = Adapted { network: network.clone(), gamma: 0.0, unseen: unseen.to_vec(), notes: vec![] };
        let logits = unshifted.logits_of(&traffic.splits);
        Some(crate::adapt::calibrate::prior_matching_gamma(&logits, &seen, unseen, source_share))
    }

    pub fn planned_steps(&self) -> usize {
        method::planned_steps(&self.method, &self.hyper)
    }

    /// The event that opens this run; `origin` and `user` say who asked for it.
    pub fn started_event(&self, origin: &str, user: Option<&str>) -> Event {
        Event::AdaptationStarted {
            method: self.method_name.clone(),
            origin: origin.to_string(),
            seen_classes: self.seen.clone(),
            samples: self.sample_set.clone(),
            user: user.map(str::to_string),
        }
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
    /// Accuracy on each seen class's validation samples: `(class, adapted, source)`.
    pub per_class: Vec<(usize, f32, f32)>,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunProgress {
    pub method: String,
    pub step: usize,
    pub steps: usize,
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
    Ok(assess(plan, adapted, started))
}

/// What the gate needs about `adapted`, measured on the plan's validation samples, traffic and
/// reference samples, and its verdict.
pub fn assess(plan: &RunPlan, adapted: Adapted, started: Instant) -> RunOutcome {
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
    let per_class = per_class(&adapted, &source, &plan.validation, plan.classes);
    let gate_input = GateInput {
        seen_validation,
        unseen_rate: health.predicted_unseen_rate,
        reference_unseen: health.reference_unseen,
    };
    let decision = gate::decide(&gate_input, &plan.gate);
    // `recommended` trains an adapter on bundles without a trainable tail, so the network says.
    let adapter_rank = adapted.network.adapter_rank();
    RunOutcome {
        adapted,
        adapter_rank,
        gate_input,
        decision,
        health,
        source_seen_validation,
        per_class,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Accuracy per class with validation samples, adapted against source, for the console's chart.
fn per_class(adapted: &Adapted, source: &Adapted, validation: &SplitSet, classes: usize) -> Vec<(usize, f32, f32)> {
    if validation.is_empty() {
        return Vec::new();
    }
    let of = |model: &Adapted| {
        let predicted = crate::metrics::argmax_rows(model.logits_of(validation).view());
        crate::metrics::per_class_accuracy(&validation.labels, &predicted, classes)
    };
    let (after, before) = (of(adapted), of(source));
    (0..classes).filter_map(|class| Some((class, after[class]? as f32, before[class]? as f32))).collect()
}

fn accuracy(logits: &Array2<f32>, labels: &[usize]) -> f32 {
    crate::metrics::accuracy(labels, &crate::metrics::argmax_rows(logits.view())).unwrap_or(0.0) as f32
}

impl Agent {
    /// Copies what a run needs out of the store. `method` overrides the policy's. A run that
    /// would repeat the newest version (no new labels, same method) is refused with
    /// [`AgentError::NothingNew`] unless `force` is set.
    pub fn prepare_run(&mut self, method_name: Option<&str>, force: bool) -> Result<RunPlan, AgentError> {
        let policy = self.policy()?;
        let method_name = method_name.unwrap_or(&policy.method).to_string();
        let method: Method = method_name.parse().map_err(AgentError::Input)?;
        self.flush_traffic()?;
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
        let plan = self.gather(method_name, method, policy.min_samples_per_class, policy.seed, last_sample_id)?;
        crate::adapt::train::validate(&self.source, &plan.train, plan.classes, self.classes())?;
        Ok(plan)
    }

    /// A plan to judge a version made elsewhere (`name` says where): every class with labels
    /// counts, nothing is trained.
    pub fn prepare_assessment(&mut self, name: String) -> Result<RunPlan, AgentError> {
        self.flush_traffic()?;
        let last_sample_id = self.store.last_sample_id()?;
        let seed = self.policy()?.seed;
        let method: Method = "source".parse().map_err(AgentError::Input)?;
        self.gather(name, method, 0, seed, last_sample_id)
    }

    /// Copies the samples, traffic and models a plan needs out of the store; classes with at
    /// least `minimum` training samples are seen (with `minimum` 0, every labelled class).
    fn gather(
        &mut self,
        method_name: String,
        method: Method,
        minimum: usize,
        seed: u64,
        last_sample_id: i64,
    ) -> Result<RunPlan, AgentError> {
        let classes = self.classes().to_vec();
        let samples = self.store.samples(None)?;
        // Training samples per class; an assessment trains nothing, so every labelled class counts.
        let mut train_counts: BTreeMap<&str, usize> = BTreeMap::new();
        for sample in samples.iter().filter(|s| s.split == Split::Train || minimum == 0) {
            *train_counts.entry(sample.class.as_str()).or_default() += 1;
        }
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
            seed,
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
                let ended = RunEnded { method: Some(plan.method_name.clone()), origin: None, error: error.to_string() };
                let event = match error {
                    AdaptError::Cancelled { .. } => Event::AdaptationCancelled(ended),
                    // Not a fault: the method's own guards found nothing safer than the source.
                    AdaptError::SourceKept { .. } => Event::AdaptationSourceKept(ended),
                    _ => Event::AdaptationFailed(ended),
                };
                self.store.record_failed_run(plan.last_sample_id, &event)?;
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
            "per_class": outcome.per_class.iter()
                .map(|&(class, after, before)| (classes[class].clone(), [after, before]))
                .collect::<std::collections::BTreeMap<_, _>>(),
        });
        let status = if outcome.decision.promote { VersionStatus::Promoted } else { VersionStatus::Rejected };
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
            |version| {
                let made = VersionMade {
                    version,
                    method: plan.method_name.clone(),
                    parent: plan.parent,
                    reasons: outcome.decision.reasons.clone(),
                    metrics: metrics.clone(),
                };
                vec![if outcome.decision.promote { Event::VersionPromoted(made) } else { Event::VersionRejected(made) }]
            },
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
        let ended = RunEnded { method: None, origin: Some(origin.to_string()), error: error.to_string() };
        Ok(self.store.record_failed_run(last, &Event::AdaptationFailed(ended))?)
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
        self.store.push_event(&plan.started_event("command", None))?;
        let outcome = execute(&plan, &Cancel::default(), progress);
        self.commit_run(&plan, outcome)
    }
}
