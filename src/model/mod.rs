//! Model bundles and the parts of a classifier: trunk (ONNX), tail (Rust) and head (Rust).

pub mod bundle;
pub mod head;
pub mod manifest;
pub mod onnx;
pub mod reference;
pub mod tail;
pub mod tensors;

pub use bundle::{Bundle, BundleError};
pub use head::Head;
pub use manifest::Manifest;
pub use tail::{Tail, TailLayer};
