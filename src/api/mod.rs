//! SQL functions written in Rust. The rest of the SQL surface (broadcast_changes, topic,
//! partition maintenance, presence) is plain SQL in `sql/`, where it is clearer; `send` and
//! `send_binary` are in Rust because they are on every message's path.

mod admin;
mod node;
mod presence;
mod send;
mod stats;
