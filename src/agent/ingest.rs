//! Labelled samples in: checks (class, image, duplicates), split tensors from the trunk, and
//! the store, in one transaction per batch.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::adapt::data::{SplitSet, encode_features};
use crate::imaging;
use crate::inference::prepare_bytes;
use crate::store::{NewSample, Split, StoreError};

use super::{Agent, AgentError, nearest, policy};
use crate::protocol::events::Event;

/// Why one labelled sample was refused. Nothing of a refused sample is stored.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IngestError {
    /// `hint` names the nearest classes ([`nearest::class_hint`]).
    #[error("unknown class '{class}'; {hint}")]
    UnknownClass { class: String, hint: String },
    #[error("{what}: {problem}")]
    BadImage { what: String, problem: String },
    #[error("{what}: already stored as sample {id} of class '{class}'")]
    Duplicate { what: String, id: i64, class: String },
    #[error("{what}: {problem}")]
    Failed { what: String, problem: String },
}

impl IngestError {
    /// What is wrong, without the file's name, for messages that name the file themselves.
    pub fn problem(&self) -> String {
        let full = self.to_string();
        match self {
            IngestError::UnknownClass { .. } => full,
            IngestError::BadImage { what, .. }
            | IngestError::Duplicate { what, .. }
            | IngestError::Failed { what, .. } => {
                full.strip_prefix(&format!("{what}: ")).map(str::to_string).unwrap_or(full)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingested {
    pub id: i64,
    pub class: String,
    pub split: Split,
    pub sha256: String,
}

/// One labelled image offered for ingest.
pub struct Labelled<'a> {
    /// File name or other description, for messages.
    pub what: &'a str,
    pub bytes: &'a [u8],
    pub class: &'a str,
}

pub(super) fn unknown_label(class: &str) -> AgentError {
    AgentError::Input(format!("stored sample of class '{class}', which this bundle does not have"))
}

impl Agent {
    /// Ingests labelled images: decodes them, extracts their split tensors in one trunk batch
    /// and stores them in one transaction. Each image gets its own result; an `Ok` is durable.
    pub fn ingest(&mut self, items: &[Labelled<'_>], origin: &str) -> Vec<Result<Ingested, IngestError>> {
        self.ingest_by(items, origin, None)
    }

    /// [`Agent::ingest`], recording who labelled the images (a console user).
    pub fn ingest_by(
        &mut self,
        items: &[Labelled<'_>],
        origin: &str,
        user: Option<&str>,
    ) -> Vec<Result<Ingested, IngestError>> {
        let classes = self.classes().to_vec();
        let mut results: Vec<Option<Result<Ingested, IngestError>>> = vec![None; items.len()];
        let mut candidates = Vec::new();
        for (index, item) in items.iter().enumerate() {
            if !classes.iter().any(|c| c == item.class) {
                results[index] = Some(Err(IngestError::UnknownClass {
                    class: item.class.to_string(),
                    hint: nearest::class_hint(item.class, &classes),
                }));
                continue;
            }
            let sha = hex::encode(Sha256::digest(item.bytes));
            match self.store.find_sample(&sha) {
                Ok(Some((id, class))) => {
                    results[index] = Some(Err(IngestError::Duplicate { what: item.what.to_string(), id, class }))
                }
                Ok(None) => candidates.push((index, sha)),
                Err(e) => {
                    results[index] = Some(Err(IngestError::Failed { what: item.what.into(), problem: e.to_string() }))
                }
            }
        }
        let encoded: Vec<(&str, &[u8])> = candidates.iter().map(|(i, _)| (items[*i].what, items[*i].bytes)).collect();
        let prepared = prepare_bytes(&encoded, &self.classifier.bundle.manifest.input, &self.limits);
        let mut ready = Vec::new();
        for ((index, sha), outcome) in candidates.into_iter().zip(prepared) {
            match outcome {
                Ok(input) => ready.push((index, sha, input)),
                Err(e) => {
                    results[index] =
                        Some(Err(IngestError::BadImage { what: items[index].what.to_string(), problem: e.problem() }))
                }
            }
        }
        if !ready.is_empty() {
            let outcome = self.extract(ready.iter().map(|(_, _, input)| input.view()).collect());
            match outcome {
                Err(e) => {
                    for (index, _, _) in &ready {
                        results[*index] = Some(Err(IngestError::Failed {
                            what: items[*index].what.to_string(),
                            problem: e.to_string(),
                        }));
                    }
                }
                Ok(rows) => self.store_samples(items, &ready, rows, (origin, user), &mut results),
            }
        }
        results.into_iter().map(|r| r.expect("every item has a result")).collect()
    }

    fn store_samples(
        &mut self,
        items: &[Labelled<'_>],
        ready: &[(usize, String, ndarray::Array3<f32>)],
        rows: Vec<Vec<u8>>,
        (origin, user): (&str, Option<&str>),
        results: &mut [Option<Result<Ingested, IngestError>>],
    ) {
        let keep_images = self.config.labelling.keep_images;
        let site = self.config.labelling.site.clone();
        let samples: Vec<NewSample<'_>> = ready
            .iter()
            .zip(&rows)
            .map(|((index, sha, _), features)| NewSample {
                sha256: sha,
                class: items[*index].class,
                labelled_by: user,
                origin,
                site: site.as_deref(),
                image: keep_images.then_some(items[*index].bytes),
                features,
            })
            .collect();
        let every = self.config.labelling.validation_every;
        let stored = self.store.insert_samples(
            &samples,
            |n| policy::split_for(n, every),
            |sample, id, split| Event::SampleIngested {
                id,
                class: sample.class.to_string(),
                split: split.as_str().to_string(),
                origin: sample.origin.to_string(),
                user: sample.labelled_by.map(str::to_string),
            },
        );
        match stored {
            Ok(outcomes) => {
                for (((index, sha, _), outcome), sample) in ready.iter().zip(outcomes).zip(&samples) {
                    results[*index] = Some(match outcome {
                        Ok((id, split)) => {
                            Ok(Ingested { id, class: sample.class.to_string(), split, sha256: sha.clone() })
                        }
                        Err(StoreError::Duplicate { id, class, .. }) => {
                            Err(IngestError::Duplicate { what: items[*index].what.to_string(), id, class })
                        }
                        Err(e) => Err(IngestError::Failed { what: items[*index].what.into(), problem: e.to_string() }),
                    });
                }
            }
            Err(e) => {
                for (index, _, _) in ready {
                    results[*index] =
                        Some(Err(IngestError::Failed { what: items[*index].what.into(), problem: e.to_string() }));
                }
            }
        }
    }

    /// Split tensors of prepared inputs, one f16 row block per sample.
    pub(super) fn extract(&mut self, inputs: Vec<ndarray::ArrayView3<'_, f32>>) -> Result<Vec<Vec<u8>>, AgentError> {
        let batch = imaging::stack(&inputs);
        let split = self.classifier.split(batch.view())?;
        let set = SplitSet::from_onnx(split.view(), vec![0; inputs.len()]).map_err(AgentError::Input)?;
        Ok((0..set.len()).map(|i| encode_features(&set, i)).collect())
    }
}
