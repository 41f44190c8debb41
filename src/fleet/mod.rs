//! The fleet interface over MQTT: the agent's broker link, the embedded broker, the fleet-side
//! client, the keys commands are signed and checked with, and rebuilding a version from a weights set. The wire format is `crate::protocol`.

pub mod broker;
pub mod client;
pub mod connect;
pub mod deploy;
pub mod keys;
pub mod link;
pub mod link_state;
pub mod merge;
pub mod port;
pub mod rebuild;
pub mod send;
pub mod sim_device;
pub mod simulate;
