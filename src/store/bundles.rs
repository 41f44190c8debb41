//! Which bundle the store serves. A deployment switches it in one transaction: the bundle, the
//! folder it is in, the promoted version (each bundle keeps its own), the probation, and the
//! event. Samples and versions name the bundle whose trunk made them, so a switch never mixes
//! one trunk's split tensors with another's.

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::events::insert_event;
use super::{Result, Store, StoreError, sqlite};
use crate::protocol::events::Event;

/// A switch to another bundle.
#[derive(Debug, Clone)]
pub struct BundleSwitch<'a> {
    pub bundle: &'a str,
    /// The folder under the data folder's `bundles/`, or `None` for the configured bundle.
    pub dir: Option<&'a str>,
    /// The deployment's probation (JSON) while the new bundle proves itself, or `None`.
    pub probation: Option<&'a str>,
}

impl Store {
    /// A state value read without opening the store for writing (`None` if there is no store
    /// or it cannot be read): which bundle an agent serves, for commands that only look.
    pub fn peek_state(path: &std::path::Path, key: &str) -> Option<String> {
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = rusqlite::Connection::open_with_flags(path, flags).ok()?;
        conn.query_row("SELECT value FROM state WHERE key = ?1", [key], |row| row.get(0)).optional().ok()?
    }

    /// The bundle the store serves (`None` only for a store made by an older build before its
    /// first open).
    pub fn bundle(&self) -> Result<Option<String>> {
        self.state("bundle")
    }

    /// The deployed folder the served bundle is in; `None`: the configured bundle.
    pub fn bundle_dir(&self) -> Result<Option<String>> {
        self.state("bundle_dir")
    }

