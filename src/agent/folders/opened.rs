//! A folder opened as a capability (`cap_std::fs::Dir`): every read, move and write in the
//! agent's folders goes through one, so no name, `..` or link can reach outside it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cap_std::ambient_authority;
use cap_std::fs::Dir;

use super::rules::{EntryKind, fit_name};

pub fn named(path: &Path, error: std::io::Error) -> std::io::Error {
    std::io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// A folder opened as a capability, with its path for messages.
pub struct Opened {
    pub dir: Dir,
    pub path: PathBuf,
}

impl Opened {
    pub fn open(path: &Path) -> std::io::Result<Opened> {
        Ok(Opened {
            dir: Dir::open_ambient_dir(path, ambient_authority()).map_err(|e| named(path, e))?,
            path: path.into(),
        })
    }

    /// A sub-folder, created if missing; a link there is refused by the capability.
    pub fn sub(&self, name: &str) -> std::io::Result<Opened> {
        let path = self.path.join(name);
        self.dir.create_dir_all(name).map_err(|e| named(&path, e))?;
        Ok(Opened { dir: self.dir.open_dir(name).map_err(|e| named(&path, e))?, path })
    }

    /// Entries with their kinds, links not followed, in name order.
    pub fn entries(&self) -> std::io::Result<Vec<(OsString, EntryKind)>> {
        let mut entries = Vec::new();
        for entry in self.dir.entries().map_err(|e| named(&self.path, e))? {
            let entry = entry.map_err(|e| named(&self.path, e))?;
            let kind = match entry.file_type() {
                Ok(t) if t.is_symlink() => EntryKind::Link,
                Ok(t) if t.is_file() => EntryKind::File,
                Ok(t) if t.is_dir() => EntryKind::Dir,
                _ => EntryKind::Other,
            };
            entries.push((entry.file_name(), kind));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(entries)
    }

    /// Reads a file up to `limit` bytes; a larger one is an error without reading it.
    pub fn read(&self, name: &str, limit: u64) -> Result<Vec<u8>, String> {
        use std::io::Read;
        let file = self.dir.open(name).map_err(|e| e.to_string())?;
        let length = file.metadata().map_err(|e| e.to_string())?.len();
        if length > limit {
            return Err(format!("{length} bytes exceeds the {limit}-byte limit for an input image"));
        }
        let mut bytes = Vec::with_capacity(length as usize);
        file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
        if bytes.len() as u64 > limit {
            return Err(format!("the file grew past the {limit}-byte limit for an input image"));
        }
        Ok(bytes)
    }

    /// A file's size as listed (0 if it cannot be read; reading it then says why).
    pub fn size(&self, name: &str) -> u64 {
        self.dir.symlink_metadata(name).map_or(0, |m| m.len())
    }

    /// How long ago a file was last modified; `None` if unknown or in the future.
    pub fn modified_ago(&self, name: &str) -> Option<Duration> {
        let modified = self.dir.symlink_metadata(name).ok()?.modified().ok()?.into_std();
        std::time::SystemTime::now().duration_since(modified).ok()
    }

    /// Moves `name` (the entry itself, never a link's target) into `to`, adding a number to
    /// the name if it is taken. Returns the new name.
    pub fn move_into(&self, name: &str, to: &Opened) -> std::io::Result<String> {
        let mut target = name.to_string();
        let mut n = 1;
        while to.dir.symlink_metadata(&target).is_ok() {
            target = fit_name(&format!("{n}-"), name, "");
            n += 1;
        }
        self.dir.rename(name, &to.dir, &target).map_err(|e| named(&self.path.join(name), e))?;
        Ok(target)
    }

    pub fn display(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }
}

/// Opens the classification log for appending. A link in its place is removed (the link only,
/// never its target) and a plain file made instead: the log never follows a link.
pub fn open_results_log(data: &Opened) -> anyhow::Result<cap_std::fs::File> {
    if data.dir.symlink_metadata(super::RESULTS_LOG).is_ok_and(|m| m.is_symlink()) {
        tracing::warn!(path = %data.path.join(super::RESULTS_LOG).display(),
            "the classification log was a link; replaced by a file (links are never followed)");
        data.dir.remove_file(super::RESULTS_LOG).map_err(|e| named(&data.path.join(super::RESULTS_LOG), e))?;
    }
    Ok(data
        .dir
        .open_with(super::RESULTS_LOG, cap_std::fs::OpenOptions::new().create(true).append(true))
        .map_err(|e| named(&data.path.join(super::RESULTS_LOG), e))?)
}
