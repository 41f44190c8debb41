//! The durable local store: one SQLite database (WAL, full sync) holding labelled samples with
//! their cached split tensors, model versions with their weights, the event outbox, unlabelled
//! traffic features and metrics history.
//!
//! Every change that is acknowledged to a caller is one committed transaction, and the
//! transaction also records the event that describes it, so a crash or power loss can neither
//! lose an acknowledged change nor leave a half-written one.

mod commands;
mod schema;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

pub use commands::Claim;
pub use schema::MIGRATIONS;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("store {path}: schema version {found} is newer than this build understands ({known}); upgrade edgeadapt")]
    TooNew { path: PathBuf, found: u32, known: u32 },
    #[error(
        "store {path} belongs to bundle {stored}, not {wanted}; point `data_dir` at a fresh folder for a new bundle"
    )]
    OtherBundle { path: PathBuf, stored: String, wanted: String },
    #[error("sample {sha256} is already stored (id {id}, class '{class}')")]
    Duplicate { sha256: String, id: i64, class: String },
    #[error("version {0} does not exist")]
    NoSuchVersion(i64),
    #[error("version {id} was rejected by the safety gate and cannot be served")]
    Rejected { id: i64 },
    #[error("store {path}: {problem}")]
    Corrupt { path: PathBuf, problem: String },
    #[error(
        "store {path} is damaged ({problem}); the agent will not use it. Stop every edgeadapt process on this \
         data folder, move the store (and any -wal and -shm files beside it) aside, then restore it from a \
         backup, or salvage it with `sqlite3 BROKEN.db .recover | sqlite3 {path}`; with no store the agent \
         starts a new, empty one (no samples, versions or events)"
    )]
    Damaged { path: PathBuf, problem: String },
    #[error("store {path} {problem}")]
    NotAFile { path: PathBuf, problem: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Samples go either to training or to the validation split the safety gate scores on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
}

impl Split {
    fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
        }
    }

    fn parse(text: &str) -> Option<Split> {
        match text {
            "train" => Some(Split::Train),
            "validation" => Some(Split::Validation),
            _ => None,
        }
    }
}

pub struct NewSample<'a> {
    pub sha256: &'a str,
    pub class: &'a str,
    /// Where it came from: `cli`, `http`, `inbox`, `mqtt`.
    pub origin: &'a str,
    pub site: Option<&'a str>,
    /// The encoded image as received, kept so features can be extracted again for a new trunk.
    pub image: Option<&'a [u8]>,
    /// The sample's split tensor, f16 little-endian, channels last.
    pub features: &'a [u8],
}

#[derive(Debug, Clone)]
pub struct StoredSample {
    pub id: i64,
    pub class: String,
    pub split: Split,
    pub features: Vec<u8>,
}

/// An event to record with a change (and to deliver later through the outbox).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub kind: String,
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PendingEvent {
    pub id: i64,
    pub at_ms: i64,
    pub kind: String,
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionStatus {
    Source,
    Promoted,
    Rejected,
}

impl VersionStatus {
    fn as_str(self) -> &'static str {
        match self {
            VersionStatus::Source => "source",
            VersionStatus::Promoted => "promoted",
            VersionStatus::Rejected => "rejected",
        }
    }
}

