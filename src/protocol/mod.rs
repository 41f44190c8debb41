//! The fleet protocol: the topic tree and message schemas (docs/mqtt.md), commands and who may
//! sign them, weights sets in chunks, broker addresses. Pure data and checks, with no
//! dependency on the agent, the config or the broker link: they depend on it.

pub mod broker_address;
pub mod commands;
pub mod counters;
pub mod events;
pub mod health;
pub mod messages;
pub mod signing;
pub mod topics;
pub mod transfer;
pub mod version_ref;
pub mod weights;

pub use version_ref::VersionRef;
