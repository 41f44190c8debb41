//! Inference throughput of edgeadapt (trunk in ONNX Runtime; tail and head in a second ONNX
//! Runtime session or in Rust) against a bare ONNX Runtime session of the same model (the bundle
//! exported as one ONNX file), on the same library, tensors and threads; the time to serve a new
//! version; the process's peak RSS after loading the bundle.
//!
//! `cargo bench --bench inference` (after `tools/setup.sh`). Environment: EDGEADAPT_BENCH_BUNDLE
//! (default models/efficientnet-lite0-fonts36; tools/bench/two-layer-tail.sh makes the second
//! bundle of docs/performance.md), EDGEADAPT_BENCH_DATA (default target/data/fonts36/target/test),
//! EDGEADAPT_BENCH_SECONDS per table cell (default 6).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use edgeadapt::imaging::{self, DecodeLimits};
use edgeadapt::inference::{Calibration, Classifier, collect_image_files, prepare_files};
use edgeadapt::model::Bundle;
use edgeadapt::model::onnx::{decode_model, encode_model, export};
use edgeadapt::runtime::{self, RuntimeOptions, TailPlacement};
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

/// Interleaves `sides` (each processing `batch` images per call) in 10 rounds of about
/// `budget / (10 * sides)` each, so that drift in machine speed hits all alike. Returns each
/// side's images/s over the whole run and the median over the rounds of its ratio to the last
/// side (the baseline).
fn compare(batch: usize, budget: Duration, sides: &mut [&mut dyn FnMut()]) -> Vec<(f64, f64)> {
    for _ in 0..3 {
        for side in sides.iter_mut() {
            side();
        }
    }
    let round = budget / (10 * sides.len() as u32);
    let mut totals = vec![(0.0f64, 0usize); sides.len()];
    let mut ratios = vec![Vec::new(); sides.len()];
    for _ in 0..10 {
        let mut rates = vec![0.0; sides.len()];
        for (slot, step) in sides.iter_mut().enumerate() {
            let started = Instant::now();
            let mut images = 0;
            while started.elapsed() < round || images == 0 {
                step();
                images += batch;
            }
            let seconds = started.elapsed().as_secs_f64();
            rates[slot] = images as f64 / seconds;
            totals[slot].0 += seconds;
            totals[slot].1 += images;
        }
        let baseline = rates[rates.len() - 1];
        for (slot, rate) in rates.iter().enumerate() {
            ratios[slot].push(rate / baseline);
        }
    }
    totals
        .iter()
        .zip(ratios.iter_mut())
        .map(|(&(seconds, images), ratios)| {
            ratios.sort_by(f64::total_cmp);
            (images as f64 / seconds, (ratios[4] + ratios[5]) / 2.0)
        })
        .collect()
}

fn open_classifier(bundle: &Bundle, tail: TailPlacement) -> Classifier {
    let options = RuntimeOptions { tail, ..RuntimeOptions::default() };
    Classifier::open(bundle.clone(), &options).expect("classifier opens")
}

fn main() {
    let bundle_dir = env_path("EDGEADAPT_BENCH_BUNDLE", "models/efficientnet-lite0-fonts36");
    let data = env_path("EDGEADAPT_BENCH_DATA", "target/data/fonts36/target/test");
    let seconds: f64 = std::env::var("EDGEADAPT_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(6.0);
    let budget = Duration::from_secs_f64(seconds);
    let options = RuntimeOptions::default();

    let bundle = Bundle::load(&bundle_dir).expect("bundle loads");
    let mut classifier = open_classifier(&bundle, TailPlacement::Auto);
    let files: Vec<PathBuf> =
        collect_image_files(std::slice::from_ref(&data)).expect("data folder").into_iter().take(256).collect();
    assert!(files.len() >= 32, "need at least 32 images under {}", data.display());
    let limits = DecodeLimits::default();
    let first = prepare_files(&files[..1], &bundle.manifest.input, &limits);
    let first: Vec<_> = first.iter().map(|r| r.as_ref().expect("image decodes").view()).collect();
    classifier.logits(imaging::stack(&first).view()).expect("inference runs");
    let rss_after_load = peak_rss_mib();
    let mut in_rust = open_classifier(&bundle, TailPlacement::Rust);
    let mut in_onnx = open_classifier(&bundle, TailPlacement::Onnx);

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
        "| batch | tail in Rust img/s | ratio | tail in ONNX Runtime img/s | ratio | bare ort img/s | auto runs the tail in | auto incl. preprocessing | bare incl. preprocessing | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
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
        let run = |classifier: &mut Classifier, input: &Array4<f32>| {
            std::hint::black_box(classifier.logits(input.view()).unwrap());
        };
        let cursors = [(); 4].map(|_| std::cell::Cell::new(0));
        let next = |cursor: &std::cell::Cell<usize>, len: usize| {
            cursor.set(cursor.get() + 1);
            cursor.get() % len
        };
        let paths = compare(
            batch,
            budget * 3 / 2,
            &mut [
                &mut || run(&mut in_rust, &batches[next(&cursors[0], batches.len())]),
                &mut || run(&mut in_onnx, &batches[next(&cursors[1], batches.len())]),
                &mut || bare_run(&batches[next(&cursors[2], batches.len())]),
            ],
        );
        let auto = match classifier.tail_provider() {
            Some(provider) => format!("ONNX Runtime ({provider})"),
            None => "Rust".to_string(),
        };
        let full = compare(
            batch,
            budget,
            &mut [
                &mut || run(&mut classifier, &prepare(file_batches[next(&cursors[3], file_batches.len())])),
                &mut || bare_run(&prepare(file_batches[next(&cursors[2], file_batches.len())])),
            ],
        );
        println!(
            "| {batch} | {:.1} | {:.3} | {:.1} | {:.3} | {:.1} | {auto} | {:.1} | {:.1} | {:.3} |",
            paths[0].0, paths[0].1, paths[1].0, paths[1].1, paths[2].0, full[0].0, full[1].0, full[0].1
        );
    }
    let _ = std::fs::remove_file(&full_path);
    print_swap_times(&mut classifier);
}

/// How long serving another version takes (`Classifier::set_model`), alternating between the
/// source and a version of the same structure, then one with an adapter.
fn print_swap_times(classifier: &mut Classifier) {
    let source = classifier.model().0.clone();
    let mut same_structure = source.clone();
    same_structure.params[source.head.1].mapv_inplace(|v| v + 0.1);
    let with_adapter = source.with_adapter(8, 1);
    println!(
        "\nserving another version (`set_model`), {} tail, 20 swaps each:\n",
        match classifier.tail_provider() {
            Some(provider) => format!("ONNX Runtime ({provider})"),
            None => "Rust".into(),
        }
    );
    println!("| swap | median ms | max ms |");
    println!("|---|---|---|");
    for (name, version) in [
        ("source <-> version of the same structure", &same_structure),
        ("source <-> version with an adapter", &with_adapter),
    ] {
        let mut times = Vec::new();
        for round in 0..20 {
            let network = if round % 2 == 0 { version } else { &source };
            let started = Instant::now();
            classifier.set_model(network.clone(), Calibration::default());
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        println!("| {name} | {:.2} | {:.2} |", (times[9] + times[10]) / 2.0, times[19]);
    }
}
