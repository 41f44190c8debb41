//! `import-onnx`: turns a single-file ONNX classifier into a bundle.
//!
//! The user names the feature tensor (the head's input) and optionally an earlier split tensor.
//! The trunk is the graph up to the split; the tail and head weights come from the initializers.
//! After writing, the bundle is checked against the original model on random inputs, so an
//! import that changed what the model computes is refused instead of shipped.

use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayD};

use super::graph::{self, GraphError, GraphIndex};
use super::proto::{ModelProto, tensor_proto::DataType, type_proto};
use super::{decode_model, encode_model};
use crate::model::manifest::{
    ColorMode, FORMAT_VERSION, HeadSpec, InputContract, Layout, Manifest, Provenance, ResizePolicy, TailLayerSpec,
    TrunkSpec,
};
use crate::model::tensors::{StoredAs, to_safetensors};
use crate::model::{Bundle, BundleError, TailLayer};
use crate::output::{self, Overwrite};
use crate::runtime::{self, RuntimeOptions};

/// Largest logit difference accepted between the bundle and the original model.
pub const IMPORT_TOLERANCE: f32 = 1e-3;

#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub model: PathBuf,
    pub features: String,
    pub split: Option<String>,
    pub head: Option<String>,
    pub classes: Option<PathBuf>,
    pub out: PathBuf,
    /// Whether an existing bundle at `out` may be replaced.
    pub overwrite: Overwrite,
    /// `(height, width)`; required when the model input has no static size.
    pub size: Option<(u32, u32)>,
    pub channels: Option<u32>,
    pub color: Option<ColorMode>,
    pub resize: ResizePolicy,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub name: Option<String>,
    pub provenance: Option<Provenance>,
    pub runtime: RuntimeOptions,
}

impl ImportOptions {
    pub fn new(model: impl Into<PathBuf>, features: impl Into<String>, out: impl Into<PathBuf>) -> ImportOptions {
        ImportOptions {
            model: model.into(),
            features: features.into(),
            split: None,
            head: None,
            classes: None,
            out: out.into(),
            overwrite: Overwrite::Refuse,
            size: None,
            channels: None,
            color: None,
            resize: ResizePolicy::Stretch,
            mean: None,
            std: None,
            name: None,
            provenance: None,
            runtime: RuntimeOptions::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not an ONNX model: {problem}")]
    Decode { path: PathBuf, problem: String },
    #[error("{path}: {source}")]
    Graph { path: PathBuf, source: GraphError },
    #[error("{path}: input: {problem}")]
    Input { path: PathBuf, problem: String },
    #[error("{path}: {problem}")]
    Classes { path: PathBuf, problem: String },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Running the new bundle for the check failed.
    #[error("{0}")]
    Check(String),
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    #[error("{path}: running the model failed: {problem}")]
    Run { path: PathBuf, problem: String },
    #[error(
        "the bundle's logits differ from the original model's by up to {max_diff:e} (tolerance {IMPORT_TOLERANCE:e}); the bundle was not kept"
    )]
    Mismatch { max_diff: f32 },
}

#[derive(Debug, Clone)]
pub struct ImportReport {
    pub bundle: PathBuf,
    pub classes: usize,
    pub feature_dim: usize,
    /// The split tensor, and why it was chosen when `--split` was not given.
    pub split: String,
    pub split_reason: Option<String>,
    pub split_shape: Vec<usize>,
    pub tail: Vec<String>,
    pub input: InputContract,
    /// Largest absolute logit difference between bundle and original on random inputs.
    pub max_logit_diff: f32,
}

/// The check that a written bundle gives the original model's logits: the bundle's folder, the
/// original model, the original's logits output; the largest absolute logit difference. Running
/// a bundle belongs to the inference layer, so the caller supplies it
/// (`inference::import_check`).
pub type LogitCheck<'a> = dyn Fn(&Path, &Path, &str) -> Result<f32, ImportError> + 'a;

