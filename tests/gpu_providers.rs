//! GPU execution providers on the default bundle and real images: CUDA and TensorRT (fp16)
//! agree with the CPU within stated tolerances, the TensorRT engine cache is reused across
//! starts and rebuilt when it no longer matches, and the tail on the GPU agrees with the Rust
//! tail and takes a new version without building an engine.
//!
//! They need an NVIDIA GPU and a GPU build of ONNX Runtime (ORT_DYLIB_PATH); elsewhere each
//! test prints why it skips. `EDGEADAPT_GPU_TESTS=require` turns those skips into failures, for
//! runs on GPU machines where a skip would hide a broken set-up.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

use common::gpu::{missing, skip};
use edgeadapt::imaging::{self, DecodeLimits};
use edgeadapt::inference::onnx_tail::provider_beside;
use edgeadapt::inference::{Calibration, Classifier, Warmup, collect_image_files, prepare_files};
use edgeadapt::metrics::argmax_rows;
use edgeadapt::model::Bundle;
use edgeadapt::runtime::{ConvAlgoSearch, CudaOptions, ProviderKind, RuntimeOptions, TailPlacement};
use ndarray::{Array2, Axis};

/// Top-1 agreement with the CPU, at least.
const MIN_AGREEMENT: f64 = 0.99;
/// Largest difference of any class probability from the CPU's. CUDA runs convolutions in TF32
/// on Ampere and newer GPUs, and TensorRT here in fp16, so bit equality is not expected.
const MAX_PROBABILITY_DIFF: f32 = 0.05;
const IMAGES: usize = 360;
const HEADER: &str = "| provider       | warm-up    | 1st pass | images/s | top-1 = cpu | max abs dp | engine cache |";

fn images() -> Vec<PathBuf> {
    let folder = common::repo().join("target/data/fonts36/target/test");
    let files = collect_image_files(std::slice::from_ref(&folder))
        .unwrap_or_else(|e| panic!("{}: {e} (run tools/setup.sh)", folder.display()));
    let step = (files.len() / IMAGES).max(1);
    files.into_iter().step_by(step).take(IMAGES).collect()
}

fn bundle() -> Bundle {
    Bundle::load(&common::repo().join("models/efficientnet-lite0-fonts36")).expect("default bundle loads")
}

struct Run {
    probabilities: Array2<f32>,
    warmup: Warmup,
    /// The first pass meets each batch size for the first time (cuDNN picks its kernels then).
    first_pass_per_second: f64,
    images_per_second: f64,
}

fn classify(options: &RuntimeOptions, files: &[PathBuf]) -> Run {
    let (mut classifier, warmup) = Classifier::open_warm(bundle(), options, &|_| {}).expect("classifier opens");
    let prepared: Vec<_> = prepare_files(files, &classifier.bundle.manifest.input, &DecodeLimits::default())
        .into_iter()
        .map(|p| p.expect("test image decodes"))
        .collect();
    let views: Vec<_> = prepared.iter().map(|p| p.view()).collect();
    let mut pass = || {
        let started = Instant::now();
        let mut parts = Vec::new();
        for chunk in views.chunks(32) {
            parts.push(classifier.logits(imaging::stack(chunk).view()).expect("inference runs"));
        }
        let per_second = files.len() as f64 / started.elapsed().as_secs_f64();
        (ndarray::concatenate(Axis(0), &parts.iter().map(|p| p.view()).collect::<Vec<_>>()).unwrap(), per_second)
    };
    let (_, first_pass_per_second) = pass();
    let (logits, images_per_second) = pass();
    Run { probabilities: softmax(logits), warmup, first_pass_per_second, images_per_second }
}

fn softmax(mut logits: Array2<f32>) -> Array2<f32> {
    for mut row in logits.axis_iter_mut(Axis(0)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        row.mapv_inplace(|z| (z - max).exp());
        let total = row.sum();
        row.mapv_inplace(|p| p / total);
    }
    logits
}

/// Top-1 agreement and the largest probability difference between two runs.
fn compare(a: &Array2<f32>, b: &Array2<f32>) -> (f64, f32) {
    let agree = argmax_rows(a.view()).into_iter().zip(argmax_rows(b.view())).filter(|(x, y)| x == y).count();
    let diff = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    (agree as f64 / a.nrows() as f64, diff)
}

