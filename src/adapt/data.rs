//! Cached split tensors of labelled samples, kept compact (f16) because adaptation reads them
//! many times and a device keeps them for months.

use half::f16;
use ndarray::{Array2, ArrayViewD, Axis};

use crate::network::Batch;

/// Split tensors of `samples` samples, channels last: row `n * positions + p` holds position `p`
/// of sample `n`.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitSet {
    pub data: Array2<f16>,
    pub positions: usize,
    pub labels: Vec<usize>,
}

/// A bundle's reference samples as a split set; `None` when it has none.
pub fn reference_set(bundle: &crate::model::Bundle) -> Result<Option<SplitSet>, String> {
    match bundle.reference().map_err(|e| e.to_string())? {
        Some((split, labels)) => SplitSet::from_onnx(split.view(), labels).map(Some),
        None => Ok(None),
    }
}

impl SplitSet {
    /// From a trunk output batch in ONNX layout (`[N, C, H, W]` or `[N, D]`).
    pub fn from_onnx(split: ArrayViewD<'_, f32>, labels: Vec<usize>) -> Result<SplitSet, String> {
        if split.shape().first() != Some(&labels.len()) {
            return Err(format!("{} labels for split tensors of shape {:?}", labels.len(), split.shape()));
        }
        let batch = Batch::from_onnx(split)?;
        Ok(SplitSet { data: batch.data.mapv(f16::from_f32), positions: batch.positions, labels })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn channels(&self) -> usize {
        self.data.ncols()
    }

    /// The samples at `indices`, as an f32 batch.
    pub fn batch(&self, indices: &[usize]) -> Batch {
        let mut data = Array2::zeros((indices.len() * self.positions, self.channels()));
        for (out, &sample) in indices.iter().enumerate() {
            let rows = self.data.slice(ndarray::s![sample * self.positions..(sample + 1) * self.positions, ..]);
            data.slice_mut(ndarray::s![out * self.positions..(out + 1) * self.positions, ..])
                .zip_mut_with(&rows, |d, s| *d = s.to_f32());
        }
        Batch { data, positions: self.positions }
    }

    /// The samples whose label satisfies `keep`, in order.
    pub fn filter(&self, keep: impl Fn(usize) -> bool) -> SplitSet {
        let indices: Vec<usize> = (0..self.len()).filter(|&i| keep(self.labels[i])).collect();
        self.select(&indices)
    }

    pub fn select(&self, indices: &[usize]) -> SplitSet {
        let rows: Vec<usize> = indices.iter().flat_map(|&i| (i * self.positions)..((i + 1) * self.positions)).collect();
        SplitSet {
            data: self.data.select(Axis(0), &rows),
            positions: self.positions,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// Concatenates sets with the same per-sample shape.
    pub fn concat(sets: &[&SplitSet]) -> SplitSet {
        let views: Vec<_> = sets.iter().map(|s| s.data.view()).collect();
        SplitSet {
            data: ndarray::concatenate(Axis(0), &views).expect("same channel count"),
            positions: sets.first().map_or(1, |s| s.positions),
            labels: sets.iter().flat_map(|s| s.labels.iter().copied()).collect(),
        }
    }

    /// All samples in chunks of `size`, for evaluation.
    pub fn chunks(&self, size: usize) -> impl Iterator<Item = Batch> + '_ {
        let indices: Vec<usize> = (0..self.len()).collect();
        indices.chunks(size.max(1)).map(|chunk| self.batch(chunk)).collect::<Vec<_>>().into_iter()
    }
}

/// One sample's rows of a split set as f16 little-endian bytes.
pub fn encode_features(set: &SplitSet, sample: usize) -> Vec<u8> {
    let rows = set.data.slice(ndarray::s![sample * set.positions..(sample + 1) * set.positions, ..]);
    rows.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Rebuilds a split set from stored rows, checking each row's size.
pub fn decode_features(
    rows: &[(i64, &[u8])],
    labels: Vec<usize>,
    positions: usize,
    channels: usize,
) -> Result<SplitSet, String> {
    let per_sample = positions * channels;
    let mut values = Vec::with_capacity(rows.len() * per_sample);
    for (id, bytes) in rows {
        if bytes.len() != per_sample * 2 {
            return Err(format!(
                "stored features of sample {id} have {} bytes, the bundle's split tensor needs {}",
                bytes.len(),
                per_sample * 2
            ));
        }
        values.extend(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])));
    }
    let data = Array2::from_shape_vec((rows.len() * positions, channels), values).map_err(|e| e.to_string())?;
    Ok(SplitSet { data, positions, labels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, IxDyn};

    #[test]
    fn onnx_layout_becomes_channels_last_rows() {
        let split = Array::from_shape_fn(IxDyn(&[2, 3, 2, 2]), |i| (i[0] * 100 + i[1] * 10 + i[2] * 2 + i[3]) as f32);
        let set = SplitSet::from_onnx(split.view(), vec![4, 7]).unwrap();
        assert!(SplitSet::from_onnx(split.view(), vec![1]).is_err());
        assert_eq!((set.positions, set.channels(), set.len()), (4, 3, 2));
        let batch = set.batch(&[1]);
        // sample 1, position (h=1, w=0) = 2, channel 2
        assert_eq!(batch.data[[2, 2]], 100.0 + 20.0 + 2.0);
        let cats = set.filter(|label| label == 7);
        assert_eq!(cats.labels, vec![7]);
        assert_eq!(cats.batch(&[0]).data, batch.data);
        let both = SplitSet::concat(&[&cats, &set]);
        assert_eq!(both.labels, vec![7, 4, 7]);
    }
}
