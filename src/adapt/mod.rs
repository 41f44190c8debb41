//! On-device adaptation: training the tail (and optionally a feature adapter) on cached split
//! tensors of locally labelled samples, with the classifier head kept safe.

pub mod backward;
pub mod calibrate;
pub mod data;
pub mod gate;
pub mod health;
pub mod loss;
pub mod method;
pub mod optim;
pub mod prior;
pub mod queue;
pub mod recommended;
pub mod share;
pub mod spec;
pub mod train;
