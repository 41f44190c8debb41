//! Reading and writing named weight tensors in safetensors files.

use std::collections::HashMap;
use std::path::Path;

use half::f16;
use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// Why a weight tensor could not be used; always names the file and the tensor.
#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("{file}: cannot read: {source}")]
    Io { file: String, source: std::io::Error },
    #[error("{file}: not a valid safetensors file: {problem}")]
    Format { file: String, problem: String },
    #[error("{file}: tensor '{tensor}' is missing (present: {present})")]
    Missing { file: String, tensor: String, present: String },
    #[error("{file}: tensor '{tensor}' has dtype {dtype:?}; expected F32, F16, BF16 or F64")]
    Dtype { file: String, tensor: String, dtype: Dtype },
    #[error("{file}: tensor '{tensor}' has shape {actual:?}, expected {expected}")]
    Shape { file: String, tensor: String, actual: Vec<usize>, expected: String },
    #[error("{file}: tensor '{tensor}' holds {count} NaN or infinite values (first at flat index {first})")]
    NotFinite { file: String, tensor: String, count: usize, first: usize },
}

/// The tensors of one safetensors file, converted to f32.
pub struct TensorFile {
    name: String,
    tensors: HashMap<String, ArrayD<f32>>,
}

impl TensorFile {
    pub fn read(path: &Path) -> Result<TensorFile, TensorFileError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| TensorFileError::Io { file: name.clone(), source })?;
        TensorFile::parse(&name, &bytes)
    }

    pub fn parse(name: &str, bytes: &[u8]) -> Result<TensorFile, TensorFileError> {
        let file = SafeTensors::deserialize(bytes)
            .map_err(|e| TensorFileError::Format { file: name.to_string(), problem: e.to_string() })?;
        let mut tensors = HashMap::new();
        for (tensor, view) in file.tensors() {
            let array = to_f32(&view).ok_or_else(|| TensorFileError::Dtype {
                file: name.to_string(),
                tensor: tensor.clone(),
                dtype: view.dtype(),
            })?;
            tensors.insert(tensor, array);
        }
        Ok(TensorFile { name: name.to_string(), tensors })
    }

    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn shape(&self, tensor: &str) -> Option<&[usize]> {
        self.tensors.get(tensor).map(|t| t.shape())
    }

    /// A finite tensor of the given rank.
    pub fn finite(&self, tensor: &str, rank: usize) -> Result<ArrayD<f32>, TensorFileError> {
        let array = self.tensors.get(tensor).ok_or_else(|| TensorFileError::Missing {
            file: self.name.clone(),
            tensor: tensor.to_string(),
            present: self.names().join(", "),
        })?;
        if array.ndim() != rank {
            return Err(TensorFileError::Shape {
                file: self.name.clone(),
                tensor: tensor.to_string(),
                actual: array.shape().to_vec(),
                expected: format!("rank {rank}"),
            });
        }
        let bad: Vec<usize> =
            array.iter().enumerate().filter(|(_, v)| !v.is_finite()).map(|(index, _)| index).collect();
        if let Some(&first) = bad.first() {
            return Err(TensorFileError::NotFinite {
                file: self.name.clone(),
                tensor: tensor.to_string(),
                count: bad.len(),
                first,
            });
        }
        Ok(array.clone())
    }
}

fn to_f32(view: &TensorView<'_>) -> Option<ArrayD<f32>> {
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        _ => return None,
    };
    ArrayD::from_shape_vec(IxDyn(view.shape()), values).ok()
}

/// How a tensor is stored when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredAs {
    F32,
    F16,
}

/// Serialises named f32 arrays to safetensors bytes.
pub fn to_safetensors(tensors: &[(&str, &ArrayD<f32>, StoredAs)]) -> Result<Vec<u8>, String> {
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, array, stored)| {
            let bytes: Vec<u8> = match stored {
                StoredAs::F32 => array.iter().flat_map(|v| v.to_le_bytes()).collect(),
                StoredAs::F16 => array.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            };
            let dtype = match stored {
                StoredAs::F32 => Dtype::F32,
                StoredAs::F16 => Dtype::F16,
            };
            (name.to_string(), dtype, array.shape().to_vec(), bytes)
        })
        .collect();
    let views = encoded
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|view| (name.clone(), view)).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, String>>()?;
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn f32_and_f16_round_trip() {
        let weight = array![[1.0f32, -2.5], [0.125, 3.0]].into_dyn();
        let bytes = to_safetensors(&[("w", &weight, StoredAs::F32), ("h", &weight, StoredAs::F16)]).unwrap();
        let file = TensorFile::parse("mem", &bytes).unwrap();
        assert_eq!(file.finite("w", 2).unwrap(), weight);
        assert_eq!(file.finite("h", 2).unwrap(), weight);
    }

    #[test]
    fn nan_weights_are_refused_with_the_tensor_name() {
        let weight = array![1.0f32, f32::NAN, f32::INFINITY].into_dyn();
        let bytes = to_safetensors(&[("head.weight", &weight, StoredAs::F32)]).unwrap();
        let error = TensorFile::parse("head.safetensors", &bytes).unwrap().finite("head.weight", 1).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("head.safetensors") && text.contains("head.weight") && text.contains("2 NaN"), "{text}");
    }

    #[test]
    fn missing_tensors_and_wrong_ranks_are_named() {
        let weight = array![1.0f32, 2.0].into_dyn();
        let bytes = to_safetensors(&[("bias", &weight, StoredAs::F32)]).unwrap();
        let file = TensorFile::parse("t", &bytes).unwrap();
        assert!(file.finite("weight", 2).unwrap_err().to_string().contains("present: bias"));
        assert!(file.finite("bias", 2).unwrap_err().to_string().contains("rank 2"));
    }

    #[test]
    fn garbage_is_a_format_error() {
        let error = TensorFile::parse("junk.safetensors", b"not a safetensors file").err().unwrap();
        assert!(error.to_string().contains("junk.safetensors"));
    }
}
