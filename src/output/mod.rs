//! Writing what commands produce (bundles, models, reports, plots) without ever losing what
//! was there: each output is written to a temporary sibling, synced and renamed into place,
//! and an existing target is replaced only when the user said `--force`, and then only if it
//! is a file, an empty folder or a bundle (a folder with a `manifest.toml`), never any other
//! folder.

use std::path::{Component, Path, PathBuf};

/// The file that marks a folder as a bundle (`model::manifest::MANIFEST_FILE`; this layer sits
/// below the model and does not import it).
const BUNDLE_MANIFEST: &str = "manifest.toml";

/// What to do with an output path that already holds something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    Refuse,
    Replace,
}

impl Overwrite {
    pub fn from_force(force: bool) -> Overwrite {
        if force { Overwrite::Replace } else { Overwrite::Refuse }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{0}: already exists; choose another path or pass --force to replace it")]
    Exists(PathBuf),
    #[error("{0}: a folder that is not a bundle (no manifest.toml); refusing to replace it, even with --force")]
    NotABundle(PathBuf),
    #[error("{path}: {kind}; expected {expected}")]
    WrongKind { path: PathBuf, kind: &'static str, expected: &'static str },
    #[error("{0}: no such folder to write into")]
    NoFolder(PathBuf),
    #[error("{0}: not a usable output path")]
    BadPath(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io { path: path.to_path_buf(), source }
}

/// The path made absolute with `.` and `..` resolved by name, so that `--out .` names the
/// current folder (which has a parent to stage beside) rather than an empty file name.
pub fn absolute(path: &Path) -> Result<PathBuf, OutputError> {
    let clean = lexical(&std::path::absolute(path).map_err(io(path))?);
    if clean.file_name().is_none() {
        return Err(OutputError::BadPath(path.to_path_buf()));
    }
    Ok(clean)
}

/// `path` with `.` and `..` resolved by name; links are not resolved.
pub fn lexical(path: &Path) -> PathBuf {
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            other => clean.push(other),
        }
    }
    clean
}

/// What occupies an output path now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occupant {
    Nothing,
    File,
    EmptyDir,
    Bundle,
    OtherDir,
    /// A link, a socket, a device: never replaced.
    Other,
}

pub fn occupant(path: &Path) -> Result<Occupant, OutputError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Occupant::Nothing),
        Err(e) => return Err(io(path)(e)),
    };
    let kind = metadata.file_type();
    Ok(if kind.is_file() {
        Occupant::File
    } else if kind.is_dir() {
        if std::fs::read_dir(path).map_err(io(path))?.next().is_none() {
            Occupant::EmptyDir
        } else if is_bundle(path) {
            Occupant::Bundle
        } else {
            Occupant::OtherDir
        }
    } else {
        Occupant::Other
    })
}

/// Whether `dir` holds a bundle and nothing else: a `manifest.toml` whose checksums table names
/// every other entry, each a plain file. Only such a folder is ever replaced.
fn is_bundle(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(BUNDLE_MANIFEST)) else { return false };
    let Ok(manifest) = text.parse::<toml::Table>() else { return false };
    let Some(checksums) = manifest.get("checksums").and_then(|c| c.as_table()) else { return false };
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.into_iter().all(|entry| {
        entry.is_ok_and(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let plain = entry.file_type().is_ok_and(|t| t.is_file());
            plain && (name == BUNDLE_MANIFEST || checksums.contains_key(&name))
        })
    })
}

/// Whether a file may be written at `path`: the decision alone, for checking before long work.
pub fn file_decision(path: &Path, occupant: Occupant, overwrite: Overwrite) -> Result<(), OutputError> {
    match (occupant, overwrite) {
        (Occupant::Nothing, _) => Ok(()),
        (Occupant::File, Overwrite::Replace) => Ok(()),
        (Occupant::File, Overwrite::Refuse) => Err(OutputError::Exists(path.into())),
        (Occupant::EmptyDir | Occupant::Bundle | Occupant::OtherDir, _) => {
            Err(OutputError::WrongKind { path: path.into(), kind: "a folder", expected: "a file" })
        }
        (Occupant::Other, _) => {
            Err(OutputError::WrongKind { path: path.into(), kind: "a link or special file", expected: "a file" })
        }
    }
}

