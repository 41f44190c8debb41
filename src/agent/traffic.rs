//! Classification, and what it leaves behind: unlabelled traffic for prior matching, and the
//! recent images with their predictions for labelling on the console.

use std::time::Instant;

use crate::adapt::data::{SplitSet, encode_features};
use crate::imaging;
use crate::inference::{Prediction, predict, prepare_bytes};
use crate::store::{KeepImages, NewTrafficImage};

use super::{Agent, AgentError};

/// Unlabelled traffic rows are written to the store in groups of this many.
const TRAFFIC_FLUSH_ROWS: usize = 64;
/// Classes kept with each recent image, for the labelling queue.
const KEPT_TOP: usize = 5;

impl Agent {
    /// Classifies encoded images with the served version. Counts each result and keeps the
    /// split tensors as unlabelled traffic.
    pub fn classify(&mut self, images: &[(&str, &[u8])], top_k: usize) -> Vec<Result<Prediction, String>> {
        let started = Instant::now();
        let mut results: Vec<Option<Result<Prediction, String>>> = vec![None; images.len()];
        let mut ready = Vec::new();
        let prepared = prepare_bytes(images, &self.classifier.bundle.manifest.input, &self.limits);
        for (index, outcome) in prepared.into_iter().enumerate() {
            match outcome {
                Ok(input) => ready.push((index, input)),
                Err(e) => results[index] = Some(Err(e.to_string())),
            }
        }
        let decode_failures = images.len() - ready.len();
        if !ready.is_empty() {
            let batch = imaging::stack(&ready.iter().map(|(_, input)| input.view()).collect::<Vec<_>>());
            let outcome = self.classifier.split(batch.view()).and_then(|split| {
                let logits = self.classifier.logits_from_split(split.view())?;
                Ok((split, logits))
            });
            match outcome {
                Ok((split, logits)) => {
                    let predictions = predict(logits.view(), self.classes(), top_k.max(KEPT_TOP));
                    let non_finite = predictions.iter().filter(|p| !p.confidence.is_finite()).count();
                    self.note_probation(0, non_finite);
                    if let Ok(set) = SplitSet::from_onnx(split.view(), vec![0; ready.len()]) {
                        self.pending_traffic.extend((0..set.len()).map(|i| encode_features(&set, i)));
                    }
                    for ((index, _), mut prediction) in ready.iter().zip(predictions) {
                        self.keep_image(images[*index], &prediction);
                        prediction.top.truncate(top_k);
                        results[*index] = Some(Ok(prediction));
                    }
                }
                Err(e) => {
                    for (index, _) in &ready {
                        results[*index] = Some(Err(e.to_string()));
                    }
                }
            }
        }
        let model_failures = results.iter().filter(|r| matches!(r, Some(Err(_)))).count() - decode_failures;
        self.note_probation(ready.len() - model_failures, model_failures);
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let results: Vec<_> = results.into_iter().map(|r| r.expect("every image has a result")).collect();
        for result in &results {
            match result {
                Ok(prediction) => self.counters.record(&prediction.class, prediction.confidence, latency_ms),
                Err(_) => self.counters.record_failure(),
            }
        }
        if self.pending_traffic.len() >= TRAFFIC_FLUSH_ROWS
            && let Err(error) = self.flush_traffic()
        {
            tracing::warn!(%error, "cannot store unlabelled traffic");
        }
        results
    }

    /// Buffers a classified image for the console, while the byte budget of the buffer lasts.
    fn keep_image(&mut self, (name, bytes): (&str, &[u8]), prediction: &Prediction) {
        let keep = self.keep_images();
        if keep.count == 0 || bytes.len() as u64 > keep.bytes {
            return;
        }
        let buffered: usize = self.pending_images.iter().map(|image| image.image.len()).sum();
        if (buffered + bytes.len()) as u64 > keep.bytes || self.pending_images.len() >= keep.count {
            return;
        }
        self.pending_images.push(NewTrafficImage {
            name: name.chars().take(200).collect(),
            predicted: prediction.class.clone(),
            confidence: prediction.confidence,
            top: prediction.top.iter().take(KEPT_TOP).cloned().collect(),
            image: bytes.to_vec(),
        });
    }

    fn keep_images(&self) -> KeepImages {
        let console = &self.config.console;
        let count = if console.enabled { console.keep_images } else { 0 };
        KeepImages { count, bytes: console.keep_image_bytes }
    }

    /// Writes buffered recent images to the store.
    pub fn flush_images(&mut self) -> Result<(), AgentError> {
        if self.pending_images.is_empty() {
            return Ok(());
        }
        let images = std::mem::take(&mut self.pending_images);
        self.store.add_traffic_images(&images, self.keep_images())?;
        Ok(())
    }

    /// Writes buffered traffic rows to the store.
    pub fn flush_traffic(&mut self) -> Result<(), AgentError> {
        if self.pending_traffic.is_empty() {
            return Ok(());
        }
        let keep = self.config.watch.keep_traffic;
        self.store.add_traffic(&self.pending_traffic, keep)?;
        self.traffic_rows = (self.traffic_rows + self.pending_traffic.len()).min(keep);
        self.pending_traffic.clear();
        Ok(())
    }
}
