//! The "label next" queue: which unlabelled images to ask site staff about first (the
//! console's queue, and `bench --label-budget`'s `queue` order).
//!
//! The rule: **ask where a label most likely completes a class.** A class takes part in a run
//! only with `min_samples` labels, and each class that takes part is one more class the run
//! learns; a label beyond that still helps, with diminishing returns. So:
//! 1. **Group the images by the model's guess.** For each group, estimate which classes its
//!    images really are: the model's mean probabilities over the group, worth [`PRIOR_WEIGHT`]
//!    answers, plus the answers staff gave for earlier images of the group (a skip is an answer
//!    with no class). A group the model confuses with another class (or that holds no class of
//!    the site at all) thus stops promising its guessed class after a couple of answers.
//! 2. **Take the group whose next label is worth most:** the sum over its classes of the
//!    probability times that class's [`worth`], 1 while the class is short of `min_samples` and
//!    then falling with the labels it has. Each pick adds its expected classes to the counts, so
//!    one queue spreads its labels.
//! 3. **Within a group, the newest image**: a fair sample of what the camera sees now. The
//!    hardest images (least certain) were tried and lost: they are more often another class and
//!    teach a class with a handful of labels little (docs/console.md).
//! 4. **No near-duplicates.** An image whose difference hash is within [`NEAR_DUPLICATE_BITS`]
//!    of one already labelled or queued is left out.

use std::collections::HashMap;

/// Hashes this close (in bits of 64) are the same picture for the queue.
pub const NEAR_DUPLICATE_BITS: u32 = 5;

/// How many answers the model's own belief about a group is worth.
pub const PRIOR_WEIGHT: f64 = 2.0;

/// Values closer than this are equal (sums of the same terms in another order).
const TIE: f64 = 1e-9;

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
    /// Recent images staff answered: the model's guess and the label given (`None`: skipped).
    pub answered: Vec<(String, Option<String>)>,
}

/// Why an image is in the queue where it is, for the page.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Its likely class has too few labels to take part in a run.
    ClassShort,
    /// Every likely class takes part; its likely class has fewer labels than others.
    FewLabels,
}

/// One queued image.
#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    pub id: i64,
    pub reason: Reason,
    /// The class it most likely is, by the model and the answers so far.
    pub likely: String,
}

/// What one more label of a class with `labels` labels is worth: 1 while the class cannot take
/// part yet; after that, less than half of that and falling as 1/n, so that any fair chance of
/// completing a short class comes first and the rest spread evenly.
pub fn worth(labels: f64, min_samples: usize) -> f64 {
    let min = min_samples.max(1) as f64;
    if labels < min { 1.0 } else { min / (2.0 * (labels + 1.0)) }
}

/// The images the model guesses as one class.
struct Group<'a> {
    /// Newest first.
    members: Vec<&'a Candidate>,
    /// Expected classes of its images: pseudo-counts (model belief and answers) and their sum.
    classes: HashMap<String, f64>,
    answers: f64,
}

impl Group<'_> {
    /// The probability of each class for the group's next image.
    fn distribution(&self) -> impl Iterator<Item = (&str, f64)> {
        let total = PRIOR_WEIGHT + self.answers;
        self.classes.iter().map(move |(class, mass)| (class.as_str(), mass / total))
    }
}

fn groups<'a>(candidates: &'a [Candidate], answered: &[(String, Option<String>)]) -> Vec<Group<'a>> {
    let mut by_guess: HashMap<&str, Vec<&Candidate>> = HashMap::new();
    for candidate in candidates {
        by_guess.entry(&candidate.predicted).or_default().push(candidate);
    }
    let mut groups: Vec<Group<'a>> = by_guess
        .into_values()
        .map(|mut members| {
            members.sort_by_key(|c| std::cmp::Reverse(c.id));
            let mut classes: HashMap<String, f64> = HashMap::new();
            let share = PRIOR_WEIGHT / members.len() as f64;
            for member in &members {
                for (class, p) in &member.top {
                    *classes.entry(class.clone()).or_default() += share * f64::from(*p);
                }
            }
            let guess = &members[0].predicted;
            let mut answers = 0.0;
            for (_, label) in answered.iter().filter(|(predicted, _)| predicted == guess) {
                answers += 1.0;
                if let Some(label) = label {
                    *classes.entry(label.clone()).or_default() += 1.0;
                }
            }
            Group { members, classes, answers }
        })
        .collect();
    // Newest image first, the order equal values are taken in.
    groups.sort_by_key(|g| std::cmp::Reverse(g.members[0].id));
    groups
}

