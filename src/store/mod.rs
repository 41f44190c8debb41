//! The durable local store: one SQLite database (WAL, full sync) holding labelled samples with
//! their cached split tensors, model versions with their weights, the event outbox, unlabelled
//! traffic features and fleet command ids.
//!
//! Every change that is acknowledged to a caller is one committed transaction, and the
//! transaction also records the event that describes it, so a crash or power loss can neither
//! lose an acknowledged change nor leave a half-written one.

mod bundles;
mod commands;
mod events;
mod samples;
mod schema;
mod traffic;
mod traffic_images;
mod transfers;
mod versions;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

pub use bundles::{BundleSwitch, ShadowImage};
pub use commands::Claim;
pub use events::PendingEvent;
pub use samples::{NewSample, Split, StoredSample};
pub use schema::MIGRATIONS;
pub use traffic_images::{KeepImages, NewTrafficImage, TrafficImage};
pub use versions::{NewVersion, VersionRecord, VersionStatus};

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
    #[error("version {id} was made on bundle {made_on}; this device now serves {serving}, so it cannot be served")]
    OtherBundleVersion { id: i64, made_on: String, serving: String },
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
        let mut store = Store::open_any(path)?;
        store.claim_bundle(bundle_id)?;
        Ok(store)
    }

    /// Opens the store whichever bundle it is on (a new one is on none until
    /// [`Store::claim_bundle`]): the agent reads which bundle it serves ([`Store::bundle_dir`])
    /// before it can load it.
    pub fn open_any(path: &Path) -> Result<Store> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Corrupt {
                path: path.to_path_buf(),
                problem: format!("cannot create {}: {e}", parent.display()),
            })?;
        }
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Store::create(path)?,
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
        Ok(store)
    }

    /// Makes a new store beside `path` and renames it into place once it is complete.
    fn create(path: &Path) -> Result<()> {
        let fresh = path.with_extension("db.new");
        for leftover in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(format!("{}{leftover}", fresh.display()));
        }
        {
            let conn = Connection::open(&fresh).map_err(sqlite(&fresh))?;
            let mut store = Store { conn, path: fresh.clone() };
            store.configure()?;
            store.migrate()?;
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
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite { path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::events::{Event, VersionMade};

    fn sample<'a>(sha: &'a str, class: &'a str) -> NewSample<'a> {
        NewSample {
            sha256: sha,
            class,
            origin: "test",
            site: None,
            labelled_by: None,
            image: None,
            features: &[1, 2, 3, 4],
        }
    }

    /// An event told apart from others by `step`.
    fn event(step: usize) -> Event {
        Event::AdaptationProgress { method: "m".into(), step, steps: 10 }
    }

    fn steps(events: &[PendingEvent]) -> Vec<serde_json::Value> {
        events.iter().map(|e| e.payload["step"].clone()).collect()
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
    fn a_store_of_an_older_schema_is_migrated_keeping_its_samples() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        {
            let mut store = Store::open(&path, "bundle-a").unwrap();
            store.insert_samples(&[sample("s1", "A")], |_| Split::Train, |_, _, _| event(0)).unwrap();
        }
        // The store as schema 2 left it: migrations 3 to 6 undone, the version set back.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE metrics (id INTEGER PRIMARY KEY, at_ms INTEGER, version INTEGER, payload TEXT);
             DROP TABLE transfer_chunks;
             DROP TABLE transfers;
             DROP TABLE traffic_images;
             ALTER TABLE samples DROP COLUMN labelled_by;
             DROP INDEX samples_by_bundle;
             ALTER TABLE samples DROP COLUMN bundle;
             ALTER TABLE versions DROP COLUMN bundle;
             PRAGMA user_version = 2;",
        )
        .unwrap();
        drop(conn);
        let store = Store::open(&path, "bundle-a").unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as u32);
        let tables: i64 = store
            .conn
            .query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'metrics'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 0, "migration 3 drops the metrics table nothing wrote");
        let labelled_by: Option<String> =
            store.conn.query_row("SELECT labelled_by FROM samples", [], |r| r.get(0)).unwrap();
        assert_eq!(labelled_by, None, "migration 4 adds who labelled a sample, unknown for older ones");
        assert_eq!(store.sample_counts().unwrap()["A"], (1, 0), "migration 6 gives it the store's bundle");
        assert_eq!(store.samples(None).unwrap().len(), 1);
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
        store.insert_samples(&[sample("h1", "cat")], split, |_, _, _| event(0)).unwrap();
        let results =
            store.insert_samples(&[sample("h2", "cat"), sample("h3", "cat")], split, |_, _, _| event(0)).unwrap();
        assert!(results.iter().all(|r| r.is_ok()));
        assert_eq!(*seen_counts.borrow(), vec![0, 1, 2]);
        let results = store
            .insert_samples(&[sample("h2", "dog"), sample("h4", "dog"), sample("h4", "dog")], split, |_, _, _| event(0))
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
        let made = |version| {
            let made = VersionMade { version, method: "m".into(), parent: 0, reasons: vec![], metrics: json.clone() };
            vec![Event::VersionPromoted(made)]
        };
        let promoted = store.insert_version(&new(VersionStatus::Promoted), made).unwrap();
        assert_eq!(store.promoted().unwrap(), promoted);
        let rejected = store.insert_version(&new(VersionStatus::Rejected), made).unwrap();
        assert_eq!(store.promoted().unwrap(), promoted);
        let rollback = |to| Event::VersionRollback { from: promoted, to };
        assert!(matches!(store.promote(rejected, &rollback(rejected)), Err(StoreError::Rejected { .. })));
        store.promote(0, &rollback(0)).unwrap();
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
            store.push_event(&event(i)).unwrap();
        }
        assert_eq!(store.trim_outbox(20).unwrap(), 0);
        // Room for the report itself: 5 kept = 4 newest + the report.
        assert_eq!(store.trim_outbox(5).unwrap(), 6);
        let pending = store.pending_events(100).unwrap();
        assert_eq!(steps(&pending[..4]), vec![6, 7, 8, 9]);
        assert_eq!(pending[4].kind, "outbox.dropped");
        assert_eq!(pending[4].payload["dropped"], 6);
    }

    #[test]
    fn traffic_keeps_the_newest_rows_and_the_outbox_drains() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db"), "b").unwrap();
        store.add_traffic(&[vec![1], vec![2], vec![3]], 2).unwrap();
        store.add_traffic(&[vec![4]], 2).unwrap();
        assert_eq!(store.traffic().unwrap(), vec![vec![3], vec![4]]);
        let id = store.push_event(&event(1)).unwrap();
        store.push_event(&event(2)).unwrap();
        store.mark_delivered(&[id]).unwrap();
        assert_eq!(steps(&store.pending_events(10).unwrap()), vec![2]);
    }
}
