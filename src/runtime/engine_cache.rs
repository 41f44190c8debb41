//! The TensorRT engine and timing cache: one folder per model on persistent storage, sealed
//! with the facts the engines depend on.
//!
//! ONNX Runtime reuses any engine file it finds for a model, even one built by another
//! TensorRT version or for another GPU, and a power cut during a build leaves a truncated file.
//! So the folder is trusted only when its seal (`cache.json`) names the same model, ONNX
//! Runtime, TensorRT, CUDA, GPU and build options, and every file still has the hash it was
//! sealed with. Anything else is wiped and rebuilt.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Everything a TensorRT engine depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineKey {
    pub model_sha256: String,
    pub onnxruntime: String,
    pub tensorrt: String,
    /// CUDA version of the driver.
    pub cuda: String,
    pub gpu: String,
    pub compute_capability: String,
    pub fp16: bool,
    /// The batch size the engine is built for.
    pub batch: usize,
}

impl EngineKey {
    /// The fields that differ from `other`, as `name: old -> new`.
    pub fn differences(&self, other: &EngineKey) -> Vec<String> {
        let mine = fields(self);
        let theirs = fields(other);
        mine.iter()
            .zip(&theirs)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| format!("{}: {} -> {}", a.0, a.1, b.1))
            .collect()
    }
}

fn fields(key: &EngineKey) -> [(&'static str, String); 8] {
    [
        ("model", key.model_sha256.chars().take(16).collect()),
        ("onnxruntime", key.onnxruntime.clone()),
        ("tensorrt", key.tensorrt.clone()),
        ("cuda", key.cuda.clone()),
        ("gpu", key.gpu.clone()),
        ("compute capability", key.compute_capability.clone()),
        ("fp16", key.fp16.to_string()),
        ("batch", key.batch.to_string()),
    ]
}

/// The seal written once the engines are built and have run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub key: EngineKey,
    /// File name to sha256 of every file in the folder.
    pub files: BTreeMap<String, String>,
}

/// What to do with a cache folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheVerdict {
    /// Nothing there yet: the engines are built now.
    Empty,
    /// Sealed for this key and intact.
    Reuse,
    /// Present but not trustworthy; the reason is reported and the folder wiped.
    Rebuild(String),
}

impl CacheVerdict {
    pub fn describe(&self) -> String {
        match self {
            CacheVerdict::Empty => "built (no cache yet)".into(),
            CacheVerdict::Reuse => "reused".into(),
            CacheVerdict::Rebuild(reason) => format!("rebuilt ({reason})"),
        }
    }
}

