//! Recent classified images, kept for labelling on the console: each with its prediction, and a
//! thumbnail made later, off the classification path. Bounded by count and by bytes; the oldest
//! go first. A labelled or skipped image stays (greyed on the page) until it ages out.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::{Result, Store, now_ms, sqlite};

/// A classified image to keep.
#[derive(Debug, Clone)]
pub struct NewTrafficImage {
    /// File name or other description, for the page.
    pub name: String,
    pub predicted: String,
    pub confidence: f32,
    /// The top classes with their probabilities, best first.
    pub top: Vec<(String, f32)>,
    pub image: Vec<u8>,
}

/// A kept image without its bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrafficImage {
    pub id: i64,
    pub at_ms: i64,
    pub name: String,
    pub predicted: String,
    pub confidence: f32,
    pub top: Vec<(String, f32)>,
    pub bytes: i64,
    pub has_thumbnail: bool,
    /// A 64-bit difference hash of the thumbnail, for near-duplicates; `None` until made.
    #[serde(skip)]
    pub dhash: Option<u64>,
    /// The sample it became, once labelled, and that sample's class.
    pub sample: Option<i64>,
    pub label: Option<String>,
    pub skipped: bool,
}

/// How many images, and how many bytes of them, to keep at most.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeepImages {
    pub count: usize,
    pub bytes: u64,
}

const COLUMNS: &str = "id, at_ms, name, predicted, confidence, top, bytes, thumbnail IS NOT NULL, dhash, sample, \
                       skipped, (SELECT class FROM samples WHERE samples.id = traffic_images.sample)";

fn row_to_image(row: &rusqlite::Row<'_>) -> rusqlite::Result<TrafficImage> {
    let top: String = row.get(5)?;
    Ok(TrafficImage {
        id: row.get(0)?,
        at_ms: row.get(1)?,
        name: row.get(2)?,
        predicted: row.get(3)?,
        confidence: row.get(4)?,
        top: serde_json::from_str(&top).unwrap_or_default(),
        bytes: row.get(6)?,
        has_thumbnail: row.get(7)?,
        dhash: row.get::<_, Option<i64>>(8)?.map(|h| h as u64),
        sample: row.get(9)?,
        skipped: row.get::<_, i64>(10)? != 0,
        label: row.get(11)?,
    })
}