fn report(name: &str, run: &Run, against_cpu: Option<(f64, f32)>) {
    let (agreement, diff) =
        against_cpu.map_or(("-".into(), "-".into()), |(a, d)| (format!("{:.2}%", a * 100.0), format!("{d:.2e}")));
    eprintln!(
        "| {name:<14} | {:>8.2} s | {:>8.0} | {:>8.0} | {agreement:>9} | {diff:>10} | {} |",
        run.warmup.seconds,
        run.first_pass_per_second,
        run.images_per_second,
        run.warmup.engine_cache.as_deref().unwrap_or("-")
    );
}

/// Per provider: the ops it ran (op -> node count) and its kernel time, from ONNX Runtime's
/// profile of one session that classified `files` once.
fn node_providers(options: &RuntimeOptions, files: &[PathBuf]) -> BTreeMap<String, (BTreeMap<String, usize>, f64)> {
    let dir = tempfile::tempdir().unwrap();
    let options = RuntimeOptions { profile_dir: Some(dir.path().to_path_buf()), ..options.clone() };
    drop(classify(&options, files));
    // One profile per session: the trunk's and the tail's.
    let profiles: Vec<PathBuf> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(!profiles.is_empty(), "a profile is written");
    let events: Vec<serde_json::Value> = profiles
        .iter()
        .flat_map(|p| serde_json::from_slice::<Vec<serde_json::Value>>(&std::fs::read(p).unwrap()).unwrap())
        .collect();
    let mut nodes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut summary: BTreeMap<String, (BTreeMap<String, usize>, f64)> = BTreeMap::new();
    for event in events.iter().filter(|e| e["cat"] == "Node") {
        let (Some(provider), Some(op)) = (event["args"]["provider"].as_str(), event["args"]["op_name"].as_str()) else {
            continue;
        };
        let entry = summary.entry(provider.to_string()).or_default();
        entry.1 += event["dur"].as_f64().unwrap_or(0.0) / 1000.0;
        if nodes.entry(provider.to_string()).or_default().insert(event["name"].as_str().unwrap_or("").to_string()) {
            *entry.0.entry(op.to_string()).or_default() += 1;
        }
    }
    summary
}

fn print_node_providers(summary: &BTreeMap<String, (BTreeMap<String, usize>, f64)>) {
    eprintln!("| execution provider | kernel ms (2 passes) | nodes by op |");
    for (provider, (ops, ms)) in summary {
        let ops: Vec<String> = ops.iter().map(|(op, n)| format!("{op} {n}")).collect();
        eprintln!("| {provider} | {ms:.1} | {} |", ops.join(", "));
    }
}

fn gpu_options(kind: ProviderKind) -> RuntimeOptions {
    RuntimeOptions { providers: vec![kind], require_gpu: true, ..RuntimeOptions::default() }
}

#[test]
fn cuda_agrees_with_the_cpu_on_real_images() {
    if let Some(reason) = missing(ProviderKind::Cuda) {
        return skip(&reason);
    }
    let files = images();
    let cpu = classify(&RuntimeOptions::default(), &files);
    let cuda = classify(&gpu_options(ProviderKind::Cuda), &files);
    assert_eq!(cuda.warmup.provider, ProviderKind::Cuda);
    let (agreement, diff) = compare(&cpu.probabilities, &cuda.probabilities);
    eprintln!("{HEADER}");
    report("cpu", &cpu, None);
    report("cuda", &cuda, Some((agreement, diff)));
    assert!(agreement >= MIN_AGREEMENT, "top-1 agreement {agreement}");
    assert!(diff <= MAX_PROBABILITY_DIFF, "probability difference {diff}");

    // Warm-up cost and rates for each way cuDNN picks algorithms: a steady batch of 32, batches
    // alternating between 32 and 8, and sizes 1..=32 in turn (padded to the fixed GPU batch).
    let prepared: Vec<_> = prepare_files(&files[..32], &bundle().manifest.input, &DecodeLimits::default())
        .into_iter()
        .map(|p| p.unwrap())
        .collect();
    let batch = imaging::stack(&prepared.iter().map(|p| p.view()).collect::<Vec<_>>());
    eprintln!("| cuda conv_algo_search | warm-up | steady (32) | alternating 32/8 | sizes 1..=32 | images/s |");
    for search in [ConvAlgoSearch::Exhaustive, ConvAlgoSearch::Heuristic] {
        let options =
            RuntimeOptions { cuda: CudaOptions { conv_algo_search: search }, ..gpu_options(ProviderKind::Cuda) };
        let (mut classifier, warmup) = Classifier::open_warm(bundle(), &options, &|_| {}).unwrap();
        let mut rate = |sizes: &[usize]| {
            let started = Instant::now();
            for &size in sizes {
                classifier.logits(batch.slice_axis(Axis(0), ndarray::Slice::from(0..size))).unwrap();
            }
            sizes.iter().sum::<usize>() as f64 / started.elapsed().as_secs_f64()
        };
        let steady = rate(&[32; 20]);
        let alternating = rate(&[32, 8].repeat(10));
        let every_size: Vec<usize> = (1..=32).collect();
        let mixed = rate(&every_size);
        eprintln!("| {search:?} | {:.2} s | {steady:.0} | {alternating:.0} | {mixed:.0} | |", warmup.seconds);
    }

    // Every convolution runs on the GPU: a node left on the CPU costs two copies per run.
    let summary = node_providers(&gpu_options(ProviderKind::Cuda), &files[..64]);
    print_node_providers(&summary);
    let on_cpu = summary.get("CPUExecutionProvider").and_then(|(ops, _)| ops.get("Conv")).copied().unwrap_or(0);
    assert_eq!(on_cpu, 0, "convolutions left on the CPU: {summary:?}");
    assert!(summary.contains_key("CUDAExecutionProvider"), "{summary:?}");
}

