//! The socket loop: frames in, the connection's outbound queue out (batched per write), the
//! idle timeout and token expiry timer, shutdown, and the closing handshake.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::Conn;
use crate::Inner;
use crate::broadcast::Frame;
use crate::outbound::{ConnHandle, Outbound};
use crate::protocol::Vsn;
use crate::refusal::Close;
use crate::usage::ConnUsage;
use crate::websocket::{FrameReader, Incoming, OutFrame, Unsent, WsIo};

/// How long a closing handshake may take before the TCP connection is just dropped.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
const SLOW_CLOSE_WRITE_TIMEOUT: Duration = Duration::from_millis(200);

/// What the upgrade request established.
pub(crate) struct ConnectInfo {
    pub vsn: Vsn,
    pub token: String,
    pub headers_json: Arc<str>,
    /// The connect token's claims (the connection's identity until a join brings another).
    pub claims: crate::jwt::Claims,
    pub remote: Option<std::net::SocketAddr>,
}

/// Decrements the live-connection count however the connection ends (even by panic).
pub(crate) struct ConnectionSlot(pub Arc<Inner>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.active_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Exit {
    Shutdown,
    SlowConsumer,
    Idle,
    Gone,
    /// The client closed, with this code to echo.
    ClosedByClient(Option<u16>),
    /// The client broke the protocol; the close frame says how.
    Broken(u16),
    /// An operator disconnected it, with this reason.
    Kicked(String),
}

/// Sets the connection up and returns the future that serves it until it closes. The setup
/// runs here rather than in the future: a future keeps room for everything it was given for as
/// long as it lives, so the unsplit socket and the connect info, used up at the start, would
/// cost every idle connection their size.
pub(crate) fn run(
    socket: WsIo,
    info: ConnectInfo,
    inner: Arc<Inner>,
) -> impl Future<Output = ()> + Send + 'static {
    let cfg = inner.config();
    let (handle, rx) = ConnHandle::new(cfg.outbound_queue, cfg.outbound_queue_bytes);
    let handle = Arc::new(handle);
    let vsn_text = match info.vsn {
        Vsn::V1 => "1.0.0",
        Vsn::V2 => "2.0.0",
    };
    let usage = Arc::new(ConnUsage::new(
        handle.clone(),
        info.remote,
        vsn_text,
        Some(&info.claims),
    ));
    let mut io = Io {
        conn: Conn::new(inner.clone(), info, usage.clone()),
        socket,
        reader: FrameReader::new(inner.max_frame_bytes),
        unsent: Unsent::default(),
        rx,
    };
    let idle_timeout = cfg.idle_timeout;
    async move {
        let _registered = inner.conns.register(usage.clone());
        let exit = serve(&mut io, &usage, &inner, idle_timeout).await;
        // Boxed: the closing handshake's timers live only while it runs, not in every idle
        // connection's future.
        Box::pin(close(io, exit, &inner)).await;
    }
}

/// What the connection's loop and its close share.
struct Io {
    conn: Conn,
    socket: WsIo,
    reader: FrameReader,
    /// A write the loop left unfinished, which the close completes before its close frame.
    unsent: Unsent,
    rx: Outbound,
}

/// Frames in, queued frames out, timers and signals, until the connection should end.
async fn serve(io: &mut Io, usage: &ConnUsage, inner: &Inner, idle_timeout: Duration) -> Exit {
    let Io {
        conn,
        socket,
        reader,
        unsent,
        rx,
    } = io;
    let mut shutdown = inner.shutdown.clone();
    let mut last_inbound = Instant::now();
    // The loop runs once per delivered frame, so it sets nothing up per turn: these futures
    // live as long as the connection. One timer serves the idle timeout and the channels' token
    // expiry; traffic only moves `last_inbound`, and the timer is re-armed when it fires or when
    // a token expires sooner (a reloaded idle timeout applies from the next firing).
    let timer = tokio::time::sleep_until(last_inbound + idle_timeout);
    tokio::pin!(timer);
    let overflowed = usage.handle.overflowed();
    tokio::pin!(overflowed);
    let stop = stopped(&mut shutdown);
    tokio::pin!(stop);
    let kicked = usage.kicked();
    tokio::pin!(kicked);

    'conn: loop {
        if let Some(expiry) = conn.next_expiry()
            && expiry < timer.deadline()
        {
            timer.as_mut().reset(expiry);
        }
        tokio::select! {
            biased;
            _ = &mut stop => break Exit::Shutdown,
            _ = &mut overflowed => break Exit::SlowConsumer,
            reason = &mut kicked => break Exit::Kicked(reason),
            // Before traffic: a client that keeps the loop busy must not delay its idle close
            // or its channels' token expiry.
            _ = &mut timer => {
                if let Some(exit) = on_timer(conn, timer.as_mut(), last_inbound, inner) {
                    break exit;
                }
            }
            Some(frame) = rx.recv() => {
                // Whatever else is already queued goes out with it in one write (one system
                // call instead of one per frame).
                // Counted per batch, into this connection's own counters: nothing shared is
                // touched per frame.
                let mut bytes = frame.len() as u64;
                let mut batch = vec![out_frame(frame)];
                while batch.len() < WRITE_BATCH
                    && let Some(frame) = rx.try_recv()
                {
                    bytes += frame.len() as u64;
                    batch.push(out_frame(frame));
                }
                let frames = batch.len() as u64;
                *unsent = batch.into();
                let write = unsent.write_to(socket);
                tokio::pin!(write);
                // A stuck write must not hide a shutdown, an overflow or an expired token.
                loop {
                    tokio::select! {
                        biased;
                        sent = &mut write => {
                            if sent.is_err() {
                                break 'conn Exit::Gone;
                            }
                            usage.count_out(frames, bytes);
                            break;
                        }
                        _ = &mut overflowed => break 'conn Exit::SlowConsumer,
                        _ = &mut stop => break 'conn Exit::Shutdown,
                        _ = &mut timer => {
                            if let Some(exit) =
                                on_timer(conn, timer.as_mut(), last_inbound, inner)
                            {
                                break 'conn exit;
                            }
                        }
                    }
                }
            }
            Some(internal) = conn.answers.recv() => conn.on_internal(*internal),
            incoming = std::future::poll_fn(|cx| reader.poll_next(cx, socket)) => {
                last_inbound = Instant::now();
                match incoming {
                    Ok(Incoming::Text(t)) => {
                        usage.count_in(t.len());
                        conn.on_text(t.as_str());
                    }
                    Ok(Incoming::Binary(b)) => {
                        usage.count_in(b.len());
                        conn.on_binary(b);
                    }
                    Ok(Incoming::Ping(payload)) => {
                        // A client that pings but does not read gets no longer than a close.
                        unsent.push(OutFrame::pong(payload));
                        let pong = unsent.write_to(socket);
                        match tokio::time::timeout(CLOSE_WRITE_TIMEOUT, pong).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => break Exit::Gone,
                            Err(_) => break Exit::SlowConsumer,
                        }
                    }
                    Ok(Incoming::Close(code)) => break Exit::ClosedByClient(code),
                    Err(e) => {
                        if let Some(code) = e.close_code() {
                            log::debug!("closing a realtime connection: {e}");
                            break Exit::Broken(code);
                        }
                        break Exit::Gone;
                    }
                }
            }
        }
    }
}

