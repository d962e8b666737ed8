//! Every setting of pg_realtime, in one place: the `realtime.*` GUCs, their registration, and
//! typed accessors that apply each setting's unit and clamp.
//!
//! The socket server's threads may not read GUCs: the worker's main thread snapshots the
//! settings they need into a [`realtime_server::Config`] ([`server_config`]) at start and after
//! each SIGHUP.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use realtime_server::{Config, NodeConfig};
use std::ffi::{CStr, CString};
use std::time::Duration;

/// Addresses the WebSocket/HTTP server listens on: a comma-separated list of host names or IP
/// addresses, `*` for all interfaces. Restart to change.
static LISTEN_ADDRESSES: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"localhost"));

/// TCP port of the WebSocket/HTTP server. Restart to change.
static PORT: GucSetting<i32> = GucSetting::<i32>::new(4000);

/// Database the background worker connects to; the extension must be created there.
static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));

/// Shared secret for HS256/HS384/HS512 tokens. `SHOW` and `current_setting` print it masked:
/// superuser-only settings are still readable by `pg_read_all_settings` (so by `pg_monitor`).
static JWT_SECRET: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// A file holding the HS* secret, read by the worker at start and at each reload. Preferred to
/// `realtime.jwt_secret`, whose value PostgreSQL logs when a reload changes it.
static JWT_SECRET_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// When set, a token's `role` must be a role this one is a member of (PostgREST's
/// authenticator rule); superusers are refused whatever it says.
static AUTHENTICATOR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// A JWKS document (`{"keys": [...]}`) for RS*, ES* and EdDSA tokens, keys chosen by `kid`.
static JWT_JWKS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The topic of the message being inserted; set by `realtime.send` and by the worker's
/// authorization probes, read by `realtime.topic()` in RLS policies.
pub static TOPIC: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));

/// How long stored messages are kept, in seconds (partitions are dropped by day).
static RETENTION: GucSetting<i32> = GucSetting::<i32>::new(3 * 24 * 3600);

/// How often the worker runs partition maintenance, in seconds.
static MAINTENANCE_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(3600);

/// Size of the shared-memory commit queue, in kB.
static QUEUE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(32 * 1024);

/// Largest broadcast payload, in kB (JSON text or binary bytes).
static MAX_PAYLOAD_SIZE: GucSetting<i32> = GucSetting::<i32>::new(3000);

/// Concurrent WebSocket connections the server accepts.
static MAX_CONNECTIONS: GucSetting<i32> = GucSetting::<i32>::new(20_000);

/// Channels one WebSocket connection may join.
static MAX_CHANNELS_PER_CONNECTION: GucSetting<i32> = GucSetting::<i32>::new(100);

/// Frames that may wait for one slow connection before it is disconnected.
static OUTBOUND_QUEUE: GucSetting<i32> = GucSetting::<i32>::new(1024);

/// Largest `config.broadcast.replay.limit` honoured (Supabase caps it at 25; a resume after an
/// offset wants everything it missed).
static REPLAY_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// Public channels may replay their stored messages too (anyone can then read them).
static PUBLIC_REPLAY: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Presence calls (track/untrack) one channel may make per window; 0 turns the limit off.
static PRESENCE_CALLS_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(5);

/// The presence rate-limit window, in seconds.
static PRESENCE_CALLS_WINDOW: GucSetting<i32> = GucSetting::<i32>::new(30);

/// Seconds without any frame from a client before its socket is closed.
static IDLE_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(60);

/// Milliseconds to wait before refusing a connection (slows down token-guessing clients).
static CONNECT_ERROR_DELAY: GucSetting<i32> = GucSetting::<i32>::new(2000);

/// Milliseconds to wait before refusing a join (phoenix.js retries joins forever).
static JOIN_ERROR_DELAY: GucSetting<i32> = GucSetting::<i32>::new(5000);

/// Refuse public channels.
static PRIVATE_ONLY: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Whether the primary's worker writes socket presence changes into `realtime.presence_events`.
static PRESENCE_EVENTS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Threads of the network runtime.
static WORKER_THREADS: GucSetting<i32> = GucSetting::<i32>::new(2);

/// Bytes that may wait for one connection before it is disconnected as too slow, in kB.
static OUTBOUND_QUEUE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024);

