use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::error::ServerError;

/// Server settings. Everything except the listen addresses, port, frame size and thread count
/// can be changed at run time with [`crate::Server::reload`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Comma-separated hosts; `*` means every IPv4 and IPv6 address, `""` means localhost.
    pub listen_addresses: String,
    pub port: u16,
    /// HS256/384/512 shared secret.
    pub jwt_secret: Option<String>,
    /// JWKS document `{"keys":[...]}` for RS*/ES*/EdDSA (and `oct`) keys, chosen by `kid`.
    pub jwt_jwks: Option<String>,
    pub max_connections: usize,
    pub max_channels_per_connection: usize,
    /// Broadcast payload limit: JSON text length or binary length.
    pub max_payload_bytes: usize,
    /// WebSocket message/frame limit; also the REST request body limit.
    pub max_frame_bytes: usize,
    /// Per-connection outbound queue, in frames; a connection whose queue overflows is closed.
    pub outbound_queue: usize,
    pub idle_timeout: Duration,
    pub connect_error_delay: Duration,
    pub join_error_delay: Duration,
    pub private_only: bool,
    pub worker_threads: usize,
    /// When false (the default until the worker answers authorization requests) private joins
    /// and private REST sends are refused without asking anyone. When true they produce
    /// [`crate::Event::Authorize`] and wait for [`crate::Server::complete_authorization`].
    pub authorize_private: bool,
    /// How long a private join waits for the worker's authorization answer.
    pub authorization_timeout: Duration,
    /// Upper bound of `config.broadcast.replay.limit` (Supabase: 25; here 1,000 by default).
    pub max_replay_limit: usize,
    /// Public channels may replay too (`realtime.public_replay`); anyone can then read their
    /// stored history. Off as in Supabase.
    pub public_replay: bool,
    /// Presence calls (track/untrack) one channel may make per window; 0 = unlimited.
    pub presence_calls_limit: u32,
    pub presence_calls_window: Duration,
    /// Per-connection outbound queue, in bytes of queued frames; past it the connection is
    /// closed as a slow consumer, like past `outbound_queue` frames.
    pub outbound_queue_bytes: usize,
    /// Bytes of messages one connection may hold, over all its private channels, while their
    /// write checks run; past it (or past 256 messages on one channel) further writes are
    /// refused.
    pub max_held_write_bytes: usize,
    /// Longest `persist` ttl (`realtime.retention`): a stored message is kept at least that
    /// long anyway.
    pub max_persist_ttl: Duration,
    /// Broadcasts with `persist` one connection may have waiting to be stored at once.
    pub max_persist_per_connection: usize,
    /// Broadcasts with `persist` waiting for the worker over all connections, in messages and
    /// in bytes; past them a new one is refused.
    pub max_persist_queued: usize,
    pub max_persist_queued_bytes: usize,
    /// Private joins of one connection that may wait for authorization at once.
    pub max_pending_joins_per_connection: usize,
    /// Authorization requests (joins, token refreshes, write checks, REST) that may wait for
    /// the worker at once, over all connections; past it new ones are refused at once.
    pub max_pending_authorizations: usize,
    /// Joins per second one connection may make on average (token bucket); 0 = unlimited.
    pub joins_per_second: f64,
    /// Joins one connection may make at once before `joins_per_second` applies.
    pub join_burst: u32,
    /// Largest presence meta (its JSON text) a client may track.
    pub max_presence_meta_bytes: usize,
    /// Metas (tracking channels) one presence key may have in one topic.
    pub max_presence_metas_per_key: usize,
    /// Presence keys one topic may have.
    pub max_presence_keys_per_topic: usize,
    /// Bytes of presence (keys and metas) one topic may hold; also bounds its
    /// `presence_state`, which must fit a joining client's outbound queue.
    pub max_presence_bytes_per_topic: usize,
    /// Batch messages one REST request may carry.
    pub max_batch_messages: usize,
    /// Committed database messages waiting for the network side, in messages and in payload
    /// bytes; see [`crate::Server::publish`] for what happens past them.
    pub publish_queue_messages: usize,
    pub publish_queue_bytes: usize,
    /// Serve `GET /metrics`; off by default, since it tells anyone who can reach the port
    /// how busy the server is.
    pub metrics: bool,
    /// When set, `GET /metrics` requires `Authorization: Bearer <this>`.
    pub metrics_token: Option<String>,
    /// Serve the inspector page (`GET /inspector`): static files, whose token stays in the
    /// browser.
    pub inspector: bool,
    /// This node of a multi-node setup; fixed at start.
    pub node: NodeConfig,
}

/// Who this node is among the nodes sharing a bus (see `bus.rs`).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Random per start: a restarted node is a new node.
    pub id: u64,
    /// Shown in the logs of other nodes.
    pub name: String,
    /// How long another node's members survive without news from it.
    pub lease: Duration,
    /// On a standby: the link to the primary (`dbname` already set). None on a primary.
    pub primary: Option<tokio_postgres::Config>,
    /// Bytes of frames that may wait for the bus.
    pub outbox_bytes: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: random_node_id(),
            name: String::new(),
            lease: Duration::from_secs(10),
            primary: None,
            outbox_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A node id nobody else is likely to have: the standard library's random hasher keys, over
