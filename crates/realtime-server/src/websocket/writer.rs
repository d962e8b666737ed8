//! Server frames out, written straight from the payloads that were queued: each frame's header
//! is made on the stack and sent with its payload in one vectored write per batch, so a
//! connection keeps no write buffer, however large a frame it was once sent.

use std::io::{self, IoSlice};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// The longest header of a server frame (no mask): 2 bytes and a 64-bit length.
const MAX_HEADER: usize = 10;

/// Slices handed to one system call at most (well under any IOV_MAX).
const MAX_SLICES: usize = 128;

/// One frame to send: its header, made up front, and its payload, shared with every other
/// connection it goes to.
pub(crate) struct OutFrame {
    header: [u8; MAX_HEADER],
    header_len: u8,
    payload: Bytes,
}

impl OutFrame {
    pub(crate) fn text(payload: Bytes) -> OutFrame {
        OutFrame::new(OpCode::Data(Data::Text), payload)
    }

    pub(crate) fn binary(payload: Bytes) -> OutFrame {
        OutFrame::new(OpCode::Data(Data::Binary), payload)
    }

    pub(crate) fn pong(payload: Bytes) -> OutFrame {
        OutFrame::new(OpCode::Control(Control::Pong), payload)
    }

    /// A close frame with its code and reason (at most 123 bytes, as control frames require).
    pub(crate) fn close(code: u16, reason: &str) -> OutFrame {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut payload = Vec::with_capacity(2 + end);
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        OutFrame::new(OpCode::Control(Control::Close), payload.into())
    }

    fn new(opcode: OpCode, payload: Bytes) -> OutFrame {
        let header = FrameHeader {
            opcode,
            ..FrameHeader::default()
        };
        let mut bytes = [0u8; MAX_HEADER];
        let mut out = &mut bytes[..];
        // A final, unmasked header is at most MAX_HEADER bytes, so formatting into it cannot
        // run out of room.
        let formatted = header.format(payload.len() as u64, &mut out);
        debug_assert!(formatted.is_ok());
        let header_len = (MAX_HEADER - out.len()) as u8;
        OutFrame {
            header: bytes,
            header_len,
            payload,
        }
    }

    fn parts(&self) -> [&[u8]; 2] {
        [&self.header[..self.header_len as usize], &self.payload]
    }
}

/// Frames being written and how far the socket took them. A connection keeps it across an
/// interrupted write (a shutdown or a slow-consumer close while a frame was half written), so
/// that its close frame goes out after the rest of that frame rather than inside it.
#[derive(Default)]
pub(crate) struct Unsent {
    frames: Vec<OutFrame>,
    /// Bytes already written, counted from the first frame's header.
    written: usize,
}

impl Unsent {
    /// Appends a frame after those not yet written.
    pub(crate) fn push(&mut self, frame: OutFrame) {
        self.frames.push(frame);
    }

    /// Writes everything, resuming where the socket stopped taking bytes, then flushes and
    /// lets the frames go. Cancel-safe: a dropped call leaves the progress recorded here.
    pub(crate) async fn write_to<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> io::Result<()> {
        loop {
            let n = {
                let slices = self.remaining();
                if slices.is_empty() {
                    break;
                }
                io.write_vectored(&slices).await?
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.written += n;
        }
        io.flush().await?;
        *self = Unsent::default();
        Ok(())
    }

    /// What is left, as up to [`MAX_SLICES`] slices.
    fn remaining(&self) -> Vec<IoSlice<'_>> {
        let mut slices = Vec::with_capacity(MAX_SLICES.min(self.frames.len() * 2));
        let mut skip = self.written;
        for part in self.frames.iter().flat_map(OutFrame::parts) {
            if slices.len() == MAX_SLICES {
                break;
            }
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            slices.push(IoSlice::new(&part[skip..]));
            skip = 0;
        }
        slices
    }
}

impl From<Vec<OutFrame>> for Unsent {
    fn from(frames: Vec<OutFrame>) -> Unsent {
        Unsent { frames, written: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `step` bytes per call, to exercise resumed writes.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn expected(frames: &[OutFrame]) -> Vec<u8> {
        frames
            .iter()
            .flat_map(|f| f.parts().concat())
            .collect::<Vec<u8>>()
    }

    #[tokio::test]
    async fn frames_are_written_whole_and_in_order_however_the_socket_splits_them() {
        let big = Bytes::from(vec![7u8; 70_000]);
        for step in [1, 3, 9, 100, 65_536, usize::MAX] {
            let frames = [
                OutFrame::text(Bytes::from_static(b"hello")),
                OutFrame::binary(big.clone()),
                OutFrame::text(Bytes::from(vec![b'x'; 300])),
                OutFrame::close(1000, "bye"),
            ];
            let want = expected(&frames);
            let mut io = Trickle {
                out: Vec::new(),
                step,
            };
            let mut unsent = Unsent::from(Vec::from(frames));
            unsent.write_to(&mut io).await.expect("written");
            assert_eq!(io.out, want, "step {step}");
            assert!(unsent.frames.is_empty());
        }
    }

    #[tokio::test]
    async fn an_interrupted_write_resumes_where_it_stopped_and_a_frame_pushed_after_it_follows() {
        let first = OutFrame::binary(Bytes::from(vec![1u8; 50_000]));
        let mut want = first.parts().concat();
        let mut unsent = Unsent::from(vec![first]);
        // A socket that takes 1,000 bytes, then blocks: the write is abandoned half done.
        let mut io = Trickle {
            out: Vec::new(),
            step: 1_000,
        };
        let n = {
            let slices = unsent.remaining();
            io.write_vectored(&slices).await.expect("written")
        };
        unsent.written += n;
        let close = OutFrame::close(1001, "going away");
        want.extend(close.parts().concat());
        unsent.push(close);
        unsent.write_to(&mut io).await.expect("written");
        assert_eq!(io.out, want);
    }

    #[test]
    fn headers_use_the_shortest_length_encoding() {
        assert_eq!(
            OutFrame::text(Bytes::from_static(b"hi")).parts()[0],
            [0x81, 2]
        );
        let medium = OutFrame::binary(Bytes::from(vec![0u8; 300]));
        assert_eq!(medium.parts()[0], [0x82, 126, 1, 44]);
        let large = OutFrame::binary(Bytes::from(vec![0u8; 70_000]));
        assert_eq!(large.parts()[0], [0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn a_close_reason_is_cut_to_fit_a_control_frame_on_a_character_boundary() {
        let reason = "é".repeat(100);
        let close = OutFrame::close(4000, &reason);
        let payload = close.parts()[1];
        assert!(payload.len() <= 125);
        assert_eq!(&payload[..2], &4000u16.to_be_bytes());
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }
}
