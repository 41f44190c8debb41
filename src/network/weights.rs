//! A version's weights: the parameter slots that differ from the source network, as
//! safetensors (`slot.<index>`). Loading starts from the source network and checks every slot's
//! shape and values, so a damaged or foreign weights blob is refused instead of served.

use ndarray::ArrayD;

use super::Network;
use crate::model::tensors::{StoredAs, TensorFile, to_safetensors};

/// Serialises the slots of `network` that differ from `source`. `network` may carry an adapter
/// the source lacks (built by [`Network::with_adapter`]), whose slots are always written.
pub fn encode(network: &Network, source: &Network) -> Result<Vec<u8>, String> {
    let names: Vec<String> = (0..network.params.len()).map(|i| format!("slot.{i}")).collect();
    let changed: Vec<(&str, &ArrayD<f32>, StoredAs)> = network
        .params
        .iter()
        .enumerate()
        .filter(|(i, param)| source.params.get(*i) != Some(*param))
        .map(|(i, param)| (names[i].as_str(), param, StoredAs::F32))
        .collect();
    to_safetensors(&changed)
}

/// Rebuilds a version's network from the source network, its adapter rank (0: none) and the
/// stored slots.
pub fn decode(bytes: &[u8], source: &Network, adapter_rank: usize, what: &str) -> Result<Network, String> {
    let mut network = if adapter_rank > 0 { source.with_adapter(adapter_rank, 0) } else { source.clone() };
    let file = TensorFile::parse(what, bytes).map_err(|e| e.to_string())?;
    for name in file.names() {
        let index: usize = name
            .strip_prefix("slot.")
            .and_then(|i| i.parse().ok())
            .filter(|&i| i < network.params.len())
            .ok_or_else(|| format!("{what}: tensor '{name}' is not a parameter slot of this network"))?;
        let expected = network.params[index].shape().to_vec();
        let value = file.finite(name, expected.len()).map_err(|e| e.to_string())?;
        if value.shape() != expected.as_slice() {
            return Err(format!("{what}: '{name}' has shape {:?}, the network needs {expected:?}", value.shape()));
        }
        network.params[index] = value;
    }
    Ok(network)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{Layer, Role};
    use ndarray::{Array1, Array2};

    fn tiny() -> Network {
        Network {
            layers: vec![Layer::Affine { weight: 0, bias: 1 }],
            head: (2, 3),
            params: vec![
                Array2::from_elem((4, 3), 0.5f32).into_dyn(),
                Array1::zeros(4).into_dyn(),
                Array2::from_elem((2, 4), 0.25f32).into_dyn(),
                Array1::zeros(2).into_dyn(),
            ],
            roles: vec![Role::Tail, Role::Tail, Role::Head, Role::Head],
        }
    }

    #[test]
    fn only_changed_slots_are_stored_and_decoding_restores_them_exactly() {
        let source = tiny();
        let mut adapted = source.clone();
        adapted.params[0][[1, 2]] = -1.25;
        let bytes = encode(&adapted, &source).unwrap();
        assert_eq!(TensorFile::parse("w", &bytes).unwrap().names(), vec!["slot.0"]);
        assert_eq!(decode(&bytes, &source, 0, "w").unwrap(), adapted);
        let with_adapter = source.with_adapter(2, 0);
        let bytes = encode(&with_adapter, &source).unwrap();
        assert_eq!(decode(&bytes, &source, 2, "w").unwrap(), with_adapter);
    }

    #[test]
    fn wrong_shapes_nan_and_unknown_slots_are_refused_by_name() {
        let source = tiny();
        let bad_shape = to_safetensors(&[("slot.2", &Array2::<f32>::zeros((3, 4)).into_dyn(), StoredAs::F32)]).unwrap();
        assert!(decode(&bad_shape, &source, 0, "v7").unwrap_err().contains("shape"));
        let nan = to_safetensors(&[("slot.1", &Array1::from_elem(4, f32::NAN).into_dyn(), StoredAs::F32)]).unwrap();
        let error = decode(&nan, &source, 0, "v7").unwrap_err();
        assert!(error.contains("v7") && error.contains("NaN"), "{error}");
        let unknown = to_safetensors(&[("slot.9", &Array1::<f32>::zeros(4).into_dyn(), StoredAs::F32)]).unwrap();
        assert!(decode(&unknown, &source, 0, "v7").unwrap_err().contains("slot.9"));
    }
}
