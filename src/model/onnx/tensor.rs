//! Conversions between ONNX `TensorProto` and ndarray.

use half::f16;
use ndarray::{ArrayD, IxDyn};

use super::proto::{TensorProto, tensor_proto::DataLocation, tensor_proto::DataType};

/// Decodes a float tensor (f32, f16, f64, bf16) to f32.
pub fn to_f32(tensor: &TensorProto) -> Result<ArrayD<f32>, String> {
    let name = tensor.name.as_deref().unwrap_or("<unnamed>");
    if tensor.data_location == Some(DataLocation::External as i32) {
        return Err(format!(
            "initializer '{name}' keeps its data in an external file; save the model with the data embedded"
        ));
    }
    let shape = dims(tensor)?;
    let count: usize = shape.iter().product();
    let raw = tensor.raw_data.as_deref().filter(|raw| !raw.is_empty());
    let data_type = tensor.data_type.unwrap_or(0);
    let values: Vec<f32> = if data_type == DataType::Float as i32 {
        match raw {
            Some(raw) => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            None => tensor.float_data.clone(),
        }
    } else if data_type == DataType::Float16 as i32 {
        match raw {
            Some(raw) => raw.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            None => tensor.int32_data.iter().map(|&bits| f16::from_bits(bits as u16).to_f32()).collect(),
        }
    } else if data_type == DataType::Bfloat16 as i32 {
        match raw {
            Some(raw) => raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            None => tensor.int32_data.iter().map(|&bits| half::bf16::from_bits(bits as u16).to_f32()).collect(),
        }
    } else if data_type == DataType::Double as i32 {
        match raw {
            Some(raw) => raw
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
                .collect(),
            None => tensor.double_data.iter().map(|&v| v as f32).collect(),
        }
    } else {
        return Err(format!("initializer '{name}' has data type {data_type}, expected a float type"));
    };
    if values.len() != count {
        return Err(format!("initializer '{name}' holds {} values for shape {shape:?}", values.len()));
    }
    ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| format!("initializer '{name}': {e}"))
}

/// Decodes an integer tensor (i64 or i32), as used for shapes and axes.
pub fn to_i64(tensor: &TensorProto) -> Result<Vec<i64>, String> {
    let name = tensor.name.as_deref().unwrap_or("<unnamed>");
    let raw = tensor.raw_data.as_deref().filter(|raw| !raw.is_empty());
    let data_type = tensor.data_type.unwrap_or(0);
    if data_type == DataType::Int64 as i32 {
        Ok(match raw {
            Some(raw) => raw
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
            None => tensor.int64_data.clone(),
        })
    } else if data_type == DataType::Int32 as i32 {
        Ok(match raw {
            Some(raw) => raw.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64).collect(),
            None => tensor.int32_data.iter().map(|&v| v as i64).collect(),
        })
    } else {
        Err(format!("tensor '{name}' has data type {data_type}, expected an integer type"))
    }
}

fn dims(tensor: &TensorProto) -> Result<Vec<usize>, String> {
    tensor
        .dims
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| format!("negative dimension {d} in '{}'", tensor.name.as_deref().unwrap_or("")))
        })
        .collect()
}

/// Encodes an f32 array as a named initializer.
pub fn from_f32(name: &str, array: &ArrayD<f32>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: array.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(array.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// Encodes an i64 vector as a named 1-D initializer.
pub fn from_i64(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: vec![values.len() as i64],
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn f32_round_trips_through_raw_data() {
        let array = array![[1.5f32, -2.0], [0.0, 3.25]].into_dyn();
        assert_eq!(to_f32(&from_f32("w", &array)).unwrap(), array);
    }

    #[test]
    fn typed_fields_and_f16_decode() {
        let tensor = TensorProto {
            dims: vec![2],
            data_type: Some(DataType::Float16 as i32),
            int32_data: vec![f16::from_f32(0.5).to_bits() as i32, f16::from_f32(-4.0).to_bits() as i32],
            ..Default::default()
        };
        assert_eq!(to_f32(&tensor).unwrap().into_raw_vec_and_offset().0, vec![0.5, -4.0]);
        assert_eq!(to_i64(&from_i64("s", &[0, -1])).unwrap(), vec![0, -1]);
    }

    #[test]
    fn external_data_and_wrong_counts_are_refused_by_name() {
        let mut tensor = from_f32("big", &array![1.0f32].into_dyn());
        tensor.data_location = Some(DataLocation::External as i32);
        assert!(to_f32(&tensor).unwrap_err().contains("'big'"));
        let mut tensor = from_f32("short", &array![1.0f32, 2.0].into_dyn());
        tensor.dims = vec![3];
        assert!(to_f32(&tensor).unwrap_err().contains("'short'"));
    }
}
