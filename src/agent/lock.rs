//! One process at a time on a data folder: an exclusive lock on `<data_dir>/agent.lock`, which
//! also records who holds it (pid and role), so that whoever waits can say for whom and decide
//! what to do: a CLI command that finds the agent starting waits for its endpoint, and an agent
//! that finds a CLI command working waits for the lock instead of failing.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const LOCK_FILE: &str = "agent.lock";
/// The role the daemon records; CLI commands record their own name.
pub const AGENT: &str = "agent";

/// The lock, held until dropped.
#[derive(Debug)]
pub struct DataLock {
    _file: File,
}

/// Who holds the lock, as recorded in the lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub role: String,
}

impl Holder {
    pub fn parse(text: &str) -> Option<Holder> {
        let (pid, role) = text.trim().split_once(' ')?;
        Some(Holder { pid: pid.parse().ok()?, role: role.trim().to_string() })
    }

    pub fn is_agent(&self) -> bool {
        self.role == AGENT
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_agent() {
            write!(f, "the edgeadapt agent (pid {})", self.pid)
        } else {
            write!(f, "`edgeadapt {}` (pid {})", self.role, self.pid)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{dir}: {holder} is using this data folder")]
    Held { dir: PathBuf, holder: String, agent: bool },
    #[error("{dir}: still in use by {holder} after {waited:?}; stop it, or try again when it is done")]
    Timeout { dir: PathBuf, holder: String, waited: Duration },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Opens the lock file without following a link: a link planted in its place is removed (the
/// link only, never its target) and a plain file made instead.
fn open(data_dir: &Path) -> Result<File, LockError> {
    let path = data_dir.join(LOCK_FILE);
    let options = || {
        let mut options = File::options();
        options.create(true).truncate(false).read(true).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW);
        options
    };
    match options().open(&path) {
        Err(_) if path.is_symlink() => {
            tracing::warn!(path = %path.display(), "the lock file was a link; replaced by a file (links are never followed)");
            std::fs::remove_file(&path).map_err(|source| LockError::Io { path: path.clone(), source })?;
            options().open(&path).map_err(|source| LockError::Io { path, source })
        }
        opened => opened.map_err(|source| LockError::Io { path, source }),
    }
}

/// Who holds the lock now, if the file says (a link in its place says nothing).
pub fn holder(data_dir: &Path) -> Option<Holder> {
    let path = data_dir.join(LOCK_FILE);
    if path.is_symlink() {
        return None;
    }
    let mut text = String::new();
    File::open(path).ok()?.read_to_string(&mut text).ok()?;
    Holder::parse(&text)
}

fn describe(data_dir: &Path) -> (String, bool) {
    match holder(data_dir) {
        Some(holder) => (holder.to_string(), holder.is_agent()),
        None => ("another edgeadapt process".into(), false),
    }
}

fn record(mut file: File, data_dir: &Path, role: &str) -> Result<DataLock, LockError> {
    let path = data_dir.join(LOCK_FILE);
    let io = |source| LockError::Io { path: path.clone(), source };
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{} {role}", std::process::id()).map_err(io)?;
    Ok(DataLock { _file: file })
}

/// Takes the lock now, or says who holds it.
pub fn try_acquire(data_dir: &Path, role: &str) -> Result<DataLock, LockError> {
    let file = open(data_dir)?;
    match file.try_lock() {
        Ok(()) => record(file, data_dir, role),
        Err(std::fs::TryLockError::WouldBlock) => {
            let (holder, agent) = describe(data_dir);
            Err(LockError::Held { dir: data_dir.to_path_buf(), holder, agent })
        }
        Err(std::fs::TryLockError::Error(source)) => Err(LockError::Io { path: data_dir.join(LOCK_FILE), source }),
    }
}

/// Takes the lock, waiting up to `wait` for its holder to let go. The wait blocks in the
/// kernel, so the lock passes to this process the moment it is released, ahead of a process
/// that only tries.
pub fn acquire(data_dir: &Path, role: &str, wait: Duration) -> Result<DataLock, LockError> {
    match try_acquire(data_dir, role) {
        Err(LockError::Held { holder, .. }) => {
            tracing::info!("waiting up to {} s for {holder} to finish with {}", wait.as_secs(), data_dir.display());
            let file = open(data_dir)?;
            let (sender, receiver) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = sender.send(file.lock().map(|()| file));
            });
            match receiver.recv_timeout(wait) {
                Ok(Ok(file)) => record(file, data_dir, role),
                Ok(Err(source)) => Err(LockError::Io { path: data_dir.join(LOCK_FILE), source }),
                Err(_) => Err(LockError::Timeout { dir: data_dir.to_path_buf(), holder, waited: wait }),
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_recorded_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let lock = try_acquire(dir.path(), "label").unwrap();
        let holder = holder(dir.path()).unwrap();
        assert_eq!(holder, Holder { pid: std::process::id(), role: "label".into() });
        assert_eq!(holder.to_string(), format!("`edgeadapt label` (pid {})", std::process::id()));
        match try_acquire(dir.path(), AGENT) {
            Err(LockError::Held { agent: false, holder, .. }) => assert!(holder.contains("label")),
            other => panic!("expected the lock to be held: {other:?}"),
        }
        drop(lock);
        let _agent = try_acquire(dir.path(), AGENT).unwrap();
        assert!(super::holder(dir.path()).unwrap().is_agent());
    }

    #[test]
    fn a_waiter_gets_the_lock_when_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = try_acquire(dir.path(), "status").unwrap();
        let path = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || acquire(&path, AGENT, Duration::from_secs(30)).map(|_| ()));
        drop(first);
        waiter.join().unwrap().unwrap();
        assert!(holder(dir.path()).unwrap().is_agent());
    }

    #[test]
    fn a_waiter_gives_up_with_the_holders_name() {
        let dir = tempfile::tempdir().unwrap();
        let _held = try_acquire(dir.path(), "adapt").unwrap();
        match acquire(dir.path(), AGENT, Duration::from_millis(50)) {
            Err(error @ LockError::Timeout { .. }) => assert!(error.to_string().contains("edgeadapt adapt")),
            other => panic!("expected a timeout: {other:?}"),
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_link_in_place_of_the_lock_file_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside.txt");
        std::fs::write(&outside, b"precious").unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink(&outside, data.join(LOCK_FILE)).unwrap();
        assert_eq!(holder(&data), None);
        let _lock = try_acquire(&data, "status").unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        assert!(!data.join(LOCK_FILE).is_symlink());
    }

    #[test]
    fn unreadable_records_are_not_a_holder() {
        assert_eq!(Holder::parse(""), None);
        assert_eq!(Holder::parse("x label"), None);
        assert_eq!(Holder::parse("12 agent\n"), Some(Holder { pid: 12, role: AGENT.into() }));
    }
}
