//! `bench --label-budget N`: does the console's "label next" queue beat labelling in arrival
//! order? The site's traffic is the `target/adapt` images of the `--seen` classes (the classes
//! that occur there), as many per class as the data has or, with `--traffic-skew S`, fewer for
//! each next class (a Zipf law: real sites are uneven), arriving in a random order per seed.
//! Staff label `N` of them, either the first `N` to arrive or, one at a time, the head of the
//! queue (`adapt::queue`, on the source model's predictions and the answers given so far).
//! Classes with fewer than `min_samples` labels take no part, as on the device. `recommended`
//! then adapts on the labels, with the whole site traffic as unlabelled traffic, and is scored
//! on all of `target/test`.
//!
//! The bench's data have no near-duplicate images, so the queue's last rule is not exercised.

use ndarray::Array2;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use super::{BenchOptions, Progress, Stat, accuracy_inside_and_out, extract};
use crate::adapt::data::SplitSet;
use crate::adapt::method::{self, AdaptInput, Adapted, Method, Traffic};
use crate::adapt::queue::{Candidate, Labelled, next_to_label};
use crate::adapt::train::AdaptError;
use crate::inference::Classifier;
use crate::network::Network;

/// The orders compared.
pub const ORDERS: [&str; 2] = ["arrival", "queue"];

#[derive(Debug, Clone, Serialize)]
pub struct OrderReport {
    pub order: String,
    pub overall: Stat,
    /// The site's classes (those in its traffic).
    pub site: Stat,
    pub other: Stat,
    /// Classes with enough labels to take part in the run.
    pub classes_taking_part: Stat,
}

#[derive(Debug, Clone, Serialize)]
pub struct LabellingReport {
    pub budget: usize,
    pub skew: f64,
    pub min_samples: usize,
    pub site_classes: Vec<String>,
    pub traffic: usize,
    pub source: (f64, f64, f64),
    pub orders: Vec<OrderReport>,
}

/// Which traffic samples each order labels, for one seed.
fn choose(
    order: &str,
    arrival: &[usize],
    labels: &[usize],
    top: &[Vec<(String, f32)>],
    budget: usize,
    min_samples: usize,
    classes: &[String],
) -> Vec<usize> {
    if order == "arrival" {
        return arrival.iter().copied().take(budget).collect();
    }
    let mut known = Labelled { per_class: Default::default(), hashes: vec![], min_samples, answered: vec![] };
    let mut open: Vec<usize> = arrival.to_vec();
    let mut chosen = Vec::new();
    while chosen.len() < budget && !open.is_empty() {
        // Ids follow arrival, so the queue's tie-break (the newer image) is the later arrival.
        let candidates: Vec<Candidate> = open
            .iter()
            .enumerate()
            .map(|(at, &i)| Candidate {
                id: at as i64,
                predicted: top[i][0].0.clone(),
                top: top[i].clone(),
                dhash: None,
            })
            .collect();
        let Some(pick) = next_to_label(&candidates, &known, 1).into_iter().next() else { break };
        let sample = open.remove(pick.id as usize);
        let class = &classes[labels[sample]];
        *known.per_class.entry(class.clone()).or_default() += 1;
        known.answered.push((top[sample][0].0.clone(), Some(class.clone())));
        chosen.push(sample);
    }
    chosen
}

fn softmax_top(logits: &Array2<f32>, classes: &[String], k: usize) -> Vec<Vec<(String, f32)>> {
    logits
        .rows()
        .into_iter()
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = row.iter().map(|z| (z - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let mut ranked: Vec<(usize, f32)> = exp.iter().map(|e| e / sum).enumerate().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            ranked.into_iter().take(k).map(|(c, p)| (classes[c].clone(), p)).collect()
        })
        .collect()
}

/// What `--label-budget` compares under.
#[derive(Debug, Clone, Copy)]
pub struct LabellingSetup {
    /// Labels staff give.
    pub budget: usize,
    /// Labels a class needs to take part in a run.
    pub min_samples: usize,
    /// How uneven the site's traffic is: its k-th class (k from 0, in `--seen` order) keeps
    /// 1/(k+1)^skew of its images, as a Zipf law; 0 keeps them all.
    pub skew: f64,
}

/// The traffic of the site's classes, made uneven by `skew`.
fn site_traffic(adapt_all: &SplitSet, site: &[usize], skew: f64) -> SplitSet {
    let mut kept = Vec::new();
    for (rank, &class) in site.iter().enumerate() {
        let images: Vec<usize> = (0..adapt_all.len()).filter(|&i| adapt_all.labels[i] == class).collect();
        let keep = ((images.len() as f64) / ((rank + 1) as f64).powf(skew)).ceil() as usize;
        kept.extend(images.into_iter().take(keep));
    }
    kept.sort_unstable();
    adapt_all.select(&kept)
}

