//! Labelled samples: their split tensors, class, split (train or validation) and hash.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use super::events::insert_event;
use super::{Result, Store, StoreError, now_ms, sqlite};
use crate::protocol::events::Event;

/// Samples go either to training or to the validation split the safety gate scores on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
}

impl Split {
    pub fn as_str(self) -> &'static str {
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
    /// Who labelled it, where known (a console user).
    pub labelled_by: Option<&'a str>,
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

impl Store {
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
        event: impl Fn(&NewSample<'_>, i64, Split) -> Event,
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
                "INSERT INTO samples (sha256, class, split, origin, site, added_ms, image, features, labelled_by, bundle)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, (SELECT value FROM state WHERE key = 'bundle'))",
                params![
                    sample.sha256,
                    sample.class,
                    split.as_str(),
                    sample.origin,
                    sample.site,
                    now_ms(),
                    sample.image,
                    sample.features,
                    sample.labelled_by,
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

    /// Stored samples whose split tensors the current bundle made, in insertion order,
    /// optionally of one split only.
    pub fn samples(&self, split: Option<Split>) -> Result<Vec<StoredSample>> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT id, class, split, features FROM samples
                 WHERE (?1 IS NULL OR split = ?1) AND bundle IS (SELECT value FROM state WHERE key = 'bundle')
                 ORDER BY id",
            )
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

    /// Samples the current bundle can train on, per class: (train, validation).
    pub fn sample_counts(&self) -> Result<BTreeMap<String, (usize, usize)>> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT class, split, COUNT(*) FROM samples
                 WHERE bundle IS (SELECT value FROM state WHERE key = 'bundle') GROUP BY class, split",
            )
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
}
