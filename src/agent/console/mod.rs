//! The on-site console: a page served by the agent where site staff label recent traffic,
//! adapt, judge the result and roll back (docs/console.md).

pub mod queue;
pub mod recent;
