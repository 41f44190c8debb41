//! Keeping recent classified images for the console: written out each second, and given a
//! thumbnail and a difference hash in the background, away from classification.

use crate::imaging::DecodeLimits;
use crate::imaging::thumbnail::thumbnail;

use super::super::AgentError;
use super::super::shared::Shared;

/// Thumbnails made per housekeeping tick, at most: a burst of traffic is caught up over a few
/// seconds instead of holding a core.
const THUMBNAILS_PER_TICK: usize = 32;

/// Writes buffered images to the store and makes thumbnails for those without one. The
/// agent's lock is held only to read and write the store, not while decoding.
pub fn keep_recent_images(shared: &Shared) -> Result<(), AgentError> {
    let todo = {
        let mut agent = shared.lock();
        agent.flush_images()?;
        agent.store().images_without_thumbnail(THUMBNAILS_PER_TICK)?
    };
    if todo.is_empty() {
        return Ok(());
    }
    let limits = DecodeLimits::default();
    let made: Vec<(i64, Vec<u8>, Option<u64>)> = todo
        .into_iter()
        .map(|(id, bytes)| match thumbnail(&format!("recent image {id}"), &bytes, &limits) {
            Ok((preview, hash)) => (id, preview, Some(hash)),
            Err(error) => {
                // It was classified, so it decoded once; an empty preview keeps it from being
                // tried again, and the page shows the full image instead.
                tracing::debug!(%error, "no preview");
                (id, Vec::new(), None)
            }
        })
        .collect();
    shared.lock().store().set_thumbnails(&made)?;
    Ok(())
}
