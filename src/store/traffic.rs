//! Unlabelled traffic rows: split tensors of classified images, for prior matching.

use rusqlite::params;

use super::{Result, Store, now_ms, sqlite};

impl Store {
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
}
