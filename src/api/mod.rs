//! SQL functions written in Rust. The rest of the SQL surface (send_binary,
//! broadcast_changes, topic, partition maintenance) is plain SQL in `sql/`, where it is clearer;
//! `send` is in Rust because it is on every message's path.

mod presence;
mod send;
mod stats;
