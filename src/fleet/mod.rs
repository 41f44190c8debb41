//! The fleet interface over MQTT: the topic tree and message schemas (docs/mqtt.md), commands,
//! weights sets, the agent's broker link and the embedded broker.

pub mod broker;
pub mod client;
pub mod commands;
pub mod link;
pub mod messages;
pub mod rebuild;
pub mod topics;
pub mod weights;
