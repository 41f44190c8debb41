//! The watched folder and the labelling inbox.
//!
//! Every file operation here goes through a capability handle (`cap_std::fs::Dir`) opened on
//! one of the agent's own folders, so no name, `..` or link can reach a file outside them; and
//! links are never followed at all: a link dropped in is moved aside (the link itself, never
//! its target) with a reason, and a linked class folder in the inbox is left alone with a
//! warning. Which entries to take, and whether a failed file is retried, are decided by pure
//! functions (`rules`); the functions that touch the disk only carry out those decisions.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use serde::Serialize;

pub mod events;
mod opened;
pub mod rules;

use self::opened::{Opened, named, open_results_log};
use self::rules::{EntryKind, FOLDER_BATCH, FOLDER_BATCH_BYTES, Retry, Settling, Triage, batches, fit_name, triage};
use super::{Agent, IngestError, Labelled};
use crate::config::{AfterClassify, DeviceConfig};
use crate::imaging::DecodeLimits;
use crate::protocol::events::Event;

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
        let (files, links) = self.take(&watch, watch.entries()?);
        for name in links {
            let path = watch.path.join(&name);
            match watch.move_into(&name, &failed) {
                Ok(moved) => tracing::warn!(file = %path.display(), moved_to = %failed.display(&moved),
                    "links are not followed; copy or move the image itself into the watched folder"),
                Err(error) => self.on_stuck(&path, &error.into()),
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
                    Err(error) => {
                        // The message starts with the file's name; the log line names it once.
                        let problem = error.strip_prefix(&format!("{name}: ")).unwrap_or(error);
                        tracing::warn!(file = name, problem, "cannot classify")
                    }
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
            let (files, links) = self.take(&class_dir, entries);
            for name in links {
                let outcome = Err(IngestError::BadImage {
                    what: class_dir.display(&name),
                    problem: "is a link, and links are not followed; copy the image itself into the inbox".into(),
                });
                if let Err(error) = settle_inbox_file(agent, &class_dir, &name, &class, &processed, &rejected, outcome)
                {
                    self.on_stuck(&class_dir.path.join(&name), &error);
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

    /// Sorts a folder's entries: the files to read (with their sizes) and the links to move
    /// aside; everything else is left alone, named once in the log when it is not hidden.
    fn take(&mut self, dir: &Opened, entries: Vec<(OsString, EntryKind)>) -> (Vec<(String, u64)>, Vec<String>) {
        let (mut files, mut links) = (Vec::new(), Vec::new());
        for (name, kind) in entries {
            let Some(name) = name.to_str().map(str::to_string) else {
                self.warn_once(&name, &dir.path, "the name is not UTF-8; rename it");
                continue;
            };
            if self.is_stuck(&dir.path.join(&name)) {
                continue;
            }
            match triage(&name, kind) {
                Triage::Take => files.push((name.clone(), dir.size(&name))),
                Triage::RefuseLink => links.push(name),
                Triage::Leave if kind != EntryKind::File && !name.starts_with('.') => {
                    self.warn_once(name.as_ref(), &dir.path, "not a file (only image files are taken)");
                }
                Triage::Leave => {}
            }
        }
        (files, links)
    }

    fn warn_once(&mut self, name: &std::ffi::OsStr, folder: &Path, problem: &str) {
        if self.warned.insert(folder.join(name).into_os_string()) {
            tracing::warn!(entry = %folder.join(name).display(), "left alone: {problem}");
        }
    }
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
            tracing::warn!(file = %from.display(name), problem = %error.problem(), "label refused");
            let to = rejected.sub(class)?;
            let moved = from.move_into(name, &to)?;
            to.dir.write(fit_name("", &moved, ".reason.txt"), format!("{error}\n")).map_err(|e| named(&to.path, e))?;
            let event = Event::SampleRejected {
                file: from.display(name).to_string(),
                class: class.to_string(),
                error: serde_json::to_value(&error).expect("refusals serialise"),
            };
            agent.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).store().push_event(&event)?;
        }
    }
    Ok(())
}