/// Joins one connection may make per second once its burst is spent; 0 turns the limit off.
static JOINS_PER_SECOND: GucSetting<i32> = GucSetting::<i32>::new(20);

/// Joins one connection may make at once.
static JOIN_BURST: GucSetting<i32> = GucSetting::<i32>::new(50);

/// Private joins of one connection that may wait for their RLS check at once.
static MAX_PENDING_JOINS: GucSetting<i32> = GucSetting::<i32>::new(16);

/// Largest presence meta a client may track, in kB.
static MAX_PRESENCE_META_SIZE: GucSetting<i32> = GucSetting::<i32>::new(32);

/// Presence keys one topic may hold.
static MAX_PRESENCE_KEYS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// Bytes of presence (keys and metas) one topic may hold, in kB.
static MAX_PRESENCE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(8 * 1024);

/// Messages one REST batch may carry.
static MAX_BATCH_MESSAGES: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// What `realtime.send` does when the insert fails.
static SEND_ERRORS: GucSetting<SendErrors> = GucSetting::<SendErrors>::new(SendErrors::Warning);

/// Whether a transaction whose only writes are `realtime.send` messages waits for its commit
/// to reach disk (off: it commits as with `synchronous_commit = off`, for that transaction only).
static SEND_SYNCHRONOUS_COMMIT: GucSetting<bool> = GucSetting::<bool>::new(true);

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum SendErrors {
    /// Supabase's behaviour: a WARNING, the message is lost, the caller's transaction goes on.
    /// Every lost message is counted in `realtime.stats()`.
    #[name = c"warning"]
    Warning,
    /// Raise the error, so the caller's transaction fails and nothing is lost silently.
    #[name = c"error"]
    Error,
}

/// Serve `GET /metrics` (Prometheus text format) on the worker's port.
static METRICS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// When set, `GET /metrics` requires `Authorization: Bearer <this token>`. Masked like the JWT
/// secret: superuser-only settings are still readable by `pg_read_all_settings`.
static METRICS_TOKEN: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Serve the inspector page (`GET /inspector`).
static INSPECTOR: GucSetting<bool> = GucSetting::<bool>::new(true);

/// This node's name in other nodes' logs; empty means `<host name>:<realtime.port>`.
static NODE_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Seconds another node's presence members survive without news from that node.
static NODE_LEASE: GucSetting<i32> = GucSetting::<i32>::new(10);

