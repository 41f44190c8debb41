//! ONNX files: reading a classifier into a bundle (`import-onnx`) and writing a bundle back out
//! as one ONNX model.

pub mod export;
pub mod graph;
pub mod import;
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto;
pub mod split;
pub mod tensor;
pub mod trunk;

/// Decodes an ONNX model from bytes.
pub fn decode_model(bytes: &[u8]) -> Result<proto::ModelProto, prost::DecodeError> {
    use prost::Message;
    proto::ModelProto::decode(bytes)
}

/// Encodes an ONNX model to bytes.
pub fn encode_model(model: &proto::ModelProto) -> Vec<u8> {
    use prost::Message;
    model.encode_to_vec()
}
