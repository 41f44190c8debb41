//! The watched folder and the labelling inbox.
//!
//! Every file operation here goes through a capability handle (`cap_std::fs::Dir`) opened on
//! one of the agent's own folders, so no name, `..` or link can reach a file outside them; and
//! links are never followed at all: a link dropped in is moved aside (the link itself, never
//! its target) with a reason, and a linked class folder in the inbox is left alone with a
//! warning. Which entries to take, and whether a failed file is retried, are decided by pure
//! functions below; the functions that touch the disk only carry out those decisions.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use serde::Serialize;

use super::{Agent, IngestError, Labelled, event};
use crate::config::{AfterClassify, DeviceConfig};
use crate::imaging::DecodeLimits;

/// Images classified together from the watched folder, and labelled together from the inbox:
/// at most this many files, and at most this many bytes of them in memory at once.
const FOLDER_BATCH: usize = 32;
const FOLDER_BATCH_BYTES: u64 = 64 << 20;
/// A file that fails while it is still being written is tried again until it has been left
/// alone this long.
pub const SETTLE: Duration = Duration::from_secs(2);

/// What an entry of the watched folder or of an inbox class folder is, without following links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Link,
    Other,
}

/// What to do with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Triage {
    /// A finished file: read it.
    Take,
    /// Still being written (hidden, `.tmp` or `.part` name), or not ours to touch: leave it.
    Leave,
    /// A link: move the link itself aside with a reason; its target is never read.
    RefuseLink,
}

/// Entries of the watched folder and of inbox class folders. Writers are expected to write
/// elsewhere (or under a hidden, `.tmp` or `.part` name) and rename into the folder.
pub fn triage(name: &str, kind: EntryKind) -> Triage {
    if name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part") {
        return Triage::Leave;
    }
    match kind {
        EntryKind::File => Triage::Take,
        EntryKind::Link => Triage::RefuseLink,
        EntryKind::Dir | EntryKind::Other => Triage::Leave,
    }
}

/// Splits files (with their sizes) into consecutive batches of at most `max_files` files and
/// `max_bytes` bytes; a file larger than `max_bytes` makes a batch of its own.
pub fn batches<T>(files: &[(T, u64)], max_files: usize, max_bytes: u64) -> Vec<&[(T, u64)]> {
    let mut batches = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (index, (_, size)) in files.iter().enumerate() {
        let count = index - start;
        if count > 0 && (count == max_files || bytes.saturating_add(*size) > max_bytes) {
            batches.push(&files[start..index]);
            start = index;
            bytes = 0;
        }
        bytes = bytes.saturating_add(*size);
    }
    if start < files.len() {
        batches.push(&files[start..]);
    }
    batches
}

/// Whether a file that failed is failed for good or tried again at the next poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    Again,
    GiveUp,
}

/// Remembers files that failed while they may still have been written to. A file is tried
/// again while it was modified less than [`SETTLE`] ago, and never for longer than [`SETTLE`]
/// after its first failure (a clock that puts the file in the future cannot keep it forever).
#[derive(Debug, Default)]
pub struct Settling {
    first_failed: HashMap<PathBuf, Instant>,
}

impl Settling {
    /// `modified_ago` is `None` when the file's time is in the future or unknown.
    pub fn on_failure(&mut self, file: &Path, modified_ago: Option<Duration>, now: Instant) -> Retry {
        let first = *self.first_failed.entry(file.to_path_buf()).or_insert(now);
        let fresh = modified_ago.is_none_or(|ago| ago < SETTLE);
        if fresh && now.duration_since(first) < SETTLE {
            Retry::Again
        } else {
            self.first_failed.remove(file);
            Retry::GiveUp
        }
    }

    /// The file is settled (taken, moved or failed for good).
    pub fn on_settled(&mut self, file: &Path) {
        self.first_failed.remove(file);
    }

    /// Forgets files that are gone, so the map stays as small as the folders.
    pub fn retain_present(&mut self, present: &HashSet<PathBuf>) {
        self.first_failed.retain(|path, _| present.contains(path));
    }
}

