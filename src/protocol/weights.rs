//! Weights sets over MQTT: a version's changed parameters as f16 safetensors, split into chunks
//! that fit the broker's packet limit, with a manifest to reassemble and verify them.

use sha2::{Digest, Sha256};

use super::messages::{TensorInfo, WEIGHTS_SCHEMA, WeightsManifest};
use crate::model::tensors::{StoredAs, TensorFile, to_safetensors};

/// Room left in each packet for the fixed header and the topic.
pub const PACKET_OVERHEAD: usize = 512;
/// The packet limit when none is configured (`mqtt.max_packet_bytes`).
pub const DEFAULT_MAX_PACKET_BYTES: usize = 256 * 1024;

/// Converts stored (f32) weights to f16 safetensors for sending.
pub fn to_f16(stored: &[u8]) -> Result<(Vec<u8>, Vec<TensorInfo>), String> {
    let file = TensorFile::parse("stored weights", stored).map_err(|e| e.to_string())?;
    let mut arrays = Vec::new();
    for name in file.names() {
        let rank = file.shape(name).map(|s| s.len()).unwrap_or(0);
        arrays.push((name.to_string(), file.finite(name, rank).map_err(|e| e.to_string())?));
    }
    let tensors: Vec<TensorInfo> =
        arrays.iter().map(|(name, a)| TensorInfo { name: name.clone(), shape: a.shape().to_vec() }).collect();
    let refs: Vec<(&str, &ndarray::ArrayD<f32>, StoredAs)> =
        arrays.iter().map(|(n, a)| (n.as_str(), a, StoredAs::F16)).collect();
    Ok((to_safetensors(&refs)?, tensors))
}

/// The manifest and chunks of `payload`, each chunk at most `max_packet - PACKET_OVERHEAD` bytes.
pub fn chunk(
    payload: &[u8],
    max_packet: usize,
    describe: impl FnOnce(usize, usize, String) -> WeightsManifest,
) -> (WeightsManifest, Vec<&[u8]>) {
    let chunk_bytes = max_packet.saturating_sub(PACKET_OVERHEAD).max(1024);
    let chunks: Vec<&[u8]> = payload.chunks(chunk_bytes).collect();
    let manifest = describe(chunk_bytes, chunks.len(), hex::encode(Sha256::digest(payload)));
    (manifest, chunks)
}

/// Collects chunks of one weights set in any order.
#[derive(Debug, Clone)]
pub struct Reassembly {
    pub manifest: WeightsManifest,
    parts: Vec<Option<Vec<u8>>>,
}

impl Reassembly {
    pub fn new(manifest: WeightsManifest) -> Result<Reassembly, String> {
        if manifest.schema != WEIGHTS_SCHEMA {
            return Err(format!("unknown weights schema '{}'", manifest.schema));
        }
        if manifest.chunks == 0 || manifest.chunks > 100_000 || manifest.total_bytes > 1 << 31 {
            return Err(format!(
                "implausible weights manifest: {} chunks, {} bytes",
                manifest.chunks, manifest.total_bytes
            ));
        }
        // The chunking must be the one `chunk` produces, so every chunk's size is known and a
        // sender cannot make the receiver hold more than `total_bytes`.
        if manifest.chunk_bytes == 0 || manifest.total_bytes.div_ceil(manifest.chunk_bytes) != manifest.chunks {
            return Err(format!(
                "inconsistent weights manifest: {} bytes in chunks of {} do not make {} chunks",
                manifest.total_bytes, manifest.chunk_bytes, manifest.chunks
            ));
        }
        if manifest.dtype != "f16" {
            return Err(format!("weights dtype '{}' is not supported (f16 expected)", manifest.dtype));
        }
        Ok(Reassembly { parts: vec![None; manifest.chunks], manifest })
    }

    pub fn add(&mut self, index: usize, bytes: Vec<u8>) -> Result<(), String> {
        let manifest = &self.manifest;
        let expected = if index == manifest.chunks - 1 {
            manifest.total_bytes - manifest.chunk_bytes * (manifest.chunks - 1)
        } else {
            manifest.chunk_bytes
        };
        let slot =
            self.parts.get_mut(index).ok_or_else(|| format!("chunk {index} of a set of {} chunks", manifest.chunks))?;
        if bytes.len() != expected {
            return Err(format!("chunk {index} has {} bytes, the manifest says {expected}", bytes.len()));
        }
        *slot = Some(bytes);
        Ok(())
    }

    pub fn missing(&self) -> usize {
        self.parts.iter().filter(|p| p.is_none()).count()
    }

    /// The whole payload once every chunk is in, its size and sha256 match the manifest, and it
    /// holds exactly the manifest's tensors with their shapes and dtype.
    pub fn finish(&self) -> Option<Result<Vec<u8>, String>> {
        self.assemble()
            .map(|assembled| assembled.and_then(|payload| matches_manifest(&payload, &self.manifest).map(|()| payload)))
    }

    /// The payload's bytes once every chunk is in and their size and sha256 match the manifest,
    /// before its contents are checked.
    pub fn assemble(&self) -> Option<Result<Vec<u8>, String>> {
        if self.missing() > 0 {
            return None;
        }
        let payload: Vec<u8> = self.parts.iter().flatten().flatten().copied().collect();
        if payload.len() != self.manifest.total_bytes {
            return Some(Err(format!(
                "{} bytes received, the manifest says {}",
                payload.len(),
                self.manifest.total_bytes
            )));
        }
        let sha = hex::encode(Sha256::digest(&payload));
        if sha != self.manifest.sha256 {
            return Some(Err(format!("sha256 {sha} does not match the manifest's {}", self.manifest.sha256)));
        }
        Some(Ok(payload))
    }
}

