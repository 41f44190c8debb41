//! Versions: adapted weights with their gate metrics, promotion and the run state.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use super::events::insert_event;
use super::{Result, Store, StoreError, now_ms, sqlite};
use crate::protocol::events::Event;

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

pub(super) fn set_run_state(conn: &Connection, last_sample_id: i64) -> rusqlite::Result<()> {
    for (key, value) in [("last_run_sample_id", last_sample_id), ("last_run_ms", now_ms())] {
        conn.execute(
            "INSERT INTO state (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
            [key.to_string(), value.to_string()],
        )?;
    }
    Ok(())
}

type VersionRow = std::result::Result<VersionRecord, String>;

pub(super) fn version_from_row(row: &rusqlite::Row<'_>, with_weights: bool) -> rusqlite::Result<VersionRow> {
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

impl Store {
    /// Stores a version, and promotes it when its status says so, in one transaction with the
    /// events `events` makes from the new version's id.
    pub fn insert_version(&mut self, version: &NewVersion<'_>, events: impl FnOnce(i64) -> Vec<Event>) -> Result<i64> {
        let path = self.path.clone();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(&path))?;
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(version.weights));
        tx.execute(
            "INSERT INTO versions (parent, created_ms, method, params, sample_set, metrics, status, reasons,
                                   weights, weights_sha256, bundle)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, (SELECT value FROM state WHERE key = 'bundle'))",
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
        for event in events(id) {
            insert_event(&tx, &event).map_err(sqlite(&path))?;
        }
        tx.commit().map_err(sqlite(&path))?;
        Ok(id)
    }

    /// Records a run that made no version (failed or cancelled), so the policy does not start
    /// the same run again at once.
    pub fn record_failed_run(&mut self, last_sample_id: i64, event: &Event) -> Result<()> {
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
    pub fn promote(&mut self, id: i64, event: &Event) -> Result<()> {
        let record = self.version(id)?;
        if record.status == VersionStatus::Rejected {
            return Err(StoreError::Rejected { id });
        }
        if let (Some(made_on), Some(serving)) = (self.version_bundle(id)?, self.bundle()?)
            && made_on != serving
        {
            return Err(StoreError::OtherBundleVersion { id, made_on, serving });
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

    /// The bundle version `id` was made on; `None` for the source (version 0), which is every
    /// bundle's own.
    pub fn version_bundle(&self, id: i64) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT bundle FROM versions WHERE id = ?1", [id], |row| row.get::<_, Option<String>>(0))
            .optional()
            .map_err(self.err())?
            .ok_or(StoreError::NoSuchVersion(id))
    }

    /// Every version of the current bundle without its weights, oldest first.
    pub fn versions(&self) -> Result<Vec<VersionRecord>> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT id, parent, created_ms, method, params, sample_set, metrics, status, reasons, weights_sha256
                 FROM versions WHERE id = 0 OR bundle IS (SELECT value FROM state WHERE key = 'bundle') ORDER BY id",
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
}
