//! Image files: finding them under folders, and decoding and preparing them (or encoded
//! images) on all cores for the model's input contract.

use std::path::{Path, PathBuf};

use crate::imaging::{self, DecodeLimits, ImageInputError};

/// Decodes and prepares files on all cores; order is preserved.
pub fn prepare_files(
    files: &[PathBuf],
    contract: &crate::model::manifest::InputContract,
    limits: &DecodeLimits,
) -> Vec<Result<ndarray::Array3<f32>, ImageInputError>> {
    parallel_map(files, |path| {
        imaging::decode_file(path, limits).map(|image| imaging::to_model_input(&image, contract))
    })
}

/// Decodes and prepares encoded images (`(name for messages, bytes)`) on all cores.
pub fn prepare_bytes(
    images: &[(&str, &[u8])],
    contract: &crate::model::manifest::InputContract,
    limits: &DecodeLimits,
) -> Vec<Result<ndarray::Array3<f32>, ImageInputError>> {
    parallel_map(images, |(name, bytes)| {
        imaging::decode_bytes(name, bytes, limits).map(|image| imaging::to_model_input(&image, contract))
    })
}

/// `f` over `items` in contiguous parts, one per core; order is preserved.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len().max(1));
    if workers <= 1 {
        return items.iter().map(f).collect();
    }
    let per_worker = items.len().div_ceil(workers);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> =
            items.chunks(per_worker).map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<_>>())).collect();
        handles.into_iter().flat_map(|h| h.join().expect("image preparation does not panic")).collect()
    })
}

/// Image files under `paths` (folders are walked recursively, in sorted order). Files named
/// explicitly are kept whatever their extension so that a wrong file gets a clear error.
/// Links to folders are followed, but a link back into a folder being walked (a loop) is
/// skipped with a warning, and a file reached by several paths is listed once.
pub fn collect_image_files(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for path in paths {
        if !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        let walk = walkdir::WalkDir::new(path).follow_links(true).sort_by_file_name();
        for entry in walk {
            let entry = match entry {
                Ok(entry) => entry,
                Err(error) if error.loop_ancestor().is_some() => {
                    let at = error.path().map(|p| p.display().to_string()).unwrap_or_default();
                    tracing::warn!(link = %at, "skipped: a link back into a folder being walked");
                    continue;
                }
                // walkdir's message names the path.
                Err(error) => return Err(std::io::Error::other(error.to_string())),
            };
            if entry.file_type().is_file() && is_image_name(entry.path()) {
                let identity = std::fs::canonicalize(entry.path()).unwrap_or_else(|_| entry.path().to_path_buf());
                if seen.insert(identity) {
                    files.push(entry.into_path());
                }
            }
        }
    }
    Ok(files)
}

pub fn is_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}
