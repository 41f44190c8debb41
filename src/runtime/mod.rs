//! ONNX Runtime: loading the native library once per process and opening sessions on the
//! configured execution providers.

pub mod engine_cache;
pub mod gpu;
pub mod library;
pub mod providers;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::ep::ExecutionProvider;
use ort::session::Session;
use serde::{Deserialize, Serialize};

pub use library::{LibraryChoice, LibrarySource, PINNED_ORT_VERSION};
pub use providers::{ProviderKind, ProviderPlan};

/// Runtime settings, the `[runtime]` table of the device config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeOptions {
    /// Path to libonnxruntime.so; overrides ORT_DYLIB_PATH and the cache.
    pub ort_library: Option<PathBuf>,
    /// Execution providers in order of preference.
    pub providers: Vec<ProviderKind>,
    /// Fail at start-up instead of falling back to the CPU.
    pub require_gpu: bool,
    /// CUDA device used by the CUDA and TensorRT providers.
    pub gpu_device: i32,
    /// Threads for one inference (0: ONNX Runtime's default, one per core).
    pub intra_threads: usize,
    /// On GPU providers the trunk always runs on batches of exactly this size: smaller ones are
    /// padded, larger ones run in parts. ONNX Runtime's CUDA provider prepares every convolution
    /// again whenever the batch size changes, which costs far more than the padding.
    pub gpu_batch: usize,
    /// Writes ONNX Runtime's per-node profile (which provider ran each node, and how long) to
    /// this folder when a session closes: for finding out why a GPU provider is slow.
    pub profile_dir: Option<PathBuf>,
    /// Where the tail and head run.
    pub tail: TailPlacement,
    pub cuda: CudaOptions,
    pub tensorrt: TensorrtOptions,
}

/// Where the tail and head run: in ONNX Runtime on the trunk's execution provider, with the
/// served version's parameters as constants (CPU) or bound inputs (GPU), or in Rust on the CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TailPlacement {
    /// ONNX Runtime where the tail can run there, else Rust. ONNX Runtime measured faster on the
    /// CPU at every batch size (docs/performance.md), and on a GPU it keeps the tail there.
    #[default]
    Auto,
    /// Always ONNX Runtime; the classifier does not open where the tail cannot run there.
    Onnx,
    /// Always Rust.
    Rust,
}

/// The `[runtime.cuda]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CudaOptions {
    /// How cuDNN picks each convolution's algorithm for a new input shape.
    pub conv_algo_search: ConvAlgoSearch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvAlgoSearch {
    /// Benchmark every algorithm once per input shape (ONNX Runtime's default).
    Exhaustive,
    /// Take cuDNN's heuristic choice: a third of the warm-up and as fast afterwards, measured.
    Heuristic,
    /// cuDNN's default algorithm.
    Default,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions { conv_algo_search: ConvAlgoSearch::Heuristic }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TensorrtOptions {
    pub fp16: bool,
    /// Engine and timing caches (default: `<data_dir>/tensorrt`); a subfolder per model, sealed
    /// with the TensorRT, CUDA and GPU it was built for.
    pub cache_dir: Option<PathBuf>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            ort_library: None,
            providers: vec![ProviderKind::Cpu],
            require_gpu: false,
            gpu_device: 0,
            intra_threads: 0,
            gpu_batch: 32,
            profile_dir: None,
            tail: TailPlacement::Auto,
            cuda: CudaOptions::default(),
            tensorrt: TensorrtOptions::default(),
        }
    }
}

