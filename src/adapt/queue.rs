//! The "label next" queue: which unlabelled images to ask site staff about first (the
//! console's queue, and `bench --label-budget`'s `queue` order).
//!
//! The rule, greedy over the unlabelled images:
//! 1. **Classes that cannot take part yet come first.** A class joins a run only once it has
//!    `min_samples` labels, and every seen class adds to what adaptation learns; so images
//!    predicted as a class short of that go first, and each pick counts towards its class, which
//!    spreads the labels over classes instead of piling them on the commonest.
//! 2. **Then the least certain.** Within a tier the image with the smallest gap between its two
//!    most probable classes, or between its most probable seen and unseen class (the decision
//!    the calibration γ moves), goes first: a label there corrects the model where it is unsure.
//! 3. **No near-duplicates.** An image whose difference hash is within a few bits of one
//!    already labelled or queued adds almost nothing and is left out.

use std::collections::HashMap;

/// Hashes this close (in bits of 64) are the same picture for the queue.
pub const NEAR_DUPLICATE_BITS: u32 = 5;

/// An unlabelled recent image as the queue sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: i64,
    pub predicted: String,
    /// The most probable classes with their probabilities, best first.
    pub top: Vec<(String, f32)>,
    pub dhash: Option<u64>,
}

/// What is labelled already.
#[derive(Debug, Clone, Default)]
pub struct Labelled {
    /// Training samples per class.
    pub per_class: HashMap<String, usize>,
    /// Difference hashes of recent images that became samples.
    pub hashes: Vec<u64>,
    /// Training samples a class needs to take part in a run.
    pub min_samples: usize,
}

/// Why an image is in the queue where it is, for the page.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Its predicted class has too few labels to take part in a run.
    ClassShort,
    /// The model is unsure about it.
    Uncertain,
}

/// How unsure the model is about an image, in [0, 1]: 1 when its two best classes, or its best
/// seen and best unseen class, are equally probable.
pub fn uncertainty(candidate: &Candidate, is_seen: impl Fn(&str) -> bool) -> f32 {
    let probability = |at: usize| candidate.top.get(at).map_or(0.0, |(_, p)| *p);
    let margin = probability(0) - probability(1);
    let best = |seen: bool| candidate.top.iter().find(|(class, _)| is_seen(class) == seen).map_or(0.0, |(_, p)| *p);
    let gap = (best(true) - best(false)).abs();
    1.0 - margin.min(gap).clamp(0.0, 1.0)
}

