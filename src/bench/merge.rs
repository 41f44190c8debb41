//! `bench --merge-devices K`: can devices at one site that labelled different classes pool what
//! they learned? The `--seen` classes are dealt to K simulated devices (disjoint: each class on
//! one device; with `--merge-overlap`, each class also on the next device). Each device adapts
//! with `recommended` on the `target/adapt` samples of its classes. The merge averages their
//! parameters slot by slot (as one round of federated averaging), and its calibration γ is
//! recomputed by prior matching on the site's unlabelled traffic, aiming at the source model's
//! own unseen share there, with the union of the devices' classes as seen. Compared with each
//! device alone and with one device that had all their labels; scored on all of `target/test`.

use serde::Serialize;

use super::{BenchOptions, Progress, Stat, accuracy_inside_and_out, extract};
use crate::adapt::calibrate;
use crate::adapt::data::SplitSet;
use crate::adapt::method::{self, AdaptInput, Adapted, Method, Traffic};
use crate::adapt::train::AdaptError;
use crate::inference::Classifier;
use crate::network::Network;

#[derive(Debug, Clone, Serialize)]
pub struct MergeRow {
    pub model: String,
    /// Classes its labels covered.
    pub classes: Vec<String>,
    pub overall: Stat,
    /// On the union of the devices' classes.
    pub union_seen: Stat,
    /// On the classes no device labelled.
    pub unseen: Stat,
}

#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    pub devices: usize,
    pub overlap: bool,
    pub source: (f64, f64, f64),
    pub rows: Vec<MergeRow>,
}

/// The classes each simulated device labels.
fn deal(seen: &[usize], devices: usize, overlap: bool) -> Vec<Vec<usize>> {
    let mut dealt = vec![Vec::new(); devices];
    for (at, &class) in seen.iter().enumerate() {
        dealt[at % devices].push(class);
        if overlap {
            dealt[(at + 1) % devices].push(class);
        }
    }
    dealt
}

/// Slot-by-slot mean of networks with the same layout.
fn average(networks: &[&Network]) -> anyhow::Result<Network> {
    let mut mean = networks[0].clone();
    for other in &networks[1..] {
        anyhow::ensure!(
            other.params.len() == mean.params.len()
                && other.params.iter().zip(&mean.params).all(|(a, b)| a.shape() == b.shape()),
            "the devices' versions have different layouts (an adapter of another rank, say), so they cannot be averaged"
        );
        for (sum, param) in mean.params.iter_mut().zip(&other.params) {
            *sum += param;
        }
    }
    let n = networks.len() as f32;
    mean.params.iter_mut().for_each(|p| p.mapv_inplace(|v| v / n));
    Ok(mean)
}