impl Default for TensorrtOptions {
    fn default() -> Self {
        TensorrtOptions { fp16: true, cache_dir: None }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    NotFound(#[from] library::LibraryNotFound),
    #[error(
        "cannot load ONNX Runtime from {path} (found via {source_kind}): {problem}\n  fix: use ONNX Runtime >= 1.20 (pinned: {PINNED_ORT_VERSION}, fetched by `python3 tools/fetch-onnxruntime.py`)"
    )]
    Load { path: PathBuf, source_kind: LibrarySource, problem: String },
    #[error("ONNX Runtime was already loaded from {loaded}; cannot switch to {requested} in the same process")]
    AlreadyLoaded { loaded: PathBuf, requested: PathBuf },
    #[error(transparent)]
    Providers(#[from] providers::ProviderError),
    #[error("{model}: no execution provider could open the model: {attempts}")]
    Session { model: PathBuf, attempts: String },
    #[error("{model}: {problem}")]
    Model { model: PathBuf, problem: String },
}

/// The loaded library and its environment; lives for the whole process.
pub struct Runtime {
    pub library: LibraryChoice,
    pub version: String,
    environment: ort::environment::Environment,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Loads ONNX Runtime (first call) or returns the already loaded one.
pub fn init(ort_library: Option<&Path>) -> Result<&'static Runtime, RuntimeError> {
    let _guard = INIT_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let cached = library::cached_library_path(&library::cache_dir());
    let environment = std::env::var_os("ORT_DYLIB_PATH");
    let choice = library::resolve(ort_library, environment.as_deref(), &cached, Path::exists)?;
    if let Some(runtime) = RUNTIME.get() {
        if ort_library.is_some() && runtime.library.path != choice.path {
            return Err(RuntimeError::AlreadyLoaded { loaded: runtime.library.path.clone(), requested: choice.path });
        }
        return Ok(runtime);
    }
    let load_error =
        |problem: String| RuntimeError::Load { path: choice.path.clone(), source_kind: choice.source, problem };
    let builder = ort::init_from(&choice.path).map_err(|e| load_error(e.to_string()))?;
    let environment = builder.with_name("edgeadapt").build().map_err(|e| load_error(e.to_string()))?;
    let version = library::version_of(&choice.path).unwrap_or_else(|| "unknown".into());
    tracing::info!(library = %choice.path.display(), source = %choice.source, %version, "loaded ONNX Runtime");
    Ok(RUNTIME.get_or_init(|| Runtime { library: choice, version, environment }))
}

/// Whether the loaded ONNX Runtime build carries `kind` (call after [`init`]).
pub fn is_available(kind: ProviderKind) -> bool {
    let available = match kind {
        ProviderKind::Tensorrt => ort::ep::TensorRT::is_available(),
        ProviderKind::Cuda => ort::ep::CUDA::is_available(),
        ProviderKind::Cpu => ort::ep::CPU::is_available(),
    };
    available.unwrap_or(false)
}

/// An open ONNX Runtime session and the provider that actually runs it.
pub struct ModelSession {
    pub session: Session,
    pub provider: ProviderKind,
    pub model: PathBuf,
    /// The TensorRT engine cache in use, to be sealed once the engines have run.
    pub engine_cache: Option<engine_cache::PreparedCache>,
}

/// The model's image input, so that TensorRT builds one engine for every batch size up to
/// the one batch size it will be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputShape {
    pub name: String,
    /// The shape of one sample (without the batch axis).
    pub sample: Vec<usize>,
}

impl InputShape {
    fn profile(&self, batch: usize) -> String {
        let dims: Vec<String> =
            std::iter::once(batch).chain(self.sample.iter().copied()).map(|d| d.to_string()).collect();
        format!("{}:{}", self.name, dims.join("x"))
    }
}

/// Opens `model` on the first provider of the plan that accepts it.
///
/// `model_sha256` keys the TensorRT engine cache so that an engine built for another model is
/// never reused; `input` (when known) gives TensorRT its optimisation profile.
pub fn open_session(
    model: &Path,
    model_sha256: &str,
    input: Option<&InputShape>,
    options: &RuntimeOptions,
) -> Result<ModelSession, RuntimeError> {
    open(ModelSource::File(model), model, model_sha256, input, options)
}

/// Opens a model held in memory, as [`open_session`] does a file; `label` names it in messages.
pub fn open_session_from_memory(
    label: &Path,
    bytes: &[u8],
    model_sha256: &str,
    input: Option<&InputShape>,
    options: &RuntimeOptions,
) -> Result<ModelSession, RuntimeError> {
    open(ModelSource::Memory(bytes), label, model_sha256, input, options)
}