/// Judges a cache folder from its seal (if any, or why it could not be read) and the files in it.
pub fn judge(seal: Option<Result<Seal, String>>, wanted: &EngineKey, files: &BTreeMap<String, String>) -> CacheVerdict {
    let seal = match seal {
        None if files.is_empty() => return CacheVerdict::Empty,
        None => return CacheVerdict::Rebuild("files without a seal: an earlier build did not finish".into()),
        Some(Err(problem)) => return CacheVerdict::Rebuild(format!("unreadable seal: {problem}")),
        Some(Ok(seal)) => seal,
    };
    let changed = seal.key.differences(wanted);
    if !changed.is_empty() {
        return CacheVerdict::Rebuild(format!("built for another setup: {}", changed.join(", ")));
    }
    for (name, hash) in &seal.files {
        match files.get(name) {
            None => return CacheVerdict::Rebuild(format!("{name} is missing")),
            Some(actual) if actual != hash => {
                return CacheVerdict::Rebuild(format!("{name} changed since it was sealed"));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = files.keys().find(|name| !seal.files.contains_key(*name)) {
        return CacheVerdict::Rebuild(format!("{extra} was not part of the sealed build"));
    }
    CacheVerdict::Reuse
}

const SEAL_FILE: &str = "cache.json";

/// A cache folder checked (and wiped where needed) for one key, ready for ONNX Runtime.
#[derive(Debug, Clone)]
pub struct PreparedCache {
    pub dir: PathBuf,
    pub key: EngineKey,
    pub verdict: CacheVerdict,
}

/// Checks `root/<model>/` against `key`; an untrustworthy folder is emptied.
pub fn prepare(root: &Path, key: EngineKey) -> Result<PreparedCache, String> {
    let dir = root.join(key.model_sha256.chars().take(16).collect::<String>());
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let seal_path = dir.join(SEAL_FILE);
    let seal = match std::fs::read(&seal_path) {
        Ok(bytes) => Some(serde_json::from_slice::<Seal>(&bytes).map_err(|e| e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(e.to_string())),
    };
    let files = hash_files(&dir)?;
    let verdict = judge(seal, &key, &files);
    if let CacheVerdict::Rebuild(reason) = &verdict {
        tracing::warn!(dir = %dir.display(), %reason, "TensorRT cache not trusted; rebuilding");
        wipe(&dir)?;
    }
    Ok(PreparedCache { dir, key, verdict })
}

impl PreparedCache {
    /// Seals what ONNX Runtime wrote, after the engines have been built and have run.
    pub fn seal(&self) -> Result<(), String> {
        let seal = Seal { key: self.key.clone(), files: hash_files(&self.dir)? };
        let text = serde_json::to_vec_pretty(&seal).expect("the seal serialises");
        let temporary = self.dir.join(format!("{SEAL_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&text)?;
            file.sync_all()?;
            std::fs::rename(&temporary, self.dir.join(SEAL_FILE))?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| format!("cannot seal {}: {e}", self.dir.display()))
    }
}

/// sha256 of every regular file in `dir` except the seal itself.
fn hash_files(dir: &Path) -> Result<BTreeMap<String, String>, String> {
    let mut files = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == SEAL_FILE || name == format!("{SEAL_FILE}.tmp") || !entry.path().is_file() {
            continue;
        }
        let mut hasher = Sha256::new();
        let mut file = std::fs::File::open(entry.path()).map_err(|e| format!("cannot read {name}: {e}"))?;
        std::io::copy(&mut file, &mut hasher).map_err(|e| format!("cannot read {name}: {e}"))?;
        files.insert(name, format!("{:x}", hasher.finalize()));
    }
    Ok(files)
}

fn wipe(dir: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed.map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> EngineKey {
        EngineKey {
            model_sha256: "ab".repeat(32),
            onnxruntime: "1.31.1".into(),
            tensorrt: "10.3.0".into(),
            cuda: "12.6".into(),
            gpu: "Orin".into(),
            compute_capability: "8.7".into(),
            fp16: true,
            batch: 32,
        }
    }

    fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(n, h)| (n.to_string(), h.to_string())).collect()
    }

    #[test]
    fn an_intact_sealed_cache_for_the_same_key_is_reused() {
        let on_disk = files(&[("a.engine", "1"), ("a.timing", "2")]);
        let seal = Seal { key: key(), files: on_disk.clone() };
        assert_eq!(judge(Some(Ok(seal)), &key(), &on_disk), CacheVerdict::Reuse);
        assert_eq!(judge(None, &key(), &BTreeMap::new()), CacheVerdict::Empty);
    }

    #[test]
    fn any_change_of_setup_or_files_forces_a_rebuild() {
        let on_disk = files(&[("a.engine", "1")]);
        let sealed = Seal { key: key(), files: on_disk.clone() };
        let mut upgraded = key();
        upgraded.tensorrt = "10.4.0".into();
        let CacheVerdict::Rebuild(reason) = judge(Some(Ok(sealed.clone())), &upgraded, &on_disk) else { panic!() };
        assert!(reason.contains("tensorrt: 10.3.0 -> 10.4.0"), "{reason}");
        let mut other_gpu = key();
        other_gpu.compute_capability = "9.0".into();
        assert!(matches!(judge(Some(Ok(sealed.clone())), &other_gpu, &on_disk), CacheVerdict::Rebuild(_)));

        let truncated = files(&[("a.engine", "0")]);
        let CacheVerdict::Rebuild(reason) = judge(Some(Ok(sealed.clone())), &key(), &truncated) else { panic!() };
        assert!(reason.contains("a.engine changed"), "{reason}");
        let CacheVerdict::Rebuild(reason) = judge(Some(Ok(sealed.clone())), &key(), &BTreeMap::new()) else { panic!() };
        assert!(reason.contains("missing"), "{reason}");
        let extra = files(&[("a.engine", "1"), ("b.engine", "3")]);
        assert!(matches!(judge(Some(Ok(sealed)), &key(), &extra), CacheVerdict::Rebuild(_)));
        let CacheVerdict::Rebuild(reason) = judge(None, &key(), &on_disk) else { panic!() };
        assert!(reason.contains("did not finish"), "{reason}");
        assert!(matches!(judge(Some(Err("bad json".into())), &key(), &on_disk), CacheVerdict::Rebuild(_)));
    }

    #[test]
    fn prepare_wipes_an_untrusted_folder_and_seal_makes_it_trusted() {
        let root = tempfile::tempdir().unwrap();
        let first = prepare(root.path(), key()).unwrap();
        assert_eq!(first.verdict, CacheVerdict::Empty);
        std::fs::write(first.dir.join("model.engine"), b"engine bytes").unwrap();
        first.seal().unwrap();
        assert_eq!(prepare(root.path(), key()).unwrap().verdict, CacheVerdict::Reuse);

        // A power cut mid-write: the engine no longer matches its seal.
        std::fs::write(first.dir.join("model.engine"), b"engine").unwrap();
        let again = prepare(root.path(), key()).unwrap();
        assert!(matches!(again.verdict, CacheVerdict::Rebuild(_)));
        assert_eq!(std::fs::read_dir(&again.dir).unwrap().count(), 0, "an untrusted folder is emptied");
    }
}
