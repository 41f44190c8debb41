//! The classification counters as reported in status and metrics messages.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Confidence histogram bins: tenths.
pub const CONFIDENCE_BINS: usize = 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountersReport {
    pub classified: u64,
    pub failed: u64,
    pub per_class: BTreeMap<String, u64>,
    /// Mean top-1 confidence of the predictions of each class.
    pub per_class_confidence: BTreeMap<String, f64>,
    /// Counts of top-1 confidence in tenths: [0, 0.1), [0.1, 0.2), ... [0.9, 1].
    pub confidence_histogram: [u64; CONFIDENCE_BINS],
    pub latency_ms: Option<Latency>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    /// Requests the percentiles cover.
    pub window: usize,
}