/// Up to `limit` candidates in the order to label them.
pub fn next_to_label(candidates: &[Candidate], labelled: &Labelled, limit: usize) -> Vec<Pick> {
    let mut counts: HashMap<String, f64> =
        labelled.per_class.iter().map(|(class, n)| (class.clone(), *n as f64)).collect();
    let mut hashes = labelled.hashes.clone();
    let mut groups = groups(candidates, &labelled.answered);
    let mut queue = Vec::new();
    while queue.len() < limit {
        let value = |group: &Group<'_>| -> f64 {
            let labels = |class: &str| counts.get(class).copied().unwrap_or(0.0);
            group.distribution().map(|(class, p)| p * worth(labels(class), labelled.min_samples)).sum()
        };
        // The most valuable group; between equal ones, the less asked, then the newest image.
        let mut best: Option<(usize, f64)> = None;
        for (at, group) in groups.iter().enumerate().filter(|(_, g)| !g.members.is_empty()) {
            let v = value(group);
            let better = match best {
                None => true,
                Some((top_at, top)) => v > top + TIE || (v > top - TIE && group.answers < groups[top_at].answers),
            };
            if better {
                best = Some((at, v));
            }
        }
        let Some((at, _)) = best else { break };
        let group = &mut groups[at];
        let candidate = group.members.remove(0);
        if let Some(hash) = candidate.dhash {
            if hashes.iter().any(|&h| (h ^ hash).count_ones() <= NEAR_DUPLICATE_BITS) {
                continue;
            }
            hashes.push(hash);
        }
        let expected: Vec<(String, f64)> = group.distribution().map(|(c, p)| (c.to_string(), p)).collect();
        let likely = expected.iter().max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0))).map(|(c, _)| c.clone());
        let likely = likely.unwrap_or_else(|| candidate.predicted.clone());
        let short = counts.get(&likely).copied().unwrap_or(0.0) < labelled.min_samples as f64;
        // The pick counts as the answer it is expected to be, for the rest of this queue.
        for (class, p) in expected {
            *counts.entry(class.clone()).or_default() += p;
            *group.classes.entry(class).or_default() += p;
        }
        group.answers += 1.0;
        let reason = if short { Reason::ClassShort } else { Reason::FewLabels };
        queue.push(Pick { id: candidate.id, reason, likely });
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
            answered: vec![],
        }
    }

    fn ids(queue: &[Pick]) -> Vec<i64> {
        queue.iter().map(|pick| pick.id).collect()
    }

    #[test]
    fn a_label_is_worth_most_while_its_class_is_short() {
        assert_eq!(worth(0.0, 3), 1.0);
        assert_eq!(worth(2.0, 3), 1.0);
        assert!(worth(3.0, 3) < 0.5, "a class that takes part is worth less than half a short one");
        assert!(worth(8.0, 3) < worth(4.0, 3), "and less with every label");
        assert_eq!(worth(0.0, 0), 1.0, "min_samples 0 is read as 1");
    }

    #[test]
    fn short_classes_come_first_and_one_queue_spreads_over_them() {
        let candidates = [
            candidate(1, &[("A", 0.9), ("B", 0.1)], None),
            candidate(2, &[("A", 0.9), ("B", 0.1)], None),
            candidate(3, &[("A", 0.9), ("B", 0.1)], None),
            candidate(4, &[("B", 0.9), ("A", 0.1)], None),
            candidate(5, &[("C", 0.9), ("A", 0.1)], None),
            candidate(6, &[("C", 0.9), ("A", 0.1)], None),
            candidate(7, &[("C", 0.9), ("A", 0.1)], None),
        ];
        // A takes part already; B needs 1 more, C 3 more.
        let queue = next_to_label(&candidates, &labelled(&[("A", 5), ("B", 2)]), 7);
        assert_eq!(ids(&queue[..4]), vec![7, 4, 6, 5], "newest of each short group, spread, before any A");
        assert!(queue[..4].iter().all(|p| p.reason == Reason::ClassShort));
        assert_eq!(ids(&queue[4..]), vec![3, 2, 1]);
        assert!(queue[4..].iter().all(|p| p.reason == Reason::FewLabels && p.likely == "A"));
    }

    #[test]
    fn a_group_whose_answers_name_another_class_stops_promising_its_guess() {
        // The model guesses X (absent from this site) for images staff answered as A, which
        // takes part; D is short but the model is less sure of its images.
        let candidates = [
            candidate(1, &[("X", 0.95), ("A", 0.05)], None),
            candidate(2, &[("X", 0.95), ("A", 0.05)], None),
            candidate(3, &[("D", 0.6), ("A", 0.4)], None),
        ];
        let fresh = next_to_label(&candidates, &labelled(&[("A", 9)]), 1);
        assert_eq!((fresh[0].id, fresh[0].likely.as_str()), (2, "X"), "unanswered, X looks like a short class");
        let mut known = labelled(&[("A", 12)]);
        known.answered = vec![("X".into(), Some("A".into())); 3];
        let answered = next_to_label(&candidates, &known, 3);
        assert_eq!(answered[0].id, 3, "after three answers of A, the X group is mostly A");
        assert_eq!(answered[1].likely, "A");
        assert_eq!(answered[1].reason, Reason::FewLabels);
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
    fn the_queue_stops_at_its_limit_or_when_nothing_is_left() {
        let candidates: Vec<_> = (0..5).map(|i| candidate(i, &[("A", 0.5), ("B", 0.4)], None)).collect();
        assert_eq!(next_to_label(&candidates, &labelled(&[]), 2).len(), 2);
        assert_eq!(next_to_label(&candidates, &labelled(&[]), 10).len(), 5);
        assert!(next_to_label(&[], &labelled(&[]), 10).is_empty());
    }
}
