//! `edgeadapt bench`: adapts on the seen classes of `target/adapt`, evaluates on all of
//! `target/test` with the argmax over all classes, and reports every method side by side.

pub mod features;
pub mod labelling;
pub mod merge;
pub mod plot;
pub mod seen;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use ndarray::Array2;
use serde::Serialize;

use crate::adapt::data::SplitSet;
use crate::adapt::health::{self, Health};
use crate::adapt::method::{self, AdaptInput, Adapted, Hyper, Method, Traffic};
use crate::adapt::share;
use crate::adapt::train::AdaptError;
use crate::inference::Classifier;
use crate::metrics::{accuracy, per_class_accuracy};
use crate::network::Network;
use seen::SeenSpec;

pub struct BenchOptions {
    pub data: PathBuf,
    pub seen: SeenSpec,
    /// Method names as given; `oracle` is the recommended method trained on every class.
    pub methods: Vec<String>,
    pub seeds: usize,
    pub hyper: Hyper,
    pub cache_dir: PathBuf,
    /// Resample the unlabelled traffic so that this share of it is unseen classes.
    pub traffic_unseen_share: Option<f32>,
}

/// The unlabelled traffic the methods saw: its true unseen share (the bench knows the labels)
/// and every estimator's label-free estimate of it.
#[derive(Debug, Clone, Serialize)]
pub struct TrafficReport {
    pub samples: usize,
    pub true_unseen_share: f32,
    pub estimates: Vec<share::Estimate>,
}

/// Mean, standard deviation and the value of each seed.
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub per_seed: Vec<f64>,
}

/// Accuracy of `model` on `test`: overall, on the classes in `inside`, and on the rest.
pub(crate) fn accuracy_inside_and_out(
    model: &crate::adapt::method::Adapted,
    test: &crate::adapt::data::SplitSet,
    inside: &[usize],
) -> (f64, f64, f64) {
    let predicted = crate::metrics::argmax_rows(model.logits_of(test).view());
    let part = |keep: &dyn Fn(usize) -> bool| {
        let pairs: Vec<(usize, usize)> =
            test.labels.iter().zip(&predicted).filter(|(l, _)| keep(**l)).map(|(l, p)| (*l, *p)).collect();
        pairs.iter().filter(|(l, p)| l == p).count() as f64 / pairs.len().max(1) as f64
    };
    (part(&|_| true), part(&|l| inside.contains(&l)), part(&|l| !inside.contains(&l)))
}

impl Stat {
    /// `mean ± std | Δ` in points against `base`, two cells of a Markdown table.
    pub(crate) fn cells_against(&self, base: f64) -> String {
        format!("{:.1} ± {:.1} | {:+.1}", self.mean * 100.0, self.std * 100.0, (self.mean - base) * 100.0)
    }

