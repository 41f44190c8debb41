//! Accuracy figures, always with the argmax over all classes.

use ndarray::{ArrayView2, Axis};

/// The predicted class of each row of logits (of equal maxima, the last).
pub fn argmax_rows(logits: ArrayView2<'_, f32>) -> Vec<usize> {
    logits
        .axis_iter(Axis(0))
        .map(|row| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(c, _)| c))
        .collect()
}

/// Fraction of `predicted[i] == labels[i]`; `None` for no samples.
pub fn accuracy(labels: &[usize], predicted: &[usize]) -> Option<f64> {
    if labels.is_empty() {
        return None;
    }
    let correct = labels.iter().zip(predicted).filter(|(l, p)| l == p).count();
    Some(correct as f64 / labels.len() as f64)
}

/// Accuracy of each class over the samples labelled with it (`None` where a class has none).
pub fn per_class_accuracy(labels: &[usize], predicted: &[usize], classes: usize) -> Vec<Option<f64>> {
    let mut correct = vec![0usize; classes];
    let mut total = vec![0usize; classes];
    for (&label, &prediction) in labels.iter().zip(predicted) {
        total[label] += 1;
        if label == prediction {
            correct[label] += 1;
        }
    }
    correct.iter().zip(&total).map(|(&c, &t)| (t > 0).then(|| c as f64 / t as f64)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_counts_matches() {
        assert_eq!(accuracy(&[0, 1, 2, 2], &[0, 1, 1, 2]), Some(0.75));
        assert_eq!(accuracy(&[], &[]), None);
        assert_eq!(per_class_accuracy(&[0, 0, 2], &[0, 1, 2], 3), vec![Some(0.5), None, Some(1.0)]);
    }
}