/// Reads `options.model` into a bundle at `options.out`, kept only when `check` finds its logits
/// within [`IMPORT_TOLERANCE`] of the original's.
pub fn import_onnx(options: &ImportOptions, check: &LogitCheck<'_>) -> Result<ImportReport, ImportError> {
    let path = options.model.clone();
    output::check_dir(&options.out, options.overwrite).map_err(BundleError::Output)?;
    let bytes = std::fs::read(&path).map_err(|source| ImportError::Io { path: path.clone(), source })?;
    let model = decode_model(&bytes).map_err(|e| ImportError::Decode { path: path.clone(), problem: e.to_string() })?;
    let Some(graph_proto) = model.graph.as_ref() else {
        return Err(ImportError::Decode { path, problem: "the model has no graph".into() });
    };
    let graph_error = |source| ImportError::Graph { path: path.clone(), source };
    let index = GraphIndex::new(graph_proto);
    let head = graph::find_head(&index, &options.features, options.head.as_deref()).map_err(graph_error)?;
    let (split, tail_layers, split_reason) = match &options.split {
        Some(split) => (split.clone(), graph::match_tail(&index, split, &options.features).map_err(graph_error)?, None),
        None => {
            if !index.exists(&options.features) {
                return Err(graph_error(GraphError::TensorNotFound(options.features.clone())));
            }
            let choice = super::split::choose_split(&index, &options.features);
            (choice.tensor, choice.layers, Some(choice.reason))
        }
    };
    let input = input_contract(&model, options)?;
    let classes = class_names(options.classes.as_deref(), head.weight.nrows())?;

    let trunk_graph = graph::trunk_graph(graph_proto, &split).map_err(graph_error)?;
    let trunk_output = trunk_graph.output[0].name.clone().unwrap_or_default();
    let trunk = ModelProto { graph: Some(trunk_graph), ..model.clone() };
    let trunk_bytes = encode_model(&trunk);
    let split_shape = split_shape(&trunk_bytes, &input, &trunk_output, &options.runtime)
        .map_err(|problem| ImportError::Run { path: path.clone(), problem })?;

    let mut tail_specs = Vec::new();
    let mut tail_tensors: Vec<(String, ArrayD<f32>)> = Vec::new();
    for (position, matched) in tail_layers.iter().enumerate() {
        let kind = matched.layer.kind();
        let mut spec = TailLayerSpec { kind, name: matched.name.clone(), weights: None, weight: None, bias: None };
        if let TailLayer::Linear { weight, bias } | TailLayer::Conv1x1 { weight, bias } = &matched.layer {
            let (w, b) = (format!("tail.{position}.weight"), format!("tail.{position}.bias"));
            tail_tensors.push((w.clone(), weight.clone().into_dyn()));
            tail_tensors.push((b.clone(), bias.clone().into_dyn()));
            spec.weights = Some(TAIL_FILE.into());
            spec.weight = Some(w);
            spec.bias = Some(b);
        }
        tail_specs.push(spec);
    }
    let head_bytes = to_safetensors(&[
        ("weight", &head.weight.clone().into_dyn(), StoredAs::F32),
        ("bias", &head.bias.clone().into_dyn(), StoredAs::F32),
    ])
    .map_err(|problem| ImportError::Decode { path: path.clone(), problem })?;
    let tail_bytes = if tail_tensors.is_empty() {
        None
    } else {
        let refs: Vec<(&str, &ArrayD<f32>, StoredAs)> =
            tail_tensors.iter().map(|(n, a)| (n.as_str(), a, StoredAs::F32)).collect();
        Some(to_safetensors(&refs).map_err(|problem| ImportError::Decode { path: path.clone(), problem })?)
    };

    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        name: options.name.clone().unwrap_or(stem),
        description: format!("Imported from {} (features '{}', split '{}')", file_name(&path), options.features, split),
        input: input.clone(),
        trunk: TrunkSpec { file: TRUNK_FILE.into(), output: trunk_output, output_shape: split_shape.clone() },
        tail: tail_specs,
        head: HeadSpec { file: HEAD_FILE.into(), classes: classes.clone() },
        reference: None,
        provenance: options.provenance.clone(),
        checksums: Default::default(),
    };
    let mut files: Vec<(&str, &[u8])> = vec![(TRUNK_FILE, &trunk_bytes), (HEAD_FILE, &head_bytes)];
    if let Some(tail_bytes) = &tail_bytes {
        files.push((TAIL_FILE, tail_bytes));
    }
    // The bundle is written and checked beside `out`, and takes its place only once it passed.
    let checking = output::staging_dir(&options.out).map_err(BundleError::Output)?;
    let verified = Bundle::write(&checking, manifest, &files, Overwrite::Refuse)
        .map_err(ImportError::from)
        .and_then(|()| check(&checking, &path, &head.output))
        .and_then(|diff| match diff <= IMPORT_TOLERANCE {
            true => Ok(diff),
            false => Err(ImportError::Mismatch { max_diff: diff }),
        })
        .and_then(|diff| {
            output::install_dir(&checking, &options.out, options.overwrite).map_err(BundleError::Output)?;
            Ok(diff)
        });
    let max_diff = match verified {
        Ok(diff) => diff,
        Err(error) => {
            let _ = std::fs::remove_dir_all(&checking);
            return Err(error);
        }
    };
    Ok(ImportReport {
        bundle: options.out.clone(),
        classes: classes.len(),
        feature_dim: head.weight.ncols(),
        split,
        split_reason,
        split_shape,
        tail: tail_layers.iter().map(|m| format!("{:?}", m.layer.kind()).to_lowercase()).collect(),
        input,
        max_logit_diff: max_diff,
    })
}