#[derive(Clone, Copy)]
enum ModelSource<'a> {
    File(&'a Path),
    Memory(&'a [u8]),
}

fn open(
    source: ModelSource<'_>,
    model: &Path,
    model_sha256: &str,
    input: Option<&InputShape>,
    options: &RuntimeOptions,
) -> Result<ModelSession, RuntimeError> {
    let runtime = init(options.ort_library.as_deref())?;
    let plan = providers::plan(&options.providers, is_available, options.require_gpu)?;
    for (kind, why) in &plan.skipped {
        tracing::warn!(provider = %kind, reason = %why, "execution provider skipped");
    }
    let mut failures = plan.skipped.clone();
    for &kind in &plan.attempts {
        match build_session(runtime, source, model, model_sha256, input, kind, options) {
            Ok((session, engine_cache)) => {
                tracing::info!(model = %model.display(), provider = %kind, "session running");
                return Ok(ModelSession { session, provider: kind, model: model.to_path_buf(), engine_cache });
            }
            Err(problem) => {
                tracing::warn!(provider = %kind, %problem, "execution provider failed");
                failures.push((kind, problem));
            }
        }
    }
    Err(RuntimeError::Session { model: model.to_path_buf(), attempts: providers::describe(&failures) })
}

fn build_session(
    runtime: &Runtime,
    source: ModelSource<'_>,
    model: &Path,
    model_sha256: &str,
    input: Option<&InputShape>,
    kind: ProviderKind,
    options: &RuntimeOptions,
) -> Result<(Session, Option<engine_cache::PreparedCache>), String> {
    let mut engine_cache = None;
    let provider = match kind {
        ProviderKind::Tensorrt => {
            let settings = &options.tensorrt;
            let mut trt = ort::ep::TensorRT::default().with_device_id(options.gpu_device).with_fp16(settings.fp16);
            if let Some(input) = input {
                let batch = options.gpu_batch.max(1);
                trt = trt
                    .with_profile_min_shapes(input.profile(batch))
                    .with_profile_opt_shapes(input.profile(batch))
                    .with_profile_max_shapes(input.profile(batch));
            }
            if let Some(root) = &settings.cache_dir {
                let key = engine_key(runtime, model_sha256, options)?;
                let prepared = engine_cache::prepare(root, key)?;
                let dir = prepared.dir.display().to_string();
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(&dir)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&dir);
                engine_cache = Some(prepared);
            }
            trt.build().error_on_failure()
        }
        ProviderKind::Cuda => {
            use ort::ep::cuda::ConvAlgorithmSearch;
            let search = match options.cuda.conv_algo_search {
                ConvAlgoSearch::Exhaustive => ConvAlgorithmSearch::Exhaustive,
                ConvAlgoSearch::Heuristic => ConvAlgorithmSearch::Heuristic,
                ConvAlgoSearch::Default => ConvAlgorithmSearch::Default,
            };
            ort::ep::CUDA::default()
                .with_device_id(options.gpu_device)
                .with_conv_algorithm_search(search)
                .build()
                .error_on_failure()
        }
        ProviderKind::Cpu => ort::ep::CPU::default().build().error_on_failure(),
    };
    // Idle ONNX Runtime workers would otherwise spin after each run and take the cores from the
    // tail's session (or the Rust tail), which runs right after the trunk.
    let mut builder = Session::builder(&runtime.environment)
        .map_err(|e| e.to_string())?
        .with_intra_op_spinning(false)
        .map_err(|e| e.to_string())?;
    if options.intra_threads > 0 {
        builder = builder.with_intra_threads(options.intra_threads).map_err(|e| e.to_string())?;
    }
    if let Some(dir) = &options.profile_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let stem = model.file_stem().map_or("model".into(), |s| s.to_string_lossy());
        builder = builder.with_profiling(dir.join(format!("{stem}-{kind}"))).map_err(|e| e.to_string())?;
    }
    let mut builder = builder.with_execution_providers([provider]).map_err(|e| e.to_string())?;
    let session = match source {
        ModelSource::File(path) => builder.commit_from_file(path),
        ModelSource::Memory(bytes) => builder.commit_from_memory(bytes),
    }
    .map_err(|e| e.to_string())?;
    Ok((session, engine_cache))
}

/// The facts a TensorRT engine for this model depends on; fails where TensorRT or the GPU
/// cannot be queried, since TensorRT could not run there either.
fn engine_key(
    runtime: &Runtime,
    model_sha256: &str,
    options: &RuntimeOptions,
) -> Result<engine_cache::EngineKey, String> {
    let driver = gpu::cuda_driver()?;
    let device =
        driver.devices.iter().find(|d| d.ordinal == options.gpu_device).ok_or_else(|| {
            format!("no CUDA device {} (the driver sees {})", options.gpu_device, driver.devices.len())
        })?;
    Ok(engine_cache::EngineKey {
        model_sha256: model_sha256.to_string(),
        onnxruntime: runtime.version.clone(),
        tensorrt: gpu::tensorrt_version()?,
        cuda: driver.cuda_version.clone(),
        gpu: device.name.clone(),
        compute_capability: device.compute_capability.clone(),
        fp16: options.tensorrt.fp16,
        batch: options.gpu_batch.max(1),
    })
}