    /// [`Store::claim_bundle`] for a bundle that earlier releases named `legacy_id`: a store
    /// they made is renamed to `bundle_id` (its samples, versions and promoted versions too).
    pub fn claim_bundle_named(&mut self, bundle_id: &str, legacy_id: &str) -> Result<()> {
        if self.state("bundle")?.as_deref() == Some(legacy_id) && legacy_id != bundle_id {
            let path = self.path.clone();
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(&path))?;
            for statement in [
                "UPDATE state SET value = ?1 WHERE key = 'bundle' AND value = ?2",
                "UPDATE samples SET bundle = ?1 WHERE bundle = ?2",
                "UPDATE versions SET bundle = ?1 WHERE bundle = ?2",
            ] {
                tx.execute(statement, params![bundle_id, legacy_id]).map_err(sqlite(&path))?;
            }
            tx.commit().map_err(sqlite(&path))?;
        }
        self.claim_bundle(bundle_id)
    }

    /// Checks that the store serves `bundle_id` (claiming a new store for it).
    pub fn claim_bundle(&mut self, bundle_id: &str) -> Result<()> {
        match self.state("bundle")? {
            Some(stored) if stored != bundle_id => {
                Err(StoreError::OtherBundle { path: self.path.clone(), stored, wanted: bundle_id.into() })
            }
            Some(_) => Ok(()),
            None => {
                self.set_state("bundle", bundle_id)?;
                let path = self.path.clone();
                self.conn
                    .execute("UPDATE samples SET bundle = ?1 WHERE bundle IS NULL", [bundle_id])
                    .and_then(|_| {
                        self.conn
                            .execute("UPDATE versions SET bundle = ?1 WHERE bundle IS NULL AND id > 0", [bundle_id])
                    })
                    .map(|_| ())
                    .map_err(sqlite(&path))
            }
        }
    }

    /// Serves another bundle from now on. The promoted version of the bundle left is kept for
    /// a switch back; the one of the bundle taken is restored (the source if it has none).
    /// Unlabelled traffic goes: its split tensors are the old trunk's.
    pub fn switch_bundle(&mut self, switch: &BundleSwitch<'_>, event: &Event) -> Result<()> {
        let path = self.path.clone();
        let left = self.bundle()?.unwrap_or_default();
        let promoted = self.promoted()?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(&path))?;
        let upsert = "INSERT INTO state (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2";
        let restored: Option<String> = tx
            .query_row("SELECT value FROM state WHERE key = ?1", [format!("promoted@{}", switch.bundle)], |row| {
                row.get(0)
            })
            .optional()
            .map_err(sqlite(&path))?;
        tx.execute(upsert, params![format!("promoted@{left}"), promoted.to_string()]).map_err(sqlite(&path))?;
        tx.execute(upsert, params!["promoted", restored.unwrap_or_else(|| "0".into())]).map_err(sqlite(&path))?;
        tx.execute(upsert, params!["bundle", switch.bundle]).map_err(sqlite(&path))?;
        for (key, value) in [("bundle_dir", switch.dir), ("probation", switch.probation)] {
            match value {
                Some(value) => tx.execute(upsert, params![key, value]),
                None => tx.execute("DELETE FROM state WHERE key = ?1", [key]),
            }
            .map_err(sqlite(&path))?;
        }
        tx.execute("DELETE FROM traffic", []).map_err(sqlite(&path))?;
        insert_event(&tx, event).map_err(sqlite(&path))?;
        tx.commit().map_err(sqlite(&path))
    }

    /// The deployment in probation (JSON), if any.
    pub fn probation(&self) -> Result<Option<String>> {
        self.state("probation")
    }

    /// Replaces (or, with `None`, ends) the probation, with its event.
    pub fn set_probation(&mut self, probation: Option<&str>, event: Option<&Event>) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(&path))?;
        match probation {
            Some(value) => tx.execute(
                "INSERT INTO state (key, value) VALUES ('probation', ?1) ON CONFLICT (key) DO UPDATE SET value = ?1",
                [value],
            ),
            None => tx.execute("DELETE FROM state WHERE key = 'probation'", []),
        }
        .map_err(sqlite(&path))?;
        if let Some(event) = event {
            insert_event(&tx, event).map_err(sqlite(&path))?;
        }
        tx.commit().map_err(sqlite(&path))
    }

    /// Up to `limit` samples whose split tensors another bundle made and whose image is kept:
    /// (id, image).
    pub fn samples_to_reextract(&self, limit: usize) -> Result<Vec<(i64, Vec<u8>)>> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT id, image FROM samples WHERE image IS NOT NULL
                 AND bundle IS NOT (SELECT value FROM state WHERE key = 'bundle') ORDER BY id LIMIT ?1",
            )
            .map_err(self.err())?;
        let rows = statement.query_map([limit as i64], |row| Ok((row.get(0)?, row.get(1)?))).map_err(self.err())?;
        rows.collect::<std::result::Result<_, _>>().map_err(self.err())
    }

    /// Gives samples the current bundle's split tensors, in one transaction.
    pub fn set_sample_features(&mut self, rows: &[(i64, Vec<u8>)]) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite(&path))?;
        for (id, features) in rows {
            tx.execute(
                "UPDATE samples SET features = ?1, bundle = (SELECT value FROM state WHERE key = 'bundle') WHERE id = ?2",
                params![features, id],
            )
            .map_err(sqlite(&path))?;
        }
        tx.commit().map_err(sqlite(&path))
    }

    /// Samples another bundle made without a kept image: their labels cannot train this one.
    pub fn samples_of_other_bundles(&self) -> Result<usize> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM samples WHERE image IS NULL
                 AND bundle IS NOT (SELECT value FROM state WHERE key = 'bundle')",
                [],
                |row| row.get::<_, i64>(0),
            )
            .map(|n| n as usize)
            .map_err(self.err())
    }

    /// Images a new bundle is shadowed on, newest first: up to `limit` labelled samples with a
    /// kept image (with their class) and up to `limit` unlabelled recent traffic images.
    pub fn shadow_images(&self, limit: usize) -> Result<Vec<ShadowImage>> {
        let mut images = Vec::new();
        for (query, labelled) in [
            ("SELECT id, class FROM samples WHERE image IS NOT NULL ORDER BY id DESC LIMIT ?1", true),
            ("SELECT id, NULL FROM traffic_images WHERE sample IS NULL ORDER BY id DESC LIMIT ?1", false),
        ] {
            let mut statement = self.conn.prepare(query).map_err(self.err())?;
            let rows = statement
                .query_map([limit as i64], |row| {
                    let id = row.get(0)?;
                    Ok(if labelled {
                        ShadowImage::Sample { id, label: row.get(1)? }
                    } else {
                        ShadowImage::Traffic { id }
                    })
                })
                .map_err(self.err())?;
            for row in rows {
                images.push(row.map_err(self.err())?);
            }
        }
        Ok(images)
    }

    /// The bytes of a shadow image; `None` if it went meanwhile.
    pub fn shadow_image_bytes(&self, image: &ShadowImage) -> Result<Option<Vec<u8>>> {
        let (query, id) = match image {
            ShadowImage::Sample { id, .. } => ("SELECT image FROM samples WHERE id = ?1", id),
            ShadowImage::Traffic { id } => ("SELECT image FROM traffic_images WHERE id = ?1", id),
        };
        self.conn.query_row(query, [id], |row| row.get(0)).optional().map_err(self.err())
    }
}

/// An image to shadow a new bundle on.
#[derive(Debug, Clone, PartialEq)]
pub enum ShadowImage {
    Sample { id: i64, label: String },
    Traffic { id: i64 },
}

