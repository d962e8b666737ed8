//! The WebSocket layer: the upgrade (`upgrade.rs`), client frames in (`reader.rs`) and server
//! frames out (`writer.rs`).
//!
//! The frame format comes from `tungstenite` (header parsing and formatting, the accept key);
//! the buffering is ours. A WebSocket library keeps per-connection read and write buffers as
//! large as the largest frame the connection ever received or was sent, for as long as it
//! lives: after one large presence state reached every member of a big room, every member's
//! connection kept a copy's worth of memory. Here a frame is read into a buffer that is let go
//! once the frame is complete, and written straight from the payload that every receiver
//! shares, so what a connection holds is bounded by its outbound queue's limits and the frame
//! it is reading.

mod reader;
mod upgrade;
mod writer;

pub(crate) use reader::{FrameReader, Incoming};
pub(crate) use upgrade::{Upgrade, WsIo};
pub(crate) use writer::{OutFrame, Unsent};
