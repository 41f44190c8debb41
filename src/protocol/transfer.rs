//! Artefacts sent to a device (a source bundle to deploy, a version to adopt): a manifest that
//! lists every chunk's SHA-256, offered in a signed `offer` command, and the chunks as raw
//! payloads on the device's `in/<transfer>/<index>` topics. A chunk is checked against the
//! signed manifest the moment it arrives, so a forged one is never stored; the device keeps
//! the chunks it has, so a transfer resumes after a disconnect or a restart by sending only
//! the missing ones.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::weights::PACKET_OVERHEAD;

pub const TRANSFER_SCHEMA: &str = "edgeadapt.transfer/1";

/// What an artefact is, and so what the device may do with it once complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtefactKind {
    /// A source bundle, as a tar archive of its folder.
    Bundle,
    /// A version's weights set (`weights` manifest in `meta`).
    Weights,
}

/// The signed description of an artefact in chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferManifest {
    pub schema: String,
    /// The first 32 hex digits of the payload's SHA-256: the same artefact is the same transfer.
    pub transfer: String,
    pub kind: ArtefactKind,
    /// For people: the bundle's name, or the device and version a weights set came from.
    pub name: String,
    pub total_bytes: u64,
    pub chunk_bytes: u64,
    /// Hex SHA-256 of each chunk, in order.
    pub chunk_sha256: Vec<String>,
    /// Hex SHA-256 of the whole payload.
    pub sha256: String,
    /// What the kind needs besides the bytes (a weights manifest, say).
    #[serde(default)]
    pub meta: serde_json::Value,
}

/// The manifest and chunks of `payload`, each chunk small enough for a packet of `max_packet`.
pub fn make<'a>(
    kind: ArtefactKind,
    name: &str,
    payload: &'a [u8],
    max_packet: usize,
    meta: serde_json::Value,
) -> (TransferManifest, Vec<&'a [u8]>) {
    let chunk_bytes = max_packet.saturating_sub(PACKET_OVERHEAD).max(1024);
    let chunks: Vec<&[u8]> = payload.chunks(chunk_bytes).collect();
    let sha256 = hex::encode(Sha256::digest(payload));
    let manifest = TransferManifest {
        schema: TRANSFER_SCHEMA.into(),
        transfer: sha256[..32].to_string(),
        kind,
        name: name.to_string(),
        total_bytes: payload.len() as u64,
        chunk_bytes: chunk_bytes as u64,
        chunk_sha256: chunks.iter().map(|c| hex::encode(Sha256::digest(c))).collect(),
        sha256,
        meta,
    };
    (manifest, chunks)
}

/// Bounds a device sets on what it accepts.
#[derive(Debug, Clone, Copy)]
pub struct TransferLimits {
    pub max_bytes: u64,
    /// The broker's packet limit: a larger chunk could never arrive.
    pub max_packet: usize,
}

impl TransferManifest {
    pub fn chunks(&self) -> usize {
        self.chunk_sha256.len()
    }

    /// Bytes chunk `index` must have.
    pub fn chunk_len(&self, index: usize) -> u64 {
        if index + 1 == self.chunks() {
            self.total_bytes - self.chunk_bytes * (self.chunks() as u64 - 1)
        } else {
            self.chunk_bytes
        }
    }

    /// Whether the manifest describes one consistent artefact within `limits`.
    pub fn check(&self, limits: &TransferLimits) -> Result<(), String> {
        if self.schema != TRANSFER_SCHEMA {
            return Err(format!("unknown transfer schema '{}', expected '{TRANSFER_SCHEMA}'", self.schema));
        }
        let hex_digest = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_digest(&self.sha256, 64) || self.transfer != self.sha256[..32] {
            return Err("the transfer id must be the first 32 hex digits of the payload's sha256".into());
        }
        if self.total_bytes == 0 || self.total_bytes > limits.max_bytes {
            return Err(format!("{} bytes: an artefact must have 1 to {} bytes", self.total_bytes, limits.max_bytes));
        }
        if self.chunk_bytes == 0 || self.chunk_bytes as usize + PACKET_OVERHEAD > limits.max_packet {
            return Err(format!(
                "chunks of {} bytes do not fit the broker's packet limit of {} bytes",
                self.chunk_bytes, limits.max_packet
            ));
        }
        if self.total_bytes.div_ceil(self.chunk_bytes) != self.chunks() as u64 {
            return Err(format!(
                "{} bytes in chunks of {} do not make {} chunks",
                self.total_bytes,
                self.chunk_bytes,
                self.chunks()
            ));
        }
        if let Some(bad) = self.chunk_sha256.iter().position(|s| !hex_digest(s, 64)) {
            return Err(format!("chunk {bad}'s sha256 is not 64 hex digits"));
        }
        if self.name.chars().count() > 200 {
            return Err("the name must be at most 200 characters".into());
        }
        Ok(())
    }

