//! The device agent's figures: labelled ingest against bare feature extraction, time from
//! `adapt` to a promoted version, daemon RSS at rest and during adaptation, and classification
//! latency through the watched folder and the HTTP endpoint.
//!
//! `cargo bench --bench agent` (after `tools/setup.sh`). Uses the default bundle and fonts36:
//! 18 classes x 60 target/adapt images are labelled (1080 samples: 864 train, 216 validation).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgeadapt::agent::{Agent, Labelled};
use edgeadapt::config::DeviceConfig;
use edgeadapt::imaging::thumbnail::thumbnail;
use edgeadapt::imaging::{self, DecodeLimits};
use edgeadapt::inference::{Classifier, prepare_bytes};
use edgeadapt::model::Bundle;
use edgeadapt::runtime::RuntimeOptions;

const BATCH: usize = 32;
const CLASSES: [&str; 18] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "A", "B", "C", "D", "E", "F", "G", "H"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn labelled_files() -> Vec<(String, PathBuf)> {
    let root = repo().join("target/data/fonts36/target/adapt");
    assert!(root.is_dir(), "run tools/setup.sh first: {} is missing", root.display());
    CLASSES
        .iter()
        .flat_map(|c| {
            let root = root.clone();
            (0..60).map(move |n| (c.to_string(), root.join(c).join(format!("{n}.png"))))
        })
        .collect()
}

