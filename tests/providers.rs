//! Execution providers on the real ONNX Runtime: CPU fallback, `require_gpu`, and where a GPU
//! build of ONNX Runtime and a GPU exist, CUDA and TensorRT agreeing with the CPU.

mod common;

use common::fixture;
use edgeadapt::inference::Classifier;
use edgeadapt::inference::import_check::import_onnx;
use edgeadapt::model::Bundle;
use edgeadapt::model::onnx::import::{ImportOptions, pseudo_random_batch};
use edgeadapt::runtime::{self, ProviderKind, RuntimeError, RuntimeOptions};

fn tiny_bundle(dir: &std::path::Path) -> Bundle {
    let out = dir.join("bundle");
    let mut options = ImportOptions::new(fixture("onnx/tiny_cnn.onnx"), "features", &out);
    options.split = Some("split".into());
    import_onnx(&options).expect("fixture imports");
    Bundle::load(&out).unwrap()
}

fn with_providers(providers: &[ProviderKind], require_gpu: bool) -> RuntimeOptions {
    RuntimeOptions { providers: providers.to_vec(), require_gpu, ..RuntimeOptions::default() }
}

#[test]
fn gpu_providers_fall_back_to_the_cpu_unless_a_gpu_is_required() {
    runtime::init(None).expect("ONNX Runtime loads");
    if common::gpu::missing(ProviderKind::Cuda).is_none() {
        common::skipped("CUDA runs here, so there is no fallback to observe");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = tiny_bundle(dir.path());
    let options = with_providers(&[ProviderKind::Tensorrt, ProviderKind::Cuda], false);
    let classifier = Classifier::open(bundle.clone(), &options).expect("falls back to the CPU");
    assert_eq!(classifier.provider(), ProviderKind::Cpu);

    let options = with_providers(&[ProviderKind::Tensorrt, ProviderKind::Cuda, ProviderKind::Cpu], true);
    let error = Classifier::open(bundle, &options).err().expect("require_gpu refuses the CPU");
    let text = error.to_string();
    assert!(text.contains("require_gpu") && text.contains("cuda") && text.contains("tensorrt"), "{text}");
    // Refused by the plan (a CPU-only build) or after each GPU provider failed to open (a GPU
    // build without a GPU).
    assert!(matches!(
        error,
        edgeadapt::inference::InferenceError::Runtime(RuntimeError::Providers(_) | RuntimeError::Session { .. })
    ));
}

fn max_diff_against_cpu(options: &RuntimeOptions) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    let bundle = tiny_bundle(dir.path());
    let batch = pseudo_random_batch([4, 3, 8, 8], 7);
    let mut cpu = Classifier::open(bundle.clone(), &RuntimeOptions::default()).unwrap();
    let mut gpu = Classifier::open(bundle, options).unwrap();
    assert_ne!(gpu.provider(), ProviderKind::Cpu);
    let (a, b) = (cpu.logits(batch.view()).unwrap(), gpu.logits(batch.view()).unwrap());
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn cuda_agrees_with_the_cpu_where_a_gpu_exists() {
    if let Some(reason) = common::gpu::missing(ProviderKind::Cuda) {
        return common::gpu::skip(&reason);
    }
    let diff = max_diff_against_cpu(&with_providers(&[ProviderKind::Cuda], true));
    eprintln!("cuda vs cpu: max |logit difference| {diff:.2e}");
    // CUDA convolutions run in TF32 on Ampere and newer GPUs (10-bit mantissa).
    assert!(diff < 1e-2, "{diff}");
}

#[test]
fn tensorrt_agrees_with_the_cpu_where_a_gpu_exists() {
    if let Some(reason) = common::gpu::missing(ProviderKind::Tensorrt) {
        return common::gpu::skip(&reason);
    }
    let cache = tempfile::tempdir().unwrap();
    let mut options = with_providers(&[ProviderKind::Tensorrt], true);
    options.tensorrt.cache_dir = Some(cache.path().to_path_buf());
    options.tensorrt.fp16 = false;
    let diff = max_diff_against_cpu(&options);
    eprintln!("tensorrt fp32 vs cpu: max |logit difference| {diff:.2e}");
    // TensorRT's fp32 engines may use TF32 tactics, as CUDA does.
    assert!(diff < 1e-2, "{diff}");
    options.tensorrt.fp16 = true;
    let diff = max_diff_against_cpu(&options);
    eprintln!("tensorrt fp16 vs cpu: max |logit difference| {diff:.2e}");
    assert!(diff < 5e-2, "{diff}");
}

#[test]
fn padding_to_the_fixed_gpu_batch_leaves_results_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = tiny_bundle(dir.path());
    let batch = pseudo_random_batch([13, 3, 8, 8], 11);
    let mut classifier = Classifier::open(bundle, &RuntimeOptions::default()).unwrap();
    let plain = classifier.logits(batch.view()).unwrap();
    // 13 images as a batch of 8 and a batch of 5 padded to 8.
    classifier.set_fixed_batch(Some(8));
    let padded = classifier.logits(batch.view()).unwrap();
    assert_eq!(padded.shape(), plain.shape());
    let diff = plain.iter().zip(padded.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(diff < 1e-4, "{diff}");
    // A single image padded to a batch of 8.
    classifier.set_fixed_batch(Some(8));
    let one = classifier.logits(batch.slice_axis(ndarray::Axis(0), ndarray::Slice::from(0..1))).unwrap();
    assert_eq!(one.nrows(), 1);
    assert!((one[[0, 0]] - plain[[0, 0]]).abs() < 1e-4);
}