/// On a standby: how its worker reaches the primary; empty means `primary_conninfo`.
static PRIMARY_CONNINFO: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub fn init() {
    let none = GucFlags::default();
    GucRegistry::define_string_guc(
        c"realtime.listen_addresses",
        c"Addresses the realtime WebSocket/HTTP server listens on.",
        c"Comma-separated host names or IP addresses; '*' means all interfaces.",
        &LISTEN_ADDRESSES,
        GucContext::Postmaster,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.port",
        c"TCP port of the realtime WebSocket/HTTP server.",
        c"",
        &PORT,
        1,
        65535,
        GucContext::Postmaster,
        none,
    );
    GucRegistry::define_string_guc(
        c"realtime.database",
        c"Database the realtime background worker serves.",
        c"CREATE EXTENSION pg_realtime must be run in this database.",
        &DATABASE,
        GucContext::Postmaster,
        none,
    );
    // SAFETY: the show hook cannot panic.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"realtime.jwt_secret",
            c"Secret used to verify HS256/HS384/HS512 client tokens.",
            c"Shown masked. Prefer realtime.jwt_secret_file: a reload that changes this setting logs its value.",
            &JWT_SECRET,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            None,
            None,
            Some(show_masked_secret),
        );
    }
    GucRegistry::define_string_guc(
        c"realtime.jwt_secret_file",
        c"File holding the secret used to verify HS256/HS384/HS512 client tokens.",
        c"Read by the worker at start and reload; it should be readable only by the server's OS user. Overrides realtime.jwt_secret.",
        &JWT_SECRET_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"realtime.authenticator",
        c"Role whose member roles client tokens may become.",
        c"Empty: any role that is not a superuser. Set: also only roles granted to this role (GRANT anon TO it).",
        &AUTHENTICATOR,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"realtime.jwt_jwks",
        c"JWKS document used to verify RS*, ES* and EdDSA client tokens.",
        c"A JSON object {\"keys\": [...]}; the key is chosen by the token's kid.",
        &JWT_JWKS,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"realtime.topic",
        c"Topic of the realtime message being inserted or authorized.",
        c"Read by realtime.topic() in row-level security policies.",
        &TOPIC,
        GucContext::Userset,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.retention",
        c"How long messages are kept in realtime.messages.",
        c"Daily partitions older than this are dropped by the background worker.",
        &RETENTION,
        3600,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"realtime.maintenance_interval",
        c"How often the background worker maintains the partitions of realtime.messages.",
        c"",
        &MAINTENANCE_INTERVAL,
        1,
        24 * 3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"realtime.queue_size",
        c"Size of the shared-memory queue of committed messages.",
        c"A transaction whose messages do not fit fails at commit.",
        &QUEUE_SIZE,
        64,
        1024 * 1024,
        GucContext::Postmaster,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"realtime.max_payload_size",
        c"Largest broadcast payload.",
        c"",
        &MAX_PAYLOAD_SIZE,
        1,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"realtime.max_connections",
        c"Concurrent WebSocket connections the realtime server accepts.",
        c"",
        &MAX_CONNECTIONS,
        1,
        1_000_000,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.max_channels_per_connection",
        c"Channels one WebSocket connection may join.",
        c"",
        &MAX_CHANNELS_PER_CONNECTION,
        1,
        100_000,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.outbound_queue",
        c"Frames that may wait for one connection before it is disconnected as too slow.",
        c"",
        &OUTBOUND_QUEUE,
        16,
        1_000_000,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.replay_limit",
        c"Most stored messages one join may replay (config.broadcast.replay.limit).",
        c"Larger requests are clamped to this value, and a resume that misses more is told so. A `since` replay without a limit gets 25, as in Supabase.",
        &REPLAY_LIMIT,
        1,
        10_000,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.presence_calls_limit",
        c"Presence calls (track/untrack) one channel may make per window; 0 means no limit.",
        c"A channel that exceeds it is closed with \"Client presence rate limit exceeded\", as Supabase does (5 per 30 s).",
        &PRESENCE_CALLS_LIMIT,
        0,
        1_000_000,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.presence_calls_window",
        c"The window of realtime.presence_calls_limit.",
        c"",
        &PRESENCE_CALLS_WINDOW,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"realtime.idle_timeout",
        c"Time without any frame from a client after which its socket is closed.",
        c"",
        &IDLE_TIMEOUT,
        1,
        24 * 3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"realtime.connect_error_delay",
        c"Delay before a refused WebSocket connection is answered.",
        c"",
        &CONNECT_ERROR_DELAY,
        0,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"realtime.join_error_delay",
        c"Delay before a refused channel join is answered.",
        c"",
        &JOIN_ERROR_DELAY,
        0,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"realtime.presence_events",
        c"Write socket presence joins, updates and leaves into realtime.presence_events.",
        c"Rows are written by the primary's worker in batches; put triggers on the table to react to them.",
        &PRESENCE_EVENTS,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_bool_guc(
        c"realtime.public_replay",
        c"Let joins of public channels replay stored messages (config.broadcast.replay).",
        c"Off as in Supabase: anyone may join a public channel, so anyone could then read its stored history. Public messages get their offsets stored only while it is on.",
        &PUBLIC_REPLAY,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_bool_guc(
        c"realtime.private_only",
        c"Refuse joins of public channels.",
        c"",
        &PRIVATE_ONLY,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.worker_threads",
        c"Threads of the realtime network runtime.",
        c"",
        &WORKER_THREADS,
        1,
        64,
        GucContext::Postmaster,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.outbound_queue_size",
        c"Bytes that may wait for one connection before it is disconnected as too slow.",
        c"Bounds each connection's outbound queue in bytes, as realtime.outbound_queue bounds it in frames.",
        &OUTBOUND_QUEUE_SIZE,
        64,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"realtime.joins_per_second",
        c"Joins one connection may make per second once its burst is spent; 0 means no limit.",
        c"Past it a join is refused with ClientJoinRateLimitReached.",
        &JOINS_PER_SECOND,
        0,
        1_000_000,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.join_burst",
        c"Joins one connection may make at once before realtime.joins_per_second applies.",
        c"",
        &JOIN_BURST,
        1,
        1_000_000,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.max_pending_joins",
        c"Private joins of one connection that may wait for their RLS check at once.",
        c"",
        &MAX_PENDING_JOINS,
        1,
        100_000,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.max_presence_meta_size",
        c"Largest presence meta a client may track.",
        c"",
        &MAX_PRESENCE_META_SIZE,
        1,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"realtime.max_presence_keys",
        c"Presence keys one topic may hold.",
        c"",
        &MAX_PRESENCE_KEYS,
        1,
        10_000_000,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.max_presence_size",
        c"Bytes of presence (keys and metas) one topic may hold.",
        c"Also bounds the presence_state a joining client receives.",
        &MAX_PRESENCE_SIZE,
        64,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"realtime.max_batch_messages",
        c"Messages one REST batch (POST /realtime/v1/api/broadcast) may carry.",
        c"",
        &MAX_BATCH_MESSAGES,
        1,
        1_000_000,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_string_guc(
        c"realtime.node_name",
        c"Name of this node in the logs of the other nodes.",
        c"Empty: the host name and realtime.port.",
        &NODE_NAME,
        GucContext::Postmaster,
        none,
    );
    GucRegistry::define_int_guc(
        c"realtime.node_lease",
        c"Seconds another node's presence members survive without news from that node.",
        c"Nodes send a heartbeat four times per lease; a stopped or unreachable node's members leave after it.",
        &NODE_LEASE,
        1,
        3600,
        GucContext::Postmaster,
        none,
    );
    GucRegistry::define_string_guc(
        c"realtime.primary_conninfo",
        c"How a standby's realtime worker connects to the primary.",
        c"Empty: primary_conninfo. The database is always realtime.database; the user must be a superuser or be granted realtime._node_relay and realtime._node_authorize.",
        &PRIMARY_CONNINFO,
        GucContext::Postmaster,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_bool_guc(
        c"realtime.metrics",
        c"Serve Prometheus metrics at GET /metrics on the realtime port.",
        c"Off by default: the numbers tell anyone who reaches the port how busy the server is. See also realtime.metrics_token.",
        &METRICS,
        GucContext::Sighup,
        none,
    );
    // SAFETY: the show hook cannot panic.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"realtime.metrics_token",
            c"Bearer token GET /metrics requires when set.",
            c"Shown masked. Scrapers send Authorization: Bearer <token>; without it the answer is 401.",
            &METRICS_TOKEN,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            None,
            None,
            Some(show_masked_metrics_token),
        );
    }
    GucRegistry::define_bool_guc(
        c"realtime.inspector",
        c"Serve the inspector page at GET /inspector on the realtime port.",
        c"A static page (embedded, nothing fetched from elsewhere) to join a channel with a pasted token, watch broadcasts and presence, send, and see why a join is refused.",
        &INSPECTOR,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_enum_guc(
        c"realtime.send_errors",
        c"What realtime.send does when storing a message fails: warning or error.",
        c"warning keeps the caller's transaction going and counts the lost message in realtime.stats(); error raises.",
        &SEND_ERRORS,
        GucContext::Userset,
        none,
    );
    GucRegistry::define_bool_guc(
        c"realtime.send_synchronous_commit",
        c"Whether a transaction that only sends messages waits for its commit to reach disk.",
        c"off: a transaction whose only writes are realtime.send messages commits as with synchronous_commit = off, so neither it nor its subscribers wait for the disk; a crash may then lose the last moments of such messages from realtime.messages (not from the clients that got them). Transactions that write anything else are never affected.",
        &SEND_SYNCHRONOUS_COMMIT,
        GucContext::Userset,
        none,
    );
}

/// A string setting as Rust text; unset and empty are the same.
fn text(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

/// What `SHOW realtime.jwt_secret` prints: whether it is set, never the secret.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn show_masked_secret() -> *const std::ffi::c_char {
    let set = JWT_SECRET
        .get()
        .is_some_and(|secret| !secret.as_bytes().is_empty());
    if set { c"********" } else { c"" }.as_ptr()
}

/// What `SHOW realtime.metrics_token` prints: whether it is set, never the token.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn show_masked_metrics_token() -> *const std::ffi::c_char {
    let set = METRICS_TOKEN
        .get()
        .is_some_and(|token| !token.as_bytes().is_empty());
    if set { c"********" } else { c"" }.as_ptr()
}

/// The HS* secret: the contents of `realtime.jwt_secret_file` (without a trailing newline) when
/// that is set, else `realtime.jwt_secret`. A file that cannot be read leaves no secret, and
/// the log names the file, never its contents.
fn jwt_secret() -> Option<String> {
    let Some(path) = text(&JWT_SECRET_FILE) else {
        return text(&JWT_SECRET);
    };
    use std::os::unix::fs::PermissionsExt;
    if std::fs::metadata(&path).is_ok_and(|meta| meta.permissions().mode() & 0o077 != 0) {
        pgrx::warning!(
            "pg_realtime: realtime.jwt_secret_file \"{path}\" is readable by other OS users; chmod 600 it"
        );
    }
    match std::fs::read_to_string(&path) {
        Ok(contents) => {
            Some(contents.trim_end_matches(['\r', '\n']).to_string()).filter(|s| !s.is_empty())
        }
        Err(e) => {
            pgrx::warning!("pg_realtime: cannot read realtime.jwt_secret_file \"{path}\": {e}");
            None
        }
    }
}

/// The database the worker serves.
pub fn database() -> String {
    text(&DATABASE).unwrap_or_else(|| "postgres".into())
}

/// The role whose members tokens may become, when set.
pub fn authenticator() -> Option<String> {
    text(&AUTHENTICATOR)
}

/// How long stored messages are kept.
pub fn retention() -> Duration {
    seconds(&RETENTION)
}

/// Time between partition maintenance rounds.
pub fn maintenance_interval() -> Duration {
    seconds(&MAINTENANCE_INTERVAL).max(Duration::from_secs(1))
}

/// The commit queue's size in bytes (fixed at server start).
pub fn queue_bytes() -> usize {
    kb_bytes(&QUEUE_SIZE)
}

/// The largest payload in bytes.
pub fn max_payload_bytes() -> usize {
    kb_bytes(&MAX_PAYLOAD_SIZE)
}

/// Whether presence changes are written into `realtime.presence_events`.
pub fn presence_events() -> bool {
    PRESENCE_EVENTS.get()
}

/// Whether message-only transactions wait for the disk at commit.
pub fn send_synchronous_commit() -> bool {
    SEND_SYNCHRONOUS_COMMIT.get()
}

/// What `realtime.send` does when storing fails.
pub fn send_errors() -> SendErrors {
    SEND_ERRORS.get()
}

/// The settings the socket server reads, as the main thread sees them now.
pub fn server_config() -> Config {
    Config {
        listen_addresses: text(&LISTEN_ADDRESSES).unwrap_or_default(),
        port: u16::try_from(PORT.get()).unwrap_or(4000),
        jwt_secret: jwt_secret(),
        jwt_jwks: text(&JWT_JWKS),
        max_connections: count(&MAX_CONNECTIONS),
        max_channels_per_connection: count(&MAX_CHANNELS_PER_CONNECTION),
        max_payload_bytes: max_payload_bytes(),
        outbound_queue: count(&OUTBOUND_QUEUE),
        idle_timeout: seconds(&IDLE_TIMEOUT).max(Duration::from_secs(1)),
        connect_error_delay: millis(&CONNECT_ERROR_DELAY),
        join_error_delay: millis(&JOIN_ERROR_DELAY),
        private_only: PRIVATE_ONLY.get(),
        worker_threads: count(&WORKER_THREADS),
        authorize_private: true,
        max_replay_limit: count(&REPLAY_LIMIT),
        public_replay: PUBLIC_REPLAY.get(),
        max_persist_ttl: retention(),
        presence_calls_limit: PRESENCE_CALLS_LIMIT.get().max(0) as u32,
        presence_calls_window: seconds(&PRESENCE_CALLS_WINDOW).max(Duration::from_secs(1)),
        outbound_queue_bytes: kb_bytes(&OUTBOUND_QUEUE_SIZE),
        joins_per_second: f64::from(JOINS_PER_SECOND.get().max(0)),
        join_burst: count(&JOIN_BURST) as u32,
        max_pending_joins_per_connection: count(&MAX_PENDING_JOINS),
        max_presence_meta_bytes: kb_bytes(&MAX_PRESENCE_META_SIZE),
        max_presence_keys_per_topic: count(&MAX_PRESENCE_KEYS),
        max_presence_bytes_per_topic: kb_bytes(&MAX_PRESENCE_SIZE),
        max_batch_messages: count(&MAX_BATCH_MESSAGES),
        metrics: METRICS.get(),
        metrics_token: text(&METRICS_TOKEN),
        inspector: INSPECTOR.get(),
        ..Config::default()
    }
}

/// Who this node is on the bus, read once when the worker starts. On a standby (in recovery)
/// it names the primary to link to; a standby whose link cannot be configured says why and
/// serves its own clients only.
pub fn node_config() -> NodeConfig {
    let name = text(&NODE_NAME).unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        format!("{host}:{}", PORT.get())
    });
    // SAFETY: reads shared recovery state.
    let standby = unsafe { pgrx::pg_sys::RecoveryInProgress() };
    let primary = if standby {
        let conninfo = text(&PRIMARY_CONNINFO).unwrap_or_else(|| {
            // SAFETY: primary_conninfo's GUC storage, a C string or NULL, read on the thread
            // that owns the GUCs.
            let raw = unsafe { pgrx::pg_sys::PrimaryConnInfo };
            if raw.is_null() {
                String::new()
            } else {
                // SAFETY: a non-null GUC string is NUL-terminated.
                unsafe { CStr::from_ptr(raw) }
                    .to_string_lossy()
                    .into_owned()
            }
        });
        if conninfo.is_empty() {
            pgrx::warning!(
                "pg_realtime: this standby has no primary_conninfo (nor realtime.primary_conninfo): \
                 it serves its own clients only"
            );
            None
        } else {
            match realtime_server::bus::link::link_config(&conninfo, &database()) {
                Ok(config) => Some(config),
                Err(e) => {
                    pgrx::warning!(
                        "pg_realtime: cannot use the primary's connection string ({e}); set \
                         realtime.primary_conninfo. This standby serves its own clients only"
                    );
                    None
                }
            }
        }
    } else {
        None
    };
    NodeConfig {
        name,
        lease: Duration::from_secs(NODE_LEASE.get().max(1) as u64),
        primary,
        ..NodeConfig::default()
    }
}