fn config_text(data_dir: &Path, port: u16) -> String {
    format!(
        "device_id = \"bench\"\nbundle = \"{}\"\ndata_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
         [watch]\npoll_ms = 50\n",
        repo().join("models/efficientnet-lite0-fonts36").display(),
        data_dir.display()
    )
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Images/s of bare feature extraction (decode, preprocessing, trunk) and of ingest (the same
/// plus hashing, duplicate checks and one committed transaction per batch). The two alternate
/// batch by batch on the same images, so drift in machine speed hits both alike; each round
/// ingests into a fresh store.
fn ingest_vs_extraction(files: &[(String, PathBuf)], rounds: usize) -> (Vec<f64>, Vec<f64>, PathBuf) {
    let bundle = Bundle::load(&repo().join("models/efficientnet-lite0-fonts36")).unwrap();
    let mut classifier = Classifier::open(bundle, &RuntimeOptions::default()).unwrap();
    let paths: Vec<PathBuf> = files.iter().map(|(_, p)| p.clone()).collect();
    let bytes: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let mut bare = Vec::new();
    let mut ingest = Vec::new();
    let mut last_dir = PathBuf::new();
    for round in 0..rounds {
        let dir = std::env::temp_dir().join(format!("edgeadapt-bench-ingest-{}-{round}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = DeviceConfig::parse(&config_text(&dir, 0), Path::new(".")).unwrap();
        let mut agent = Agent::open(&config).unwrap();
        let (mut bare_s, mut ingest_s) = (0.0, 0.0);
        for start in (0..files.len()).step_by(BATCH) {
            let end = (start + BATCH).min(files.len());
            let images: Vec<(&str, &[u8])> = (start..end).map(|i| (names[i].as_str(), bytes[i].as_slice())).collect();
            let items: Vec<Labelled<'_>> =
                (start..end).map(|i| Labelled { what: &names[i], bytes: &bytes[i], class: &files[i].0 }).collect();
            let mut run_bare = || {
                let started = Instant::now();
                let inputs: Vec<_> =
                    prepare_bytes(&images, &classifier.bundle.manifest.input, &DecodeLimits::default())
                        .into_iter()
                        .map(|i| i.unwrap())
                        .collect();
                let batch = imaging::stack(&inputs.iter().map(|i| i.view()).collect::<Vec<_>>());
                std::hint::black_box(classifier.split(batch.view()).unwrap());
                started.elapsed().as_secs_f64()
            };
            let mut run_ingest = || {
                let started = Instant::now();
                for result in agent.ingest(&items, "bench") {
                    result.unwrap();
                }
                started.elapsed().as_secs_f64()
            };
            // Which goes first alternates: the second of a pair finds the caches warm.
            if (start / BATCH).is_multiple_of(2) {
                bare_s += run_bare();
                ingest_s += run_ingest();
            } else {
                ingest_s += run_ingest();
                bare_s += run_bare();
            }
        }
        bare.push(files.len() as f64 / bare_s);
        ingest.push(files.len() as f64 / ingest_s);
        drop(agent);
        if round + 1 < rounds {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        last_dir = dir;
    }
    (bare, ingest, last_dir)
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// What keeping recent images for the console costs classification: two agents on the same
/// bundle, one keeping images (`console.keep_images` 500) and one not (0), classify the same
/// encoded images one at a time (as the watched folder and `POST /v1/classify` do) in
/// interleaved rounds, writing buffered images out once a second as the daemon does. Also the
/// time to make one thumbnail, which the daemon does in the background.
fn keeping_images(seconds: f64) {
    let data = repo().join("target/data/fonts36/target/test");
    let config = |dir: &Path, keep_images: usize| {
        let text = format!(
            "device_id = \"bench\"\nbundle = \"{}\"\ndata_dir = \"{}\"\n[console]\nkeep_images = {keep_images}\n",
            repo().join("models/efficientnet-lite0-fonts36").display(),
            dir.display()
        );
        DeviceConfig::parse(&text, dir).unwrap()
    };
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(&data)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .map(|e| e.into_path())
        .collect();
    files.sort();
    let images: Vec<(String, Vec<u8>)> =
        files.iter().take(2000).map(|f| (f.display().to_string(), std::fs::read(f).unwrap())).collect();
    assert!(!images.is_empty(), "no images under {} (run tools/setup.sh)", data.display());
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut keeping = Agent::open(&config(dirs[0].path(), 500)).unwrap();
    let mut plain = Agent::open(&config(dirs[1].path(), 0)).unwrap();
    let round = Duration::from_secs_f64(seconds / 10.0);
    let (mut next_a, mut next_b) = (0, 0);
    // Warm-up, then ten interleaved rounds.
    run(&mut keeping, &images, Duration::from_secs(1), &mut next_a);
    run(&mut plain, &images, Duration::from_secs(1), &mut next_b);
    let (mut totals, mut ratios) = ([(0usize, 0.0f64); 2], Vec::new());
    for _ in 0..10 {
        let a = run(&mut keeping, &images, round, &mut next_a);
        let b = run(&mut plain, &images, round, &mut next_b);
        for (slot, (n, s)) in [a, b].into_iter().enumerate() {
            totals[slot].0 += n;
            totals[slot].1 += s;
        }
        ratios.push((a.0 as f64 / a.1) / (b.0 as f64 / b.1));
    }
    ratios.sort_by(f64::total_cmp);
    let rate = |(n, s): (usize, f64)| n as f64 / s;
    let limits = DecodeLimits::default();
    let started = Instant::now();
    let sample = &images[..images.len().min(200)];
    for (name, bytes) in sample {
        thumbnail(name, bytes, &limits).unwrap();
    }
    let thumb_ms = started.elapsed().as_secs_f64() * 1000.0 / sample.len() as f64;
    println!("| agent | images/s (batch 1) | ratio to not keeping (median of 10 rounds, range) |");
    println!("|---|---|---|");
    println!(
        "| keeping recent images (500) | {:.1} | {:.3} ({:.3}-{:.3}) |",
        rate(totals[0]),
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );
    println!("| not keeping (0) | {:.1} | 1 |", rate(totals[1]));
    println!();
    println!(
        "one thumbnail (made in the background): {thumb_ms:.2} ms per image over {} images of {}",
        sample.len(),
        data.display()
    );
}

/// Classifies for `budget`, one image per call, flushing buffered images once a second.
fn run(agent: &mut Agent, images: &[(String, Vec<u8>)], budget: Duration, next: &mut usize) -> (usize, f64) {
    let started = Instant::now();
    let mut flushed = Instant::now();
    let mut done = 0;
    while started.elapsed() < budget {
        let (name, bytes) = &images[*next % images.len()];
        *next += 1;
        let result = agent.classify(&[(name.as_str(), bytes.as_slice())], 3);
        assert!(result[0].is_ok());
        done += 1;
        if flushed.elapsed() >= Duration::from_secs(1) {
            agent.flush_images().unwrap();
            agent.flush_traffic().unwrap();
            flushed = Instant::now();
        }
    }
    (done, started.elapsed().as_secs_f64())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo bench --bench agent -- keep`: only what keeping recent images costs.
    if std::env::args().any(|a| a == "keep") {
        keeping_images(20.0);
        return;
    }
    let files = labelled_files();
    println!("Agent benchmark: default bundle, {} labelled fonts36 images in batches of {BATCH}", files.len());
    println!("\nKeeping recent images for the console:\n");
    keeping_images(20.0);

    let (bare, ingest, data_dir) = ingest_vs_extraction(&files, 3);
    println!("\n| round | bare extraction (img/s) | ingest (img/s) | ratio |");
    println!("|---|---|---|---|");
    let mut ratios = Vec::new();
    for (round, (b, i)) in bare.iter().zip(&ingest).enumerate() {
        ratios.push(i / b);
        println!("| {} | {b:.0} | {i:.0} | {:.3} |", round + 1, i / b);
    }
    println!("median ingest / extraction ratio: {:.3} (goal >= 0.90)", percentile(&mut ratios, 0.5));

    // The daemon on the store just filled.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = data_dir.join("config.toml");
    std::fs::write(&config, config_text(&data_dir, port)).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("EDGEADAPT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let daemon = Daemon(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "the daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let base = format!("http://127.0.0.1:{port}");
    let agent = http();
    let rss_started = rss_mib(pid);

    // Unlabelled traffic (10 images of each of the 36 classes) through the watched folder.
    let root = repo().join("target/data/fonts36/target/adapt");
    let watch = data_dir.join("watch");
    let stage = data_dir.join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    let mut traffic = Vec::new();
    for class in std::fs::read_dir(&root).unwrap() {
        let class = class.unwrap().path();
        for n in 0..10 {
            traffic.push(class.join(format!("{n}.png")));
        }
    }
    for (i, path) in traffic.iter().enumerate() {
        std::fs::copy(path, stage.join(format!("t{i}.png"))).unwrap();
        std::fs::rename(stage.join(format!("t{i}.png")), watch.join(format!("t{i}.png"))).unwrap();
    }
    while std::fs::read_dir(&watch).unwrap().next().is_some() {
        std::thread::sleep(Duration::from_millis(20));
    }

    // Latency: one image at a time through the folder (drop to result line) and over HTTP.
    let test_root = repo().join("target/data/fonts36/target/test");
    let probes: Vec<PathBuf> =
        (0..100).map(|n| test_root.join(CLASSES[n % 18]).join(format!("{}.png", n / 18))).collect();
    let log = data_dir.join("classifications.jsonl");
    let mut folder_ms = Vec::new();
    for (i, probe) in probes.iter().enumerate() {
        let name = format!("probe{i}.png");
        std::fs::copy(probe, stage.join(&name)).unwrap();
        let lines_before = std::fs::read_to_string(&log).unwrap().lines().count();
        // Drops at varying points of the 50 ms poll cycle, as real arrivals would be.
        std::thread::sleep(Duration::from_millis((i as u64 * 37) % 50));
        let started = Instant::now();
        std::fs::rename(stage.join(&name), watch.join(&name)).unwrap();
        while std::fs::read_to_string(&log).unwrap().lines().count() == lines_before {
            std::thread::sleep(Duration::from_millis(1));
        }
        folder_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let mut http_ms = Vec::new();
    for probe in &probes {
        let bytes = std::fs::read(probe).unwrap();
        let started = Instant::now();
        let response = agent.post(format!("{base}/v1/classify")).send(bytes.as_slice()).unwrap();
        assert_eq!(response.status(), 200);
        http_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let rss_rest = rss_mib(pid);

    // Adapt to promoted, for the default method and a single fixed configuration.
    println!("\n| method | adapt to promoted (s) | promoted | peak RSS during run (MiB) |");
    println!("|---|---|---|---|");
    for method in ["recommended", "ft-tail+prior"] {
        // Each run starts from the source model, so the gate compares against the same version.
        let response = agent.post(format!("{base}/v1/rollback")).query("to", "source").send_empty().unwrap();
        assert_eq!(response.status(), 200);
        let started = Instant::now();
        let response = agent.post(format!("{base}/v1/adapt")).query("method", method).send_empty().unwrap();
        assert_eq!(response.status(), 202, "adapt refused");
        let mut peak = 0f64;
        let state = loop {
            peak = peak.max(rss_mib(pid));
            let state: serde_json::Value =
                agent.get(format!("{base}/v1/adapt")).call().unwrap().body_mut().read_json().unwrap();
            if state["running"].is_null() {
                break state;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let seconds = started.elapsed().as_secs_f64();
        let promoted = state["last"]["Ok"]["promoted"].as_bool().unwrap_or(false);
        println!("| {method} | {seconds:.1} | {promoted} | {peak:.0} |");
    }

    println!("\n| measure | value |");
    println!("|---|---|");
    println!("| RSS after start (MiB) | {rss_started:.0} |");
    println!("| RSS at rest after 560 classifications (MiB) | {rss_rest:.0} |");
    println!(
        "| watched folder, drop to result (ms), poll 50 ms | p50 {:.1}, p99 {:.1} |",
        percentile(&mut folder_ms.clone(), 0.5),
        percentile(&mut folder_ms, 0.99)
    );
    println!(
        "| HTTP /v1/classify round trip (ms) | p50 {:.1}, p99 {:.1} |",
        percentile(&mut http_ms.clone(), 0.5),
        percentile(&mut http_ms, 0.99)
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&data_dir);
}