pub const TRUNK_FILE: &str = "trunk.onnx";
pub const TAIL_FILE: &str = "tail.safetensors";
pub const HEAD_FILE: &str = "head.safetensors";

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn input_contract(model: &ModelProto, options: &ImportOptions) -> Result<InputContract, ImportError> {
    let input_error = |problem: String| ImportError::Input { path: options.model.clone(), problem };
    let graph = model.graph.as_ref().expect("checked by the caller");
    let initializers: Vec<&str> = graph.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
    let inputs: Vec<_> =
        graph.input.iter().filter(|i| !initializers.contains(&i.name.as_deref().unwrap_or(""))).collect();
    let [input] = inputs.as_slice() else {
        let names: Vec<&str> = inputs.iter().filter_map(|i| i.name.as_deref()).collect();
        return Err(input_error(format!("expected one image input, found {}: {}", names.len(), names.join(", "))));
    };
    let name = input.name.clone().unwrap_or_default();
    if let Some(type_proto::Value::TensorType(t)) = input.r#type.as_ref().and_then(|t| t.value.as_ref())
        && t.elem_type != Some(DataType::Float as i32)
    {
        return Err(input_error(format!("'{name}' must be a float32 tensor (element type {:?})", t.elem_type)));
    }
    let dims = graph::value_info_dims(input).unwrap_or_default();
    if dims.len() != 4 {
        return Err(input_error(format!(
            "'{name}' must be an image batch of rank 4, the model declares rank {}",
            dims.len()
        )));
    }
    let is_channels = |d: Option<i64>| matches!(d, Some(1 | 3));
    let (layout, declared_channels, h, w) = if is_channels(dims[1]) || (!is_channels(dims[3]) && dims[1].is_none()) {
        (Layout::Nchw, dims[1], dims[2], dims[3])
    } else {
        (Layout::Nhwc, dims[3], dims[1], dims[2])
    };
    let (height, width) = match (options.size, h, w) {
        (Some(size), _, _) => size,
        (None, Some(h), Some(w)) => (h as u32, w as u32),
        _ => return Err(input_error(format!("'{name}' has no static height and width ({dims:?}); pass --size HxW"))),
    };
    let channels = match (options.channels, declared_channels) {
        (Some(c), Some(d)) if i64::from(c) != d => {
            return Err(input_error(format!("--channels {c} contradicts the model's {d} input channels")));
        }
        (Some(c), _) => c,
        (None, Some(d)) => d as u32,
        (None, None) => return Err(input_error(format!("'{name}' has no static channel count; pass --channels 1|3"))),
    };
    let color = options.color.unwrap_or(if channels == 1 { ColorMode::Grayscale } else { ColorMode::Rgb });
    let per_channel = |values: &Option<Vec<f32>>, default: f32, flag: &str| -> Result<Vec<f32>, ImportError> {
        match values.as_deref() {
            None => Ok(vec![default; channels as usize]),
            Some([single]) => Ok(vec![*single; channels as usize]),
            Some(list) if list.len() == channels as usize => Ok(list.to_vec()),
            Some(list) => Err(input_error(format!("{flag} has {} values for {channels} channels", list.len()))),
        }
    };
    let contract = InputContract {
        tensor: name,
        layout,
        height,
        width,
        channels,
        color,
        resize: options.resize,
        mean: per_channel(&options.mean, 0.0, "--mean")?,
        std: per_channel(&options.std, 1.0, "--std")?,
    };
    // Reuse the manifest's own rules so import and load agree on what is valid.
    let probe = Manifest {
        format_version: FORMAT_VERSION,
        name: "probe".into(),
        description: String::new(),
        input: contract.clone(),
        trunk: TrunkSpec { file: TRUNK_FILE.into(), output: "x".into(), output_shape: vec![1] },
        tail: vec![],
        head: HeadSpec { file: HEAD_FILE.into(), classes: vec!["c".into()] },
        reference: None,
        provenance: None,
        checksums: [(TRUNK_FILE, "0".repeat(64)), (HEAD_FILE, "0".repeat(64))]
            .into_iter()
            .map(|(k, v)| (k.into(), v))
            .collect(),
    };
    probe.validate().map_err(|p| input_error(p.to_string()))?;
    Ok(contract)
}