pub fn run(
    classifier: &mut Classifier,
    options: &BenchOptions,
    setup: LabellingSetup,
    progress: &mut dyn FnMut(Progress<'_>),
) -> anyhow::Result<LabellingReport> {
    let LabellingSetup { budget, min_samples, skew } = setup;
    let classes = classifier.bundle.head.classes.clone();
    let site = options.seen.resolve(&classes).map_err(anyhow::Error::msg)?;
    let adapt_all = extract(classifier, options, "target/adapt", progress)?;
    let test = extract(classifier, options, "target/test", progress)?;
    let reference = crate::adapt::data::reference_set(&classifier.bundle).map_err(anyhow::Error::msg)?;
    let traffic_set = site_traffic(&adapt_all, &site, skew);
    let source = Network::from_bundle(&classifier.bundle);
    let all_unseen: Vec<usize> = (0..classes.len()).collect();
    let source_model = Adapted { network: source.clone(), gamma: 0.0, unseen: all_unseen, notes: vec![] };
    let source_logits = source_model.logits_of(&traffic_set);
    let top = softmax_top(&source_logits, &classes, 5);
    let traffic = Traffic::new(traffic_set.clone(), &source);
    let source_score = accuracy_inside_and_out(&source_model, &test, &site);
    let recommended: Method = "recommended".parse().map_err(anyhow::Error::msg)?;
    let mut orders = Vec::new();
    for order in ORDERS {
        let mut runs: Vec<(f64, f64, f64, f64)> = Vec::new();
        for seed in 0..options.seeds {
            let mut arrival: Vec<usize> = (0..traffic_set.len()).collect();
            arrival.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed as u64));
            let chosen = choose(order, &arrival, &traffic_set.labels, &top, budget, min_samples, &classes);
            let mut counts = vec![0usize; classes.len()];
            for &i in &chosen {
                counts[traffic_set.labels[i]] += 1;
            }
            let kept: Vec<usize> =
                chosen.into_iter().filter(|&i| counts[traffic_set.labels[i]] >= min_samples).collect();
            let taking_part = counts.iter().filter(|&&n| n >= min_samples).count();
            let labelled = traffic_set.select(&kept);
            let adapted = if taking_part < 2 {
                source_model.clone()
            } else {
                let (_, unseen) = method::seen_and_unseen(&labelled.labels, classes.len());
                let base = Adapted { unseen, ..source_model.clone() };
                let teacher = base.logits_of(&labelled);
                let input = AdaptInput {
                    source: &source,
                    data: &labelled,
                    teacher: &teacher,
                    classes: classes.len(),
                    unlabelled: Some(&traffic),
                    reference: reference.as_ref(),
                };
                let steps = method::planned_steps(&recommended, &options.hyper);
                match method::adapt(&recommended, &input, &options.hyper, seed as u64, &mut |step| {
                    progress(Progress::Adapting { method: order, seed, step, steps })
                }) {
                    Ok(adapted) => adapted,
                    Err(AdaptError::SourceKept { .. }) => source_model.clone(),
                    Err(error) => return Err(error.into()),
                }
            };
            let (overall, on_site, other) = accuracy_inside_and_out(&adapted, &test, &site);
            runs.push((overall, on_site, other, taking_part as f64));
        }
        orders.push(OrderReport {
            order: order.to_string(),
            overall: Stat::of(runs.iter().map(|r| r.0).collect()),
            site: Stat::of(runs.iter().map(|r| r.1).collect()),
            other: Stat::of(runs.iter().map(|r| r.2).collect()),
            classes_taking_part: Stat::of(runs.iter().map(|r| r.3).collect()),
        });
    }
    Ok(LabellingReport {
        budget,
        skew,
        min_samples,
        site_classes: site.iter().map(|&c| classes[c].clone()).collect(),
        traffic: traffic_set.len(),
        source: source_score,
        orders,
    })
}

/// The report as a Markdown table.
pub fn table(report: &LabellingReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let (o, s, u) = report.source;
    let _ = writeln!(
        out,
        "site classes ({}): {}  \nsite traffic: {} images (skew {}); {} labels; a class takes part with {} labels\n",
        report.site_classes.len(),
        report.site_classes.join(","),
        report.traffic,
        report.skew,
        report.budget,
        report.min_samples
    );
    let _ = writeln!(out, "| order | overall | Δ | site classes | Δ | other classes | Δ | classes taking part |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    let _ = writeln!(out, "| source | {:.1} | | {:.1} | | {:.1} | | |", o * 100.0, s * 100.0, u * 100.0);
    for row in &report.orders {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} |",
            row.order,
            row.overall.cells_against(o),
            row.site.cells_against(s),
            row.other.cells_against(u),
            row.classes_taking_part.mean
        );
    }
    out
}