pub struct NewVersion<'a> {
    pub parent: i64,
    pub method: &'a str,
    pub params: &'a serde_json::Value,
    pub sample_set: &'a serde_json::Value,
    pub metrics: &'a serde_json::Value,
    pub status: VersionStatus,
    pub reasons: &'a [String],
    /// Safetensors bytes of the version's parameters.
    pub weights: &'a [u8],
    /// The newest sample the run saw; new labels are counted from it.
    pub last_sample_id: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VersionRecord {
    pub id: i64,
    pub parent: Option<i64>,
    pub created_ms: i64,
    pub method: String,
    pub params: serde_json::Value,
    pub sample_set: serde_json::Value,
    pub metrics: serde_json::Value,
    pub status: VersionStatus,
    pub reasons: Vec<String>,
    pub weights_sha256: Option<String>,
    #[serde(skip)]
    pub weights: Option<Vec<u8>>,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens (creating and migrating as needed) the store at `path` for the bundle identified by
    /// `bundle_id`. A store made for another bundle is refused: its features and versions
    /// would not fit.
    ///
    /// A missing store is created under a temporary name and renamed into place once it is
    /// complete, so an empty or half-made `store.db` is never ours: an existing file that is
    /// empty, not a database or fails SQLite's quick check is refused with a way to recover.
    pub fn open(path: &Path, bundle_id: &str) -> Result<Store> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Corrupt {
                path: path.to_path_buf(),
                problem: format!("cannot create {}: {e}", parent.display()),
            })?;
        }
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Store::create(path, bundle_id)?,
            Err(e) => return Err(StoreError::Damaged { path: path.to_path_buf(), problem: e.to_string() }),
            Ok(metadata) if metadata.is_symlink() => {
                return Err(StoreError::NotAFile {
                    path: path.to_path_buf(),
                    problem: "is a link, and the agent never follows links; replace it with the database file itself"
                        .into(),
                });
            }
            Ok(metadata) if !metadata.is_file() => {
                return Err(StoreError::NotAFile {
                    path: path.to_path_buf(),
                    problem: "is not a file; move it out of the data folder (the agent then starts a new store)".into(),
                });
            }
            Ok(metadata) if metadata.len() == 0 => {
                return Err(StoreError::Damaged {
                    path: path.to_path_buf(),
                    problem: "the file is empty (0 bytes), so its samples and versions are gone".into(),
                });
            }
            Ok(_) => {}
        }
        let damaged = |source: rusqlite::Error| match source.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                StoreError::Damaged { path: path.to_path_buf(), problem: source.to_string() }
            }
            _ => StoreError::Sqlite { path: path.to_path_buf(), source },
        };
        let conn = Connection::open(path).map_err(damaged)?;
        let verdict: String = conn.query_row("PRAGMA quick_check", [], |row| row.get(0)).map_err(damaged)?;
        if verdict != "ok" {
            return Err(StoreError::Damaged { path: path.to_path_buf(), problem: format!("quick_check: {verdict}") });
        }
        let mut store = Store { conn, path: path.to_path_buf() };
        store.configure()?;
        store.migrate()?;
        match store.state("bundle")? {
            Some(stored) if stored != bundle_id => {
                return Err(StoreError::OtherBundle { path: path.to_path_buf(), stored, wanted: bundle_id.into() });
            }
            Some(_) => {}
            None => store.set_state("bundle", bundle_id)?,
        }
        Ok(store)
    }

    /// Makes a new store beside `path` and renames it into place once it is complete.
    fn create(path: &Path, bundle_id: &str) -> Result<()> {
        let fresh = path.with_extension("db.new");
        for leftover in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(format!("{}{leftover}", fresh.display()));
        }
        {
            let conn = Connection::open(&fresh).map_err(sqlite(&fresh))?;
            let mut store = Store { conn, path: fresh.clone() };
            store.configure()?;
            store.migrate()?;
            store.set_state("bundle", bundle_id)?;
            // Closing the only connection checkpoints the WAL into the file and removes it.
            store.conn.close().map_err(|(_, e)| StoreError::Sqlite { path: fresh.clone(), source: e })?;
        }
        let io = |e: std::io::Error| StoreError::Damaged { path: path.to_path_buf(), problem: e.to_string() };
        std::fs::File::open(&fresh).and_then(|f| f.sync_all()).map_err(io)?;
        std::fs::rename(&fresh, path).map_err(io)?;
        if let Some(parent) = path.parent() {
            let _ = std::fs::File::open(parent).and_then(|dir| dir.sync_all());
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        sqlite(&self.path)
    }

    fn configure(&mut self) -> Result<()> {
        // WAL lets readers run beside the writer; FULL sync makes every commit survive power loss.
        let mode: String =
            self.conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(self.err())?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                problem: format!("journal mode {mode}, not WAL"),
            });
        }
        self.conn.pragma_update(None, "synchronous", "FULL").map_err(self.err())?;
        self.conn.pragma_update(None, "foreign_keys", "ON").map_err(self.err())?;
        self.conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(self.err())?;
        Ok(())
    }

    fn migrate(&mut self) -> Result<()> {
        let found: u32 = self.conn.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(self.err())?;
        let known = MIGRATIONS.len() as u32;
        if found > known {
            return Err(StoreError::TooNew { path: self.path.clone(), found, known });
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let path = self.path.clone();
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(&path))?;
            tx.execute_batch(migration).map_err(sqlite(&path))?;
            tx.pragma_update(None, "user_version", index as u32 + 1).map_err(sqlite(&path))?;
            tx.commit().map_err(sqlite(&path))?;
        }
        Ok(())
    }

    pub fn schema_version(&self) -> Result<u32> {
        self.conn.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(self.err())
    }

    /// SQLite's own consistency check; `ok` when the file is sound.
    pub fn integrity_check(&self) -> Result<String> {
        self.conn.query_row("PRAGMA integrity_check", [], |row| row.get(0)).map_err(self.err())
    }

    pub fn state(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM state WHERE key = ?1", [key], |row| row.get(0))
            .optional()
            .map_err(self.err())
    }

    pub fn set_state(&mut self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO state (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
                [key, value],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// The stored sample with this content hash, if any: id and class.
    pub fn find_sample(&self, sha256: &str) -> Result<Option<(i64, String)>> {
        self.conn
            .query_row("SELECT id, class FROM samples WHERE sha256 = ?1", [sha256], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()
            .map_err(self.err())
    }

    /// Stores samples and their events in one transaction: all are acknowledged together once
    /// it commits. A duplicate (by content hash, also within the batch) gets its own error and
    /// the others are stored. `choose_split` gets the number of samples of the class already
    /// stored, so the split is decided against committed data.
    pub fn insert_samples(
        &mut self,
        samples: &[NewSample<'_>],
        choose_split: impl Fn(usize) -> Split,
        event: impl Fn(&NewSample<'_>, i64, Split) -> EventRecord,
    ) -> Result<Vec<Result<(i64, Split)>>> {
        let path = self.path.clone();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(&path))?;
        let mut results = Vec::with_capacity(samples.len());
        for sample in samples {
            let existing: Option<(i64, String)> = tx
                .query_row("SELECT id, class FROM samples WHERE sha256 = ?1", [sample.sha256], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()
                .map_err(sqlite(&path))?;
            if let Some((id, class)) = existing {
                results.push(Err(StoreError::Duplicate { sha256: sample.sha256.into(), id, class }));
                continue;
            }
            let in_class: i64 = tx
                .query_row("SELECT COUNT(*) FROM samples WHERE class = ?1", [sample.class], |row| row.get(0))
                .map_err(sqlite(&path))?;
            let split = choose_split(in_class as usize);
            tx.execute(
                "INSERT INTO samples (sha256, class, split, origin, site, added_ms, image, features)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    sample.sha256,
                    sample.class,
                    split.as_str(),
                    sample.origin,
                    sample.site,
                    now_ms(),
                    sample.image,
                    sample.features
                ],
            )
            .map_err(sqlite(&path))?;
            let id = tx.last_insert_rowid();
            insert_event(&tx, &event(sample, id, split)).map_err(sqlite(&path))?;
            results.push(Ok((id, split)));
        }
        tx.commit().map_err(sqlite(&path))?;
        Ok(results)
    }

    /// Stored samples in insertion order, optionally of one split only.
    pub fn samples(&self, split: Option<Split>) -> Result<Vec<StoredSample>> {
        let mut statement = self
            .conn
            .prepare("SELECT id, class, split, features FROM samples WHERE ?1 IS NULL OR split = ?1 ORDER BY id")
            .map_err(self.err())?;
        let rows = statement
            .query_map([split.map(Split::as_str)], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?, row.get(3)?))
            })
            .map_err(self.err())?;
        let mut samples = Vec::new();
        for row in rows {
            let (id, class, split, features) = row.map_err(self.err())?;
            let split = Split::parse(&split).ok_or_else(|| StoreError::Corrupt {
                path: self.path.clone(),
                problem: format!("sample {id} has unknown split '{split}'"),
            })?;
            samples.push(StoredSample { id, class, split, features });
        }
        Ok(samples)
    }

    /// Samples per class: (train, validation).
    pub fn sample_counts(&self) -> Result<BTreeMap<String, (usize, usize)>> {
        let mut statement = self
            .conn
            .prepare("SELECT class, split, COUNT(*) FROM samples GROUP BY class, split")
            .map_err(self.err())?;
        let rows = statement
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, i64>(2)?)))
            .map_err(self.err())?;
        let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for row in rows {
            let (class, split, count) = row.map_err(self.err())?;
            let entry = counts.entry(class).or_default();
            if split == "validation" {
                entry.1 += count as usize;
            } else {
                entry.0 += count as usize;
            }
        }
        Ok(counts)
    }

    /// Highest sample id (0 when there are none); versions record it to count new labels.
    pub fn last_sample_id(&self) -> Result<i64> {
        self.conn.query_row("SELECT COALESCE(MAX(id), 0) FROM samples", [], |row| row.get(0)).map_err(self.err())
    }

    pub fn count_samples_after(&self, id: i64) -> Result<usize> {
        self.conn
            .query_row("SELECT COUNT(*) FROM samples WHERE id > ?1", [id], |row| row.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(self.err())
    }

    /// Stores a version, and promotes it when its status says so, in one transaction.
    pub fn insert_version(&mut self, version: &NewVersion<'_>, events: &[EventRecord]) -> Result<i64> {
        let path = self.path.clone();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(&path))?;
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(version.weights));
        tx.execute(
            "INSERT INTO versions (parent, created_ms, method, params, sample_set, metrics, status, reasons,
                                   weights, weights_sha256)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                version.parent,
                now_ms(),
                version.method,
                version.params.to_string(),
                version.sample_set.to_string(),
                version.metrics.to_string(),
                version.status.as_str(),
                serde_json::to_string(version.reasons).expect("strings serialise"),
                version.weights,
                sha,
            ],
        )
        .map_err(sqlite(&path))?;
        let id = tx.last_insert_rowid();
        set_run_state(&tx, version.last_sample_id).map_err(sqlite(&path))?;
        if version.status == VersionStatus::Promoted {
            tx.execute("UPDATE state SET value = ?1 WHERE key = 'promoted'", [id.to_string()])
                .map_err(sqlite(&path))?;
        }
        for event in events {
            let mut event = event.clone();
            if let Some(object) = event.payload.as_object_mut() {
                object.insert("version".into(), id.into());
            }
            insert_event(&tx, &event).map_err(sqlite(&path))?;
        }
        tx.commit().map_err(sqlite(&path))?;
        Ok(id)
    }

    /// Records a run that made no version (failed or cancelled), so the policy does not start
    /// the same run again at once.
    pub fn record_failed_run(&mut self, last_sample_id: i64, event: &EventRecord) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(&path))?;
        set_run_state(&tx, last_sample_id).map_err(sqlite(&path))?;
        insert_event(&tx, event).map_err(sqlite(&path))?;
        tx.commit().map_err(sqlite(&path))
    }

    /// The newest sample id the last run saw and when it ended (ms since the epoch).
    pub fn last_run(&self) -> Result<Option<(i64, i64)>> {
        let sample = self.state("last_run_sample_id")?;
        let at = self.state("last_run_ms")?;
        Ok(match (sample, at) {
            (Some(sample), Some(at)) => Some((sample.parse().unwrap_or(0), at.parse().unwrap_or(0))),
            _ => None,
        })
    }

    /// Serves `id` from now on (a rollback or a roll-forward); rejected versions are refused.
    pub fn promote(&mut self, id: i64, event: &EventRecord) -> Result<()> {
        let record = self.version(id)?;
        if record.status == VersionStatus::Rejected {
            return Err(StoreError::Rejected { id });
        }
        let path = self.path.clone();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(&path))?;
        tx.execute("UPDATE state SET value = ?1 WHERE key = 'promoted'", [id.to_string()]).map_err(sqlite(&path))?;
        insert_event(&tx, event).map_err(sqlite(&path))?;
        tx.commit().map_err(sqlite(&path))?;
        Ok(())
    }

    pub fn promoted(&self) -> Result<i64> {
        let value = self.state("promoted")?.unwrap_or_else(|| "0".into());
        value.parse().map_err(|_| StoreError::Corrupt {
            path: self.path.clone(),
            problem: format!("promoted version '{value}' is not a number"),
        })
    }

    pub fn version(&self, id: i64) -> Result<VersionRecord> {
        self.conn
            .query_row(
                "SELECT id, parent, created_ms, method, params, sample_set, metrics, status, reasons, weights_sha256,
                        weights
                 FROM versions WHERE id = ?1",
                [id],
                |row| version_from_row(row, true),
            )
            .optional()
            .map_err(self.err())?
            .ok_or(StoreError::NoSuchVersion(id))?
            .map_err(|problem| StoreError::Corrupt { path: self.path.clone(), problem })
    }

    /// Every version without its weights, oldest first.
    pub fn versions(&self) -> Result<Vec<VersionRecord>> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT id, parent, created_ms, method, params, sample_set, metrics, status, reasons, weights_sha256
                 FROM versions ORDER BY id",
            )
            .map_err(self.err())?;
        let rows = statement.query_map([], |row| version_from_row(row, false)).map_err(self.err())?;
        let mut versions = Vec::new();
        for row in rows {
            versions.push(
                row.map_err(self.err())?.map_err(|problem| StoreError::Corrupt { path: self.path.clone(), problem })?,
            );
        }
        Ok(versions)
    }

    pub fn push_event(&mut self, event: &EventRecord) -> Result<i64> {
        insert_event(&self.conn, event).map_err(self.err())
    }

    /// Events not yet delivered, oldest first.
    pub fn pending_events(&self, limit: usize) -> Result<Vec<PendingEvent>> {
        // Event ids start at 1.
        self.pending_events_after(0, limit)
    }

    /// Undelivered events with ids above `after`, oldest first.
    pub fn pending_events_after(&self, after: i64, limit: usize) -> Result<Vec<PendingEvent>> {
        self.events_where("WHERE delivered = 0 AND id > ?1 ORDER BY id LIMIT ?2", [after, limit as i64])
    }

    /// The most recent events, newest first.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<PendingEvent>> {
        self.events_where("ORDER BY id DESC LIMIT ?1", [limit as i64])
    }

    /// The newest event of one of these kinds.
    pub fn last_event_of(&self, kinds: &[&str]) -> Result<Option<PendingEvent>> {
        let placeholders = vec!["?"; kinds.len()].join(", ");
        let clause = format!("WHERE kind IN ({placeholders}) ORDER BY id DESC LIMIT 1");
        Ok(self.events_where(&clause, rusqlite::params_from_iter(kinds))?.pop())
    }

    /// Events selected by `clause` (what follows `FROM events`); a payload that is not JSON is
    /// returned as a string rather than lost.
    fn events_where(&self, clause: &str, params: impl rusqlite::Params) -> Result<Vec<PendingEvent>> {
        let mut statement =
            self.conn.prepare(&format!("SELECT id, at_ms, kind, payload FROM events {clause}")).map_err(self.err())?;
        let rows = statement
            .query_map(params, |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, String>(2)?, row.get::<_, String>(3)?))
            })
            .map_err(self.err())?;
        let mut events = Vec::new();
        for row in rows {
            let (id, at_ms, kind, payload) = row.map_err(self.err())?;
            let payload = serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload));
            events.push(PendingEvent { id, at_ms, kind, payload });
        }
        Ok(events)
    }

    pub fn mark_delivered(&mut self, ids: &[i64]) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(sqlite(&path))?;
        for id in ids {
            tx.execute("UPDATE events SET delivered = 1 WHERE id = ?1", [id]).map_err(sqlite(&path))?;
        }
        tx.commit().map_err(sqlite(&path))
    }

    /// Keeps at most `limit` undelivered events: the oldest beyond it are dropped, and one event
    /// reports how many. Delivered events beyond the newest `limit` are pruned.
    pub fn trim_outbox(&mut self, limit: usize) -> Result<usize> {
        let path = self.path.clone();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(&path))?;
        let undelivered: i64 = tx
            .query_row("SELECT COUNT(*) FROM events WHERE delivered = 0", [], |row| row.get(0))
            .map_err(sqlite(&path))?;
        let excess = (undelivered - limit as i64).max(0) as usize;
        if excess > 0 {
            let (first, last): (i64, i64) = tx
                .query_row(
                    "SELECT MIN(id), MAX(id) FROM (SELECT id FROM events WHERE delivered = 0 ORDER BY id LIMIT ?1)",
                    [excess as i64 + 1],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .map_err(sqlite(&path))?;
            tx.execute(
                "UPDATE events SET delivered = 2 WHERE id IN (SELECT id FROM events WHERE delivered = 0 ORDER BY id LIMIT ?1)",
                [excess as i64 + 1],
            )
            .map_err(sqlite(&path))?;
            let payload =
                serde_json::json!({ "dropped": excess + 1, "first_id": first, "last_id": last, "limit": limit });
            insert_event(&tx, &EventRecord { kind: "outbox.dropped".into(), payload }).map_err(sqlite(&path))?;
        }
        tx.execute(
            "DELETE FROM events WHERE delivered != 0 AND id < (SELECT COALESCE(MAX(id), 0) FROM events) - ?1",
            [limit as i64],
        )
        .map_err(sqlite(&path))?;
        tx.commit().map_err(sqlite(&path))?;
        Ok(if excess > 0 { excess + 1 } else { 0 })
    }

    /// Adds split tensors of unlabelled traffic and keeps only the newest `keep`.
    pub fn add_traffic(&mut self, features: &[Vec<u8>], keep: usize) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(sqlite(&path))?;
        let at = now_ms();
        for row in features {
            tx.execute("INSERT INTO traffic (at_ms, features) VALUES (?1, ?2)", params![at, row])
                .map_err(sqlite(&path))?;
        }
        tx.execute("DELETE FROM traffic WHERE id <= (SELECT COALESCE(MAX(id), 0) FROM traffic) - ?1", [keep as i64])
            .map_err(sqlite(&path))?;
        tx.commit().map_err(sqlite(&path))
    }

    pub fn traffic(&self) -> Result<Vec<Vec<u8>>> {
        let mut statement = self.conn.prepare("SELECT features FROM traffic ORDER BY id").map_err(self.err())?;
        let rows = statement.query_map([], |row| row.get(0)).map_err(self.err())?;
        rows.collect::<rusqlite::Result<Vec<Vec<u8>>>>().map_err(self.err())
    }

    pub fn record_metrics(&mut self, version: i64, payload: &serde_json::Value) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO metrics (at_ms, version, payload) VALUES (?1, ?2, ?3)",
                params![now_ms(), version, payload.to_string()],
            )
            .map(|_| ())
            .map_err(self.err())
    }
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite { path: path.to_path_buf(), source }
}

