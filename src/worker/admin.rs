//! Answers the SQL backends' requests about sockets (`realtime.connections()`, `channels()`,
//! `disconnect()`, `disconnect_user()`, through `queue/commands.rs`) on the worker's main
//! thread. Nothing here waits: a snapshot is a walk of the server's connection table, a
//! disconnect only marks connections, which the network threads then close.

use crate::queue::commands::{self, CHUNK_BYTES, Kind, SLOTS, Taken};
use pgrx::prelude::*;
use realtime_server::{ChannelInfo, ConnectionInfo, DisconnectTarget, Server};
use serde_json::{Value, json};
use std::time::UNIX_EPOCH;

/// A snapshot larger than this is cut (rows past it are left out, with a log line): what the
/// worker keeps for a backend reading it chunk by chunk stays bounded.
const MAX_SNAPSHOT_BYTES: usize = 64 << 20;

/// The reason given when SQL gave none.
pub const DEFAULT_REASON: &str = "Disconnected by the server administrator";

/// A snapshot being read chunk by chunk, kept per slot for the claim that asked for it.
struct Kept {
    claim: i64,
    kind: Kind,
    bytes: Vec<u8>,
}

#[derive(Default)]
pub struct Admin {
    kept: [Option<Kept>; SLOTS],
}

impl Admin {
    /// Answers every waiting request; with `check_stale`, also frees slots of backends that
    /// went away (about once a second is enough).
    pub fn serve(&mut self, server: &Server, check_stale: bool) {
        for taken in commands::take_requests(check_stale) {
            self.answer(server, taken);
        }
        if check_stale {
            // A snapshot whose reader vanished is not kept past the next claim of its slot,
            // but an idle slot would keep it: drop those whose slot is free again.
            for (slot, kept) in self.kept.iter_mut().enumerate() {
                if kept.is_some() && !commands::is_claimed(slot) {
                    *kept = None;
                }
            }
        }
    }

    fn answer(&mut self, server: &Server, taken: Taken) {
        let reason = if taken.text2.is_empty() {
            DEFAULT_REASON.to_string()
        } else {
            taken.text2.clone()
        };
        match taken.kind {
            Some(kind @ (Kind::Connections | Kind::Channels)) => {
                let offset = usize::try_from(taken.number).unwrap_or(0);
                let kept = &mut self.kept[taken.slot];
                let reuse = offset > 0
                    && kept
                        .as_ref()
                        .is_some_and(|k| k.claim == taken.claim && k.kind == kind);
                if !reuse {
                    let bytes = match kind {
                        Kind::Connections => encode_connections(&server.connections()),
                        _ => encode_channels(&server.channels()),
                    };
                    *kept = Some(Kept {
                        claim: taken.claim,
                        kind,
                        bytes,
                    });
                }
                let Some(k) = kept.as_ref() else {
                    return taken.answer(Err("no snapshot"));
                };
                let total = k.bytes.len();
                let end = offset.saturating_add(CHUNK_BYTES).min(total);
                let chunk = k.bytes.get(offset..end).unwrap_or(&[]);
                taken.answer(Ok((0, total as u64, chunk)));
                if end >= total {
                    *kept = None;
                }
            }
            Some(Kind::Disconnect) => {
                let target = DisconnectTarget::Connection(u64::try_from(taken.number).unwrap_or(0));
                let n = server.disconnect(&target, &reason);
                taken.answer(Ok((n as i64, 0, &[])));
            }
            Some(Kind::DisconnectUser) => {
                let target = DisconnectTarget::Sub(taken.text1.clone());
                let n = server.disconnect(&target, &reason);
                taken.answer(Ok((n as i64, 0, &[])));
            }
            None => taken.answer(Err("unknown request")),
        }
    }
}

fn unix_micros(t: std::time::SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A JSON array of rows, cut at [`MAX_SNAPSHOT_BYTES`].
fn encode_rows(rows: impl Iterator<Item = Value>, what: &str) -> Vec<u8> {
    let mut out = Vec::from(&b"["[..]);
    let mut first = true;
    for row in rows {
        let text = row.to_string();
        if out.len() + text.len() + 2 > MAX_SNAPSHOT_BYTES {
            log!(
                "pg_realtime: the {what} snapshot is larger than {} MB; the rest is left out",
                MAX_SNAPSHOT_BYTES >> 20
            );
            break;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(text.as_bytes());
    }
    out.push(b']');
    out
}

fn encode_connections(conns: &[ConnectionInfo]) -> Vec<u8> {
    let rows = conns.iter().map(|c| {
        json!({
            "id": c.id,
            "ip": c.remote.map(|a| a.ip().to_string()),
            "port": c.remote.map(|a| a.port()),
            "role": c.role,
            "sub": c.sub,
            "vsn": c.vsn,
            "at": unix_micros(c.connected_at),
            "channels": c.channels,
            "mi": c.messages_in,
            "bi": c.bytes_in,
            "mo": c.messages_out,
            "bo": c.bytes_out,
            "q": c.queued_bytes,
        })
    });
    encode_rows(rows, "connection")
}

fn encode_channels(channels: &[ChannelInfo]) -> Vec<u8> {
    let rows = channels.iter().map(|c| {
        json!({
            "topic": c.topic,
            "private": c.private,
            "subscribers": c.subscribers,
            "keys": c.presence_keys,
        })
    });
    encode_rows(rows, "channel")
}
