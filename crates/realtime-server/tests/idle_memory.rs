//! What one idle joined socket costs the server's heap: the bytes and allocations still held by
//! the server's threads once N sockets have connected and joined a channel, per socket.
//!
//! The clients run in this process too, on threads marked as clients, whose allocations are not
//! counted: client and server never free each other's memory (they share only the kernel's
//! sockets), so the count is the server's alone. This file is its own test binary because it
//! replaces the global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

mod common;

thread_local! {
    static CLIENT: Cell<bool> = const { Cell::new(false) };
}

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_ALLOCS: AtomicI64 = AtomicI64::new(0);
/// Live allocations by size class (16-byte classes up to 64 KiB, then one for the rest), to
/// tell what a socket's bytes are when the figure moves.
const CLASSES: usize = 4097;
static BY_SIZE: [AtomicI64; CLASSES] = [const { AtomicI64::new(0) }; CLASSES];

fn class(size: usize) -> usize {
    (size.div_ceil(16)).min(CLASSES - 1)
}

struct Counting;

fn counted() -> bool {
    // A thread being torn down has no thread-locals left; its frees are not the sockets'.
    CLIENT.try_with(|c| !c.get()).unwrap_or(false)
}

fn account(size: usize, sign: i64) {
    if counted() {
        LIVE_BYTES.fetch_add(sign * size as i64, Ordering::Relaxed);
        LIVE_ALLOCS.fetch_add(sign, Ordering::Relaxed);
        BY_SIZE[class(size)].fetch_add(sign, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on to the system allocator unchanged; the counting only reads
// the layout.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is the system allocator's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size(), 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            account(layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(layout.size(), -1);
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(layout.size(), -1);
            account(new_size, 1);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

struct Snapshot {
    bytes: i64,
    allocs: i64,
    by_size: Vec<i64>,
}

fn snapshot() -> Snapshot {
    Snapshot {
        bytes: LIVE_BYTES.load(Ordering::Relaxed),
        allocs: LIVE_ALLOCS.load(Ordering::Relaxed),
        by_size: BY_SIZE.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
    }
}

/// Connects and joins `realtime:<topic>` as the load generator's idle subscribers do.
async fn joined(addr: std::net::SocketAddr, topic: &str) -> common::Ws {
    let mut ws = common::connect(addr, "2.0.0").await;
    let join = json!([
        "1",
        "1",
        format!("realtime:{topic}"),
        "phx_join",
        {
            "config": {
                "broadcast": {"self": false, "ack": false},
                "presence": {"enabled": false},
                "private": false
            },
            "access_token": common::token()
        }
    ]);
    ws.send(Message::text(join.to_string())).await.unwrap();
    let reply: Value = common::next_json(&mut ws).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    ws
}

/// Heap bytes one idle joined socket may hold. What they are (release build, 4,997 bytes in
/// 24 allocations): the connection's task (2.9 KiB, its future and the upgrade's), the
/// channel, the socket's registration with the runtime, the connection's counters and topic
/// map, the tokens and the operator's view of the connection. No read or write buffer: the
/// WebSocket layer holds none while a socket is idle.
const MAX_BYTES_PER_SOCKET: f64 = 5.5 * 1024.0;

/// Sockets measured: enough that per-map and per-topic costs average out.
const SOCKETS: usize = 2_000;
const TOPICS: usize = 100;

/// What a socket may keep after it sent one large frame and was sent another: a WebSocket
/// library that keeps buffers as large as the largest frame would keep both frames' size.
const MAX_BYTES_KEPT_AFTER_LARGE_FRAMES: f64 = 16.0 * 1024.0;
const LARGE_FRAME: usize = 256 * 1024;
const LARGE_FRAME_SOCKETS: usize = 200;

/// The clients' runtime, on threads whose allocations are not counted (this thread's neither).
fn client_runtime() -> tokio::runtime::Runtime {
    CLIENT.with(|c| c.set(true));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(|| CLIENT.with(|c| c.set(true)))
        .enable_all()
        .build()
        .unwrap()
}

/// Frees of the handshakes and replies happen on the server's threads after the clients saw
/// the reply.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

/// Both ends of every socket are in this process: it needs two files per socket.
fn files_allowed() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a pointer to a live one.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc == 0 {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else {
        0
    }
}

/// The tests of this file count one heap: they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn an_idle_joined_socket_holds_little_of_the_heap() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The server raises the soft open-file limit to the hard one when it starts.
    let (server, addr) = common::start(realtime_server::Config {
        max_connections: (SOCKETS + TOPICS) * 2,
        ..common::test_config()
    });
    let sockets_wanted = SOCKETS.min(files_allowed().saturating_sub(2 * TOPICS + 200) / 2);
    if sockets_wanted < 500 {
        eprintln!("skipped: {} open files allowed", files_allowed());
        return;
    }
    let clients = client_runtime();

    // The first sockets set up what every later one shares (topics, maps, the timer wheel).
    let mut sockets = clients.block_on(async {
        let mut v = Vec::new();
        for i in 0..TOPICS {
            v.push(joined(addr, &format!("bench_{i}")).await);
        }
        v
    });
    settle();
    let before = snapshot();
    let more = clients.block_on(async {
        let tasks: Vec<_> = (0..sockets_wanted)
            .map(|i| {
                tokio::spawn(async move { joined(addr, &format!("bench_{}", i % TOPICS)).await })
            })
            .collect();
        let mut v = Vec::new();
        for t in tasks {
            v.push(t.await.unwrap());
        }
        v
    });
    sockets.extend(more);
    settle();
    let after = snapshot();

    let per = |a: i64, b: i64| (a - b) as f64 / sockets_wanted as f64;
    let bytes = per(after.bytes, before.bytes);
    let allocs = per(after.allocs, before.allocs);
    let mut report = format!("per idle joined socket: {bytes:.0} bytes in {allocs:.1} allocations");
    for (i, (a, b)) in after.by_size.iter().zip(&before.by_size).enumerate() {
        let n = per(*a, *b);
        if n.abs() >= 0.05 {
            report.push_str(&format!("\n  {:>6} bytes: {n:.2} per socket", i * 16));
        }
    }
    eprintln!("{report}");
    assert!(bytes <= MAX_BYTES_PER_SOCKET, "{report}");

    drop(sockets);
    clients.block_on(common::stop(server));
}

#[test]
fn a_socket_keeps_no_copy_of_the_large_frames_it_sent_and_was_sent() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (server, addr) = common::start(common::test_config());
    if files_allowed() < LARGE_FRAME_SOCKETS * 2 + 200 {
        eprintln!("skipped: {} open files allowed", files_allowed());
        return;
    }
    let clients = client_runtime();
    let mut sockets = clients.block_on(async {
        let mut v = Vec::new();
        for _ in 0..LARGE_FRAME_SOCKETS {
            v.push(joined(addr, "large").await);
        }
        v
    });
    settle();
    let before = snapshot();
    let big = "x".repeat(LARGE_FRAME);
    clients.block_on(async {
        // One broadcast of LARGE_FRAME bytes reaches every other socket.
        let broadcast = json!([null, "2", "realtime:large", "broadcast",
            {"type": "broadcast", "event": "big", "payload": {"p": big}}]);
        sockets[0]
            .send(Message::text(broadcast.to_string()))
            .await
            .unwrap();
        for ws in &mut sockets[1..] {
            let got: Value = common::next_json(ws).await;
            assert_eq!(got[3], "broadcast", "{got}");
            assert_eq!(
                got[4]["payload"]["p"].as_str().map(str::len),
                Some(LARGE_FRAME)
            );
        }
        // And every socket sends a frame as large (a heartbeat, answered in a few bytes).
        for ws in &mut sockets {
            let heartbeat = json!([null, "3", "phoenix", "heartbeat", {"p": big}]);
            ws.send(Message::text(heartbeat.to_string())).await.unwrap();
        }
        for ws in &mut sockets {
            let reply: Value = common::next_json(ws).await;
            assert_eq!(reply[4]["status"], "ok", "{reply}");
        }
    });
    settle();
    let after = snapshot();
    let kept = (after.bytes - before.bytes) as f64 / LARGE_FRAME_SOCKETS as f64;
    eprintln!("kept per socket after a {LARGE_FRAME}-byte frame each way: {kept:.0} bytes");
    assert!(
        kept <= MAX_BYTES_KEPT_AFTER_LARGE_FRAMES,
        "{kept:.0} bytes kept per socket"
    );

    drop(sockets);
    clients.block_on(common::stop(server));
}
