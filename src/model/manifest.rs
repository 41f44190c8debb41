//! The bundle manifest (`manifest.toml`): what a bundle holds and how its input is prepared.
//!
//! Parsing and validation are pure so that every rule can be tested without files.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Manifest format understood by this build.
pub const FORMAT_VERSION: u32 = 1;

/// File name of the manifest inside a bundle folder.
pub const MANIFEST_FILE: &str = "manifest.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub input: InputContract,
    pub trunk: TrunkSpec,
    /// Layers between the split tensor and the penultimate features, in order.
    #[serde(default)]
    pub tail: Vec<TailLayerSpec>,
    pub head: HeadSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    /// sha256 (hex) of every file the bundle refers to, by file name.
    pub checksums: BTreeMap<String, String>,
}

/// How an image becomes the trunk's input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputContract {
    /// Name of the trunk's image input.
    pub tensor: String,
    pub layout: Layout,
    pub height: u32,
    pub width: u32,
    /// Channels the model takes (1 or 3).
    pub channels: u32,
    /// How decoded pixels fill the channels.
    pub color: ColorMode,
    pub resize: ResizePolicy,
    /// Per-channel mean and std applied after scaling pixels to [0, 1].
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    #[serde(rename = "NCHW")]
    Nchw,
    #[serde(rename = "NHWC")]
    Nhwc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ColorMode {
    /// Luma, replicated into every channel (models trained on greyscale data).
    Grayscale,
    /// Red, green, blue in that channel order.
    Rgb,
    /// Blue, green, red in that channel order.
    Bgr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizePolicy {
    /// Resize to exactly height x width, ignoring the aspect ratio.
    Stretch,
    /// Resize the shorter side to fit, then crop the centre.
    CenterCrop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkSpec {
    pub file: String,
    /// Name of the split tensor: the trunk's output, where the trainable tail begins.
    pub output: String,
    /// Per-sample shape of the split tensor (without the batch dimension), e.g. `[320, 3, 3]`.
    pub output_shape: Vec<usize>,
}

/// One tail layer. Weights live in the safetensors file named by `weights`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TailLayerSpec {
    pub kind: TailLayerKind,
    /// Layer name from the source graph, for messages.
    #[serde(default)]
    pub name: String,
    /// Safetensors file holding `weight` and `bias` of linear and 1x1 convolution layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// Tensor names inside `weights`: weight `[out, in]`, bias `[out]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TailLayerKind {
    Linear,
    Conv1x1,
    Relu,
    Relu6,
    Silu,
    Sigmoid,
    GlobalAvgPool,
    Flatten,
}

impl TailLayerKind {
    pub fn has_weights(self) -> bool {
        matches!(self, TailLayerKind::Linear | TailLayerKind::Conv1x1)
    }
}

/// The classifier: `logits = features · weightᵀ + bias`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSpec {
    /// Safetensors file with `weight` `[C, d]` and `bias` `[C]`.
    pub file: String,
    pub classes: Vec<String>,
}

/// Source-domain split tensors of a few samples per class, for label-free health estimates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceSpec {
    /// Safetensors file with `split` `[n, ...]` (f16) and `labels` `[n]` (class indices, f32).
    pub file: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub licence: String,
    #[serde(default)]
    pub notes: String,
}

/// A manifest rule that does not hold; `field` names the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ManifestProblem {
    pub field: String,
    pub problem: String,
}

fn problem(field: impl Into<String>, text: impl Into<String>) -> ManifestProblem {
    ManifestProblem { field: field.into(), problem: text.into() }
}

