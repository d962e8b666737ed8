//! SQL functions written in Rust. The rest of the SQL surface (send, broadcast_changes,
//! topic, partition maintenance) is plain SQL in `sql/`, where it is clearer.

mod presence;
mod stats;
