//! `import-onnx`'s last step: the new bundle, run the way edgeadapt runs it, must give the
//! original model's logits. It lives here, above the bundle format, because it runs both models.

use std::path::Path;

use crate::inference::Classifier;
use crate::model::Bundle;
use crate::model::onnx::import::{self, ImportError, ImportOptions, ImportReport, batch_shape, pseudo_random_batch};
use crate::runtime::{self, RuntimeOptions};

/// Imports `options.model` and keeps the bundle only when its logits match the original's.
pub fn import_onnx(options: &ImportOptions) -> Result<ImportReport, ImportError> {
    import::import_onnx(options, &|bundle, original, logits| max_logit_diff(bundle, original, logits, &options.runtime))
}

/// Largest absolute logit difference between the written bundle and the original model.
fn max_logit_diff(
    bundle_dir: &Path,
    original: &Path,
    logits_name: &str,
    options: &RuntimeOptions,
) -> Result<f32, ImportError> {
    let bundle = Bundle::load(bundle_dir)?;
    let batch = pseudo_random_batch(batch_shape(&bundle.manifest.input, 3), 0x5eed);
    let check_error = |error: crate::inference::InferenceError| ImportError::Check(error.to_string());
    let mut classifier = Classifier::open(bundle, options).map_err(check_error)?;
    let ours = classifier.logits(batch.view()).map_err(check_error)?;
    let run_error = |problem: String| ImportError::Run { path: original.to_path_buf(), problem };
    let mut session = runtime::open_session(original, "import-original", None, options)?;
    let tensor = ort::value::TensorRef::from_array_view(batch.view()).map_err(|e| run_error(e.to_string()))?;
    let input_name = classifier.bundle.manifest.input.tensor.clone();
    let outputs =
        session.session.run(ort::inputs![input_name.as_str() => tensor]).map_err(|e| run_error(e.to_string()))?;
    let theirs = outputs
        .get(logits_name)
        .ok_or_else(|| run_error(format!("no output '{logits_name}'")))?
        .try_extract_array::<f32>()
        .map_err(|e| run_error(e.to_string()))?;
    if theirs.shape() != ours.shape() {
        return Err(run_error(format!("logits shape {:?} vs bundle {:?}", theirs.shape(), ours.shape())));
    }
    Ok(ours.iter().zip(theirs.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max))
}
