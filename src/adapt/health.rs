//! Label-free estimates of unseen-class health, reported next to every adaptation.
//!
//! Without unseen labels a device can only estimate: from source-domain reference samples of
//! the unseen classes shipped in the bundle, from how often unlabelled local traffic is still
//! predicted as an unseen class, and from agreement with the source model.

use serde::Serialize;

use super::data::SplitSet;
use super::method::{Adapted, Traffic};
use crate::metrics::argmax_rows;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Health {
    /// Accuracy on the bundle's reference samples of unseen classes: adapted, source.
    pub reference_unseen: Option<(f32, f32)>,
    /// Share of unlabelled target samples predicted as an unseen class: adapted, source.
    pub predicted_unseen_rate: Option<(f32, f32)>,
    /// Share of unlabelled target samples on which adapted and source predictions agree.
    pub source_agreement: Option<f32>,
}

pub fn estimate(
    adapted: &Adapted,
    source: &Adapted,
    reference: Option<&SplitSet>,
    unlabelled: Option<&Traffic>,
) -> Health {
    let unseen = &adapted.unseen;
    let reference_unseen =
        reference.map(|set| set.filter(|label| unseen.contains(&label))).filter(|set| !set.is_empty()).map(|set| {
            let accuracy = |model: &Adapted| {
                let predicted = argmax_rows(model.logits_of(&set).view());
                predicted.iter().zip(&set.labels).filter(|(p, l)| p == l).count() as f32 / set.len() as f32
            };
            (accuracy(adapted), accuracy(source))
        });
    let (predicted_unseen_rate, source_agreement) = match unlabelled.filter(|traffic| !traffic.splits.is_empty()) {
        Some(traffic) => {
            let ours = argmax_rows(adapted.logits_of(&traffic.splits).view());
            let theirs = argmax_rows(traffic.source_logits.view());
            let rate = |predictions: &[usize]| {
                predictions.iter().filter(|p| unseen.contains(p)).count() as f32 / predictions.len() as f32
            };
            let agreement = ours.iter().zip(&theirs).filter(|(a, b)| a == b).count() as f32 / ours.len() as f32;
            (Some((rate(&ours), rate(&theirs))), Some(agreement))
        }
        None => (None, None),
    };
    Health { reference_unseen, predicted_unseen_rate, source_agreement }
}
