//! The device agent's config sections: local endpoints, labelling, adaptation policy and the
//! safety gate. Defaults suit a CPU box; `device-config/default.toml` documents every key.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Loopback address of the local endpoint (classification, labelling, commands).
    pub listen: String,
    pub enabled: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: "127.0.0.1:8470".into(), enabled: true }
    }
}

/// What happens to an image in the watched folder once it is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterClassify {
    /// Move it to `<data_dir>/classified/`.
    Move,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// Folder whose images are classified as they appear. Unset: `<data_dir>/watch`.
    pub folder: Option<PathBuf>,
    pub poll_ms: u64,
    pub after: AfterClassify,
    /// Split tensors of this many recent classified images are kept as unlabelled traffic for
    /// calibration and the unseen-health estimate.
    pub keep_traffic: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig { folder: None, poll_ms: 250, after: AfterClassify::Move, keep_traffic: 2000 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabellingConfig {
    /// Folder with one subfolder per class whose files are ingested as labelled samples.
    /// Unset: `<data_dir>/inbox`.
    pub inbox: Option<PathBuf>,
    /// Every n-th sample of a class is held out for the safety gate's validation.
    pub validation_every: usize,
    /// Keep the encoded image with each sample (to extract features again for a new trunk).
    pub keep_images: bool,
    /// Recorded with each sample.
    pub site: Option<String>,
}

impl Default for LabellingConfig {
    fn default() -> Self {
        LabellingConfig { inbox: None, validation_every: 5, keep_images: true, site: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptationConfig {
    /// Method name, as `edgeadapt bench` takes it.
    pub method: String,
    /// Start a run after this many new labels (0: never).
    pub after_new_labels: usize,
    /// Start a run this often when there are new labels (0: never).
    pub every_minutes: u64,
    /// Training samples a class needs before it counts as seen.
    pub min_samples_per_class: usize,
    pub seed: u64,
}

impl Default for AdaptationConfig {
    fn default() -> Self {
        AdaptationConfig {
            method: "recommended".into(),
            after_new_labels: 0,
            every_minutes: 0,
            min_samples_per_class: 3,
            seed: 0,
        }
    }
}

/// Tolerances of the safety gate, as fractions (0.02 = 2 points).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// How far validation accuracy on the seen classes may fall below the current version's.
    pub max_seen_drop: f32,
    /// How far the share of traffic predicted as an unseen class may fall below the source's.
    pub max_unseen_rate_drop: f32,
    /// How far accuracy on the bundle's reference samples of unseen classes may fall below the
    /// source's.
    pub max_reference_drop: f32,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig { max_seen_drop: 0.02, max_unseen_rate_drop: 0.05, max_reference_drop: 0.05 }
    }
}