fn class_names(file: Option<&Path>, count: usize) -> Result<Vec<String>, ImportError> {
    let Some(file) = file else { return Ok((0..count).map(|i| i.to_string()).collect()) };
    let text = std::fs::read_to_string(file).map_err(|source| ImportError::Io { path: file.to_path_buf(), source })?;
    let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    if names.len() != count {
        return Err(ImportError::Classes {
            path: file.to_path_buf(),
            problem: format!("lists {} class names but the classifier has {count} outputs", names.len()),
        });
    }
    Ok(names)
}

/// The input batch shape of `batch` images in the model's layout.
pub fn batch_shape(input: &InputContract, batch: usize) -> [usize; 4] {
    let (c, h, w) = (input.channels as usize, input.height as usize, input.width as usize);
    match input.layout {
        Layout::Nchw => [batch, c, h, w],
        Layout::Nhwc => [batch, h, w, c],
    }
}

/// Runs the trunk once to learn the per-sample shape of the split tensor.
fn split_shape(
    trunk: &[u8],
    input: &InputContract,
    output: &str,
    options: &RuntimeOptions,
) -> Result<Vec<usize>, String> {
    let scratch = std::env::temp_dir().join(format!("edgeadapt-trunk-{}-{}.onnx", std::process::id(), unique()));
    std::fs::write(&scratch, trunk).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let result = (|| {
        let mut session = runtime::open_session(&scratch, "import", None, options).map_err(|e| e.to_string())?;
        let batch = Array4::<f32>::zeros(batch_shape(input, 1));
        let tensor = ort::value::TensorRef::from_array_view(batch.view()).map_err(|e| e.to_string())?;
        let outputs = session.session.run(ort::inputs![input.tensor.as_str() => tensor]).map_err(|e| e.to_string())?;
        let value = outputs.get(output).ok_or_else(|| format!("the trunk has no output '{output}'"))?;
        let array = value.try_extract_array::<f32>().map_err(|e| e.to_string())?;
        Ok(array.shape()[1..].to_vec())
    })();
    let _ = std::fs::remove_file(&scratch);
    result
}

fn unique() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// Deterministic values in [-2, 2): enough to exercise every unit without a random crate.
pub fn pseudo_random_batch(shape: [usize; 4], seed: u64) -> Array4<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    Array4::from_shape_simple_fn(shape, || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    })
}