/// Whether a folder (a bundle) may be written at `path`.
pub fn dir_decision(path: &Path, occupant: Occupant, overwrite: Overwrite) -> Result<(), OutputError> {
    match (occupant, overwrite) {
        (Occupant::Nothing | Occupant::EmptyDir, _) => Ok(()),
        (Occupant::Bundle, Overwrite::Replace) => Ok(()),
        (Occupant::Bundle, Overwrite::Refuse) => Err(OutputError::Exists(path.into())),
        (Occupant::OtherDir, _) => Err(OutputError::NotABundle(path.into())),
        (Occupant::File, _) => Err(OutputError::WrongKind { path: path.into(), kind: "a file", expected: "a folder" }),
        (Occupant::Other, _) => {
            Err(OutputError::WrongKind { path: path.into(), kind: "a link or special file", expected: "a folder" })
        }
    }
}

/// Checks a file output before the work that produces it: its folder must exist, and the path
/// must be free (or replaceable).
pub fn check_file(path: &Path, overwrite: Overwrite) -> Result<(), OutputError> {
    let path = absolute(path)?;
    if let Some(parent) = path.parent()
        && !parent.is_dir()
    {
        return Err(OutputError::NoFolder(parent.to_path_buf()));
    }
    file_decision(&path, occupant(&path)?, overwrite)
}

/// Checks a folder output before the work that produces it.
pub fn check_dir(path: &Path, overwrite: Overwrite) -> Result<(), OutputError> {
    let path = absolute(path)?;
    dir_decision(&path, occupant(&path)?, overwrite)
}

/// A sibling of `path` for staging: hidden, named after the process so that two writers never
/// share one, and with the same extension (writers such as image encoders go by it).
fn sibling(path: &Path, tag: &str) -> PathBuf {
    let stem = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let extension = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    path.with_file_name(format!(".{stem}.{tag}-{}{extension}", std::process::id()))
}

/// Writes `bytes` to `path` through a synced temporary sibling and a rename.
pub fn write_file(path: &Path, bytes: &[u8], overwrite: Overwrite) -> Result<(), OutputError> {
    write_file_with(path, overwrite, |temporary| std::fs::write(temporary, bytes))
}