/// the process id and the time.
pub fn random_node_id() -> u64 {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::collections::hash_map::RandomState::new().hash_one((std::process::id(), nanos))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_addresses: "*".to_string(),
            port: 4000,
            jwt_secret: None,
            jwt_jwks: None,
            max_connections: 200,
            max_channels_per_connection: 100,
            max_payload_bytes: 3_000_000,
            max_frame_bytes: 5_000_000,
            outbound_queue: 1024,
            idle_timeout: Duration::from_secs(60),
            connect_error_delay: Duration::from_secs(2),
            join_error_delay: Duration::from_secs(5),
            private_only: false,
            worker_threads: 2,
            authorize_private: false,
            authorization_timeout: Duration::from_secs(10),
            max_replay_limit: 1000,
            public_replay: false,
            presence_calls_limit: 5,
            presence_calls_window: Duration::from_secs(30),
            outbound_queue_bytes: 16 * 1024 * 1024,
            max_held_write_bytes: 8 * 1024 * 1024,
            max_persist_ttl: Duration::from_secs(3 * 24 * 3600),
            max_persist_per_connection: 64,
            max_persist_queued: 10_000,
            max_persist_queued_bytes: 16 * 1024 * 1024,
            max_pending_joins_per_connection: 16,
            max_pending_authorizations: 10_000,
            joins_per_second: 20.0,
            join_burst: 50,
            max_presence_meta_bytes: 32 * 1024,
            max_presence_metas_per_key: 100,
            max_presence_keys_per_topic: 10_000,
            max_presence_bytes_per_topic: 8 * 1024 * 1024,
            max_batch_messages: 1000,
            publish_queue_messages: 65_536,
            publish_queue_bytes: 64 * 1024 * 1024,
            metrics: false,
            metrics_token: None,
            inspector: true,
            node: NodeConfig::default(),
        }
    }
}

/// One address to bind. `optional` addresses (the IPv6 half of `*` and of localhost) may fail
/// to bind on hosts without IPv6 without failing the start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListenTarget {
    pub addr: SocketAddr,
    pub optional: bool,
}

pub(crate) fn listen_targets(spec: &str, port: u16) -> Result<Vec<ListenTarget>, ServerError> {
    let mut out: Vec<ListenTarget> = Vec::new();
    let mut push = |addr: SocketAddr, optional: bool| {
        if !out.iter().any(|t| t.addr == addr) {
            out.push(ListenTarget { addr, optional });
        }
    };
    let entries: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if entries.is_empty() {
        push(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            false,
        );
        push(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port), true);
    }
    for entry in entries {
        if entry == "*" {
            push(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                false,
            );
            push(
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
                true,
            );
            continue;
        }
        let host = entry
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(entry);
        if let Ok(ip) = host.parse::<IpAddr>() {
            push(SocketAddr::new(ip, port), false);
            continue;
        }
        if host.eq_ignore_ascii_case("localhost") {
            push(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
                false,
            );
            push(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port), true);
            continue;
        }
        let resolved = (host, port)
            .to_socket_addrs()
            .map_err(|e| ServerError::InvalidListenAddress(entry.to_string(), e.to_string()))?;
        let mut any = false;
        for addr in resolved {
            any = true;
            push(addr, false);
        }
        if !any {
            return Err(ServerError::InvalidListenAddress(
                entry.to_string(),
                "host name resolved to no address".to_string(),
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(spec: &str) -> Vec<(String, bool)> {
        listen_targets(spec, 4000)
            .unwrap()
            .into_iter()
            .map(|t| (t.addr.to_string(), t.optional))
            .collect()
    }

    #[test]
    fn star_means_all_v4_and_optional_v6() {
        assert_eq!(
            addrs("*"),
            vec![("0.0.0.0:4000".into(), false), ("[::]:4000".into(), true)]
        );
    }

    #[test]
    fn empty_means_localhost() {
        assert_eq!(
            addrs(" "),
            vec![
                ("127.0.0.1:4000".into(), false),
                ("[::1]:4000".into(), true)
            ]
        );
    }

    #[test]
    fn lists_literals_and_dedups() {
        assert_eq!(
            addrs("127.0.0.1, [::1],127.0.0.1,,"),
            vec![
                ("127.0.0.1:4000".into(), false),
                ("[::1]:4000".into(), false)
            ]
        );
    }

    #[test]
    fn bad_host_is_an_error() {
        assert!(matches!(
            listen_targets("no such host.invalid", 1),
            Err(ServerError::InvalidListenAddress(..))
        ));
    }

    #[test]
    fn defaults_match_supabase() {
        let c = Config::default();
        assert_eq!(c.port, 4000);
        assert_eq!(c.max_frame_bytes, 5_000_000);
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.worker_threads, 2);
        assert!(!c.authorize_private);
    }
}
