//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod daemon;

/// Reports a test that cannot run on this machine: on stderr, and in the list that
/// `tools/test.sh` prints at the end, so a skip never passes for a pass.
pub fn skipped(reason: &str) {
    skipped_to(&std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests.txt"), reason);
}

/// [`skipped`], listing the test in `list`.
pub fn skipped_to(list: &std::path::Path, reason: &str) {
    use std::io::Write;
    eprintln!("skipped: {reason}");
    // The test harness names each test's thread after the test.
    let test = std::thread::current().name().unwrap_or("?").to_string();
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(list) {
        // One write per line: parallel tests append whole lines.
        let _ = file.write_all(format!("{}::{test}: {reason}\n", env!("CARGO_CRATE_NAME")).as_bytes());
    }
}

/// Gates for tests that need a GPU.
pub mod gpu {
    use edgeadapt::runtime::{self, ProviderKind, gpu};

    pub fn skip(reason: &str) {
        if std::env::var("EDGEADAPT_GPU_TESTS").as_deref() == Ok("require") {
            panic!("EDGEADAPT_GPU_TESTS=require, but: {reason}");
        }
        super::skipped(reason);
    }

    /// Why `kind` cannot run here, if it cannot.
    pub fn missing(kind: ProviderKind) -> Option<String> {
        let runtime = match runtime::init(None) {
            Ok(runtime) => runtime,
            Err(error) => return Some(error.to_string()),
        };
        if !runtime::is_available(kind) {
            return Some(format!(
                "the loaded ONNX Runtime ({}) has no {kind} execution provider (the PyPI `onnxruntime` wheel is \
                 CPU-only; point ORT_DYLIB_PATH at a GPU build)",
                runtime.library.path.display()
            ));
        }
        match gpu::cuda_driver() {
            Ok(driver) if driver.devices.is_empty() => return Some("the CUDA driver sees no device".into()),
            Ok(driver) => eprintln!("GPU: {:?}, CUDA driver {}", driver.devices, driver.cuda_version),
            Err(problem) => return Some(problem),
        }
        if kind == ProviderKind::Tensorrt {
            match gpu::tensorrt_version() {
                Ok(version) => eprintln!("TensorRT {version}"),
                Err(problem) => return Some(problem),
            }
        }
        None
    }
}

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgeadapt::runtime::{self, RuntimeOptions};
use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

/// Polls `probe` until it gives a value and returns that value; panics naming `what` once `limit`
/// has passed. Every test that waits for another thread or process waits through here (or
/// [`wait_until_ok`]), so no wait can hang a test or end it with a bare assertion.
pub fn wait_until<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    wait_until_ok(limit, what, || probe().ok_or_else(String::new))
}