/// Lets `write` produce the file at a temporary sibling, then syncs it and renames it into place.
pub fn write_file_with<E: std::fmt::Display>(
    path: &Path,
    overwrite: Overwrite,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), OutputError> {
    let path = absolute(path)?;
    file_decision(&path, occupant(&path)?, overwrite)?;
    let temporary = sibling(&path, "partial");
    let result = write(&temporary)
        .map_err(|e| OutputError::Io { path: path.clone(), source: std::io::Error::other(e.to_string()) })
        .and_then(|()| sync(&temporary).map_err(io(&temporary)))
        .and_then(|()| {
            // Checked again just before the rename: something may have appeared meanwhile.
            file_decision(&path, occupant(&path)?, overwrite)?;
            std::fs::rename(&temporary, &path).map_err(io(&path))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result?;
    sync_parent(&path);
    Ok(())
}

/// Puts a finished folder `staged` (a sibling made with [`staging_dir`]) in place at `path`.
/// A bundle it replaces is moved aside first and removed only once the new one is in place.
pub fn install_dir(staged: &Path, path: &Path, overwrite: Overwrite) -> Result<(), OutputError> {
    let path = absolute(path)?;
    let occupant = occupant(&path)?;
    dir_decision(&path, occupant, overwrite)?;
    match occupant {
        Occupant::Nothing => std::fs::rename(staged, &path).map_err(io(&path))?,
        Occupant::EmptyDir => {
            std::fs::remove_dir(&path).map_err(io(&path))?;
            std::fs::rename(staged, &path).map_err(io(&path))?;
        }
        _ => {
            let old = sibling(&path, "old");
            std::fs::rename(&path, &old).map_err(io(&path))?;
            if let Err(error) = std::fs::rename(staged, &path) {
                let _ = std::fs::rename(&old, &path);
                return Err(io(&path)(error));
            }
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
    }
    sync_parent(&path);
    Ok(())
}

/// A fresh, empty staging folder beside `path`.
pub fn staging_dir(path: &Path) -> Result<PathBuf, OutputError> {
    let path = absolute(path)?;
    let staging = sibling(&path, "partial");
    if std::fs::symlink_metadata(&staging).is_ok() {
        // Our own name and process id: a leftover of this very process.
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::create_dir(&staging).map_err(io(&staging))?;
    Ok(staging)
}

fn sync(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent() {
        // Makes the rename durable; a failure here is not worth failing the command for.
        let _ = std::fs::File::open(parent).and_then(|dir| dir.sync_all());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_outputs_are_refused_without_force() {
        let p = Path::new("/x");
        assert!(matches!(file_decision(p, Occupant::File, Overwrite::Refuse), Err(OutputError::Exists(_))));
        assert!(file_decision(p, Occupant::File, Overwrite::Replace).is_ok());
        assert!(file_decision(p, Occupant::Nothing, Overwrite::Refuse).is_ok());
        assert!(matches!(dir_decision(p, Occupant::Bundle, Overwrite::Refuse), Err(OutputError::Exists(_))));
        assert!(dir_decision(p, Occupant::Bundle, Overwrite::Replace).is_ok());
        assert!(dir_decision(p, Occupant::EmptyDir, Overwrite::Refuse).is_ok());
    }

    #[test]
    fn folders_that_are_not_bundles_and_links_are_never_replaced() {
        let p = Path::new("/x");
        for overwrite in [Overwrite::Refuse, Overwrite::Replace] {
            assert!(matches!(dir_decision(p, Occupant::OtherDir, overwrite), Err(OutputError::NotABundle(_))));
            assert!(dir_decision(p, Occupant::Other, overwrite).is_err());
            assert!(dir_decision(p, Occupant::File, overwrite).is_err());
            assert!(file_decision(p, Occupant::Other, overwrite).is_err());
            assert!(file_decision(p, Occupant::OtherDir, overwrite).is_err());
            assert!(file_decision(p, Occupant::EmptyDir, overwrite).is_err());
        }
    }

    #[test]
    fn dot_names_the_current_folder() {
        let here = std::env::current_dir().unwrap();
        assert_eq!(absolute(Path::new(".")).unwrap(), here);
        assert_eq!(absolute(Path::new("a/../b")).unwrap(), here.join("b"));
        assert!(absolute(Path::new("/")).is_err());
    }

    #[test]
    fn files_are_replaced_whole_and_only_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        write_file(&path, b"one", Overwrite::Refuse).unwrap();
        assert!(matches!(write_file(&path, b"two", Overwrite::Refuse), Err(OutputError::Exists(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        write_file(&path, b"two", Overwrite::Replace).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file is left");
    }

    #[test]
    fn a_folder_with_other_files_survives_even_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let precious = dir.path().join("home");
        std::fs::create_dir(&precious).unwrap();
        std::fs::write(precious.join("notes.txt"), b"keep").unwrap();
        let staged = staging_dir(&precious).unwrap();
        std::fs::write(staged.join("manifest.toml"), b"").unwrap();
        assert!(matches!(install_dir(&staged, &precious, Overwrite::Replace), Err(OutputError::NotABundle(_))));
        assert_eq!(std::fs::read(precious.join("notes.txt")).unwrap(), b"keep");
    }

    #[test]
    fn a_folder_with_an_empty_manifest_or_extra_files_is_not_a_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake");
        std::fs::create_dir(&fake).unwrap();
        std::fs::write(fake.join("manifest.toml"), b"").unwrap();
        std::fs::write(fake.join("precious.dat"), b"mine").unwrap();
        assert_eq!(occupant(&fake).unwrap(), Occupant::OtherDir);
        std::fs::write(fake.join("manifest.toml"), b"[checksums]\n\"head.safetensors\" = \"00\"\n").unwrap();
        assert_eq!(occupant(&fake).unwrap(), Occupant::OtherDir, "precious.dat is not the bundle's");
        std::fs::remove_file(fake.join("precious.dat")).unwrap();
        std::fs::write(fake.join("head.safetensors"), b"").unwrap();
        assert_eq!(occupant(&fake).unwrap(), Occupant::Bundle);
    }

    #[test]
    fn a_bundle_is_replaced_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        std::fs::create_dir(&bundle).unwrap();
        std::fs::write(bundle.join("manifest.toml"), b"[checksums]\n").unwrap();
        let staged = staging_dir(&bundle).unwrap();
        std::fs::write(staged.join("manifest.toml"), b"[checksums]\n# new\n").unwrap();
        assert!(matches!(install_dir(&staged, &bundle, Overwrite::Refuse), Err(OutputError::Exists(_))));
        install_dir(&staged, &bundle, Overwrite::Replace).unwrap();
        assert_eq!(std::fs::read(bundle.join("manifest.toml")).unwrap(), b"[checksums]\n# new\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "nothing is left beside it");
    }
}