/// The watched folder and the labelling inbox, with where their files go afterwards.
#[derive(Debug, Clone)]
pub struct Folders {
    pub watch: PathBuf,
    pub inbox: PathBuf,
    pub data_dir: PathBuf,
    after: AfterClassify,
    pub poll: Duration,
    limits: DecodeLimits,
}

/// Folders under the data folder.
const CLASSIFIED: &str = "classified";
const FAILED: &str = "failed";
const PROCESSED: &str = "processed";
const REJECTED: &str = "rejected";
pub const RESULTS_LOG: &str = "classifications.jsonl";

impl Folders {
    pub fn new(config: &DeviceConfig, data_dir: &Path) -> Folders {
        Folders {
            watch: config.watch.folder.clone().unwrap_or_else(|| data_dir.join("watch")),
            inbox: config.labelling.inbox.clone().unwrap_or_else(|| data_dir.join("inbox")),
            data_dir: data_dir.to_path_buf(),
            after: config.watch.after,
            poll: Duration::from_millis(config.watch.poll_ms),
            limits: DecodeLimits::default(),
        }
    }

    /// Creates the folders the agent reads and writes.
    pub fn create(&self) -> std::io::Result<()> {
        for dir in [&self.watch, &self.inbox, &self.data_dir] {
            std::fs::create_dir_all(dir).map_err(|e| named(dir, e))?;
        }
        let data = self.open(&self.data_dir)?;
        for dir in [CLASSIFIED, PROCESSED, REJECTED] {
            data.create_dir_all(dir).map_err(|e| named(&self.data_dir.join(dir), e))?;
        }
        Ok(())
    }

    fn open(&self, dir: &Path) -> std::io::Result<Dir> {
        Dir::open_ambient_dir(dir, ambient_authority()).map_err(|e| named(dir, e))
    }
}