/// Checks that the payload holds exactly the manifest's tensors, with its shapes and dtype.
pub fn matches_manifest(payload: &[u8], manifest: &WeightsManifest) -> Result<(), String> {
    let file = safetensors::SafeTensors::deserialize(payload).map_err(|e| format!("weights payload: {e}"))?;
    let mut found: Vec<(String, Vec<usize>, safetensors::Dtype)> =
        file.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec(), view.dtype())).collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut declared: Vec<&TensorInfo> = manifest.tensors.iter().collect();
    declared.sort_by(|a, b| a.name.cmp(&b.name));
    if found.len() != declared.len() || found.iter().zip(&declared).any(|(f, d)| f.0 != d.name) {
        let names: Vec<&str> = found.iter().map(|f| f.0.as_str()).collect();
        let listed: Vec<&str> = declared.iter().map(|d| d.name.as_str()).collect();
        return Err(format!("the payload holds tensors {names:?}, the manifest lists {listed:?}"));
    }
    for ((name, shape, dtype), info) in found.iter().zip(declared) {
        if *shape != info.shape {
            return Err(format!("tensor '{name}' has shape {shape:?}, the manifest says {:?}", info.shape));
        }
        if *dtype != safetensors::Dtype::F16 {
            return Err(format!("tensor '{name}' is {dtype:?}, the manifest says f16"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn manifest(chunk_bytes: usize, chunks: usize, sha256: String, total: usize) -> WeightsManifest {
        WeightsManifest {
            schema: WEIGHTS_SCHEMA.into(),
            device: "d".into(),
            version: 3,
            parent: Some(0),
            method: "recommended".into(),
            bundle: "b".into(),
            dtype: "f16".into(),
            tensors: vec![],
            params: serde_json::json!({}),
            total_bytes: total,
            chunk_bytes,
            chunks,
            sha256,
        }
    }

    #[test]
    fn f16_halves_the_bytes_and_chunks_reassemble_in_any_order() {
        let weight = Array2::from_shape_fn((64, 100), |(i, j)| (i as f32 - j as f32) / 64.0).into_dyn();
        let stored = to_safetensors(&[("slot.0", &weight, StoredAs::F32)]).unwrap();
        let (payload, tensors) = to_f16(&stored).unwrap();
        assert_eq!(tensors, vec![TensorInfo { name: "slot.0".into(), shape: vec![64, 100] }]);
        assert!(payload.len() < stored.len() / 2 + 200, "{} vs {}", payload.len(), stored.len());
        let total = payload.len();
        let (mut manifest, chunks) = chunk(&payload, 2048, |bytes, n, sha| manifest(bytes, n, sha, total));
        manifest.tensors = tensors.clone();
        assert!(chunks.len() > 1 && chunks.iter().all(|c| c.len() <= 2048 - PACKET_OVERHEAD));
        // A manifest whose shapes or tensors do not describe the payload is caught at the end.
        let mut lying = manifest.clone();
        lying.tensors[0].shape = vec![100, 64];
        let mut wrong = Reassembly::new(lying).unwrap();
        for (index, part) in chunks.iter().enumerate() {
            wrong.add(index, part.to_vec()).unwrap();
        }
        assert!(wrong.finish().unwrap().unwrap_err().contains("shape"));
        let mut reassembly = Reassembly::new(manifest).unwrap();
        for (index, part) in chunks.iter().enumerate().rev() {
            assert!(reassembly.finish().is_none());
            reassembly.add(index, part.to_vec()).unwrap();
        }
        let received = reassembly.finish().unwrap().unwrap();
        let file = TensorFile::parse("received", &received).unwrap();
        let back = file.finite("slot.0", 2).unwrap();
        assert!(back.iter().zip(weight.iter()).all(|(a, b)| (a - b).abs() <= b.abs() / 1024.0 + 1e-4));
    }

    #[test]
    fn a_damaged_chunk_or_wrong_index_is_detected() {
        let payload = vec![7u8; 5000];
        let (manifest, chunks) = chunk(&payload, 2048, |bytes, n, sha| manifest(bytes, n, sha, 5000));
        let mut inconsistent = manifest.clone();
        inconsistent.chunks = 1000;
        assert!(Reassembly::new(inconsistent).unwrap_err().contains("inconsistent"));
        let mut other_dtype = manifest.clone();
        other_dtype.dtype = "f32".into();
        assert!(Reassembly::new(other_dtype).is_err());
        let mut reassembly = Reassembly::new(manifest).unwrap();
        assert!(reassembly.add(99, vec![]).is_err());
        assert!(reassembly.add(0, vec![0; 10_000]).unwrap_err().contains("bytes"), "an oversized chunk is refused");
        for (index, part) in chunks.iter().enumerate() {
            let mut part = part.to_vec();
            if index == 1 {
                part[0] ^= 1;
            }
            reassembly.add(index, part).unwrap();
        }
        assert!(reassembly.finish().unwrap().unwrap_err().contains("sha256"));
    }
}
