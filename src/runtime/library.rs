//! Where the ONNX Runtime shared library comes from.
//!
//! Lookup order: `ort_library` in the device config, then `ORT_DYLIB_PATH`, then the cache that
//! `tools/fetch-onnxruntime.py` fills from the pinned PyPI wheel. An explicit setting that points
//! at a missing file is an error rather than a silent fallback, because the operator asked for it.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};

/// ONNX Runtime version of the pinned wheel (and the one `ort` is built against).
pub const PINNED_ORT_VERSION: &str = "1.31.1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibrarySource {
    Config,
    Environment,
    Cache,
}

impl fmt::Display for LibrarySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LibrarySource::Config => "device config `ort_library`",
            LibrarySource::Environment => "ORT_DYLIB_PATH",
            LibrarySource::Cache => "edgeadapt cache",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryChoice {
    pub path: PathBuf,
    pub source: LibrarySource,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "ONNX Runtime library not found.\n  looked for: {looked}\n  fix: run `python3 tools/fetch-onnxruntime.py` to fetch the pinned ONNX Runtime {PINNED_ORT_VERSION} \
     into the cache, or set `ort_library` in the device config / ORT_DYLIB_PATH to an existing libonnxruntime.so (on Jetson: JetPack's build)"
)]
pub struct LibraryNotFound {
    pub looked: String,
}

/// The cache folder: `$EDGEADAPT_CACHE`, else `$XDG_CACHE_HOME/edgeadapt`, else `~/.cache/edgeadapt`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EDGEADAPT_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("edgeadapt");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("edgeadapt")
}

/// Where the fetch script puts the pinned library for this machine's architecture.
pub fn cached_library_path(cache: &Path) -> PathBuf {
    cache
        .join("onnxruntime")
        .join(format!("{PINNED_ORT_VERSION}-{}", std::env::consts::ARCH))
        .join(format!("libonnxruntime.so.{PINNED_ORT_VERSION}"))
}

/// Picks the library to load. Pure apart from the `exists` probe, so the order is unit-tested.
pub fn resolve(
    configured: Option<&Path>,
    environment: Option<&OsStr>,
    cached: &Path,
    exists: impl Fn(&Path) -> bool,
) -> Result<LibraryChoice, LibraryNotFound> {
    if let Some(path) = configured {
        if exists(path) {
            return Ok(LibraryChoice { path: path.to_path_buf(), source: LibrarySource::Config });
        }
        return Err(LibraryNotFound {
            looked: format!("device config ort_library = {} (file does not exist)", path.display()),
        });
    }
    if let Some(value) = environment.filter(|v| !v.is_empty()) {
        let path = Path::new(value);
        if exists(path) {
            return Ok(LibraryChoice { path: path.to_path_buf(), source: LibrarySource::Environment });
        }
        return Err(LibraryNotFound { looked: format!("ORT_DYLIB_PATH={} (file does not exist)", path.display()) });
    }
    if exists(cached) {
        return Ok(LibraryChoice { path: cached.to_path_buf(), source: LibrarySource::Cache });
    }
    Err(LibraryNotFound {
        looked: format!(
            "device config ort_library (not set), ORT_DYLIB_PATH (not set), cache {} (missing)",
            cached.display()
        ),
    })
}

/// The version string the library reports through the ONNX Runtime C API.
pub fn version_of(path: &Path) -> Option<String> {
    // SAFETY: `path` is the library ort has already loaded, so opening it again only raises its
    // reference count; `OrtGetApiBase` and `GetVersionString` are side-effect-free C API entry
    // points that return static data.
    unsafe {
        let library = libloading::Library::new(path).ok()?;
        let get_api_base: libloading::Symbol<'_, unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
            library.get(b"OrtGetApiBase").ok()?;
        let base = get_api_base();
        if base.is_null() {
            return None;
        }
        let version = ((*base).GetVersionString)();
        if version.is_null() {
            return None;
        }
        Some(std::ffi::CStr::from_ptr(version).to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CACHED: &str = "/cache/libonnxruntime.so.1.31.1";

    fn only(existing: &'static [&'static str]) -> impl Fn(&Path) -> bool {
        move |path| existing.iter().any(|e| Path::new(e) == path)
    }

    #[test]
    fn the_config_wins_over_the_environment_and_the_cache() {
        let choice = resolve(
            Some(Path::new("/cfg/lib.so")),
            Some(OsStr::new("/env/lib.so")),
            Path::new(CACHED),
            only(&["/cfg/lib.so", "/env/lib.so", CACHED]),
        )
        .unwrap();
        assert_eq!(choice, LibraryChoice { path: "/cfg/lib.so".into(), source: LibrarySource::Config });
    }

    #[test]
    fn the_environment_wins_over_the_cache() {
        let choice =
            resolve(None, Some(OsStr::new("/env/lib.so")), Path::new(CACHED), only(&["/env/lib.so", CACHED])).unwrap();
        assert_eq!(choice.source, LibrarySource::Environment);
    }

    #[test]
    fn the_cache_is_the_last_resort_and_an_empty_variable_counts_as_unset() {
        let choice = resolve(None, Some(OsStr::new("")), Path::new(CACHED), only(&[CACHED])).unwrap();
        assert_eq!(choice.source, LibrarySource::Cache);
    }

    #[test]
    fn an_explicit_setting_to_a_missing_file_is_an_error_not_a_fallback() {
        let error = resolve(Some(Path::new("/cfg/missing.so")), None, Path::new(CACHED), only(&[CACHED])).unwrap_err();
        assert!(error.to_string().contains("/cfg/missing.so"), "{error}");
        let error = resolve(None, Some(OsStr::new("/env/missing.so")), Path::new(CACHED), only(&[CACHED])).unwrap_err();
        assert!(error.to_string().contains("ORT_DYLIB_PATH=/env/missing.so"), "{error}");
    }

    #[test]
    fn nothing_found_lists_every_place_and_the_fix() {
        let text = resolve(None, None, Path::new(CACHED), only(&[])).unwrap_err().to_string();
        for needle in ["ort_library (not set)", "ORT_DYLIB_PATH (not set)", CACHED, "tools/fetch-onnxruntime.py"] {
            assert!(text.contains(needle), "missing '{needle}' in: {text}");
        }
    }
}