/// [`wait_until`] for a probe that says what it saw instead (`Err`), for the panic message.
pub fn wait_until_ok<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(seen) if Instant::now() >= deadline => {
                let seen = if seen.is_empty() { String::new() } else { format!("; last seen: {seen}") };
                panic!("timed out after {limit:?} waiting for {what}{seen}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The complete lines of the log at `path` that contain `needle`. A line still being written
/// does not count, so a match is never a line cut short.
pub fn log_lines(path: &Path, needle: &str) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && l.contains(needle))
        .map(|l| l.trim_end().into())
        .collect()
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(relative: &str) -> PathBuf {
    repo().join("tests/fixtures").join(relative)
}

pub fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A nested JSON array of numbers as an f32 array of the given shape.
pub fn array(value: &Value, shape: &[usize]) -> ArrayD<f32> {
    fn flatten(value: &Value, out: &mut Vec<f32>) {
        match value {
            Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
            Value::Number(n) => out.push(n.as_f64().expect("a number") as f32),
            other => panic!("not a number: {other}"),
        }
    }
    let mut data = Vec::new();
    flatten(value, &mut data);
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape matches the data")
}

pub fn shape(value: &Value) -> Vec<usize> {
    value.as_array().expect("a shape list").iter().map(|d| d.as_u64().expect("a dimension") as usize).collect()
}

pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Runs a plain ONNX model on one input and returns one output.
pub fn run_onnx(model: &Path, input_name: &str, input: &ArrayD<f32>, output: &str) -> ArrayD<f32> {
    let mut session = runtime::open_session(model, "test", None, &RuntimeOptions::default()).expect("session opens");
    let tensor = ort::value::TensorRef::from_array_view(input.view()).expect("input tensor");
    let outputs = session.session.run(ort::inputs![input_name => tensor]).expect("model runs");
    outputs[output].try_extract_array::<f32>().expect("f32 output").to_owned()
}

/// Copies a folder (non-recursive: bundles are flat).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Copies the first `n` images of the benchmark folder `target/data/fonts36/<class_dir>` into
/// `dir/images`.
pub fn fonts36_images(class_dir: &str, dir: &Path, n: usize) -> PathBuf {
    let source = repo().join("target/data/fonts36").join(class_dir);
    assert!(source.is_dir(), "run tools/setup.sh first: {} is missing", source.display());
    let folder = dir.join("images");
    std::fs::create_dir_all(&folder).unwrap();
    for i in 0..n {
        std::fs::copy(source.join(format!("{i}.png")), folder.join(format!("{i}.png"))).unwrap();
    }
    folder
}

/// Imports `tiny_cnn.onnx` split at its features (classes cat, dog, bird) into `dir/bundle`:
/// a bundle whose tail is empty.
pub fn tailless_bundle(dir: &Path) -> PathBuf {
    let fixtures = repo().join("tests/fixtures/onnx");
    let bundle = dir.join("bundle");
    let import = std::process::Command::new(env!("CARGO_BIN_EXE_edgeadapt"))
        .arg("import-onnx")
        .arg(fixtures.join("tiny_cnn.onnx"))
        .args(["--features", "features", "--split", "features", "--classes"])
        .arg(fixtures.join("tiny_cnn.classes.txt"))
        .arg("--out")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    bundle
}

/// Labels `(class, what, bytes)` samples in-process and fails on any refusal.
pub fn ingest_all(agent: &mut edgeadapt::agent::Agent, samples: &[(String, String, Vec<u8>)]) {
    let items: Vec<edgeadapt::agent::Labelled<'_>> =
        samples.iter().map(|(class, what, bytes)| edgeadapt::agent::Labelled { what, bytes, class }).collect();
    for result in agent.ingest(&items, "test") {
        result.unwrap();
    }
}

/// Starts an embedded MQTT broker of the test's own on a free port; its port. A port found free
/// can be taken before the broker binds it (a parallel test's client may get it as its local
/// port), so a taken one is replaced by another.
pub fn start_embedded_broker() -> u16 {
    for _ in 0..20 {
        let port = daemon::free_port();
        match edgeadapt::fleet::broker::start(format!("127.0.0.1:{port}").parse().unwrap(), 1 << 20) {
            Ok(()) => return port,
            Err(error)
                if error.chain().any(|cause| {
                    cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
                }) =>
            {
                continue;
            }
            Err(error) => panic!("the embedded broker did not start: {error:#}"),
        }
    }
    panic!("no free port for the embedded broker in 20 tries");
}

/// A copy of the default bundle under another name (so another bundle id) in `dir/<name>`;
/// `classes_shift` rotates its class list, the packaging mistake a health check must catch.
pub fn renamed_bundle(dir: &Path, name: &str, classes_shift: usize) -> PathBuf {
    let out = dir.join(name);
    copy_dir(&repo().join("models/efficientnet-lite0-fonts36"), &out);
    let path = out.join("manifest.toml");
    let mut manifest: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    manifest.insert("name".into(), name.into());
    let classes = manifest["head"]["classes"].as_array().unwrap().clone();
    let mut rotated = classes.clone();
    rotated.rotate_left(classes_shift % classes.len());
    manifest["head"].as_table_mut().unwrap().insert("classes".into(), toml::Value::Array(rotated));
    std::fs::write(&path, toml::to_string(&manifest).unwrap()).unwrap();
    out
}

/// Debian's Mosquitto, where it is installed.
pub fn mosquitto_binary() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}