fn named(path: &Path, error: std::io::Error) -> std::io::Error {
    std::io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// A folder opened as a capability, with its path for messages.
struct Opened {
    dir: Dir,
    path: PathBuf,
}

impl Opened {
    fn open(path: &Path) -> std::io::Result<Opened> {
        Ok(Opened {
            dir: Dir::open_ambient_dir(path, ambient_authority()).map_err(|e| named(path, e))?,
            path: path.into(),
        })
    }

    /// A sub-folder, created if missing; a link there is refused by the capability.
    fn sub(&self, name: &str) -> std::io::Result<Opened> {
        let path = self.path.join(name);
        self.dir.create_dir_all(name).map_err(|e| named(&path, e))?;
        Ok(Opened { dir: self.dir.open_dir(name).map_err(|e| named(&path, e))?, path })
    }

    /// Entries with their kinds, links not followed, in name order.
    fn entries(&self) -> std::io::Result<Vec<(OsString, EntryKind)>> {
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
    fn read(&self, name: &str, limit: u64) -> Result<Vec<u8>, String> {
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
    fn size(&self, name: &str) -> u64 {
        self.dir.symlink_metadata(name).map_or(0, |m| m.len())
    }

    /// How long ago a file was last modified; `None` if unknown or in the future.
    fn modified_ago(&self, name: &str) -> Option<Duration> {
        let modified = self.dir.symlink_metadata(name).ok()?.modified().ok()?.into_std();
        std::time::SystemTime::now().duration_since(modified).ok()
    }

    /// Moves `name` (the entry itself, never a link's target) into `to`, adding a number to
    /// the name if it is taken. Returns the new name.
    fn move_into(&self, name: &str, to: &Opened) -> std::io::Result<String> {
        let mut target = name.to_string();
        let mut n = 1;
        while to.dir.symlink_metadata(&target).is_ok() {
            target = fit_name(&format!("{n}-"), name, "");
            n += 1;
        }
        self.dir.rename(name, &to.dir, &target).map_err(|e| named(&self.path.join(name), e))?;
        Ok(target)
    }

    fn display(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }
}

/// The folders' poll: classifies the watched folder, then ingests the inbox.
pub struct Poller {
    folders: Folders,
    settling: Settling,
    /// Inbox entries already warned about, so a link or a stray file is named once.
    warned: HashSet<OsString>,
    /// Files that could not be moved away (a destination that is a link, say), and when: left
    /// alone for [`STUCK_RETRY`] so that one of them never holds up the others.
    stuck: HashMap<PathBuf, Instant>,
}

/// How long a file that could not be moved away is left alone before it is tried again.
const STUCK_RETRY: Duration = Duration::from_secs(60);

impl Poller {
    pub fn new(folders: Folders) -> Poller {
        Poller { folders, settling: Settling::default(), warned: HashSet::new(), stuck: HashMap::new() }
    }

    /// Whether `path` is left alone for now, after it could not be moved away.
    fn is_stuck(&mut self, path: &Path) -> bool {
        match self.stuck.get(path) {
            Some(at) if at.elapsed() < STUCK_RETRY => true,
            Some(_) => {
                self.stuck.remove(path);
                false
            }
            None => false,
        }
    }

    /// Records a file that could not be settled; says so the first time.
    fn on_stuck(&mut self, path: &Path, error: &anyhow::Error) {
        if self.stuck.insert(path.to_path_buf(), Instant::now()).is_none() {
            tracing::warn!(file = %path.display(), error = format!("{error:#}"),
                "cannot move the file away; other files go on, this one is tried again in a minute");
        }
    }

    pub fn poll(&mut self, agent: &Mutex<Agent>) -> anyhow::Result<()> {
        let data = Opened::open(&self.folders.data_dir)?;
        let mut present = HashSet::new();
        self.classify_watched(agent, &data, &mut present)?;
        self.ingest_inbox(agent, &data, &mut present)?;
        self.settling.retain_present(&present);
        Ok(())
    }

    fn classify_watched(
        &mut self,
        agent: &Mutex<Agent>,
        data: &Opened,
        present: &mut HashSet<PathBuf>,
    ) -> anyhow::Result<()> {
        let watch = Opened::open(&self.folders.watch)?;
        let classified = data.sub(CLASSIFIED)?;
        let failed = classified.sub(FAILED)?;
        let mut files = Vec::new();
        for (name, kind) in watch.entries()? {
            let Some(name) = name.to_str().map(str::to_string) else {
                self.warn_once(&name, &watch.path, "the name is not UTF-8; rename it");
                continue;
            };
            let path = watch.path.join(&name);
            if self.is_stuck(&path) {
                continue;
            }
            match triage(&name, kind) {
                Triage::Take => files.push((name.clone(), watch.size(&name))),
                Triage::Leave if kind != EntryKind::File && !name.starts_with('.') => {
                    self.warn_once(name.as_ref(), &watch.path, "not a file (only image files are classified)");
                }
                Triage::Leave => {}
                Triage::RefuseLink => match watch.move_into(&name, &failed) {
                    Ok(moved) => tracing::warn!(file = %path.display(), moved_to = %failed.display(&moved),
                        "links are not followed; copy or move the image itself into the watched folder"),
                    Err(error) => self.on_stuck(&path, &error.into()),
                },
            }
        }
        for chunk in batches(&files, FOLDER_BATCH, FOLDER_BATCH_BYTES) {
            let loaded: Vec<(String, Result<Vec<u8>, String>)> = chunk
                .iter()
                .map(|(name, _)| (name.clone(), watch.read(name, self.folders.limits.max_file_bytes)))
                .collect();
            let images: Vec<(&str, &[u8])> = loaded
                .iter()
                .filter_map(|(name, bytes)| bytes.as_ref().ok().map(|b| (name.as_str(), b.as_slice())))
                .collect();
            let (results, version) = {
                let mut agent = agent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                (agent.classify(&images, 3), agent.serving())
            };
            let mut results = results.into_iter();
            let mut log = open_results_log(data)?;
            for (name, bytes) in &loaded {
                let result = match bytes {
                    Ok(_) => results.next().expect("one result per image"),
                    Err(problem) => Err(problem.clone()),
                };
                let path = watch.path.join(name);
                if result.is_err() {
                    let ago = watch.modified_ago(name);
                    if self.settling.on_failure(&path, ago, Instant::now()) == Retry::Again {
                        present.insert(path);
                        tracing::debug!(file = name, "not readable yet; trying again");
                        continue;
                    }
                }
                self.settling.on_settled(&path);
                let outcome = match &result {
                    Ok(prediction) => serde_json::json!({ "prediction": prediction }),
                    Err(error) => serde_json::json!({ "error": error }),
                };
                let line = ResultLine { at_ms: crate::store::now_ms(), file: name, version, outcome };
                writeln!(log, "{}", serde_json::to_string(&line)?)?;
                match &result {
                    Ok(prediction) => tracing::info!(file = name, class = %prediction.class,
                        confidence = prediction.confidence, version, "classified"),
                    Err(error) => tracing::warn!(file = name, %error, "cannot classify"),
                }
                let settled = match (self.folders.after, result.is_ok()) {
                    (AfterClassify::Delete, true) => watch.dir.remove_file(name).map_err(|e| named(&path, e)),
                    (_, true) => watch.move_into(name, &classified).map(|_| ()),
                    (_, false) => watch.move_into(name, &failed).map(|_| ()),
                };
                if let Err(error) = settled {
                    self.on_stuck(&path, &error.into());
                }
            }
        }
        Ok(())
    }

    fn ingest_inbox(
        &mut self,
        agent: &Mutex<Agent>,
        data: &Opened,
        present: &mut HashSet<PathBuf>,
    ) -> anyhow::Result<()> {
        let inbox = Opened::open(&self.folders.inbox)?;
        let processed = data.sub(PROCESSED)?;
        let rejected = data.sub(REJECTED)?;
        for (entry, kind) in inbox.entries()? {
            let class = match (entry.to_str(), kind) {
                (Some(class), EntryKind::Dir) if !class.starts_with('.') => class.to_string(),
                (_, EntryKind::Link) => {
                    self.warn_once(&entry, &inbox.path, "links are not followed; make it a folder of its own");
                    continue;
                }
                (None, EntryKind::Dir) => {
                    self.warn_once(&entry, &inbox.path, "the class folder's name is not UTF-8");
                    continue;
                }
                (Some(name), _) if !name.starts_with('.') => {
                    self.warn_once(&entry, &inbox.path, "not a class folder (put images in <inbox>/<class>/)");
                    continue;
                }
                _ => continue,
            };
            let opened = inbox.dir.open_dir(&class).map_err(|e| named(&inbox.path.join(&class), e));
            let class_dir = match opened {
                Ok(dir) => Opened { dir, path: inbox.path.join(&class) },
                Err(error) => {
                    self.warn_once(&entry, &inbox.path, &format!("cannot open it: {error}"));
                    continue;
                }
            };
            let entries = match class_dir.entries() {
                Ok(entries) => entries,
                Err(error) => {
                    self.warn_once(&entry, &inbox.path, &format!("cannot list it: {error}"));
                    continue;
                }
            };
            let mut files = Vec::new();
            for (name, kind) in entries {
                let Some(name) = name.to_str().map(str::to_string) else {
                    self.warn_once(&name, &class_dir.path, "the name is not UTF-8; rename it");
                    continue;
                };
                let path = class_dir.path.join(&name);
                if self.is_stuck(&path) {
                    continue;
                }
                match triage(&name, kind) {
                    Triage::Take => files.push((name.clone(), class_dir.size(&name))),
                    Triage::Leave if kind != EntryKind::File && !name.starts_with('.') => {
                        self.warn_once(name.as_ref(), &class_dir.path, "not a file (only image files are labelled)");
                    }
                    Triage::Leave => {}
                    Triage::RefuseLink => {
                        let outcome = Err(IngestError::BadImage {
                            what: class_dir.display(&name),
                            problem: "is a link, and links are not followed; copy the image itself into the inbox"
                                .into(),
                        });
                        if let Err(error) =
                            settle_inbox_file(agent, &class_dir, &name, &class, &processed, &rejected, outcome)
                        {
                            self.on_stuck(&path, &error);
                        }
                    }
                }
            }
            for chunk in batches(&files, FOLDER_BATCH, FOLDER_BATCH_BYTES) {
                let loaded: Vec<(String, String, Result<Vec<u8>, String>)> = chunk
                    .iter()
                    .map(|(name, _)| {
                        (
                            name.clone(),
                            class_dir.display(name),
                            class_dir.read(name, self.folders.limits.max_file_bytes),
                        )
                    })
                    .collect();
                let items: Vec<Labelled<'_>> = loaded
                    .iter()
                    .filter_map(|(_, what, bytes)| {
                        bytes.as_ref().ok().map(|bytes| Labelled { what, bytes, class: &class })
                    })
                    .collect();
                let mut results =
                    agent.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).ingest(&items, "inbox").into_iter();
                for (name, what, bytes) in &loaded {
                    let outcome = match bytes {
                        Ok(_) => results.next().expect("one result per item"),
                        Err(problem) => Err(IngestError::Failed { what: what.clone(), problem: problem.clone() }),
                    };
                    let path = class_dir.path.join(name);
                    if matches!(outcome, Err(IngestError::BadImage { .. } | IngestError::Failed { .. })) {
                        let ago = class_dir.modified_ago(name);
                        if self.settling.on_failure(&path, ago, Instant::now()) == Retry::Again {
                            present.insert(path);
                            tracing::debug!(file = %what, "not readable yet; trying again");
                            continue;
                        }
                    }
                    self.settling.on_settled(&path);
                    if let Err(error) =
                        settle_inbox_file(agent, &class_dir, name, &class, &processed, &rejected, outcome)
                    {
                        self.on_stuck(&path, &error);
                    }
                }
            }
        }
        Ok(())
    }

    fn warn_once(&mut self, name: &std::ffi::OsStr, folder: &Path, problem: &str) {
        if self.warned.insert(folder.join(name).into_os_string()) {
            tracing::warn!(entry = %folder.join(name).display(), "left alone: {problem}");
        }
    }
}

/// Longest file name most file systems take, in bytes.
const MAX_NAME_BYTES: usize = 255;

/// `prefix + name + suffix`, with the start of `name` cut (on a character boundary) so that the
/// whole stays within [`MAX_NAME_BYTES`].
pub fn fit_name(prefix: &str, name: &str, suffix: &str) -> String {
    let room = MAX_NAME_BYTES.saturating_sub(prefix.len() + suffix.len());
    let mut start = name.len().saturating_sub(room);
    while !name.is_char_boundary(start) {
        start += 1;
    }
    format!("{prefix}{}{suffix}", &name[start..])
}

/// Opens the classification log for appending. A link in its place is removed (the link only,
/// never its target) and a plain file made instead: the log never follows a link.
fn open_results_log(data: &Opened) -> anyhow::Result<cap_std::fs::File> {
    if data.dir.symlink_metadata(RESULTS_LOG).is_ok_and(|m| m.is_symlink()) {
        tracing::warn!(path = %data.path.join(RESULTS_LOG).display(),
            "the classification log was a link; replaced by a file (links are never followed)");
        data.dir.remove_file(RESULTS_LOG).map_err(|e| named(&data.path.join(RESULTS_LOG), e))?;
    }
    Ok(data
        .dir
        .open_with(RESULTS_LOG, cap_std::fs::OpenOptions::new().create(true).append(true))
        .map_err(|e| named(&data.path.join(RESULTS_LOG), e))?)
}

#[derive(Serialize)]
struct ResultLine<'a> {
    at_ms: i64,
    file: &'a str,
    version: i64,
    #[serde(flatten)]
    outcome: serde_json::Value,
}

/// Moves an inbox file once its outcome is durable. A file stored before a crash but not yet
/// moved comes back as a duplicate of the same class, which counts as processed.
fn settle_inbox_file(
    agent: &Mutex<Agent>,
    from: &Opened,
    name: &str,
    class: &str,
    processed: &Opened,
    rejected: &Opened,
    outcome: Result<super::Ingested, IngestError>,
) -> anyhow::Result<()> {
    match outcome {
        Ok(_) => {
            from.move_into(name, &processed.sub(class)?)?;
        }
        Err(IngestError::Duplicate { class: stored, id, .. }) if stored == class => {
            tracing::info!(file = %from.display(name), sample = id, "already stored with this class; moved to processed");
            from.move_into(name, &processed.sub(class)?)?;
        }
        Err(error) => {
            tracing::warn!(%error, "label refused");
            let to = rejected.sub(class)?;
            let moved = from.move_into(name, &to)?;
            to.dir.write(fit_name("", &moved, ".reason.txt"), format!("{error}\n")).map_err(|e| named(&to.path, e))?;
            agent.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).store().push_event(&event(
                "sample.rejected",
                serde_json::json!({ "file": from.display(name), "class": class, "error": error }),
            ))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_files_are_taken_and_links_refused() {
        assert_eq!(triage("a.png", EntryKind::File), Triage::Take);
        assert_eq!(triage("a.png", EntryKind::Link), Triage::RefuseLink);
        assert_eq!(triage("sub", EntryKind::Dir), Triage::Leave);
        assert_eq!(triage("fifo", EntryKind::Other), Triage::Leave);
        for name in [".hidden.png", "a.png.tmp", "a.png.part"] {
            assert_eq!(triage(name, EntryKind::File), Triage::Leave, "{name}");
            assert_eq!(triage(name, EntryKind::Link), Triage::Leave, "{name}");
        }
    }

    #[test]
    fn a_file_being_written_is_retried_until_it_settles() {
        let mut settling = Settling::default();
        let file = Path::new("watch/a.png");
        let start = Instant::now();
        assert_eq!(settling.on_failure(file, Some(Duration::from_millis(10)), start), Retry::Again);
        assert_eq!(settling.on_failure(file, Some(Duration::from_millis(300)), start + SETTLE / 2), Retry::Again);
        // Unchanged for SETTLE: failed for good, and forgotten.
        assert_eq!(settling.on_failure(file, Some(SETTLE), start + SETTLE), Retry::GiveUp);
        assert!(settling.first_failed.is_empty());
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let files: Vec<(u8, u64)> = vec![(0, 10), (1, 10), (2, 10), (3, 100), (4, 1), (5, 1)];
        let sizes =
            |b: Vec<&[(u8, u64)]>| b.iter().map(|b| b.iter().map(|f| f.0).collect::<Vec<_>>()).collect::<Vec<_>>();
        assert_eq!(sizes(batches(&files, 2, 1000)), vec![vec![0, 1], vec![2, 3], vec![4, 5]]);
        // 25 bytes a batch: the 100-byte file goes alone.
        assert_eq!(sizes(batches(&files, 32, 25)), vec![vec![0, 1], vec![2], vec![3], vec![4, 5]]);
        assert!(batches::<u8>(&[], 32, 25).is_empty());
    }

    #[test]
    fn numbered_and_reason_names_stay_within_the_limit() {
        let long = format!("{}.png", "q".repeat(251));
        assert_eq!(fit_name("1-", &long, "").len(), MAX_NAME_BYTES);
        assert!(fit_name("1-", &long, "").ends_with(".png"));
        assert_eq!(fit_name("", &long, ".reason.txt").len(), MAX_NAME_BYTES);
        assert_eq!(fit_name("1-", "a.png", ""), "1-a.png");
        let accented = "é".repeat(200);
        assert!(fit_name("12-", &accented, "").len() <= MAX_NAME_BYTES);
    }

    #[test]
    fn an_old_broken_file_fails_at_once() {
        let mut settling = Settling::default();
        let now = Instant::now();
        assert_eq!(settling.on_failure(Path::new("a.png"), Some(Duration::from_secs(60)), now), Retry::GiveUp);
    }

    #[test]
    fn a_file_dated_in_the_future_is_not_retried_forever() {
        let mut settling = Settling::default();
        let file = Path::new("a.png");
        let start = Instant::now();
        assert_eq!(settling.on_failure(file, None, start), Retry::Again);
        assert_eq!(settling.on_failure(file, None, start + SETTLE), Retry::GiveUp);
    }

    #[test]
    fn files_that_are_gone_are_forgotten() {
        let mut settling = Settling::default();
        let now = Instant::now();
        settling.on_failure(Path::new("a.png"), None, now);
        settling.on_failure(Path::new("b.png"), None, now);
        settling.retain_present(&HashSet::from([PathBuf::from("b.png")]));
        assert_eq!(settling.first_failed.len(), 1);
    }
}