#[test]
fn tensorrt_engine_cache_is_reused_and_rebuilt_when_it_does_not_match() {
    if let Some(reason) = missing(ProviderKind::Tensorrt) {
        return skip(&reason);
    }
    let files = images();
    let cache = tempfile::tempdir().unwrap();
    let mut options = gpu_options(ProviderKind::Tensorrt);
    options.tensorrt.fp16 = true;
    options.tensorrt.cache_dir = Some(cache.path().to_path_buf());
    let cpu = classify(&RuntimeOptions::default(), &files);
    let built = classify(&options, &files);
    assert_eq!(built.warmup.provider, ProviderKind::Tensorrt);
    assert!(built.warmup.engine_cache.as_deref().unwrap().starts_with("built"), "{:?}", built.warmup);
    let reused = classify(&options, &files);
    assert_eq!(reused.warmup.engine_cache.as_deref(), Some("reused"));

    // The same folder presented as built by another TensorRT: not trusted.
    let folder = cache.path().join(bundle().trunk_sha256().chars().take(16).collect::<String>());
    let seal_path = folder.join("cache.json");
    let mut seal: serde_json::Value = serde_json::from_slice(&std::fs::read(&seal_path).unwrap()).unwrap();
    seal["key"]["tensorrt"] = "0.0.0".into();
    std::fs::write(&seal_path, serde_json::to_vec(&seal).unwrap()).unwrap();
    let rebuilt = classify(&options, &files);
    let verdict = rebuilt.warmup.engine_cache.clone().unwrap();
    assert!(verdict.starts_with("rebuilt") && verdict.contains("tensorrt"), "{verdict}");

    let (agreement, diff) = compare(&cpu.probabilities, &reused.probabilities);
    eprintln!("{HEADER}");
    report("cpu", &cpu, None);
    report("tensorrt fp16", &built, Some(compare(&cpu.probabilities, &built.probabilities)));
    report("tensorrt fp16", &reused, Some((agreement, diff)));
    report("tensorrt fp16", &rebuilt, Some(compare(&cpu.probabilities, &rebuilt.probabilities)));
    assert!(agreement >= MIN_AGREEMENT, "top-1 agreement {agreement}");
    assert!(diff <= MAX_PROBABILITY_DIFF, "probability difference {diff}");
}

/// Per tail path, images/s of `classifier.logits` at batch 1, 8 and 32 (padded to the GPU batch).
fn rates(classifier: &mut Classifier, batch: &ndarray::Array4<f32>) -> Vec<f64> {
    [1usize, 8, 32]
        .iter()
        .map(|&size| {
            let part = batch.slice_axis(Axis(0), ndarray::Slice::from(0..size));
            classifier.logits(part).unwrap();
            let started = Instant::now();
            let mut images = 0;
            while started.elapsed().as_secs_f64() < 2.0 {
                classifier.logits(part).unwrap();
                images += size;
            }
            images as f64 / started.elapsed().as_secs_f64()
        })
        .collect()
}

