//! edgeadapt: an on-device agent that classifies images with an ONNX model and adapts a
//! lightweight part of it to the site it runs at, keeping the classifier itself safe.

pub mod imaging;
pub mod model;
pub mod runtime;