pub fn run(
    classifier: &mut Classifier,
    options: &BenchOptions,
    devices: usize,
    overlap: bool,
    progress: &mut dyn FnMut(Progress<'_>),
) -> anyhow::Result<MergeReport> {
    anyhow::ensure!(devices >= 2, "--merge-devices needs at least 2 devices");
    let classes = classifier.bundle.head.classes.clone();
    let seen = options.seen.resolve(&classes).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(seen.len() >= 2 * devices, "--seen gives {} classes: at least 2 per device are needed", seen.len());
    let adapt_all = extract(classifier, options, "target/adapt", progress)?;
    let test = extract(classifier, options, "target/test", progress)?;
    let reference = crate::adapt::data::reference_set(&classifier.bundle).map_err(anyhow::Error::msg)?;
    let source = Network::from_bundle(&classifier.bundle);
    let traffic = Traffic::new(adapt_all.clone(), &source);
    let all: Vec<usize> = (0..classes.len()).collect();
    let source_model = Adapted { network: source.clone(), gamma: 0.0, unseen: all, notes: vec![] };
    let recommended: Method = "recommended".parse().map_err(anyhow::Error::msg)?;
    let adapt = |labelled: &SplitSet, seed: u64, what: &str, progress: &mut dyn FnMut(Progress<'_>)| {
        let (_, unseen) = method::seen_and_unseen(&labelled.labels, classes.len());
        let base = Adapted { unseen, ..source_model.clone() };
        let teacher = base.logits_of(labelled);
        let input = AdaptInput {
            source: &source,
            data: labelled,
            teacher: &teacher,
            classes: classes.len(),
            unlabelled: Some(&traffic),
            reference: reference.as_ref(),
        };
        let steps = method::planned_steps(&recommended, &options.hyper);
        match method::adapt(&recommended, &input, &options.hyper, seed, &mut |step| {
            progress(Progress::Adapting { method: what, seed: seed as usize, step, steps })
        }) {
            Ok(adapted) => Ok(adapted),
            Err(AdaptError::SourceKept { .. }) => Ok(base),
            Err(error) => Err(anyhow::Error::from(error)),
        }
    };
    let dealt = deal(&seen, devices, overlap);
    let names = |set: &[usize]| set.iter().map(|&c| classes[c].clone()).collect::<Vec<_>>();
    let mut runs: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); devices + 2];
    for seed in 0..options.seeds as u64 {
        let mut alone = Vec::new();
        for (device, own) in dealt.iter().enumerate() {
            let labelled = adapt_all.filter(|label| own.contains(&label));
            let adapted = adapt(&labelled, seed, &format!("device {}", device + 1), progress)?;
            runs[device].push(accuracy_inside_and_out(&adapted, &test, &seen));
            alone.push(adapted);
        }
        // The merge: averaged parameters, γ by prior matching for the union of their classes.
        let network = average(&alone.iter().map(|a| &a.network).collect::<Vec<_>>())?;
        let unseen: Vec<usize> = (0..classes.len()).filter(|c| !seen.contains(c)).collect();
        let source_share = method::share_predicted(&traffic.source_logits, &unseen);
        let unshifted = Adapted { network: network.clone(), gamma: 0.0, unseen: unseen.clone(), notes: vec![] };
        let gamma =
            calibrate::prior_matching_gamma(&unshifted.logits_of(&traffic.splits), &seen, &unseen, source_share);
        let merged = Adapted { network, gamma, unseen, notes: vec![] };
        runs[devices].push(accuracy_inside_and_out(&merged, &test, &seen));
        let everything = adapt(&adapt_all.filter(|label| seen.contains(&label)), seed, "all labels", progress)?;
        runs[devices + 1].push(accuracy_inside_and_out(&everything, &test, &seen));
    }
    let mut rows = Vec::new();
    for (at, scores) in runs.into_iter().enumerate() {
        let (model, covered) = match at {
            _ if at < devices => (format!("device {} alone", at + 1), names(&dealt[at])),
            _ if at == devices => ("merge".to_string(), names(&seen)),
            _ => ("one device with all labels".to_string(), names(&seen)),
        };
        rows.push(MergeRow {
            model,
            classes: covered,
            overall: Stat::of(scores.iter().map(|s| s.0).collect()),
            union_seen: Stat::of(scores.iter().map(|s| s.1).collect()),
            unseen: Stat::of(scores.iter().map(|s| s.2).collect()),
        });
    }
    Ok(MergeReport { devices, overlap, source: accuracy_inside_and_out(&source_model, &test, &seen), rows })
}

/// The report as a Markdown table.
pub fn table(report: &MergeReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let (o, s, u) = report.source;
    let _ = writeln!(
        out,
        "{} devices, {} classes each{}\n",
        report.devices,
        report.rows[0].classes.len(),
        if report.overlap { " (each class on two devices)" } else { " (disjoint)" }
    );
    let _ = writeln!(out, "| model | classes | overall | Δ | union of their classes | Δ | unseen by all | Δ |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    let _ = writeln!(out, "| source | | {:.1} | | {:.1} | | {:.1} | |", o * 100.0, s * 100.0, u * 100.0);
    for row in &report.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.model,
            row.classes.join(","),
            row.overall.cells_against(o),
            row.union_seen.cells_against(s),
            row.unseen.cells_against(u)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::ArrayD;

    #[test]
    fn classes_are_dealt_in_turn_and_overlap_puts_each_on_two_devices() {
        assert_eq!(deal(&[1, 2, 3, 4, 5, 6], 3, false), vec![vec![1, 4], vec![2, 5], vec![3, 6]]);
        assert_eq!(deal(&[1, 2, 3], 3, true), vec![vec![1, 3], vec![1, 2], vec![2, 3]]);
    }

    #[test]
    fn networks_average_slot_by_slot_and_other_layouts_are_refused() {
        let network = |value: f32, shape: &[usize]| Network {
            layers: vec![],
            head: (0, 1),
            params: vec![ArrayD::from_elem(shape, value), ArrayD::from_elem(vec![2], value * 2.0)],
            roles: vec![],
        };
        let (a, b) = (network(1.0, &[2, 2]), network(3.0, &[2, 2]));
        let mean = average(&[&a, &b]).unwrap();
        assert!(mean.params[0].iter().all(|&v| v == 2.0) && mean.params[1].iter().all(|&v| v == 4.0));
        let other = network(1.0, &[2, 3]);
        assert!(average(&[&a, &other]).unwrap_err().to_string().contains("different layouts"));
    }
}