impl ShadowImage {
    pub fn label(&self) -> Option<&str> {
        match self {
            ShadowImage::Sample { label, .. } => Some(label),
            ShadowImage::Traffic { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewSample, NewVersion, Split, VersionStatus};

    fn deployed(transfer: &str) -> Event {
        use crate::protocol::events::{DeploymentState, DeploymentStep};
        Event::Deployment(DeploymentStep {
            transfer: transfer.into(),
            bundle: "b".into(),
            state: DeploymentState::Switched,
            detail: serde_json::Value::Null,
        })
    }

    fn add_sample(store: &mut Store, sha: &str, image: Option<&[u8]>) {
        let sample = NewSample {
            sha256: sha,
            class: "A",
            origin: "test",
            site: None,
            labelled_by: None,
            image,
            features: &[1, 2],
        };
        store.insert_samples(&[sample], |_| Split::Train, |_, _, _| deployed("x")).unwrap();
    }

    fn add_version(store: &mut Store) -> i64 {
        let json = serde_json::json!({});
        let version = NewVersion {
            parent: 0,
            method: "m",
            params: &json,
            sample_set: &json,
            metrics: &json,
            status: VersionStatus::Promoted,
            reasons: &[],
            weights: &[1, 2, 3],
            last_sample_id: 0,
        };
        store.insert_version(&version, |_| vec![]).unwrap()
    }

    #[test]
    fn each_bundle_keeps_its_own_samples_versions_and_promoted_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db"), "old").unwrap();
        add_sample(&mut store, "kept", Some(b"png"));
        add_sample(&mut store, "lost", None);
        let version = add_version(&mut store);
        store.add_traffic(&[vec![9u8; 4]], 10).unwrap();
        let switch = BundleSwitch { bundle: "new", dir: Some("new-00"), probation: Some("{}") };
        store.switch_bundle(&switch, &deployed("t")).unwrap();

        assert_eq!(
            (store.bundle().unwrap().unwrap(), store.bundle_dir().unwrap()),
            ("new".into(), Some("new-00".into()))
        );
        assert_eq!(store.promoted().unwrap(), 0, "the new bundle starts from its source");
        assert!(store.samples(None).unwrap().is_empty(), "the old trunk's split tensors are not the new one's");
        assert_eq!(store.versions().unwrap().len(), 1, "only the source");
        assert!(matches!(store.promote(version, &deployed("t")), Err(StoreError::OtherBundleVersion { .. })));
        assert!(store.traffic().unwrap().is_empty());
        assert_eq!(store.probation().unwrap().as_deref(), Some("{}"));
        let to_redo = store.samples_to_reextract(10).unwrap();
        assert_eq!(to_redo.len(), 1);
        assert_eq!(store.samples_of_other_bundles().unwrap(), 1);
        store.set_sample_features(&[(to_redo[0].0, vec![5, 6])]).unwrap();
        assert_eq!(store.samples(None).unwrap()[0].features, vec![5, 6]);
        assert!(store.samples_to_reextract(10).unwrap().is_empty());

        let back = BundleSwitch { bundle: "old", dir: None, probation: None };
        store.switch_bundle(&back, &deployed("t")).unwrap();
        assert_eq!(store.promoted().unwrap(), version, "switching back serves what was served before");
        assert_eq!(store.bundle_dir().unwrap(), None);
        assert_eq!(store.probation().unwrap(), None);
        assert_eq!(store.samples(None).unwrap().len(), 1, "the sample never re-extracted is the old bundle's still");
    }

    #[test]
    fn a_new_bundle_is_shadowed_on_labelled_and_traffic_images() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db"), "b").unwrap();
        add_sample(&mut store, "with image", Some(b"png"));
        add_sample(&mut store, "without", None);
        let traffic = crate::store::NewTrafficImage {
            name: "cam.png".into(),
            predicted: "A".into(),
            confidence: 0.9,
            top: vec![],
            image: b"jpg".to_vec(),
        };
        store.add_traffic_images(&[traffic], crate::store::KeepImages { count: 10, bytes: 1 << 20 }).unwrap();
        let images = store.shadow_images(10).unwrap();
        assert_eq!(images.len(), 2, "{images:?}");
        assert_eq!(images[0].label(), Some("A"));
        assert_eq!(images[1].label(), None);
        assert_eq!(store.shadow_image_bytes(&images[1]).unwrap().as_deref(), Some(&b"jpg"[..]));
    }

    #[test]
    fn a_store_an_earlier_release_named_its_bundle_in_is_renamed_with_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let mut store = Store::open(&path, "m@legacy").unwrap();
        add_sample(&mut store, "s", None);
        add_version(&mut store);
        drop(store);
        let mut store = Store::open_any(&path).unwrap();
        store.claim_bundle_named("m@new", "m@legacy").unwrap();
        assert_eq!(store.bundle().unwrap().as_deref(), Some("m@new"));
        assert_eq!(store.samples(None).unwrap().len(), 1);
        assert_eq!(store.versions().unwrap().len(), 2);
        assert!(matches!(store.claim_bundle_named("m@other", "m@legacy2"), Err(StoreError::OtherBundle { .. })));
    }

    #[test]
    fn a_store_is_read_without_being_opened_for_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        assert_eq!(Store::peek_state(&path, "bundle"), None, "no store");
        assert!(!path.exists(), "and none is made");
        drop(Store::open(&path, "b1").unwrap());
        assert_eq!(Store::peek_state(&path, "bundle").as_deref(), Some("b1"));
    }
}
