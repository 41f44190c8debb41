//! Losses on logits and their gradients (batch means).

use ndarray::{Array2, ArrayView1, Axis};

fn log_softmax(row: ArrayView1<'_, f32>) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = row.iter().map(|&z| (z - max).exp()).sum::<f32>().ln() + max;
    row.iter().map(|&z| z - log_total).collect()
}

/// Mean negative log-likelihood of the labels under `softmax(logits)`, without a gradient (for
/// scoring and calibration).
pub fn mean_nll(logits: &Array2<f32>, labels: &[usize]) -> f32 {
    let total: f32 = logits.axis_iter(Axis(0)).zip(labels).map(|(row, &label)| -log_softmax(row)[label]).sum();
    total / labels.len().max(1) as f32
}

/// Each row's softmax.
pub fn softmax_rows(logits: &Array2<f32>) -> Array2<f32> {
    let mut out = logits.clone();
    for mut row in out.axis_iter_mut(Axis(0)) {
        let log_p = log_softmax(row.view());
        row.iter_mut().zip(log_p).for_each(|(v, lp)| *v = lp.exp());
    }
    out
}

/// Cross-entropy over all classes; returns the mean loss and its gradient.
pub fn cross_entropy(logits: &Array2<f32>, labels: &[usize]) -> (f32, Array2<f32>) {
    let samples = logits.nrows() as f32;
    let mut grad = Array2::zeros(logits.dim());
    let mut loss = 0.0;
    for ((row, mut grad_row), &label) in logits.axis_iter(Axis(0)).zip(grad.axis_iter_mut(Axis(0))).zip(labels) {
        let log_p = log_softmax(row);
        loss -= log_p[label];
        for (g, lp) in grad_row.iter_mut().zip(&log_p) {
            *g = lp.exp() / samples;
        }
        grad_row[label] -= 1.0 / samples;
    }
    (loss / samples, grad)
}

/// Relation-preserving distillation on a subset of classes:
/// `T² · KL(softmax(teacher[S] / T) ‖ softmax(logits[S] / T))`, mean over the batch.
pub fn distillation(
    logits: &Array2<f32>,
    teacher: &Array2<f32>,
    classes: &[usize],
    temperature: f32,
) -> (f32, Array2<f32>) {
    let samples = logits.nrows() as f32;
    let mut grad = Array2::zeros(logits.dim());
    let mut loss = 0.0;
    if classes.len() < 2 {
        return (0.0, grad);
    }
    for ((row, teacher_row), mut grad_row) in
        logits.axis_iter(Axis(0)).zip(teacher.axis_iter(Axis(0))).zip(grad.axis_iter_mut(Axis(0)))
    {
        let student: Vec<f32> = classes.iter().map(|&c| row[c] / temperature).collect();
        let reference: Vec<f32> = classes.iter().map(|&c| teacher_row[c] / temperature).collect();
        let log_q = log_softmax(ArrayView1::from(&student));
        let log_p = log_softmax(ArrayView1::from(&reference));
        for (k, &class) in classes.iter().enumerate() {
            let p = log_p[k].exp();
            loss += temperature * temperature * p * (log_p[k] - log_q[k]);
            grad_row[class] = temperature * (log_q[k].exp() - p) / samples;
        }
    }
    (loss / samples, grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn the_plain_likelihood_and_softmax_agree_with_the_training_loss() {
        let logits = array![[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]];
        let labels = [2, 1];
        assert!((mean_nll(&logits, &labels) - cross_entropy(&logits, &labels).0).abs() < 1e-6);
        let p = softmax_rows(&logits);
        assert!(p.rows().into_iter().all(|row| (row.sum() - 1.0).abs() < 1e-6));
        assert!((p[[1, 1]].ln() + mean_nll(&logits.select(Axis(0), &[1]), &[1])).abs() < 1e-6);
    }

    fn numeric(f: impl Fn(&Array2<f32>) -> f32, at: &Array2<f32>) -> Array2<f32> {
        let mut grad = Array2::zeros(at.dim());
        let step = 1e-3;
        for index in 0..at.len() {
            let (r, c) = (index / at.ncols(), index % at.ncols());
            let mut plus = at.clone();
            plus[[r, c]] += step;
            let mut minus = at.clone();
            minus[[r, c]] -= step;
            grad[[r, c]] = (f(&plus) - f(&minus)) / (2.0 * step);
        }
        grad
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let logits = array![[1.0, -0.5, 2.0, 0.25], [0.0, 3.0, -1.0, 0.5]];
        let labels = [2, 0];
        let (loss, grad) = cross_entropy(&logits, &labels);
        let expected = -(log_softmax(logits.row(0))[2] + log_softmax(logits.row(1))[0]) / 2.0;
        assert!((loss - expected).abs() < 1e-6);
        let numeric = numeric(|z| cross_entropy(z, &labels).0, &logits);
        for (a, b) in grad.iter().zip(numeric.iter()) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn distillation_is_zero_at_the_teacher_and_its_gradient_matches_finite_differences() {
        let teacher = array![[1.0, -0.5, 2.0, 0.25], [0.0, 3.0, -1.0, 0.5]];
        let classes = [0, 2, 3];
        let (loss, grad) = distillation(&teacher, &teacher, &classes, 2.0);
        assert!(loss.abs() < 1e-6 && grad.iter().all(|g| g.abs() < 1e-6));
        let logits = array![[0.5, 1.0, 1.0, -1.0], [1.0, 0.0, 0.5, 2.0]];
        let (loss, grad) = distillation(&logits, &teacher, &classes, 2.0);
        assert!(loss > 0.0);
        assert_eq!(grad[[0, 1]], 0.0, "classes outside the subset get no gradient");
        let numeric = numeric(|z| distillation(z, &teacher, &classes, 2.0).0, &logits);
        for (a, b) in grad.iter().zip(numeric.iter()) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }
}
