//! Model bundles on disk: a folder with `manifest.toml`, the trunk ONNX, tail and head weights.
//!
//! Every file is checked against the sha256 in the manifest before it is used, so a corrupted or
//! swapped file is refused by name instead of producing wrong predictions.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, Ix1, Ix2};
use sha2::{Digest, Sha256};

use super::head::Head;
use super::manifest::{MANIFEST_FILE, Manifest, TailLayerKind};
use super::tail::{Tail, TailLayer};
use super::tensors::{TensorFile, TensorFileError};
use crate::output::{self, OutputError, Overwrite};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid manifest: {problem}")]
    Manifest { path: PathBuf, problem: String },
    #[error(
        "{path}: checksum mismatch (manifest says sha256 {expected}, file has {actual}); the file is corrupted or does not belong to this bundle"
    )]
    Checksum { path: PathBuf, expected: String, actual: String },
    #[error(transparent)]
    Tensor(#[from] TensorFileError),
    #[error("{path}: {problem}")]
    Weights { path: PathBuf, problem: String },
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// Reference split tensors `[n, ...]` and the class index of each.
pub type ReferenceSet = (ndarray::ArrayD<f32>, Vec<usize>);

/// A verified bundle, ready to build a classifier from.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub tail: Tail,
    pub head: Head,
}

impl Bundle {
    /// Identifies the bundle by what makes its predictions: its files' checksums and what the
    /// manifest says about them (the input contract, the trunk, the tail's layers, the head's
    /// classes in order, the reference samples); not its description or provenance. A store,
    /// a version or a deployment is never used with another model, even one that differs from
    /// it only in the order of its classes.
    pub fn id(&self) -> String {
        let m = &self.manifest;
        let meaning = serde_json::json!({
            "checksums": m.checksums,
            "input": m.input,
            "trunk": m.trunk,
            "tail": m.tail,
            "head": m.head,
            "reference": m.reference,
        });
        let digest = Sha256::digest(meaning.to_string().as_bytes());
        format!("{}@{}", m.name, &hex::encode(digest)[..16])
    }

    /// The id earlier releases gave the bundle (its files' checksums only), by which stores
    /// and weights sets made by them name it.
    pub fn legacy_id(&self) -> String {
        let mut hasher = Sha256::new();
        for (file, sha) in &self.manifest.checksums {
            hasher.update(file.as_bytes());
            hasher.update(sha.as_bytes());
        }
        format!("{}@{}", self.manifest.name, &hex::encode(hasher.finalize())[..16])
    }

    /// Whether `id` names this bundle, by its id or the one earlier releases gave it.
    pub fn is_named(&self, id: &str) -> bool {
        id == self.id() || id == self.legacy_id()
    }

    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|source| BundleError::Io { path: manifest_path.clone(), source })?;
        let manifest =
            Manifest::parse(&text).map_err(|problem| BundleError::Manifest { path: manifest_path.clone(), problem })?;
        manifest
            .validate()
            .map_err(|problem| BundleError::Manifest { path: manifest_path.clone(), problem: problem.to_string() })?;
        for file in manifest.referenced_files() {
            let path = dir.join(file);
            let actual = sha256_file(&path)?;
            let expected = &manifest.checksums[file];
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(BundleError::Checksum { path, expected: expected.clone(), actual });
            }
        }
        let tail = load_tail(dir, &manifest)?;
        let head = load_head(dir, &manifest)?;
        if head.feature_dim() != tail.feature_dim() {
            return Err(BundleError::Weights {
                path: dir.join(&manifest.head.file),
                problem: format!(
                    "the head takes {} features but the tail produces {}",
                    head.feature_dim(),
                    tail.feature_dim()
                ),
            });
        }
        Ok(Bundle { dir: dir.to_path_buf(), manifest, tail, head })
    }

    pub fn trunk_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.trunk.file)
    }

    /// sha256 of the trunk ONNX, as recorded (and verified) in the manifest.
    pub fn trunk_sha256(&self) -> &str {
        &self.manifest.checksums[&self.manifest.trunk.file]
    }

    /// Writes a bundle atomically: files go to a sibling staging folder that takes the place of
    /// `dir` at the end, so a crash never leaves a half-written bundle under the final name. An
    /// existing bundle at `dir` is replaced only with [`Overwrite::Replace`]; any other non-empty
    /// folder never is (see [`crate::output`]).
    pub fn write(
        dir: &Path,
        mut manifest: Manifest,
        files: &[(&str, &[u8])],
        overwrite: Overwrite,
    ) -> Result<(), BundleError> {
        manifest.checksums = files.iter().map(|(name, bytes)| (name.to_string(), sha256_hex(bytes))).collect();
        manifest
            .validate()
            .map_err(|problem| BundleError::Manifest { path: dir.join(MANIFEST_FILE), problem: problem.to_string() })?;
        let missing: Vec<&str> =
            manifest.referenced_files().into_iter().filter(|f| !files.iter().any(|(name, _)| name == f)).collect();
        if !missing.is_empty() {
            return Err(BundleError::Manifest {
                path: dir.join(MANIFEST_FILE),
                problem: format!("files referenced but not written: {}", missing.join(", ")),
            });
        }
        let output = |error: OutputError| BundleError::Output(error);
        output::check_dir(dir, overwrite).map_err(output)?;
        let staging = output::staging_dir(dir).map_err(output)?;
        let written = (|| {
            for (name, bytes) in files {
                write_synced(&staging.join(name), bytes).map_err(|source| (staging.join(name), source))?;
            }
            write_synced(&staging.join(MANIFEST_FILE), manifest.to_toml().as_bytes())
                .map_err(|source| (staging.join(MANIFEST_FILE), source))
        })();
        if let Err((path, source)) = written {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(BundleError::Io { path, source });
        }
        output::install_dir(&staging, dir, overwrite).map_err(|error| {
            let _ = std::fs::remove_dir_all(&staging);
            output(error)
        })
    }

    /// Reads the optional source reference samples: split tensors `[n, ...]` and class indices.
    pub fn reference(&self) -> Result<Option<ReferenceSet>, BundleError> {
        let Some(spec) = &self.manifest.reference else { return Ok(None) };
        let path = self.dir.join(&spec.file);
        let file = TensorFile::read(&path)?;
        let split = file.finite("split", self.manifest.trunk.output_shape.len() + 1)?;
        let labels = file.finite("labels", 1)?;
        let classes = self.head.num_classes();
        let mut indices = Vec::with_capacity(labels.len());
        for &label in labels.iter() {
            if label < 0.0 || label.fract() != 0.0 || label as usize >= classes {
                return Err(BundleError::Weights {
                    path,
                    problem: format!("reference label {label} is not a class index"),
                });
            }
            indices.push(label as usize);
        }
        if split.shape()[0] != indices.len() || split.shape()[1..] != self.manifest.trunk.output_shape[..] {
            return Err(BundleError::Weights {
                path,
                problem: format!(
                    "reference split tensors have shape {:?}, expected [{}, {:?}]",
                    split.shape(),
                    indices.len(),
                    self.manifest.trunk.output_shape
                ),
            });
        }
        Ok(Some((split, indices)))
    }
}

