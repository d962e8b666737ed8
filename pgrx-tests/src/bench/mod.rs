//! The load generator behind `realtime-bench` (see BENCHMARKS.md). Only the binary uses these
//! modules; the integration-test library does not.

pub mod args;
pub mod client;
pub mod common;
pub mod connections;
pub mod database;
pub mod fanout;
pub mod jwt;
pub mod presence;
pub mod private_joins;
pub mod ratio;
pub mod stats;
