//! Artefacts arriving in chunks (`protocol::transfer`): each offered manifest and the chunks
//! received so far, so that a transfer resumes after a disconnect or a restart. Chunks are
//! stored only after they matched the signed manifest. Bounded by bytes: the oldest
//! transfers make room for a new one.

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{Result, Store, StoreError, now_ms, sqlite};
use crate::protocol::transfer::TransferManifest;

impl Store {
    /// Records an offered transfer (again: a resumed one keeps its chunks; one whose manifest
    /// changed starts over) and returns the chunk indices it has. Older transfers are dropped
    /// until the offered ones fit in `max_bytes`.
    pub fn offer_transfer(&mut self, manifest: &TransferManifest, max_bytes: u64) -> Result<Vec<usize>> {
        let path = self.path.clone();
        let text = serde_json::to_string(manifest).expect("manifests serialise");
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(&path))?;
        let stored: Option<String> = tx
            .query_row("SELECT manifest FROM transfers WHERE transfer = ?1", [&manifest.transfer], |r| r.get(0))
            .optional()
            .map_err(sqlite(&path))?;
        if stored.as_deref() != Some(text.as_str()) {
            tx.execute("DELETE FROM transfer_chunks WHERE transfer = ?1", [&manifest.transfer])
                .map_err(sqlite(&path))?;
            tx.execute(
                "INSERT OR REPLACE INTO transfers (transfer, manifest, total_bytes, offered_ms) VALUES (?1, ?2, ?3, ?4)",
                params![manifest.transfer, text, manifest.total_bytes as i64, now_ms()],
            )
            .map_err(sqlite(&path))?;
        }
        // Make room: the oldest other transfers go first.
        loop {
            let total: i64 = tx
                .query_row("SELECT COALESCE(SUM(total_bytes), 0) FROM transfers", [], |r| r.get(0))
                .map_err(sqlite(&path))?;
            if total as u64 <= max_bytes {
                break;
            }
            let oldest: Option<String> = tx
                .query_row(
                    "SELECT transfer FROM transfers WHERE transfer != ?1 ORDER BY offered_ms, rowid LIMIT 1",
                    [&manifest.transfer],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sqlite(&path))?;
            let Some(oldest) = oldest else { break };
            tx.execute("DELETE FROM transfer_chunks WHERE transfer = ?1", [&oldest]).map_err(sqlite(&path))?;
            tx.execute("DELETE FROM transfers WHERE transfer = ?1", [&oldest]).map_err(sqlite(&path))?;
        }
        tx.commit().map_err(sqlite(&path))?;
        self.transfer_chunks_held(&manifest.transfer)
    }

    /// The manifest of an offered transfer.
    pub fn transfer_manifest(&self, transfer: &str) -> Result<Option<TransferManifest>> {
        let text: Option<String> = self
            .conn
            .query_row("SELECT manifest FROM transfers WHERE transfer = ?1", [transfer], |r| r.get(0))
            .optional()
            .map_err(self.err())?;
        text.map(|t| {
            serde_json::from_str(&t).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                problem: format!("transfer {transfer}: {e}"),
            })
        })
        .transpose()
    }

    /// Stores a chunk that matched its manifest (a repeat changes nothing).
    pub fn put_transfer_chunk(&mut self, transfer: &str, index: usize, bytes: &[u8]) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO transfer_chunks (transfer, idx, bytes) \
                 SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM transfers WHERE transfer = ?1)",
                params![transfer, index as i64, bytes],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// The chunk indices held for a transfer, in order.
    pub fn transfer_chunks_held(&self, transfer: &str) -> Result<Vec<usize>> {
        let mut statement = self
            .conn
            .prepare("SELECT idx FROM transfer_chunks WHERE transfer = ?1 ORDER BY idx")
            .map_err(self.err())?;
        let rows = statement.query_map([transfer], |r| r.get::<_, i64>(0)).map_err(self.err())?;
        rows.map(|r| r.map(|i| i as usize).map_err(self.err())).collect()
    }

    /// Every chunk of a transfer, in order.
    pub fn transfer_chunks(&self, transfer: &str) -> Result<Vec<Vec<u8>>> {
        let mut statement = self
            .conn
            .prepare("SELECT bytes FROM transfer_chunks WHERE transfer = ?1 ORDER BY idx")
            .map_err(self.err())?;
        let rows = statement.query_map([transfer], |r| r.get::<_, Vec<u8>>(0)).map_err(self.err())?;
        rows.map(|r| r.map_err(self.err())).collect()
    }

    /// Whether the transfer's assembled payload was checked whole (so it is not assembled again).
    /// One chunk of a transfer, if held.
    pub fn transfer_chunk(&self, transfer: &str, index: usize) -> Result<Option<Vec<u8>>> {
        self.conn
            .query_row(
                "SELECT bytes FROM transfer_chunks WHERE transfer = ?1 AND idx = ?2",
                rusqlite::params![transfer, index as i64],
                |row| row.get(0),
            )
            .optional()
            .map_err(self.err())
    }

    pub fn transfer_verified(&self, transfer: &str) -> Result<bool> {
        let verified: Option<bool> = self
            .conn
            .query_row("SELECT verified FROM transfers WHERE transfer = ?1", [transfer], |r| r.get(0))
            .optional()
            .map_err(self.err())?;
        Ok(verified.unwrap_or(false))
    }

    /// Records that the transfer's assembled payload matched its manifest.
    pub fn mark_transfer_verified(&mut self, transfer: &str) -> Result<()> {
        self.conn.execute("UPDATE transfers SET verified = 1 WHERE transfer = ?1", [transfer]).map_err(self.err())?;
        Ok(())
    }

    /// Forgets a transfer and its chunks.
    pub fn drop_transfer(&mut self, transfer: &str) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(sqlite(&path))?;
        tx.execute("DELETE FROM transfer_chunks WHERE transfer = ?1", [transfer]).map_err(sqlite(&path))?;
        tx.execute("DELETE FROM transfers WHERE transfer = ?1", [transfer]).map_err(sqlite(&path))?;
        tx.commit().map_err(sqlite(&path))
    }
}

