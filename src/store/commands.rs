//! The commands table: which command ids the fleet has sent, with a fingerprint of each command
//! and its answer, so that a retry gets the same answer and a reused id is caught.

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{Result, Store, now_ms, sqlite};

/// What a command id's claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// A new id: run the command.
    New,
    /// The same command is running now.
    Running,
    /// The same command was answered with this response.
    Answered(String),
    /// The id was used for a different command.
    Conflict,
}

impl Store {
    /// Claims a command id for a command identified by `fingerprint` (its name and a digest of
    /// its arguments): a retry of the same command finds its earlier answer, and an id reused
    /// for another command is a conflict, never the earlier command's answer.
    pub fn claim_command(&mut self, id: &str, fingerprint: &str) -> Result<Claim> {
        let path = self.path.clone();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(&path))?;
        let existing: Option<(String, Option<String>)> = tx
            .query_row("SELECT command, response FROM commands WHERE id = ?1", [id], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()
            .map_err(sqlite(&path))?;
        let claim = match existing {
            None => {
                tx.execute(
                    "INSERT INTO commands (id, received_ms, command) VALUES (?1, ?2, ?3)",
                    params![id, now_ms(), fingerprint],
                )
                .map_err(sqlite(&path))?;
                Claim::New
            }
            Some((stored, _)) if stored != fingerprint => Claim::Conflict,
            Some((_, None)) => Claim::Running,
            Some((_, Some(response))) => Claim::Answered(response),
        };
        tx.commit().map_err(sqlite(&path))?;
        Ok(claim)
    }

    /// Forgets answered commands older than `keep_ms` beyond the newest `keep` of them, so the
    /// table stays bounded; a retry after that long runs as a new command.
    pub fn prune_commands(&mut self, keep: usize, keep_ms: i64) -> Result<usize> {
        self.conn
            .execute(
                "DELETE FROM commands WHERE response IS NOT NULL AND received_ms < ?1 AND id NOT IN \
                 (SELECT id FROM commands ORDER BY received_ms DESC, rowid DESC LIMIT ?2)",
                params![now_ms() - keep_ms, keep as i64],
            )
            .map_err(self.err())
    }

    pub fn answer_command(&mut self, id: &str, response: &str) -> Result<()> {
        self.conn
            .execute("UPDATE commands SET response = ?2 WHERE id = ?1", [id, response])
            .map(|_| ())
            .map_err(self.err())
    }

    /// Commands claimed but never answered (cut short by a crash); they get an error answer.
    pub fn unanswered_commands(&self) -> Result<Vec<String>> {
        let mut statement = self
            .conn
            .prepare("SELECT id FROM commands WHERE response IS NULL ORDER BY received_ms")
            .map_err(self.err())?;
        let rows = statement.query_map([], |row| row.get(0)).map_err(self.err())?;
        rows.collect::<rusqlite::Result<Vec<String>>>().map_err(self.err())
    }
}
