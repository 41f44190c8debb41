//! Inference throughput of edgeadapt (trunk in ONNX Runtime, tail and head in Rust) against a
//! bare ONNX Runtime session of the same model (the bundle exported as one ONNX file), on the
//! same library, tensors and threads. Also the process's peak RSS after loading the bundle.
//!
//! `cargo bench --bench inference` (after `tools/setup.sh`). Environment: EDGEADAPT_BENCH_BUNDLE
//! (default models/efficientnet-lite0-fonts36), EDGEADAPT_BENCH_DATA (default
//! target/data/fonts36/target/test), EDGEADAPT_BENCH_SECONDS per table cell (default 6).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use edgeadapt::imaging::{self, DecodeLimits};
use edgeadapt::inference::{Classifier, collect_image_files, prepare_files};
use edgeadapt::model::Bundle;
use edgeadapt::model::onnx::{decode_model, encode_model, export};
use edgeadapt::runtime::{self, RuntimeOptions};
use ndarray::{Array3, Array4};

fn env_path(name: &str, default: &str) -> PathBuf {
    std::env::var_os(name).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(default))
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Interleaves `ours` and `theirs` (each processing `batch` images per call) in rounds of
/// about `budget / 10`, so that drift in machine speed hits both alike. Returns the images/s of
/// each over the whole run and the median of the per-round ratios.
fn compare(batch: usize, budget: Duration, mut ours: impl FnMut(), mut theirs: impl FnMut()) -> (f64, f64, f64) {
    for _ in 0..3 {
        ours();
        theirs();
    }
    let round = budget / 20;
    let (mut ours_time, mut theirs_time, mut ours_images, mut theirs_images) = (0.0, 0.0, 0, 0);
    let mut ratios = Vec::new();
    for _ in 0..10 {
        let mut rates = [0.0; 2];
        for (slot, step) in [&mut ours as &mut dyn FnMut(), &mut theirs as &mut dyn FnMut()].into_iter().enumerate() {
            let started = Instant::now();
            let mut images = 0;
            while started.elapsed() < round || images == 0 {
                step();
                images += batch;
            }
            let seconds = started.elapsed().as_secs_f64();
            rates[slot] = images as f64 / seconds;
            if slot == 0 {
                ours_time += seconds;
                ours_images += images;
            } else {
                theirs_time += seconds;
                theirs_images += images;
            }
        }
        ratios.push(rates[0] / rates[1]);
    }
    ratios.sort_by(f64::total_cmp);
    (ours_images as f64 / ours_time, theirs_images as f64 / theirs_time, (ratios[4] + ratios[5]) / 2.0)
}

fn main() {
    let bundle_dir = env_path("EDGEADAPT_BENCH_BUNDLE", "models/efficientnet-lite0-fonts36");
    let data = env_path("EDGEADAPT_BENCH_DATA", "target/data/fonts36/target/test");
    let seconds: f64 = std::env::var("EDGEADAPT_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(6.0);
    let budget = Duration::from_secs_f64(seconds);
    // Each cell interleaves both sides for `seconds` in total.
    let options = RuntimeOptions::default();

    let bundle = Bundle::load(&bundle_dir).expect("bundle loads");
    let mut classifier = Classifier::open(bundle.clone(), &options).expect("classifier opens");
    let files: Vec<PathBuf> =
        collect_image_files(std::slice::from_ref(&data)).expect("data folder").into_iter().take(256).collect();
    assert!(files.len() >= 32, "need at least 32 images under {}", data.display());
    let limits = DecodeLimits::default();
    let first = prepare_files(&files[..1], &bundle.manifest.input, &limits);
    let first: Vec<_> = first.iter().map(|r| r.as_ref().expect("image decodes").view()).collect();
    classifier.logits(imaging::stack(&first).view()).expect("inference runs");
    let rss_after_load = peak_rss_mib();

    let trunk = decode_model(&std::fs::read(bundle.trunk_path()).unwrap()).unwrap();
    let full = export::full_model(&trunk, &bundle.manifest.trunk.output, &bundle.tail, &bundle.head).unwrap();
    let full_path = std::env::temp_dir().join(format!("edgeadapt-bench-{}.onnx", std::process::id()));
    std::fs::write(&full_path, encode_model(&full)).unwrap();
    let mut bare = runtime::open_session(&full_path, "bench", None, &options).expect("bare session opens");
    let input_name = bundle.manifest.input.tensor.clone();

    let samples: Vec<Array3<f32>> =
        prepare_files(&files, &bundle.manifest.input, &limits).into_iter().map(|r| r.expect("image decodes")).collect();
    let rt = runtime::init(None).unwrap();
    println!(
        "bundle {} | ONNX Runtime {} | provider {} | {} images | {:.0} s per cell",
        bundle.manifest.name,
        rt.version,
        classifier.provider(),
        files.len(),
        seconds
    );
    println!("peak RSS after loading the bundle and one inference: {rss_after_load:.1} MiB\n");
    println!("images/s over the whole cell; ratio = median over 10 interleaved rounds of edgeadapt / bare\n");
    println!(
        "| batch | edgeadapt img/s | bare ort img/s | ratio | edgeadapt incl. preprocessing | bare incl. preprocessing | ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for batch in [1usize, 8, 32] {
        let batches: Vec<Array4<f32>> = samples
            .chunks(batch)
            .filter(|c| c.len() == batch)
            .map(|c| imaging::stack(&c.iter().map(|s| s.view()).collect::<Vec<_>>()))
            .collect();
        let file_batches: Vec<&[PathBuf]> = files.chunks(batch).filter(|c| c.len() == batch).collect();
        let prepare = |chunk: &[PathBuf]| -> Array4<f32> {
            let prepared = prepare_files(chunk, &bundle.manifest.input, &limits);
            imaging::stack(&prepared.iter().map(|r| r.as_ref().unwrap().view()).collect::<Vec<_>>())
        };
        let bare_session = std::cell::RefCell::new(&mut bare);
        let bare_run = |input: &Array4<f32>| {
            let mut session = bare_session.borrow_mut();
            let tensor = ort::value::TensorRef::from_array_view(input.view()).unwrap();
            let outputs = session.session.run(ort::inputs![input_name.as_str() => tensor]).unwrap();
            std::hint::black_box(outputs[export::LOGITS].try_extract_array::<f32>().unwrap().sum());
        };
        let ours_classifier = std::cell::RefCell::new(&mut classifier);
        let ours_run = |input: &Array4<f32>| {
            std::hint::black_box(ours_classifier.borrow_mut().logits(input.view()).unwrap());
        };
        let (a, b) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        let next = |cursor: &std::cell::Cell<usize>, len: usize| {
            cursor.set(cursor.get() + 1);
            cursor.get() % len
        };
        let (ours, theirs, ratio) = compare(
            batch,
            budget,
            || ours_run(&batches[next(&a, batches.len())]),
            || bare_run(&batches[next(&b, batches.len())]),
        );
        let (ours_full, theirs_full, ratio_full) = compare(
            batch,
            budget,
            || ours_run(&prepare(file_batches[next(&a, file_batches.len())])),
            || bare_run(&prepare(file_batches[next(&b, file_batches.len())])),
        );
        println!(
            "| {batch} | {ours:.1} | {theirs:.1} | {ratio:.3} | {ours_full:.1} | {theirs_full:.1} | {ratio_full:.3} |"
        );
    }
    let _ = std::fs::remove_file(&full_path);
}