#[cfg(test)]
mod tests {
    use crate::protocol::transfer::{ArtefactKind, make};
    use crate::store::Store;

    #[test]
    fn chunks_survive_a_reopen_and_old_transfers_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let first = vec![1u8; 5000];
        let (manifest, chunks) = make(ArtefactKind::Bundle, "a", &first, 2048, serde_json::Value::Null);
        {
            let mut store = Store::open(&path, "b").unwrap();
            assert!(store.offer_transfer(&manifest, 1 << 20).unwrap().is_empty());
            store.put_transfer_chunk(&manifest.transfer, 2, chunks[2]).unwrap();
            store.put_transfer_chunk(&manifest.transfer, 0, chunks[0]).unwrap();
            store.put_transfer_chunk(&manifest.transfer, 0, chunks[0]).unwrap();
            store.put_transfer_chunk("unknown", 0, chunks[0]).unwrap();
        }
        let mut store = Store::open(&path, "b").unwrap();
        assert_eq!(store.offer_transfer(&manifest, 1 << 20).unwrap(), vec![0, 2], "resumed");
        assert_eq!(store.transfer_manifest(&manifest.transfer).unwrap().as_ref(), Some(&manifest));
        assert!(store.transfer_manifest("unknown").unwrap().is_none());
        assert_eq!(chunks.len(), 4);
        store.put_transfer_chunk(&manifest.transfer, 1, chunks[1]).unwrap();
        store.put_transfer_chunk(&manifest.transfer, 3, chunks[3]).unwrap();
        assert_eq!(manifest.assemble(&store.transfer_chunks(&manifest.transfer).unwrap()).unwrap(), first);
        assert!(!store.transfer_verified(&manifest.transfer).unwrap());
        store.mark_transfer_verified(&manifest.transfer).unwrap();
        assert!(store.transfer_verified(&manifest.transfer).unwrap());
        assert_eq!(store.offer_transfer(&manifest, 1 << 20).unwrap().len(), 4, "a repeated offer keeps it verified");
        assert!(store.transfer_verified(&manifest.transfer).unwrap());

        // A second transfer that does not fit beside the first pushes it out.
        let second = vec![2u8; 5000];
        let (other, _) = make(ArtefactKind::Weights, "b", &second, 2048, serde_json::Value::Null);
        assert!(store.offer_transfer(&other, 8000).unwrap().is_empty());
        assert!(store.transfer_manifest(&manifest.transfer).unwrap().is_none());
        assert!(store.transfer_chunks_held(&manifest.transfer).unwrap().is_empty());
        store.drop_transfer(&other.transfer).unwrap();
        assert!(store.transfer_manifest(&other.transfer).unwrap().is_none());
    }
}
