//! The classifier head (the model's last layer), kept frozen by default during adaptation.

use ndarray::{Array1, Array2, ArrayView2};

#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// `[C, d]`: one row per class.
    pub weight: Array2<f32>,
    /// `[C]`.
    pub bias: Array1<f32>,
    pub classes: Vec<String>,
}

impl Head {
    pub fn new(weight: Array2<f32>, bias: Array1<f32>, classes: Vec<String>) -> Result<Head, String> {
        if weight.nrows() != classes.len() {
            return Err(format!("weight has {} rows but there are {} classes", weight.nrows(), classes.len()));
        }
        if bias.len() != classes.len() {
            return Err(format!("bias has {} values but there are {} classes", bias.len(), classes.len()));
        }
        Ok(Head { weight, bias, classes })
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    pub fn feature_dim(&self) -> usize {
        self.weight.ncols()
    }

    /// `[N, d]` features to `[N, C]` logits.
    pub fn logits(&self, features: ArrayView2<'_, f32>) -> Array2<f32> {
        let mut logits = features.dot(&self.weight.t());
        logits += &self.bias;
        logits
    }

    pub fn class_index(&self, name: &str) -> Option<usize> {
        self.classes.iter().position(|class| class == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn logits_are_features_times_weight_transposed_plus_bias() {
        let head = Head::new(
            array![[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]],
            array![0.0, 0.5, -1.0],
            vec!["a".into(), "b".into(), "c".into()],
        )
        .unwrap();
        let logits = head.logits(array![[3.0, 4.0]].view());
        assert_eq!(logits, array![[3.0, 8.5, 6.0]]);
        assert_eq!(head.class_index("b"), Some(1));
        assert_eq!(head.class_index("z"), None);
    }

    #[test]
    fn class_count_must_match_the_weight_rows() {
        let error = Head::new(Array2::zeros((2, 4)), Array1::zeros(2), vec!["only".into()]).unwrap_err();
        assert!(error.contains("2 rows"), "{error}");
    }
}
