//! A bundle as one artefact: a tar of its flat folder. Packing is deterministic (sorted names,
//! no times or owners), so the same bundle always gives the same sha256 and the same transfer.
//! Unpacking takes only what a bundle is made of, plain files with plain names, so an archive
//! cannot write outside the folder it is unpacked into, whoever made it.

use std::io::{Read, Write};
use std::path::Path;

/// What an unpacked archive may hold at most.
#[derive(Debug, Clone, Copy)]
pub struct UnpackLimits {
    pub max_files: usize,
    pub max_bytes: u64,
}

/// Packs the regular files of the bundle folder `dir`; a subfolder or a link is refused by name,
/// since a bundle is flat and the agent never follows links.
pub fn pack(dir: &Path) -> Result<Vec<u8>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| format!("{}: {e}", path.display()))?;
        if !kind.is_file() {
            return Err(format!("{}: a bundle holds only plain files, and this is not one", path.display()));
        }
        let name = entry.file_name().into_string().map_err(|_| format!("{}: the name is not UTF-8", path.display()))?;
        plain_name(&name).map_err(|problem| format!("{}: {problem}", path.display()))?;
        files.push((name, path));
    }
    files.sort();
    let mut builder = tar::Builder::new(Vec::new());
    for (name, path) in files {
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, &name, bytes.as_slice()).map_err(|e| format!("{name}: {e}"))?;
    }
    builder.into_inner().map_err(|e| e.to_string())
}

/// Unpacks an archive made by [`pack`] into `into`, which must not exist yet; each file is
/// synced, then the folder. Anything but a plain file with a plain name is refused, as are
/// archives past `limits`; on error the caller removes `into`.
pub fn unpack(reader: impl Read, into: &Path, limits: UnpackLimits) -> Result<Vec<String>, String> {
    std::fs::create_dir(into).map_err(|e| format!("{}: {e}", into.display()))?;
    let mut archive = tar::Archive::new(reader);
    let (mut names, mut bytes) = (Vec::new(), 0u64);
    for entry in archive.entries().map_err(|e| format!("the archive: {e}"))? {
        let mut entry = entry.map_err(|e| format!("the archive: {e}"))?;
        let name = entry.path().map_err(|e| format!("an entry's name: {e}"))?.to_string_lossy().into_owned();
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(format!(
                "'{name}' is a {:?}, and a bundle holds only plain files",
                entry.header().entry_type()
            ));
        }
        plain_name(&name).map_err(|problem| format!("'{name}': {problem}"))?;
        if names.len() >= limits.max_files {
            return Err(format!("more than {} files", limits.max_files));
        }
        let size = entry.header().size().map_err(|e| format!("'{name}': {e}"))?;
        bytes += size;
        if bytes > limits.max_bytes {
            return Err(format!("more than {} bytes unpacked", limits.max_bytes));
        }
        let path = into.join(&name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let copied = std::io::copy(&mut (&mut entry).take(size), &mut file).map_err(|e| format!("'{name}': {e}"))?;
        if copied != size {
            return Err(format!("'{name}' is cut short ({copied} of {size} bytes)"));
        }
        file.flush().and_then(|()| file.sync_all()).map_err(|e| format!("{}: {e}", path.display()))?;
        names.push(name);
    }
    std::fs::File::open(into).and_then(|dir| dir.sync_all()).map_err(|e| format!("{}: {e}", into.display()))?;
    Ok(names)
}

/// A file name that stays inside the folder it is joined to: one component, not hidden.
fn plain_name(name: &str) -> Result<(), &'static str> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if plain { Ok(()) } else { Err("not a plain file name (letters, digits, '.', '_', '-'; not starting with '.')") }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: UnpackLimits = UnpackLimits { max_files: 16, max_bytes: 1 << 20 };

    fn bundle_folder(dir: &Path) -> std::path::PathBuf {
        let folder = dir.join("bundle");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("manifest.toml"), "name = \"m\"\n").unwrap();
        std::fs::write(folder.join("trunk.onnx"), vec![7u8; 3000]).unwrap();
        folder
    }

    #[test]
    fn a_packed_bundle_unpacks_to_the_same_files_and_packs_the_same_bytes_again() {
        let dir = tempfile::tempdir().unwrap();
        let archive = pack(&bundle_folder(dir.path())).unwrap();
        assert_eq!(archive, pack(&dir.path().join("bundle")).unwrap(), "deterministic");
        let into = dir.path().join("out");
        let names = unpack(archive.as_slice(), &into, LIMITS).unwrap();
        assert_eq!(names, ["manifest.toml", "trunk.onnx"]);
        assert_eq!(std::fs::read(into.join("trunk.onnx")).unwrap(), vec![7u8; 3000]);
        assert!(unpack(archive.as_slice(), &into, LIMITS).unwrap_err().contains("exists"), "never into a used folder");
    }

    #[test]
    fn a_folder_or_link_in_a_bundle_is_refused_when_packing() {
        let dir = tempfile::tempdir().unwrap();
        let folder = bundle_folder(dir.path());
        std::fs::create_dir(folder.join("sub")).unwrap();
        assert!(pack(&folder).unwrap_err().contains("only plain files"));
        std::fs::remove_dir(folder.join("sub")).unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc/hostname", folder.join("link")).unwrap();
            assert!(pack(&folder).unwrap_err().contains("link"));
        }
    }

    /// A raw archive with one entry, written header by header so that names the builder would
    /// refuse can be tried.
    fn raw_archive(name: &[u8], kind: tar::EntryType, data: &[u8]) -> Vec<u8> {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_size(data.len() as u64);
        header.set_entry_type(kind);
        header.set_mode(0o644);
        if kind == tar::EntryType::Symlink {
            header.set_link_name("/etc/passwd").unwrap();
        }
        header.set_cksum();
        let mut out = header.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
        out
    }

    #[test]
    fn hostile_entries_never_write_outside_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("escaped");
        for (name, kind) in [
            (&b"../escaped"[..], tar::EntryType::Regular),
            (b"/tmp/escaped", tar::EntryType::Regular),
            (b"sub/escaped", tar::EntryType::Regular),
            (b".hidden", tar::EntryType::Regular),
            (b"link", tar::EntryType::Symlink),
            (b"hard", tar::EntryType::Link),
            (b"folder", tar::EntryType::Directory),
        ] {
            let into = dir.path().join("into");
            let error = unpack(raw_archive(name, kind, b"x").as_slice(), &into, LIMITS).unwrap_err();
            assert!(!outside.exists(), "{}", String::from_utf8_lossy(name));
            assert!(error.contains("plain file"), "{error}");
            std::fs::remove_dir_all(&into).unwrap();
        }
    }

    #[test]
    fn archives_past_the_limits_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let archive = pack(&bundle_folder(dir.path())).unwrap();
        let into = dir.path().join("a");
        let small = UnpackLimits { max_files: 16, max_bytes: 1000 };
        assert!(unpack(archive.as_slice(), &into, small).unwrap_err().contains("more than 1000 bytes"));
        let few = UnpackLimits { max_files: 1, max_bytes: 1 << 20 };
        assert!(unpack(archive.as_slice(), &dir.path().join("b"), few).unwrap_err().contains("more than 1 files"));
        let cut = &archive[..archive.len() / 2];
        assert!(unpack(cut, &dir.path().join("c"), LIMITS).is_err(), "a cut archive");
    }
}