fn load_tail(dir: &Path, manifest: &Manifest) -> Result<Tail, BundleError> {
    let mut files: BTreeMap<&str, TensorFile> = BTreeMap::new();
    let mut layers = Vec::with_capacity(manifest.tail.len());
    for spec in &manifest.tail {
        let layer = match spec.kind {
            TailLayerKind::Linear | TailLayerKind::Conv1x1 => {
                let file_name = spec.weights.as_deref().expect("validated: weighted layers name their file");
                if !files.contains_key(file_name) {
                    files.insert(file_name, TensorFile::read(&dir.join(file_name))?);
                }
                let file = &files[file_name];
                let weight = file
                    .finite(spec.weight.as_deref().expect("validated"), 2)?
                    .into_dimensionality::<Ix2>()
                    .expect("rank checked");
                let bias = file
                    .finite(spec.bias.as_deref().expect("validated"), 1)?
                    .into_dimensionality::<Ix1>()
                    .expect("rank checked");
                if spec.kind == TailLayerKind::Linear {
                    TailLayer::Linear { weight, bias }
                } else {
                    TailLayer::Conv1x1 { weight, bias }
                }
            }
            TailLayerKind::Relu => TailLayer::Relu,
            TailLayerKind::Relu6 => TailLayer::Relu6,
            TailLayerKind::Silu => TailLayer::Silu,
            TailLayerKind::Sigmoid => TailLayer::Sigmoid,
            TailLayerKind::GlobalAvgPool => TailLayer::GlobalAvgPool,
            TailLayerKind::Flatten => TailLayer::Flatten,
        };
        layers.push(layer);
    }
    Tail::new(layers, manifest.trunk.output_shape.clone())
        .map_err(|e| BundleError::Weights { path: dir.join(MANIFEST_FILE), problem: e.to_string() })
}

fn load_head(dir: &Path, manifest: &Manifest) -> Result<Head, BundleError> {
    let path = dir.join(&manifest.head.file);
    let file = TensorFile::read(&path)?;
    let weight: Array2<f32> = file.finite("weight", 2)?.into_dimensionality().expect("rank checked");
    let bias: Array1<f32> = file.finite("bias", 1)?.into_dimensionality().expect("rank checked");
    Head::new(weight, bias, manifest.head.classes.clone()).map_err(|problem| BundleError::Weights { path, problem })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> Result<String, BundleError> {
    let io = |source| BundleError::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer).map_err(io)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_follows_what_makes_predictions_and_not_the_description() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet-lite0-fonts36");
        let bundle = Bundle::load(&dir).unwrap();
        let mut described = bundle.clone();
        described.manifest.description = "another description".into();
        assert_eq!(described.id(), bundle.id());
        let mut reordered = bundle.clone();
        reordered.manifest.head.classes.swap(0, 1);
        assert_ne!(reordered.id(), bundle.id(), "the class order is part of the model");
        assert_eq!(reordered.legacy_id(), bundle.legacy_id(), "which earlier releases could not tell apart");
        let mut normalised = bundle.clone();
        normalised.manifest.input.std[0] *= 2.0;
        assert_ne!(normalised.id(), bundle.id());
        assert!(bundle.is_named(&bundle.legacy_id()) && bundle.is_named(&bundle.id()));
        assert!(!reordered.is_named(&bundle.id()));
    }
}