    pub fn of(values: Vec<f64>) -> Stat {
        let n = values.len().max(1) as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        Stat { mean, std: var.sqrt(), per_seed: values }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SeedRun {
    pub overall: f64,
    pub seen: f64,
    pub unseen: f64,
    pub seconds: f64,
    pub health: Health,
    pub notes: Vec<String>,
    pub per_class: Vec<Option<f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MethodReport {
    pub overall: Stat,
    pub seen: Stat,
    pub unseen: Stat,
    pub seconds: Stat,
    /// Label-free indicators, averaged over seeds (see `adapt::health`).
    pub unseen_estimate: BTreeMap<String, Stat>,
    pub choices: Vec<Vec<String>>,
    /// Why the method could not run on this bundle and data; its figures are then empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    pub runs: Vec<SeedRun>,
}

impl MethodReport {
    pub fn ran(&self) -> bool {
        self.error.is_none() && !self.runs.is_empty()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub seen_classes: Vec<String>,
    pub unseen_classes: Vec<String>,
    pub classes: Vec<String>,
    pub unlabelled_source: String,
    pub adapt_samples: usize,
    pub test_samples: usize,
    pub seeds: usize,
    pub methods: BTreeMap<String, MethodReport>,
    /// Method names in the order given.
    pub order: Vec<String>,
    /// Spearman rank correlation across methods between each indicator and the true change in
    /// unseen accuracy.
    pub indicator_rank_correlation: BTreeMap<String, Option<f64>>,
    pub traffic: TrafficReport,
}

/// Progress of a bench run, for bars and logs.
pub enum Progress<'a> {
    Extracting { what: &'a str, done: usize, total: usize },
    Adapting { method: &'a str, seed: usize, step: usize, steps: usize },
}

pub fn run(
    classifier: &mut Classifier,
    options: &BenchOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> anyhow::Result<BenchReport> {
    let classes = classifier.bundle.head.classes.clone();
    let seen = options.seen.resolve(&classes).map_err(anyhow::Error::msg)?;
    let unseen: Vec<usize> = (0..classes.len()).filter(|c| !seen.contains(c)).collect();
    let adapt_all = extract(classifier, options, "target/adapt", progress)?;
    let test = extract(classifier, options, "target/test", progress)?;
    let unlabelled_dir = options.data.join("target/unlabelled");
    let (unlabelled, unlabelled_source) = if unlabelled_dir.is_dir() {
        (extract(classifier, options, "target/unlabelled", progress)?, "target/unlabelled".to_string())
    } else {
        (adapt_all.clone(), "target/adapt (labels ignored)".to_string())
    };
    let reference = crate::adapt::data::reference_set(&classifier.bundle).map_err(anyhow::Error::msg)?;

    let (unlabelled, unlabelled_source) = match options.traffic_unseen_share {
        Some(share) => {
            let resampled = resample_traffic(&unlabelled, &unseen, share)?;
            let described = format!("{unlabelled_source}, resampled to {:.0} % unseen", 100.0 * share);
            (resampled, described)
        }
        None => (unlabelled, unlabelled_source),
    };
    let true_unseen_share =
        unlabelled.labels.iter().filter(|l| unseen.contains(l)).count() as f32 / unlabelled.len().max(1) as f32;
    let source = Network::from_bundle(&classifier.bundle);
    let unlabelled = Traffic::new(unlabelled, &source);
    let seen_data = adapt_all.filter(|label| seen.contains(&label));
    let source_adapted = Adapted { network: source.clone(), gamma: 0.0, unseen: unseen.clone(), notes: vec![] };
    let teacher_seen = source_adapted.logits_of(&seen_data);
    let estimates = share::estimate(
        &share::ShareInput {
            traffic: unlabelled.source_logits.view(),
            labelled: teacher_seen.view(),
            labels: &seen_data.labels,
            seen: &seen,
            unseen: &unseen,
        },
        &share::Estimator::ALL,
        &share::ShareConfig::default(),
    )
    .unwrap_or_default();
    let traffic = TrafficReport { samples: unlabelled.splits.len(), true_unseen_share, estimates };
    // Only the oracle trains on every class.
    let teacher_all = if options.methods.iter().any(|m| m == "oracle") {
        source_adapted.logits_of(&adapt_all)
    } else {
        Array2::zeros((0, classes.len()))
    };

    let mut methods = BTreeMap::new();
    for name in &options.methods {
        let mut hyper = options.hyper.clone();
        let (method, data, teacher): (Method, &SplitSet, &Array2<f32>) = if name == "oracle" {
            ("recommended".parse().map_err(anyhow::Error::msg)?, &adapt_all, &teacher_all)
        } else if name == BALANCED {
            hyper.balanced_share = true;
            ("recommended".parse().map_err(anyhow::Error::msg)?, &seen_data, &teacher_seen)
        } else if name == TRUE_SHARE {
            hyper.unseen_share = Some(true_unseen_share);
            ("recommended".parse().map_err(anyhow::Error::msg)?, &seen_data, &teacher_seen)
        } else {
            (name.parse().map_err(anyhow::Error::msg)?, &seen_data, &teacher_seen)
        };
        let steps = method::planned_steps(&method, &hyper);
        let mut runs = Vec::new();
        let mut error = None;
        for seed in 0..options.seeds {
            let input = AdaptInput {
                source: &source,
                data,
                teacher,
                classes: classes.len(),
                unlabelled: Some(&unlabelled),
                reference: reference.as_ref(),
            };
            let started = Instant::now();
            let adapted = match method::adapt(&method, &input, &hyper, seed as u64, &mut |step| {
                progress(Progress::Adapting { method: name, seed, step, steps })
            }) {
                Ok(adapted) => adapted,
                // What a device does: serve the source model.
                Err(AdaptError::SourceKept { rates, .. }) => {
                    let rates = rates.iter().map(f32::to_string).collect::<Vec<_>>().join(", ");
                    Adapted {
                        notes: vec![format!("source kept (the gate's checks refused lr {rates})")],
                        ..source_adapted.clone()
                    }
                }
                // One method that cannot run on this bundle gets a row saying why; the rest run.
                Err(problem) => {
                    error = Some(problem.to_string());
                    break;
                }
            };
            let seconds = started.elapsed().as_secs_f64();
            let predicted = crate::metrics::argmax_rows(adapted.logits_of(&test).view());
            let (health_model, health_source) = if name == "oracle" {
                // The oracle has no unseen classes; judge its health against the benchmark's.
                let as_partial = Adapted { unseen: unseen.clone(), ..adapted.clone() };
                (as_partial, source_adapted.clone())
            } else {
                (adapted.clone(), source_adapted.clone())
            };
            let health = health::estimate(&health_model, &health_source, reference.as_ref(), Some(&unlabelled));
            runs.push(evaluate(&test, &predicted, &seen, classes.len(), seconds, health, adapted.notes.clone()));
        }
        let mut report = summarise(runs);
        report.error = error;
        methods.insert(name.clone(), report);
    }
    let indicator_rank_correlation = rank_correlations(&methods);
    Ok(BenchReport {
        seen_classes: seen.iter().map(|&c| classes[c].clone()).collect(),
        unseen_classes: unseen.iter().map(|&c| classes[c].clone()).collect(),
        classes,
        unlabelled_source,
        adapt_samples: seen_data.len(),
        test_samples: test.len(),
        seeds: options.seeds,
        methods,
        order: options.methods.clone(),
        indicator_rank_correlation,
        traffic,
    })
}

/// The bench row that runs `recommended` with the traffic's true unseen share instead of its
/// estimate: an upper bound on what the estimate can give, not a method.
pub const TRUE_SHARE: &str = "recommended@true-share";

/// The bench row that runs `recommended` with the balanced unseen share.
pub const BALANCED: &str = "recommended@balanced";

/// Draws traffic, without repeats and with a fixed seed (every method sees the same), so that
/// `share` of it is unseen classes; as large as the two pools allow.
/// The cached split tensors of `folder` under the bench data, with progress.
fn extract(
    classifier: &mut Classifier,
    options: &BenchOptions,
    folder: &str,
    progress: &mut dyn FnMut(Progress<'_>),
) -> anyhow::Result<SplitSet> {
    features::folder_splits(classifier, &options.data.join(folder), &options.cache_dir, &mut |done, total| {
        progress(Progress::Extracting { what: folder, done, total })
    })
}

fn resample_traffic(set: &SplitSet, unseen: &[usize], share: f32) -> anyhow::Result<SplitSet> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    anyhow::ensure!((0.0..=1.0).contains(&share), "--traffic-unseen-share {share}: expected a share in [0, 1]");
    let (mut unseen_pool, mut seen_pool): (Vec<usize>, Vec<usize>) =
        (0..set.len()).partition(|&i| unseen.contains(&set.labels[i]));
    let total = match (share, unseen_pool.len(), seen_pool.len()) {
        (s, u, _) if s >= 1.0 => u,
        (s, _, n) if s <= 0.0 => n,
        (s, u, n) => ((u as f32 / s).min(n as f32 / (1.0 - s))).floor() as usize,
    };
    let unseen_count = (share * total as f32).round() as usize;
    anyhow::ensure!(
        total > 0 && unseen_count <= unseen_pool.len() && total - unseen_count <= seen_pool.len(),
        "--traffic-unseen-share {share}: the unlabelled folder has {} unseen and {} seen samples",
        unseen_pool.len(),
        seen_pool.len()
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x7aff1c);
    unseen_pool.shuffle(&mut rng);
    seen_pool.shuffle(&mut rng);
    let mut chosen: Vec<usize> =
        unseen_pool[..unseen_count].iter().chain(&seen_pool[..total - unseen_count]).copied().collect();
    chosen.sort_unstable();
    Ok(set.select(&chosen))
}

/// The traffic's true unseen share and each estimate, as the bench prints it.
pub fn traffic_table(report: &BenchReport) -> String {
    let mut line = format!(
        "unseen share of the unlabelled traffic ({} samples): true {:.3}",
        report.traffic.samples, report.traffic.true_unseen_share
    );
    for e in &report.traffic.estimates {
        line.push_str(&format!("; {} {:.3} [{:.3}, {:.3}]", e.estimator.name(), e.share, e.low, e.high));
    }
    line
}

fn evaluate(
    test: &SplitSet,
    predicted: &[usize],
    seen: &[usize],
    classes: usize,
    seconds: f64,
    health: Health,
    notes: Vec<String>,
) -> SeedRun {
    let subset = |keep: &dyn Fn(usize) -> bool| {
        let (labels, preds): (Vec<usize>, Vec<usize>) =
            test.labels.iter().zip(predicted).filter(|(l, _)| keep(**l)).map(|(l, p)| (*l, *p)).unzip();
        accuracy(&labels, &preds).unwrap_or(f64::NAN)
    };
    SeedRun {
        overall: subset(&|_| true),
        seen: subset(&|l| seen.contains(&l)),
        unseen: subset(&|l| !seen.contains(&l)),
        seconds,
        health,
        notes,
        per_class: per_class_accuracy(&test.labels, predicted, classes),
    }
}

/// Reads one label-free indicator from a run.
type Indicator = dyn Fn(&SeedRun) -> Option<f64>;

fn summarise(runs: Vec<SeedRun>) -> MethodReport {
    let stat = |f: &dyn Fn(&SeedRun) -> Option<f64>| Stat::of(runs.iter().filter_map(f).collect());
    let mut unseen_estimate = BTreeMap::new();
    let indicators: [(&str, &Indicator); 5] = [
        ("reference_unseen_accuracy", &|r| r.health.reference_unseen.map(|(a, _)| a as f64)),
        ("reference_unseen_accuracy_source", &|r| r.health.reference_unseen.map(|(_, s)| s as f64)),
        ("predicted_unseen_rate", &|r| r.health.predicted_unseen_rate.map(|(a, _)| a as f64)),
        ("predicted_unseen_rate_source", &|r| r.health.predicted_unseen_rate.map(|(_, s)| s as f64)),
        ("source_agreement", &|r| r.health.source_agreement.map(|a| a as f64)),
    ];
    for (name, get) in indicators {
        let values = stat(get);
        if !values.per_seed.is_empty() {
            unseen_estimate.insert(name.to_string(), values);
        }
    }
    MethodReport {
        overall: stat(&|r| Some(r.overall)),
        seen: stat(&|r| Some(r.seen)),
        unseen: stat(&|r| Some(r.unseen)),
        seconds: stat(&|r| Some(r.seconds)),
        unseen_estimate,
        choices: runs.iter().map(|r| r.notes.clone()).collect(),
        error: None,
        runs,
    }
}

/// Spearman correlation between each indicator's change from the source and the true change in
/// unseen accuracy, across methods (the oracle excluded: it has no unseen classes to protect).
fn rank_correlations(methods: &BTreeMap<String, MethodReport>) -> BTreeMap<String, Option<f64>> {
    let rows: Vec<&MethodReport> = methods
        .iter()
        .filter(|(name, m)| *name != "oracle" && *name != TRUE_SHARE && *name != BALANCED && m.ran())
        .map(|(_, m)| m)
        .collect();
    let truth: Vec<f64> = rows.iter().map(|m| m.unseen.mean).collect();
    let mut out = BTreeMap::new();
    for (indicator, baseline) in [
        ("reference_unseen_accuracy", Some("reference_unseen_accuracy_source")),
        ("predicted_unseen_rate", Some("predicted_unseen_rate_source")),
        ("source_agreement", None),
    ] {
        let values: Option<Vec<f64>> = rows
            .iter()
            .map(|m| {
                let value = m.unseen_estimate.get(indicator)?.mean;
                Some(value - baseline.and_then(|b| m.unseen_estimate.get(b)).map_or(0.0, |s| s.mean))
            })
            .collect();
        out.insert(indicator.to_string(), values.and_then(|v| spearman(&v, &truth)));
    }
    out
}

/// Spearman's rank correlation (average ranks for ties); `None` when undefined.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 3 {
        return None;
    }
    let ranks = |values: &[f64]| {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&i, &j| values[i].total_cmp(&values[j]));
        let mut ranks = vec![0.0; values.len()];
        let mut start = 0;
        while start < order.len() {
            let mut end = start;
            while end + 1 < order.len() && values[order[end + 1]] == values[order[start]] {
                end += 1;
            }
            let rank = (start + end) as f64 / 2.0;
            for &index in &order[start..=end] {
                ranks[index] = rank;
            }
            start = end + 1;
        }
        ranks
    };
    let (ra, rb) = (ranks(a), ranks(b));
    let mean = (a.len() - 1) as f64 / 2.0;
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - mean) * (y - mean)).sum();
    let var_a: f64 = ra.iter().map(|x| (x - mean).powi(2)).sum();
    let var_b: f64 = rb.iter().map(|y| (y - mean).powi(2)).sum();
    (var_a > 0.0 && var_b > 0.0).then(|| cov / (var_a * var_b).sqrt())
}

/// The markdown table the bench prints.
pub fn table(report: &BenchReport) -> String {
    let source = report.methods.get("source");
    let pct = |s: &Stat| format!("{:.1} ± {:.1}", 100.0 * s.mean, 100.0 * s.std);
    let delta =
        |s: &Stat, base: Option<&Stat>| base.map_or("-".into(), |b| format!("{:+.1}", 100.0 * (s.mean - b.mean)));
    let mut lines = vec![
        "| method | overall | Δ | seen | Δ | unseen | Δ | seconds | ref. unseen acc (src) | predicted-unseen rate (src) | agreement | choice |".to_string(),
        "|---|---|---|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    for name in &report.order {
        let m = &report.methods[name];
        if let Some(error) = &m.error {
            lines.push(format!("| {name} | - | - | - | - | - | - | - | - | - | - | cannot run: {error} |"));
            continue;
        }
        let est = |key: &str| m.unseen_estimate.get(key).map(|s| s.mean);
        let pair = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.1} ({:.1})", 100.0 * a, 100.0 * b),
            _ => "-".into(),
        };
        let mut distinct: Vec<String> = m.choices.iter().map(|c| c.join(", ")).filter(|c| !c.is_empty()).collect();
        distinct.dedup();
        let choice = distinct.join(" / ");
        lines.push(format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {} | {} |",
            pct(&m.overall),
            delta(&m.overall, source.map(|s| &s.overall)),
            pct(&m.seen),
            delta(&m.seen, source.map(|s| &s.seen)),
            pct(&m.unseen),
            delta(&m.unseen, source.map(|s| &s.unseen)),
            m.seconds.mean,
            pair(est("reference_unseen_accuracy"), est("reference_unseen_accuracy_source")),
            pair(est("predicted_unseen_rate"), est("predicted_unseen_rate_source")),
            est("source_agreement").map_or("-".into(), |a| format!("{:.1}", 100.0 * a)),
            if choice.is_empty() { "-".into() } else { choice },
        ));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_handles_order_and_ties() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
        let tied = spearman(&[1.0, 1.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!(tied > 0.9 && tied < 1.0);
    }

    #[test]
    fn stats_are_population_mean_and_std() {
        let s = Stat::of(vec![0.5, 0.7]);
        assert!((s.mean - 0.6).abs() < 1e-12 && (s.std - 0.1).abs() < 1e-12);
    }
}