    /// Whether `bytes` is chunk `index`: in range, the right size and the listed SHA-256.
    pub fn verify_chunk(&self, index: usize, bytes: &[u8]) -> Result<(), String> {
        let Some(expected) = self.chunk_sha256.get(index) else {
            return Err(format!("chunk {index} of a transfer of {} chunks", self.chunks()));
        };
        if bytes.len() as u64 != self.chunk_len(index) {
            return Err(format!(
                "chunk {index} has {} bytes, the manifest says {}",
                bytes.len(),
                self.chunk_len(index)
            ));
        }
        if hex::encode(Sha256::digest(bytes)) != *expected {
            return Err(format!("chunk {index} does not match its sha256 in the signed manifest"));
        }
        Ok(())
    }

    /// The payload from its chunks in order, checked whole.
    pub fn assemble(&self, chunks: &[Vec<u8>]) -> Result<Vec<u8>, String> {
        if chunks.len() != self.chunks() {
            return Err(format!("{} of {} chunks", chunks.len(), self.chunks()));
        }
        let payload: Vec<u8> = chunks.concat();
        if hex::encode(Sha256::digest(&payload)) != self.sha256 {
            return Err("the assembled payload does not match the manifest's sha256".into());
        }
        Ok(payload)
    }
}

/// The chunk indices in `0..chunks` that are not in `have` (sorted), for the sender.
pub fn missing(chunks: usize, have: &[usize]) -> Vec<usize> {
    let mut present = vec![false; chunks];
    for &index in have {
        if let Some(slot) = present.get_mut(index) {
            *slot = true;
        }
    }
    present.iter().enumerate().filter(|(_, p)| !**p).map(|(i, _)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: TransferLimits = TransferLimits { max_bytes: 1 << 20, max_packet: 4096 };

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn chunks_verify_against_the_manifest_and_assemble_in_order() {
        let bytes = payload(10_000);
        let (manifest, chunks) = make(ArtefactKind::Bundle, "b", &bytes, 4096, serde_json::Value::Null);
        manifest.check(&LIMITS).unwrap();
        assert_eq!(manifest.chunks(), 3);
        assert_eq!(manifest.transfer.len(), 32);
        for (index, chunk) in chunks.iter().enumerate() {
            manifest.verify_chunk(index, chunk).unwrap();
        }
        let owned: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        assert_eq!(manifest.assemble(&owned).unwrap(), bytes);
        let mut swapped = owned.clone();
        swapped.swap(0, 1);
        assert!(manifest.assemble(&swapped).is_err());
    }

    #[test]
    fn a_forged_short_or_misplaced_chunk_is_refused_on_arrival() {
        let bytes = payload(10_000);
        let (manifest, chunks) = make(ArtefactKind::Weights, "w", &bytes, 4096, serde_json::Value::Null);
        let mut forged = chunks[1].to_vec();
        forged[10] ^= 1;
        assert!(manifest.verify_chunk(1, &forged).unwrap_err().contains("sha256"));
        assert!(manifest.verify_chunk(1, &chunks[1][..100]).unwrap_err().contains("bytes"));
        assert!(manifest.verify_chunk(0, chunks[1]).is_err(), "a chunk sent under another index");
        assert!(manifest.verify_chunk(3, chunks[2]).unwrap_err().contains("of a transfer of 3"));
    }

    #[test]
    fn an_inconsistent_or_oversized_manifest_is_refused() {
        let bytes = payload(10_000);
        let (manifest, _) = make(ArtefactKind::Bundle, "b", &bytes, 4096, serde_json::Value::Null);
        let refused = |change: &dyn Fn(&mut TransferManifest), phrase: &str| {
            let mut bad = manifest.clone();
            change(&mut bad);
            let error = bad.check(&LIMITS).unwrap_err();
            assert!(error.contains(phrase), "{phrase}: {error}");
        };
        refused(&|m| m.schema = "other/1".into(), "schema");
        refused(&|m| m.transfer = "0".repeat(32), "first 32 hex digits");
        refused(&|m| m.total_bytes = 2 << 20, "1 to");
        refused(&|m| m.chunk_bytes = 8192, "packet limit");
        refused(
            &|m| {
                m.chunk_sha256.pop();
            },
            "do not make",
        );
        refused(&|m| m.chunk_sha256[0] = "zz".into(), "64 hex digits");
        refused(&|m| m.name = "n".repeat(201), "200 characters");
    }

    #[test]
    fn missing_lists_what_the_sender_still_owes() {
        assert_eq!(missing(5, &[0, 2, 2, 4, 9]), vec![1, 3]);
        assert_eq!(missing(2, &[]), vec![0, 1]);
        assert!(missing(0, &[]).is_empty());
    }
}
