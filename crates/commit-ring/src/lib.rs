//! The commit queue of pg_realtime, minus Postgres.
//!
//! Backends append the messages of a committing transaction to a ring that lives in shared
//! memory; the background worker reads them back in ring order, which is commit order because
//! appends are serialized by a transaction-scoped lock held until the commit is visible. This
//! crate holds the two pieces that need no Postgres at all, so they can be tested with plain
//! `cargo test`:
//!
//! * [`ring`]: a byte ring of entries stamped with a transaction id and a database oid;
//! * [`message`]: the compact encoding of one broadcast message inside an entry.

pub mod message;
pub mod ring;

pub use message::{DecodeError, Message, PayloadKind};
pub use ring::{Entry, Full, RingHeader};
