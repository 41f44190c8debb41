//! The limits of a new bundle's health check (`crate::deploy::health`), as a `deploy`
//! command carries them.

use serde::{Deserialize, Serialize};

/// Where the health check draws its lines; the fleet sends them with the deployment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// Shadowed images below which only the failures are judged.
    pub min_images: usize,
    pub min_agreement: f64,
    /// Labelled images below which accuracy is not compared.
    pub min_labelled: usize,
    pub max_accuracy_drop: f64,
    /// How far the new model's most predicted class may outgrow the served model's.
    pub max_top_share_rise: f64,
    /// The new model's mean confidence at least this share of the served model's.
    pub min_confidence_ratio: f64,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            min_images: 20,
            min_agreement: 0.5,
            min_labelled: 10,
            max_accuracy_drop: 0.05,
            max_top_share_rise: 0.25,
            min_confidence_ratio: 0.5,
        }
    }
}

impl Thresholds {
    pub fn validate(&self) -> Result<(), String> {
        let fractions = [
            ("min_agreement", self.min_agreement),
            ("max_accuracy_drop", self.max_accuracy_drop),
            ("max_top_share_rise", self.max_top_share_rise),
            ("min_confidence_ratio", self.min_confidence_ratio),
        ];
        for (name, value) in fractions {
            if !(0.0..=1.0).contains(&value) {
                return Err(format!("health.{name} must be between 0 and 1, not {value}"));
            }
        }
        Ok(())
    }
}