/// A count setting; at least 1 (the GUC's own minimum, restated so no caller divides by 0).
fn count(setting: &GucSetting<i32>) -> usize {
    setting.get().max(1) as usize
}

/// A size setting in kB, in bytes; at least 1 kB.
fn kb_bytes(setting: &GucSetting<i32>) -> usize {
    count(setting) * 1024
}

/// A setting in seconds; negative values read as 0.
fn seconds(setting: &GucSetting<i32>) -> Duration {
    Duration::from_secs(setting.get().max(0) as u64)
}

/// A setting in milliseconds; negative values read as 0.
fn millis(setting: &GucSetting<i32>) -> Duration {
    Duration::from_millis(setting.get().max(0) as u64)
}

/// `SET LOCAL name = value`, as `set_config(name, value, true)` does it: with the caller's
/// privileges (superuser settings only for a superuser). A bad value raises.
pub fn set_local(name: &CStr, value: &CStr) {
    // SAFETY: reads the current user's role, inside a transaction.
    let context = if unsafe { pgrx::pg_sys::superuser() } {
        pgrx::pg_sys::GucContext::PGC_SUSET
    } else {
        pgrx::pg_sys::GucContext::PGC_USERSET
    };
    // SAFETY: name and value are NUL-terminated; GUC_ACTION_LOCAL inside the caller's transaction,
    // and a bad value raises an ERROR.
    unsafe {
        pgrx::pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            context,
            pgrx::pg_sys::GucSource::PGC_S_SESSION,
            pgrx::pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            pgrx::PgLogLevel::ERROR as i32,
            false,
        );
    }
}

/// Whether public channels may replay: only then are public messages' offsets stored.
pub fn public_replay() -> bool {
    PUBLIC_REPLAY.get()
}
