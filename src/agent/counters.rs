//! Classification counters: per-class counts, a confidence histogram and latency percentiles
//! over a window of recent requests.

use std::collections::{BTreeMap, VecDeque};

pub use crate::protocol::counters::{CONFIDENCE_BINS, CountersReport, Latency};

/// Latencies kept for percentiles.
const LATENCY_WINDOW: usize = 2000;

#[derive(Debug, Clone, Default)]
pub struct Counters {
    per_class: BTreeMap<String, u64>,
    confidence_sum: BTreeMap<String, f64>,
    confidence: [u64; CONFIDENCE_BINS],
    latencies_ms: VecDeque<f64>,
    classified: u64,
    failed: u64,
}

impl Counters {
    pub fn record(&mut self, class: &str, confidence: f32, latency_ms: f64) {
        self.classified += 1;
        *self.per_class.entry(class.to_string()).or_default() += 1;
        *self.confidence_sum.entry(class.to_string()).or_default() += f64::from(confidence);
        let bin = ((confidence.clamp(0.0, 1.0) * CONFIDENCE_BINS as f32) as usize).min(CONFIDENCE_BINS - 1);
        self.confidence[bin] += 1;
        if self.latencies_ms.len() == LATENCY_WINDOW {
            self.latencies_ms.pop_front();
        }
        self.latencies_ms.push_back(latency_ms);
    }

    pub fn record_failure(&mut self) {
        self.failed += 1;
    }

    pub fn report(&self) -> CountersReport {
        let mut sorted: Vec<f64> = self.latencies_ms.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let latency_ms = (!sorted.is_empty()).then(|| Latency {
            p50: percentile(&sorted, 0.50),
            p99: percentile(&sorted, 0.99),
            window: sorted.len(),
        });
        CountersReport {
            classified: self.classified,
            failed: self.failed,
            per_class: self.per_class.clone(),
            per_class_confidence: self
                .confidence_sum
                .iter()
                .map(|(class, sum)| (class.clone(), sum / self.per_class[class] as f64))
                .collect(),
            confidence_histogram: self.confidence,
            latency_ms,
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_bins_and_percentiles() {
        let mut counters = Counters::default();
        for i in 1..=100 {
            counters.record(if i % 2 == 0 { "a" } else { "b" }, (i as f32 - 0.5) / 100.0, i as f64);
        }
        counters.record_failure();
        let report = counters.report();
        assert_eq!(report.classified, 100);
        assert_eq!(report.failed, 1);
        assert_eq!(report.per_class["a"], 50);
        // Class "a" got the even i: confidences (i - 0.5) / 100 for i = 2, 4, ..., 100.
        assert!((report.per_class_confidence["a"] - 0.505).abs() < 1e-6, "{:?}", report.per_class_confidence);
        assert_eq!(report.confidence_histogram.iter().sum::<u64>(), 100);
        assert_eq!(report.confidence_histogram, [10; CONFIDENCE_BINS]);
        let latency = report.latency_ms.unwrap();
        assert_eq!((latency.p50, latency.p99, latency.window), (50.0, 99.0, 100));
    }
}
