//! Predictions: softmax and top-k over logits, and one result per classified file.

use std::path::PathBuf;

use ndarray::{ArrayView2, Axis};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Prediction {
    pub class_index: usize,
    pub class: String,
    /// Softmax probability of the predicted class.
    pub confidence: f32,
    /// The `k` most probable classes with their probabilities, best first.
    pub top: Vec<(String, f32)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileResult {
    pub file: PathBuf,
    #[serde(serialize_with = "serialize_outcome")]
    pub outcome: Result<Prediction, String>,
}

fn serialize_outcome<S: serde::Serializer>(
    outcome: &Result<Prediction, String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = serializer.serialize_map(Some(1))?;
    match outcome {
        Ok(prediction) => map.serialize_entry("prediction", prediction)?,
        Err(error) => map.serialize_entry("error", error)?,
    }
    map.end()
}

/// Softmax and top-k over each row of logits.
pub fn predict(logits: ArrayView2<'_, f32>, classes: &[String], k: usize) -> Vec<Prediction> {
    logits
        .axis_iter(Axis(0))
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = row.iter().map(|&z| (z - max).exp()).collect();
            let total: f32 = exps.iter().sum();
            let mut order: Vec<usize> = (0..exps.len()).collect();
            order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
            let top = order.iter().take(k.max(1)).map(|&i| (classes[i].clone(), exps[i] / total)).collect::<Vec<_>>();
            Prediction {
                class_index: order[0],
                class: classes[order[0]].clone(),
                confidence: exps[order[0]] / total,
                top,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn predictions_rank_classes_by_probability() {
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let predictions = predict(array![[1.0, 3.0, 2.0], [0.0, 0.0, 0.0]].view(), &classes, 2);
        assert_eq!(predictions[0].class, "b");
        assert_eq!(predictions[0].top.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(), vec!["b", "c"]);
        let expected = 3f32.exp() / (1f32.exp() + 2f32.exp() + 3f32.exp());
        assert!((predictions[0].confidence - expected).abs() < 1e-6);
        // Ties go to the lower class index, and probabilities of a uniform row are equal.
        assert_eq!(predictions[1].class_index, 0);
        assert!((predictions[1].confidence - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let classes: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        let prediction = &predict(array![[1000.0, 990.0]].view(), &classes, 1)[0];
        assert!(prediction.confidence.is_finite() && prediction.confidence > 0.99);
    }
}
