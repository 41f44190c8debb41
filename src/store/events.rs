//! The event outbox: every change's event, written in the change's transaction, kept until the
//! fleet broker acknowledged it.

use rusqlite::{Connection, TransactionBehavior, params};
use serde::Serialize;

use super::{Result, Store, now_ms, sqlite};
use crate::protocol::events::{Event, EventKind};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PendingEvent {
    pub id: i64,
    pub at_ms: i64,
    pub kind: String,
    pub payload: serde_json::Value,
}

/// Records `event` in the outbox; written with the change it describes, in the same transaction.
pub(super) fn insert_event(conn: &Connection, event: &Event) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO events (at_ms, kind, payload) VALUES (?1, ?2, ?3)",
        params![now_ms(), event.kind().as_str(), event.payload().to_string()],
    )?;
    Ok(conn.last_insert_rowid())
}

impl Store {
    pub fn push_event(&mut self, event: &Event) -> Result<i64> {
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
    pub fn last_event_of(&self, kinds: &[EventKind]) -> Result<Option<PendingEvent>> {
        let placeholders = vec!["?"; kinds.len()].join(", ");
        let clause = format!("WHERE kind IN ({placeholders}) ORDER BY id DESC LIMIT 1");
        let names = kinds.iter().map(|kind| kind.as_str());
        Ok(self.events_where(&clause, rusqlite::params_from_iter(names))?.pop())
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
            let dropped = Event::OutboxDropped { dropped: excess + 1, first_id: first, last_id: last, limit };
            insert_event(&tx, &dropped).map_err(sqlite(&path))?;
        }
        tx.execute(
            "DELETE FROM events WHERE delivered != 0 AND id < (SELECT COALESCE(MAX(id), 0) FROM events) - ?1",
            [limit as i64],
        )
        .map_err(sqlite(&path))?;
        tx.commit().map_err(sqlite(&path))?;
        Ok(if excess > 0 { excess + 1 } else { 0 })
    }
}