fn set_run_state(conn: &Connection, last_sample_id: i64) -> rusqlite::Result<()> {
    for (key, value) in [("last_run_sample_id", last_sample_id), ("last_run_ms", now_ms())] {
        conn.execute(
            "INSERT INTO state (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
            [key.to_string(), value.to_string()],
        )?;
    }
    Ok(())
}

fn insert_event(conn: &Connection, event: &EventRecord) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO events (at_ms, kind, payload) VALUES (?1, ?2, ?3)",
        params![now_ms(), event.kind, event.payload.to_string()],
    )?;
    Ok(conn.last_insert_rowid())
}

type VersionRow = std::result::Result<VersionRecord, String>;

fn version_from_row(row: &rusqlite::Row<'_>, with_weights: bool) -> rusqlite::Result<VersionRow> {
    let id: i64 = row.get(0)?;
    let json = |index: usize| -> rusqlite::Result<std::result::Result<serde_json::Value, String>> {
        let text: String = row.get(index)?;
        Ok(serde_json::from_str(&text).map_err(|e| format!("version {id}: column {index} is not JSON: {e}")))
    };
    let status: String = row.get(7)?;
    let status = match status.as_str() {
        "source" => VersionStatus::Source,
        "promoted" => VersionStatus::Promoted,
        "rejected" => VersionStatus::Rejected,
        other => return Ok(Err(format!("version {id} has unknown status '{other}'"))),
    };
    let reasons: String = row.get(8)?;
    let record = (|| {
        Ok(VersionRecord {
            id,
            parent: row.get(1).map_err(|e| e.to_string())?,
            created_ms: row.get(2).map_err(|e| e.to_string())?,
            method: row.get(3).map_err(|e| e.to_string())?,
            params: json(4).map_err(|e| e.to_string())??,
            sample_set: json(5).map_err(|e| e.to_string())??,
            metrics: json(6).map_err(|e| e.to_string())??,
            status,
            reasons: serde_json::from_str(&reasons).map_err(|e| format!("version {id}: reasons: {e}"))?,
            weights_sha256: row.get(9).map_err(|e| e.to_string())?,
            weights: if with_weights { row.get(10).map_err(|e| e.to_string())? } else { None },
        })
    })();
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(sha: &'a str, class: &'a str) -> NewSample<'a> {
        NewSample { sha256: sha, class, origin: "test", site: None, image: None, features: &[1, 2, 3, 4] }
    }

    fn event(kind: &str) -> EventRecord {
        EventRecord { kind: kind.into(), payload: serde_json::json!({}) }
    }

    #[test]
    fn a_new_store_is_migrated_and_serves_the_source_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.db"), "bundle-a").unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as u32);
        assert_eq!(store.promoted().unwrap(), 0);
        let versions = store.versions().unwrap();
        assert_eq!(versions.len(), 1);
        assert_eq!(versions[0].status, VersionStatus::Source);
        assert_eq!(store.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn a_store_of_another_bundle_or_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        drop(Store::open(&path, "bundle-a").unwrap());
        assert!(matches!(Store::open(&path, "bundle-b"), Err(StoreError::OtherBundle { .. })));
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let error = Store::open(&path, "bundle-a").err().unwrap();
        assert!(matches!(error, StoreError::TooNew { found: 99, .. }), "{error}");
    }

    #[test]
    fn duplicates_are_refused_and_splits_see_committed_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db"), "b").unwrap();
        let seen_counts = std::cell::RefCell::new(Vec::new());
        let split = |n: usize| {
            seen_counts.borrow_mut().push(n);
            if n == 2 { Split::Validation } else { Split::Train }
        };
        store.insert_samples(&[sample("h1", "cat")], split, |_, _, _| event("sample")).unwrap();
        let results = store
            .insert_samples(&[sample("h2", "cat"), sample("h3", "cat")], split, |_, _, _| event("sample"))
            .unwrap();
        assert!(results.iter().all(|r| r.is_ok()));
        assert_eq!(*seen_counts.borrow(), vec![0, 1, 2]);
        let results = store
            .insert_samples(&[sample("h2", "dog"), sample("h4", "dog"), sample("h4", "dog")], split, |_, _, _| {
                event("sample")
            })
            .unwrap();
        assert!(matches!(&results[0], Err(StoreError::Duplicate { class, .. }) if class == "cat"), "{results:?}");
        assert!(results[1].is_ok());
        assert!(matches!(&results[2], Err(StoreError::Duplicate { class, .. }) if class == "dog"), "{results:?}");
        let counts = store.sample_counts().unwrap();
        assert_eq!((counts["cat"], counts["dog"]), ((2, 1), (1, 0)));
        assert_eq!(store.samples(Some(Split::Validation)).unwrap().len(), 1);
        // Refused duplicates left no event behind.
        assert_eq!(store.pending_events(100).unwrap().len(), 4);
    }

    #[test]
    fn versions_promote_atomically_and_rejected_ones_cannot_be_served() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db"), "b").unwrap();
        let json = serde_json::json!({});
        let new = |status| NewVersion {
            parent: 0,
            method: "recommended",
            params: &json,
            sample_set: &json,
            metrics: &json,
            status,
            reasons: &[],
            weights: b"w",
            last_sample_id: 0,
        };
        let promoted = store.insert_version(&new(VersionStatus::Promoted), &[event("promoted")]).unwrap();
        assert_eq!(store.promoted().unwrap(), promoted);
        let rejected = store.insert_version(&new(VersionStatus::Rejected), &[event("rejected")]).unwrap();
        assert_eq!(store.promoted().unwrap(), promoted);
        assert!(matches!(store.promote(rejected, &event("rollback")), Err(StoreError::Rejected { .. })));
        store.promote(0, &event("rollback")).unwrap();
        assert_eq!(store.promoted().unwrap(), 0);
        assert_eq!(store.version(promoted).unwrap().weights.as_deref(), Some(&b"w"[..]));
        assert!(matches!(store.version(42), Err(StoreError::NoSuchVersion(42))));
        let events = store.pending_events(10).unwrap();
        assert_eq!(events[0].payload["version"], promoted);
    }

    #[test]
    fn commands_are_claimed_once_and_answered() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db"), "b").unwrap();
        assert_eq!(store.claim_command("c1", "adapt:x").unwrap(), Claim::New);
        assert_eq!(store.claim_command("c1", "adapt:x").unwrap(), Claim::Running);
        assert_eq!(store.unanswered_commands().unwrap(), vec!["c1".to_string()]);
        store.answer_command("c1", "{\"ok\":true}").unwrap();
        assert_eq!(store.claim_command("c1", "adapt:x").unwrap(), Claim::Answered("{\"ok\":true}".into()));
        assert!(store.unanswered_commands().unwrap().is_empty());
        // The same id for another command is a conflict, not the earlier answer.
        assert_eq!(store.claim_command("c1", "rollback:y").unwrap(), Claim::Conflict);
    }

    #[test]
    fn answered_commands_are_pruned_beyond_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db"), "b").unwrap();
        for n in 0..10 {
            store.claim_command(&format!("c{n}"), "status:x").unwrap();
            if n != 0 {
                store.answer_command(&format!("c{n}"), "{}").unwrap();
            }
        }
        // Everything is older than "now + 1 s": keep the newest 3, and the unanswered one.
        assert_eq!(store.prune_commands(3, -1000).unwrap(), 6);
        assert_eq!(store.claim_command("c0", "status:x").unwrap(), Claim::Running);
        assert_eq!(store.claim_command("c9", "status:x").unwrap(), Claim::Answered("{}".into()));
        assert_eq!(store.claim_command("c1", "status:x").unwrap(), Claim::New);
    }

    #[test]
    fn an_overfull_outbox_drops_its_oldest_events_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db"), "b").unwrap();
        for i in 0..10 {
            store.push_event(&EventRecord { kind: format!("e{i}"), payload: serde_json::json!({}) }).unwrap();
        }
        assert_eq!(store.trim_outbox(20).unwrap(), 0);
        // Room for the report itself: 5 kept = 4 newest + the report.
        assert_eq!(store.trim_outbox(5).unwrap(), 6);
        let pending = store.pending_events(100).unwrap();
        let kinds: Vec<&str> = pending.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, vec!["e6", "e7", "e8", "e9", "outbox.dropped"]);
        assert_eq!(pending[4].payload["dropped"], 6);
    }

    #[test]
    fn traffic_keeps_the_newest_rows_and_the_outbox_drains() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db"), "b").unwrap();
        store.add_traffic(&[vec![1], vec![2], vec![3]], 2).unwrap();
        store.add_traffic(&[vec![4]], 2).unwrap();
        assert_eq!(store.traffic().unwrap(), vec![vec![3], vec![4]]);
        let id = store.push_event(&event("a")).unwrap();
        store.push_event(&event("b")).unwrap();
        store.mark_delivered(&[id]).unwrap();
        let pending = store.pending_events(10).unwrap();
        assert_eq!(pending.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), vec!["b"]);
    }
}
