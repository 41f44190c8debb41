//! The classifier head (the model's last layer), kept frozen by default during adaptation.
//! Its logits are computed by the `network` module, like the tail's.

use ndarray::{Array1, Array2};

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_count_must_match_the_weight_rows() {
        let error = Head::new(Array2::zeros((2, 4)), Array1::zeros(2), vec!["only".into()]).unwrap_err();
        assert!(error.contains("2 rows"), "{error}");
    }
}
