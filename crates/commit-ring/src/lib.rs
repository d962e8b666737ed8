//! The commit queue of pg_realtime, minus Postgres.
//!
//! Each committing transaction reserves one record in a ring that lives in shared memory; its
//! backend stamps the record with its commit LSN once committed, and the background worker
//! reads records back in commit order (see [`ring`] for why that order is safe without
//! serializing the committers). This crate holds the two pieces that need no Postgres at all,
//! so they can be tested with plain `cargo test`:
//!
//! * [`ring`]: the byte ring of transaction records;
//! * [`message`]: the compact encoding of one broadcast message inside a record;
//! * [`watched`]: which topics have subscribers, so that committers wake the worker only for those.

pub mod message;
pub mod ring;
pub mod watched;

pub use message::{DecodeError, Message, PayloadKind};
pub use ring::{Full, Pending, Ready, Record, RingHeader};
pub use watched::WatchedTopics;
