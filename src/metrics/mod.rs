//! Accuracy figures, always with the argmax over all classes.

use ndarray::{ArrayView2, Axis};

/// The index of the largest value; of equal maxima the lowest index, as the served prediction
/// (`inference::predict`) orders them. 0 for no values.
pub fn argmax(values: impl IntoIterator<Item = f32>) -> usize {
    let mut best: Option<(usize, f32)> = None;
    for (index, value) in values.into_iter().enumerate() {
        if best.is_none_or(|(_, top)| value.total_cmp(&top).is_gt()) {
            best = Some((index, value));
        }
    }
    best.map_or(0, |(index, _)| index)
}

/// The predicted class of each row of logits ([`argmax`]).
pub fn argmax_rows(logits: ArrayView2<'_, f32>) -> Vec<usize> {
    logits.axis_iter(Axis(0)).map(|row| argmax(row.iter().copied())).collect()
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

    #[test]
    fn argmax_takes_the_lowest_index_of_equal_maxima_as_the_served_prediction_does() {
        assert_eq!(argmax([0.1, 0.7, 0.7, 0.2]), 1);
        assert_eq!(argmax([3.0]), 0);
        assert_eq!(argmax(std::iter::empty()), 0);
        assert_eq!(argmax([f32::NEG_INFINITY, -1.0]), 1);
        let logits = ndarray::array![[1.0, 2.0, 2.0], [5.0, 5.0, 0.0]];
        assert_eq!(argmax_rows(logits.view()), vec![1, 0]);
    }
}
