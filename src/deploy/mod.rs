//! Deploying a new source bundle (`fleet deploy`): the bundle travels as one archive
//! (`archive`), is shadowed next to the served version before it serves (`health`), proves
//! itself in its first minutes of service (`probation`), and the fleet rolls it out canaries
//! first (`rollout`), following each device to its verdict (`follow`). Decisions only; the agent and the fleet client do the I/O.

pub mod archive;
pub mod follow;
pub mod health;
pub mod probation;
pub mod rollout;