fn files_under(dir: &std::path::Path) -> BTreeSet<PathBuf> {
    walkdir::WalkDir::new(dir).into_iter().filter_map(Result::ok).map(|e| e.into_path()).collect()
}

/// The tail and head on the GPU (parameters bound as inputs; on CUDA beside a TensorRT trunk)
/// give the Rust tail's predictions, and serving a new version swaps tensors: no new session, no
/// new TensorRT engine. Prints the rates of both tail paths per batch size and the swap time.
#[test]
fn the_tail_on_the_gpu_agrees_with_rust_and_a_version_swap_builds_no_engine() {
    eprintln!(
        "| provider | tail in | batch 1 img/s | batch 8 img/s | batch 32 img/s | top-1 = rust | max abs dp | swap ms |"
    );
    for kind in [ProviderKind::Cuda, ProviderKind::Tensorrt] {
        if let Some(reason) = missing(kind) {
            skip(&reason);
            continue;
        }
        let cache = tempfile::tempdir().unwrap();
        let mut options = gpu_options(kind);
        options.tensorrt.cache_dir = Some(cache.path().to_path_buf());
        let (mut on_gpu, _) = Classifier::open_warm(bundle(), &options, &|_| {}).expect("classifier opens");
        let tail_kind = provider_beside(kind);
        assert_eq!(on_gpu.tail_provider(), Some(tail_kind), "the tail runs on {tail_kind}");
        let rust_options = RuntimeOptions { tail: TailPlacement::Rust, ..options.clone() };
        let mut in_rust = Classifier::open(bundle(), &rust_options).expect("classifier opens");
        assert_eq!(in_rust.tail_provider(), None);

        let prepared: Vec<_> = prepare_files(&images()[..32], &bundle().manifest.input, &DecodeLimits::default())
            .into_iter()
            .map(|p| p.unwrap())
            .collect();
        let batch = imaging::stack(&prepared.iter().map(|p| p.view()).collect::<Vec<_>>());
        let split = on_gpu.split(batch.view()).unwrap();
        let agree = |on_gpu: &mut Classifier, in_rust: &mut Classifier| {
            let gpu = softmax(on_gpu.logits_from_split(split.view()).unwrap());
            let rust = softmax(in_rust.logits_from_split(split.view()).unwrap());
            compare(&rust, &gpu)
        };
        let (agreement, diff) = agree(&mut on_gpu, &mut in_rust);
        assert!(agreement >= MIN_AGREEMENT && diff <= MAX_PROBABILITY_DIFF, "source: {agreement} {diff}");

        let before = on_gpu.logits_from_split(split.view()).unwrap();
        let mut version = on_gpu.model().0.clone();
        let head = version.head.0;
        version.params[head].mapv_inplace(|w| w * 1.5);
        let (engines, opened) = (files_under(cache.path()), on_gpu.tail_sessions_opened());
        let started = Instant::now();
        on_gpu.set_model(version.clone(), Calibration::default());
        let swap_ms = started.elapsed().as_secs_f64() * 1000.0;
        in_rust.set_model(version, Calibration::default());
        assert_eq!(on_gpu.tail_provider(), Some(tail_kind), "the new version runs on {tail_kind}");
        assert_eq!(on_gpu.tail_sessions_opened(), opened, "a version swap opens no session");
        assert_eq!(files_under(cache.path()), engines, "nor writes to the engine cache");
        let after = on_gpu.logits_from_split(split.view()).unwrap();
        let moved = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(moved > 0.1, "the GPU tail serves the new version's weights (logits moved by {moved})");
        let (agreement, diff) = agree(&mut on_gpu, &mut in_rust);
        assert!(agreement >= MIN_AGREEMENT && diff <= MAX_PROBABILITY_DIFF, "new version: {agreement} {diff}");

        for (path, classifier) in [("onnx", &mut on_gpu), ("rust", &mut in_rust)] {
            let r = rates(classifier, &batch);
            eprintln!(
                "| {kind} | {path} | {:.0} | {:.0} | {:.0} | {:.2}% | {diff:.2e} | {swap_ms:.2} |",
                r[0],
                r[1],
                r[2],
                agreement * 100.0
            );
        }
    }
}