impl Store {
    /// Keeps `images`, then drops the oldest beyond `keep` (by count, then by bytes). An image
    /// larger than the whole byte budget is not kept, rather than pushing out every other.
    pub fn add_traffic_images(&mut self, images: &[NewTrafficImage], keep: KeepImages) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(sqlite(&path))?;
        let at = now_ms();
        for image in images.iter().filter(|image| image.image.len() as u64 <= keep.bytes) {
            tx.execute(
                "INSERT INTO traffic_images (at_ms, name, predicted, confidence, top, image, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    at,
                    image.name,
                    image.predicted,
                    image.confidence,
                    serde_json::to_string(&image.top).expect("pairs serialise"),
                    image.image,
                    image.image.len() as i64,
                ],
            )
            .map_err(sqlite(&path))?;
        }
        tx.execute(
            "DELETE FROM traffic_images WHERE id <= (SELECT COALESCE(MAX(id), 0) FROM traffic_images) - ?1",
            [keep.count as i64],
        )
        .map_err(sqlite(&path))?;
        // The newest rows whose running total of bytes fits stay.
        tx.execute(
            "DELETE FROM traffic_images WHERE id IN (
                 SELECT id FROM (SELECT id, SUM(bytes) OVER (ORDER BY id DESC) AS total FROM traffic_images)
                 WHERE total > ?1)",
            [keep.bytes.min(i64::MAX as u64) as i64],
        )
        .map_err(sqlite(&path))?;
        tx.commit().map_err(sqlite(&path))
    }

    /// Kept images, newest first, without their bytes.
    pub fn traffic_images(&self, limit: usize) -> Result<Vec<TrafficImage>> {
        let mut statement = self
            .conn
            .prepare(&format!("SELECT {COLUMNS} FROM traffic_images ORDER BY id DESC LIMIT ?1"))
            .map_err(self.err())?;
        let rows = statement.query_map([limit as i64], row_to_image).map_err(self.err())?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(self.err())
    }

    /// One kept image and its bytes; `None` once it has aged out.
    pub fn traffic_image(&self, id: i64) -> Result<Option<(TrafficImage, Vec<u8>)>> {
        self.conn
            .query_row(&format!("SELECT {COLUMNS}, image FROM traffic_images WHERE id = ?1"), [id], |row| {
                Ok((row_to_image(row)?, row.get(12)?))
            })
            .optional()
            .map_err(self.err())
    }

    /// A kept image's thumbnail; `None` when the image is gone or has none yet.
    pub fn traffic_thumbnail(&self, id: i64) -> Result<Option<Vec<u8>>> {
        let found: Option<Option<Vec<u8>>> = self
            .conn
            .query_row("SELECT thumbnail FROM traffic_images WHERE id = ?1", [id], |row| row.get(0))
            .optional()
            .map_err(self.err())?;
        Ok(found.flatten())
    }

    /// Up to `limit` images still without a thumbnail, oldest first, with their bytes.
    pub fn images_without_thumbnail(&self, limit: usize) -> Result<Vec<(i64, Vec<u8>)>> {
        let mut statement = self
            .conn
            .prepare("SELECT id, image FROM traffic_images WHERE thumbnail IS NULL ORDER BY id LIMIT ?1")
            .map_err(self.err())?;
        let rows = statement.query_map([limit as i64], |row| Ok((row.get(0)?, row.get(1)?))).map_err(self.err())?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(self.err())
    }

    /// Stores thumbnails (an image that failed to make one gets an empty one, so it is not
    /// tried again) with their difference hashes.
    pub fn set_thumbnails(&mut self, thumbnails: &[(i64, Vec<u8>, Option<u64>)]) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(sqlite(&path))?;
        for (id, thumbnail, dhash) in thumbnails {
            tx.execute(
                "UPDATE traffic_images SET thumbnail = ?2, dhash = ?3 WHERE id = ?1",
                params![id, thumbnail, dhash.map(|h| h as i64)],
            )
            .map_err(sqlite(&path))?;
        }
        tx.commit().map_err(sqlite(&path))
    }

    /// Records that a kept image became sample `sample`.
    pub fn mark_traffic_labelled(&mut self, id: i64, sample: i64) -> Result<()> {
        self.conn
            .execute("UPDATE traffic_images SET sample = ?2, skipped = 0 WHERE id = ?1", [id, sample])
            .map_err(self.err())?;
        Ok(())
    }

    /// Takes a kept image out of the labelling queue; `false` when it is gone.
    pub fn skip_traffic_image(&mut self, id: i64) -> Result<bool> {
        let changed = self
            .conn
            .execute("UPDATE traffic_images SET skipped = 1 WHERE id = ?1 AND sample IS NULL", [id])
            .map_err(self.err())?;
        Ok(changed > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, bytes: usize) -> NewTrafficImage {
        NewTrafficImage {
            name: name.into(),
            predicted: "A".into(),
            confidence: 0.5,
            top: vec![("A".into(), 0.5), ("B".into(), 0.3)],
            image: vec![7; bytes],
        }
    }

    fn names(store: &Store) -> Vec<String> {
        store.traffic_images(100).unwrap().into_iter().map(|i| i.name).collect()
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.db"), "b").unwrap();
        (dir, store)
    }

    #[test]
    fn the_newest_images_are_kept_by_count() {
        let (_dir, mut store) = open();
        let keep = KeepImages { count: 3, bytes: 1 << 20 };
        store.add_traffic_images(&[image("a", 10), image("b", 10)], keep).unwrap();
        store.add_traffic_images(&[image("c", 10), image("d", 10)], keep).unwrap();
        assert_eq!(names(&store), vec!["d", "c", "b"]);
    }

    #[test]
    fn the_newest_images_are_kept_by_bytes() {
        let (_dir, mut store) = open();
        let keep = KeepImages { count: 100, bytes: 250 };
        store.add_traffic_images(&[image("a", 100), image("b", 100), image("c", 100)], keep).unwrap();
        assert_eq!(names(&store), vec!["c", "b"]);
        store.add_traffic_images(&[image("huge", 300)], keep).unwrap();
        assert_eq!(names(&store), vec!["c", "b"], "an image over the whole budget is not kept");
    }

    #[test]
    fn an_image_keeps_its_prediction_gets_a_thumbnail_and_becomes_a_sample_or_is_skipped() {
        let (_dir, mut store) = open();
        store.add_traffic_images(&[image("a", 10), image("b", 10)], KeepImages { count: 10, bytes: 1 << 20 }).unwrap();
        let pending = store.images_without_thumbnail(10).unwrap();
        assert_eq!(pending.len(), 2);
        let (a, b) = (pending[0].0, pending[1].0);
        store.set_thumbnails(&[(a, vec![1, 2, 3], Some(u64::MAX))]).unwrap();
        assert_eq!(store.images_without_thumbnail(10).unwrap().len(), 1);
        assert_eq!(store.traffic_thumbnail(a).unwrap(), Some(vec![1, 2, 3]));
        assert_eq!(store.traffic_thumbnail(b).unwrap(), None);
        let (kept, bytes) = store.traffic_image(a).unwrap().unwrap();
        assert_eq!((kept.dhash, kept.top.len(), bytes.len()), (Some(u64::MAX), 2, 10));
        store.mark_traffic_labelled(a, 42).unwrap();
        assert!(!store.skip_traffic_image(a).unwrap(), "a labelled image is not skipped");
        assert!(store.skip_traffic_image(b).unwrap());
        let kept = store.traffic_images(10).unwrap();
        assert_eq!((kept[1].sample, kept[0].skipped), (Some(42), true));
        assert!(store.traffic_image(999).unwrap().is_none());
        assert!(!store.skip_traffic_image(999).unwrap());
    }
}