/// Says goodbye as `exit` requires: the rest of an interrupted write, the close frame with its
/// code, and the client's half of the handshake.
async fn close(io: Io, exit: Exit, inner: &Inner) {
    let Io {
        mut conn,
        mut socket,
        mut reader,
        mut unsent,
        mut rx,
    } = io;
    if let Exit::Kicked(reason) = &exit {
        log::info!(
            "closing a realtime connection on request: {}",
            crate::log_excerpt(reason)
        );
        // The system messages go out before the close frame: what is already queued is
        // written first, within the close's time limit.
        conn.disconnected(reason);
        while let Some(frame) = rx.try_recv() {
            unsent.push(out_frame(frame));
        }
    }
    let close = match &exit {
        Exit::Kicked(_) => Some(close_frame(Close::Disconnected)),
        Exit::Shutdown => Some(close_frame(Close::Shutdown)),
        Exit::SlowConsumer => {
            let reason = Close::SlowConsumer.reason();
            log::info!("closing a realtime connection: {reason}");
            inner.metrics.slow_consumer();
            Some(close_frame(Close::SlowConsumer))
        }
        Exit::Idle => Some(close_frame(Close::Idle)),
        // The client's close is answered with its own code (RFC 6455, 5.5.1).
        Exit::ClosedByClient(code) => Some(OutFrame::close(code.unwrap_or(1000), "")),
        Exit::Broken(code) => Some(OutFrame::close(*code, "")),
        Exit::Gone => None,
    };
    drop(conn);
    // A slow consumer is not reading: its close frame probably cannot even be written, so it
    // gets a short try and no wait for the client's half of the handshake.
    let write_timeout = match exit {
        Exit::SlowConsumer => SLOW_CLOSE_WRITE_TIMEOUT,
        _ => CLOSE_WRITE_TIMEOUT,
    };
    if let Some(frame) = close {
        unsent.push(frame);
        let written = tokio::time::timeout(write_timeout, unsent.write_to(&mut socket)).await;
        // Only a close the server began waits for the client's answer.
        let answer_due = matches!(exit, Exit::Kicked(_) | Exit::Shutdown | Exit::Idle);
        if matches!(written, Ok(Ok(()))) && answer_due {
            let _ = tokio::time::timeout(
                CLOSE_WRITE_TIMEOUT,
                drain_until_closed(&mut reader, &mut socket),
            )
            .await;
        }
    }
    let _ = tokio::time::timeout(write_timeout, socket.shutdown()).await;
}

/// The idle timeout or a channel's token expiry is due: closes what expired and re-arms the
/// timer, or says the connection is idle.
fn on_timer(
    conn: &mut Conn,
    timer: std::pin::Pin<&mut tokio::time::Sleep>,
    last_inbound: Instant,
    inner: &Inner,
) -> Option<Exit> {
    let idle_deadline = last_inbound + inner.config().idle_timeout;
    if idle_deadline <= Instant::now() {
        return Some(Exit::Idle);
    }
    conn.expire_tokens();
    let next = conn
        .next_expiry()
        .map_or(idle_deadline, |e| e.min(idle_deadline));
    timer.reset(next);
    None
}

/// Frames written per flush at most, so one busy connection cannot hog its thread.
const WRITE_BATCH: usize = 64;

fn close_frame(close: Close) -> OutFrame {
    OutFrame::close(close.code(), close.reason())
}

fn out_frame(frame: Frame) -> OutFrame {
    match frame {
        Frame::Text(t) => OutFrame::text(t.into()),
        Frame::Binary(b) => OutFrame::binary(b),
    }
}

/// Resolves once the server shuts down (immediately if it already has).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Reads until the client's close frame (or the end of the connection).
async fn drain_until_closed(reader: &mut FrameReader, socket: &mut WsIo) {
    loop {
        match std::future::poll_fn(|cx| reader.poll_next(cx, socket)).await {
            Ok(Incoming::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
}
