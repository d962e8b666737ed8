//! Accepted sockets read through [`ReadAhead`], so the WebSocket library's read buffer can be
//! small. That buffer is allocated per connection and kept for the connection's life, and the
//! library reads at most its size per system call: idle connections want it small, a client
//! sending a large frame wants it large. Under it, each read that asks for less than
//! [`CHUNK`] reads up to [`CHUNK`] from the socket into the stack and keeps what the caller
//! could not take on the heap until it is taken, so a large frame still costs one system call
//! per [`CHUNK`] and an idle connection holds nothing here.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Bytes read from the socket per system call at most, when the caller asks for less.
const CHUNK: usize = 16 * 1024;

/// A socket whose small reads are served from one larger read.
pub(crate) struct ReadAhead<S> {
    inner: S,
    /// Read from the socket and not yet taken; empty (no allocation) between bursts.
    left: Vec<u8>,
    /// How much of `left` was taken.
    taken: usize,
}

impl<S> ReadAhead<S> {
    pub(crate) fn new(inner: S) -> ReadAhead<S> {
        ReadAhead {
            inner,
            left: Vec::new(),
            taken: 0,
        }
    }

    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.taken < this.left.len() {
            let n = buf.remaining().min(this.left.len() - this.taken);
            buf.put_slice(&this.left[this.taken..this.taken + n]);
            this.taken += n;
            if this.taken == this.left.len() {
                this.left = Vec::new();
                this.taken = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= CHUNK {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let mut stack = [MaybeUninit::<u8>::uninit(); CHUNK];
        let mut chunk = ReadBuf::uninit(&mut stack);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
        let read = chunk.filled();
        let n = buf.remaining().min(read.len());
        buf.put_slice(&read[..n]);
        if n < read.len() {
            this.left = read[n..].to_vec();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TCP listener whose connections read through [`ReadAhead`].
pub(crate) struct Listener(pub TcpListener);

impl axum::serve::Listener for Listener {
    type Io = ReadAhead<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The plain listener's accept: it retries, and backs off when out of files.
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (ReadAhead::new(stream), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_one() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let sent: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        tx.write_all(&sent).await.unwrap();
        drop(tx);
        let mut r = ReadAhead::new(rx);
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
            assert!(r.left.len() <= CHUNK);
        }
        assert_eq!(got, sent);
        assert_eq!(r.left.capacity(), 0, "nothing is kept once taken");
    }

    #[tokio::test]
    async fn large_reads_go_straight_to_the_socket() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        tx.write_all(&[7u8; 50_000]).await.unwrap();
        let mut r = ReadAhead::new(rx);
        let mut big = vec![0u8; 64 * 1024];
        let n = r.read(&mut big).await.unwrap();
        assert!(n > 0 && big[..n].iter().all(|b| *b == 7));
        assert!(r.left.is_empty());
    }
}