impl Manifest {
    /// Parses manifest text; the error text includes the line and key TOML reports.
    pub fn parse(text: &str) -> Result<Manifest, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a manifest always serialises")
    }

    /// Every file the manifest refers to, in a stable order.
    pub fn referenced_files(&self) -> Vec<&str> {
        let mut files: Vec<&str> = vec![self.trunk.file.as_str(), self.head.file.as_str()];
        files.extend(self.tail.iter().filter_map(|layer| layer.weights.as_deref()));
        if let Some(reference) = &self.reference {
            files.push(reference.file.as_str());
        }
        files.sort_unstable();
        files.dedup();
        files
    }

    /// Checks every rule that needs no file contents.
    pub fn validate(&self) -> Result<(), ManifestProblem> {
        if self.format_version != FORMAT_VERSION {
            return Err(problem(
                "format_version",
                format!("is {}, this build reads version {FORMAT_VERSION}", self.format_version),
            ));
        }
        if self.name.trim().is_empty() {
            return Err(problem("name", "is empty"));
        }
        self.validate_input()?;
        if self.trunk.output.is_empty() {
            return Err(problem("trunk.output", "is empty"));
        }
        if self.trunk.output_shape.is_empty() || self.trunk.output_shape.contains(&0) {
            return Err(problem(
                "trunk.output_shape",
                format!("must be non-empty with positive sizes, got {:?}", self.trunk.output_shape),
            ));
        }
        for (index, layer) in self.tail.iter().enumerate() {
            let field = format!("tail[{index}]");
            if layer.kind.has_weights() {
                for (key, value) in [("weights", &layer.weights), ("weight", &layer.weight), ("bias", &layer.bias)] {
                    if value.as_deref().is_none_or(str::is_empty) {
                        return Err(problem(
                            format!("{field}.{key}"),
                            format!("is required for a {:?} layer", layer.kind),
                        ));
                    }
                }
            } else if layer.weights.is_some() || layer.weight.is_some() || layer.bias.is_some() {
                return Err(problem(field, format!("a {:?} layer has no weights", layer.kind)));
            }
        }
        if self.head.classes.is_empty() {
            return Err(problem("head.classes", "is empty"));
        }
        let mut seen = std::collections::HashSet::new();
        for class in &self.head.classes {
            if class.trim().is_empty() {
                return Err(problem("head.classes", "contains an empty class name"));
            }
            if !seen.insert(class.as_str()) {
                return Err(problem("head.classes", format!("class '{class}' appears twice")));
            }
        }
        for file in self.referenced_files() {
            if file.is_empty() || file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(problem("files", format!("'{file}' must be a plain file name inside the bundle")));
            }
            match self.checksums.get(file) {
                None => return Err(problem("checksums", format!("no sha256 for '{file}'"))),
                Some(sum) if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    return Err(problem(format!("checksums.\"{file}\""), "is not a 64-digit hex sha256"));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn validate_input(&self) -> Result<(), ManifestProblem> {
        let input = &self.input;
        if input.tensor.is_empty() {
            return Err(problem("input.tensor", "is empty"));
        }
        if input.height == 0 || input.width == 0 || input.height > 4096 || input.width > 4096 {
            return Err(problem(
                "input.height/width",
                format!("{}x{} is out of range 1..=4096", input.height, input.width),
            ));
        }
        if input.channels != 1 && input.channels != 3 {
            return Err(problem("input.channels", format!("must be 1 or 3, got {}", input.channels)));
        }
        if input.channels == 1 && input.color != ColorMode::Grayscale {
            return Err(problem("input.color", "a 1-channel input must be grayscale"));
        }
        let channels = input.channels as usize;
        if input.mean.len() != channels {
            return Err(problem("input.mean", format!("needs {channels} values, got {}", input.mean.len())));
        }
        if input.std.len() != channels {
            return Err(problem("input.std", format!("needs {channels} values, got {}", input.std.len())));
        }
        if input.mean.iter().any(|m| !m.is_finite()) {
            return Err(problem("input.mean", "must be finite"));
        }
        if input.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(problem("input.std", "must be finite and positive"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        let sum = "a".repeat(64);
        Manifest {
            format_version: FORMAT_VERSION,
            name: "test".into(),
            description: String::new(),
            input: InputContract {
                tensor: "image".into(),
                layout: Layout::Nchw,
                height: 8,
                width: 8,
                channels: 3,
                color: ColorMode::Rgb,
                resize: ResizePolicy::Stretch,
                mean: vec![0.0; 3],
                std: vec![1.0; 3],
            },
            trunk: TrunkSpec { file: "trunk.onnx".into(), output: "split".into(), output_shape: vec![4, 8, 8] },
            tail: vec![
                TailLayerSpec {
                    kind: TailLayerKind::Conv1x1,
                    name: "c".into(),
                    weights: Some("tail.safetensors".into()),
                    weight: Some("tail.0.weight".into()),
                    bias: Some("tail.0.bias".into()),
                },
                TailLayerSpec {
                    kind: TailLayerKind::GlobalAvgPool,
                    name: String::new(),
                    weights: None,
                    weight: None,
                    bias: None,
                },
                TailLayerSpec {
                    kind: TailLayerKind::Flatten,
                    name: String::new(),
                    weights: None,
                    weight: None,
                    bias: None,
                },
            ],
            head: HeadSpec { file: "head.safetensors".into(), classes: vec!["a".into(), "b".into()] },
            reference: None,
            provenance: None,
            checksums: [("trunk.onnx", &sum), ("tail.safetensors", &sum), ("head.safetensors", &sum)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    #[test]
    fn a_complete_manifest_validates_and_round_trips_through_toml() {
        let manifest = sample();
        manifest.validate().unwrap();
        let parsed = Manifest::parse(&manifest.to_toml()).unwrap();
        assert_eq!(parsed, manifest);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let text = sample().to_toml().replace("format_version = 1", "format_version = 1\ncolour = \"red\"");
        let error = Manifest::parse(&text).unwrap_err();
        assert!(error.contains("colour"), "{error}");
    }

    #[test]
    fn a_missing_checksum_is_named() {
        let mut manifest = sample();
        manifest.checksums.remove("head.safetensors");
        let error = manifest.validate().unwrap_err();
        assert_eq!(error.field, "checksums");
        assert!(error.problem.contains("head.safetensors"));
    }

    #[test]
    fn mean_and_std_must_match_the_channel_count() {
        let mut manifest = sample();
        manifest.input.mean = vec![0.5];
        assert_eq!(manifest.validate().unwrap_err().field, "input.mean");
        let mut manifest = sample();
        manifest.input.std = vec![1.0, 0.0, 1.0];
        assert_eq!(manifest.validate().unwrap_err().field, "input.std");
    }

    #[test]
    fn weighted_layers_need_their_tensor_names() {
        let mut manifest = sample();
        manifest.tail[0].bias = None;
        assert_eq!(manifest.validate().unwrap_err().field, "tail[0].bias");
        let mut manifest = sample();
        manifest.tail[1].weights = Some("tail.safetensors".into());
        assert_eq!(manifest.validate().unwrap_err().field, "tail[1]");
    }

    #[test]
    fn duplicate_or_empty_class_names_are_refused() {
        let mut manifest = sample();
        manifest.head.classes = vec!["a".into(), "a".into()];
        assert!(manifest.validate().unwrap_err().problem.contains("twice"));
        manifest.head.classes = vec![];
        assert_eq!(manifest.validate().unwrap_err().field, "head.classes");
    }

    #[test]
    fn files_must_stay_inside_the_bundle() {
        let mut manifest = sample();
        let sum = manifest.checksums.remove("trunk.onnx").unwrap();
        manifest.trunk.file = "../trunk.onnx".into();
        manifest.checksums.insert("../trunk.onnx".into(), sum);
        assert!(manifest.validate().unwrap_err().problem.contains("plain file name"));
    }

    #[test]
    fn a_newer_format_version_is_refused() {
        let mut manifest = sample();
        manifest.format_version = 2;
        assert_eq!(manifest.validate().unwrap_err().field, "format_version");
    }
}
