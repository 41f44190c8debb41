//! edgeadapt: an on-device agent that classifies images with an ONNX model and adapts a
//! lightweight part of it to the site it runs at, keeping the classifier itself safe.

pub mod adapt;
pub mod agent;
pub mod bench;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod deploy;
pub mod doctor;
pub mod fleet;
pub mod imaging;
pub mod inference;
pub mod metrics;
pub mod model;
pub mod network;
pub mod output;
pub mod protocol;
pub mod runtime;
pub mod store;