/// Up to `limit` candidates in the order to label them, each with its reason.
pub fn next_to_label(candidates: &[Candidate], labelled: &Labelled, limit: usize) -> Vec<(i64, Reason)> {
    let mut counts = labelled.per_class.clone();
    let is_seen = |class: &str| labelled.per_class.get(class).copied().unwrap_or(0) >= labelled.min_samples;
    let mut open: Vec<(usize, f32)> =
        candidates.iter().enumerate().map(|(index, c)| (index, uncertainty(c, is_seen))).collect();
    // Most uncertain first; ties by the newer image (higher id).
    open.sort_by(|a, b| b.1.total_cmp(&a.1).then(candidates[b.0].id.cmp(&candidates[a.0].id)));
    let mut hashes = labelled.hashes.clone();
    let mut queue = Vec::new();
    while queue.len() < limit {
        let short =
            |index: usize| counts.get(&candidates[index].predicted).copied().unwrap_or(0) < labelled.min_samples;
        let Some(at) =
            open.iter().position(|&(index, _)| short(index)).or(if open.is_empty() { None } else { Some(0) })
        else {
            break;
        };
        let (index, _) = open.remove(at);
        let candidate = &candidates[index];
        if let Some(hash) = candidate.dhash {
            if hashes.iter().any(|&h| (h ^ hash).count_ones() <= NEAR_DUPLICATE_BITS) {
                continue;
            }
            hashes.push(hash);
        }
        let reason = if short(index) { Reason::ClassShort } else { Reason::Uncertain };
        *counts.entry(candidate.predicted.clone()).or_default() += 1;
        queue.push((candidate.id, reason));
    }
    queue
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: i64, top: &[(&str, f32)], dhash: Option<u64>) -> Candidate {
        Candidate {
            id,
            predicted: top[0].0.to_string(),
            top: top.iter().map(|(c, p)| (c.to_string(), *p)).collect(),
            dhash,
        }
    }

    fn labelled(per_class: &[(&str, usize)]) -> Labelled {
        Labelled {
            per_class: per_class.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
            hashes: vec![],
            min_samples: 3,
        }
    }

    fn ids(queue: &[(i64, Reason)]) -> Vec<i64> {
        queue.iter().map(|(id, _)| *id).collect()
    }

    #[test]
    fn the_least_certain_image_comes_first_among_well_labelled_classes() {
        let candidates = [
            candidate(1, &[("A", 0.9), ("B", 0.05)], None),
            candidate(2, &[("A", 0.5), ("B", 0.45)], None),
            candidate(3, &[("B", 0.7), ("A", 0.2)], None),
        ];
        let queue = next_to_label(&candidates, &labelled(&[("A", 10), ("B", 10)]), 10);
        assert_eq!(ids(&queue), vec![2, 3, 1]);
        assert!(queue.iter().all(|(_, reason)| *reason == Reason::Uncertain));
    }

    #[test]
    fn classes_short_of_labels_come_first_and_the_labels_spread_over_them() {
        let candidates = [
            candidate(1, &[("A", 0.5), ("B", 0.4)], None),
            candidate(2, &[("A", 0.55), ("B", 0.4)], None),
            candidate(3, &[("A", 0.6), ("B", 0.3)], None),
            candidate(4, &[("A", 0.65), ("B", 0.3)], None),
            candidate(5, &[("C", 0.99), ("A", 0.01)], None),
            candidate(6, &[("C", 0.98), ("A", 0.01)], None),
        ];
        // A has 1 label and needs 2 more; C has none and needs 3.
        let queue = next_to_label(&candidates, &labelled(&[("A", 1)]), 6);
        assert_eq!(ids(&queue[..4]), vec![1, 2, 6, 5], "two for A, then C's, before A's third");
        assert_eq!(queue[..4].iter().filter(|(_, r)| *r == Reason::ClassShort).count(), 4);
        assert_eq!(queue[4..].iter().map(|(_, r)| *r).collect::<Vec<_>>(), vec![Reason::Uncertain; 2]);
    }

    #[test]
    fn a_near_duplicate_of_a_labelled_or_queued_image_is_left_out() {
        let candidates = [
            candidate(1, &[("A", 0.5), ("B", 0.5)], Some(0b1111)),
            candidate(2, &[("A", 0.5), ("B", 0.5)], Some(0b1110)),
            candidate(3, &[("A", 0.5), ("B", 0.5)], Some(u64::MAX)),
            candidate(4, &[("A", 0.9), ("B", 0.1)], Some(0xF0F0_F0F0_0000_0000)),
        ];
        let mut known = labelled(&[("A", 10), ("B", 10)]);
        known.hashes = vec![0xF0F0_F0F0_0000_0001];
        let queue = next_to_label(&candidates, &known, 10);
        assert_eq!(ids(&queue), vec![3, 2], "1 and 2 are one picture (the newer kept); 4 was labelled");
    }

    #[test]
    fn uncertainty_sees_the_seen_unseen_decision() {
        // Its two best classes are a seen and an unseen one: the seen/unseen gap is the margin.
        let sure = candidate(1, &[("A", 0.6), ("U", 0.35), ("B", 0.05)], None);
        let seen = |class: &str| class != "U";
        assert!((uncertainty(&sure, seen) - 0.75).abs() < 1e-6);
        let all_seen = |_: &str| true;
        assert!((uncertainty(&sure, all_seen) - 0.75).abs() < 1e-6, "the two best decide without unseen classes");
        let clear = candidate(2, &[("A", 0.95), ("B", 0.03), ("U", 0.02)], None);
        assert!(uncertainty(&clear, seen) < 0.1);
    }

    #[test]
    fn the_queue_stops_at_its_limit_or_when_nothing_is_left() {
        let candidates: Vec<_> = (0..5).map(|i| candidate(i, &[("A", 0.5), ("B", 0.4)], None)).collect();
        assert_eq!(next_to_label(&candidates, &labelled(&[]), 2).len(), 2);
        assert_eq!(next_to_label(&candidates, &labelled(&[]), 10).len(), 5);
        assert!(next_to_label(&[], &labelled(&[]), 10).is_empty());
    }
}
