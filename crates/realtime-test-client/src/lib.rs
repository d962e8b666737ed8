//! The client side of pg_realtime's wire formats, written once for everything that plays a
//! client: the integration tests (`pgrx-tests`, `crates/realtime-server/tests`) and the load
//! generator (`crates/realtime-bench`).
//!
//! - [`jwt`]: HS256 tokens as Supabase issues them, and a low-level signer for odd headers;
//! - [`phoenix`]: Phoenix text frames, vsn 1.0.0 (JSON objects) and 2.0.0 (JSON arrays), and
//!   the decoded [`Message`] that tests assert on;
//! - [`binary`]: the Supabase binary broadcast frames (kind 3 from clients, kind 4 to them).
//!
//! It is deliberately independent of `realtime-server`'s own codecs, so that a test written
//! with it checks the server against a second implementation of the protocol.

pub mod binary;
pub mod jwt;
pub mod phoenix;

pub use phoenix::{Frame, Message};
