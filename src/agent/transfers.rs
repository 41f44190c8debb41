//! Artefacts the fleet sends in chunks (`protocol::transfer`): an offer records the manifest
//! and says which chunks are still needed; each chunk is checked against the manifest before
//! it is stored. A complete transfer is checked whole.

use super::{Agent, AgentError};
use crate::protocol::transfer::{TransferLimits, TransferManifest, missing};

/// Missing chunk indices an answer lists at most (the sender asks again after sending them).
const LISTED_MISSING: usize = 512;

impl Agent {
    /// Records an offer (or a resumed one); answers with what is still missing.
    pub fn offer(&mut self, manifest: &TransferManifest, limits: &TransferLimits) -> Result<serde_json::Value, String> {
        manifest.check(limits).map_err(|e| format!("offer: {e}"))?;
        let held = self.store().offer_transfer(manifest, limits.max_bytes).map_err(|e| e.to_string())?;
        let missing = missing(manifest.chunks(), &held);
        // Checked whole once: a repeated offer of a complete transfer does not assemble it again.
        if missing.is_empty() && !self.store().transfer_verified(&manifest.transfer).map_err(|e| e.to_string())? {
            let chunks = self.store().transfer_chunks(&manifest.transfer).map_err(|e| e.to_string())?;
            if let Err(problem) = manifest.assemble(&chunks) {
                self.store().drop_transfer(&manifest.transfer).map_err(|e| e.to_string())?;
                return Err(format!("offer: transfer {}: {problem}; it starts over", manifest.transfer));
            }
            self.store().mark_transfer_verified(&manifest.transfer).map_err(|e| e.to_string())?;
        }
        Ok(serde_json::json!({
            "transfer": manifest.transfer,
            "kind": manifest.kind,
            "chunks": manifest.chunks(),
            "received": held.len(),
            "missing": missing.iter().take(LISTED_MISSING).collect::<Vec<_>>(),
            "complete": missing.is_empty(),
        }))
    }

    /// Stores one chunk of an offered transfer if it is the one the manifest lists.
    pub fn store_chunk(&mut self, transfer: &str, index: usize, bytes: &[u8]) -> Result<(), AgentError> {
        let Some(manifest) = self.store().transfer_manifest(transfer)? else {
            return Err(AgentError::Input(format!("a chunk of transfer {transfer}, which no offer announced")));
        };
        manifest.verify_chunk(index, bytes).map_err(AgentError::Input)?;
        self.store().put_transfer_chunk(transfer, index, bytes)?;
        Ok(())
    }
}
