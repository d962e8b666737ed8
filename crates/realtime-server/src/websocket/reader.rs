//! Client frames in: header checks, unmasking, fragmented messages and control frames.
//!
//! Every byte read is held in [`FrameReader::unparsed`] only until the frame it belongs to is
//! complete, and the buffer is let go as soon as it is empty, so an idle connection holds no
//! read buffer, and one that once received a large frame does not keep its size.

use std::io::{self, Cursor};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tungstenite::Utf8Bytes;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// Bytes read per system call when no large frame is waiting to be completed. They are read
/// into the stack and only what arrived is copied to the heap.
const CHUNK: usize = 16 * 1024;

/// Control frames carry at most this much (RFC 6455, 5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// A complete message or control frame from the client.
#[derive(Debug)]
pub(crate) enum Incoming {
    Text(Utf8Bytes),
    Binary(Bytes),
    /// To be answered with a pong carrying the same payload.
    Ping(Bytes),
    /// The client's close code, if it gave one: the server answers with the same code.
    Close(Option<u16>),
}

/// Why the client's frames cannot be read any further.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("the connection ended")]
    Ended,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("frame or message larger than {0} bytes")]
    TooBig(usize),
    #[error("text message is not valid UTF-8")]
    NotUtf8,
}

impl ReadError {
    /// The close code the server sends before dropping the connection, if any.
    pub(crate) fn close_code(&self) -> Option<u16> {
        match self {
            ReadError::Ended | ReadError::Io(_) => None,
            ReadError::Protocol(_) => Some(1002),
            ReadError::NotUtf8 => Some(1007),
            ReadError::TooBig(_) => Some(1009),
        }
    }
}

/// A message whose first fragment arrived and whose last has not.
struct Partial {
    text: bool,
    data: BytesMut,
}

/// Reads client frames from a socket. All its state is in the struct, so a read may be
/// abandoned (by `select!`) at any point and resumed later without losing bytes.
pub(crate) struct FrameReader {
    /// Read and not yet part of a complete frame; unallocated when empty.
    unparsed: BytesMut,
    /// Bytes the frame at the start of `unparsed` needs in all, once its header is known.
    wanted: usize,
    partial: Option<Partial>,
    max_message: usize,
}

impl FrameReader {
    /// `max_message` bounds one frame and one reassembled message alike.
    pub(crate) fn new(max_message: usize) -> FrameReader {
        FrameReader {
            unparsed: BytesMut::new(),
            wanted: 0,
            partial: None,
            max_message,
        }
    }

    /// The next message or control frame; pongs are skipped.
    pub(crate) fn poll_next<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut R,
    ) -> Poll<Result<Incoming, ReadError>> {
        loop {
            if let Some(incoming) = self.parse()? {
                return Poll::Ready(Ok(incoming));
            }
            ready!(self.poll_fill(cx, io))?;
        }
    }

    /// Reads once from the socket into `unparsed`.
    fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut R,
    ) -> Poll<Result<(), ReadError>> {
        let had = self.unparsed.len();
        let read = if self.wanted > had + CHUNK {
            // The rest of a large frame: read straight into its place. The buffer grows with
            // what arrived (at most doubling), not to the size the header claims, so a client
            // that announces a large frame and sends little of it gets little memory.
            let step = had.max(4 * CHUNK);
            self.unparsed.resize(self.wanted.min(had + step), 0);
            let mut buf = ReadBuf::new(&mut self.unparsed[had..]);
            let polled = Pin::new(&mut *io).poll_read(cx, &mut buf);
            let n = buf.filled().len();
            self.unparsed.truncate(had + n);
            ready!(polled)?;
            n
        } else {
            let mut stack = [MaybeUninit::<u8>::uninit(); CHUNK];
            let mut buf = ReadBuf::uninit(&mut stack);
            ready!(Pin::new(&mut *io).poll_read(cx, &mut buf))?;
            self.unparsed.extend_from_slice(buf.filled());
            buf.filled().len()
        };
        if read == 0 {
            return Poll::Ready(Err(ReadError::Ended));
        }
        Poll::Ready(Ok(()))
    }

    /// Takes complete frames off `unparsed` until one makes a message or a control frame to
    /// answer; `None` when more bytes are needed.
    fn parse(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let mut cursor = Cursor::new(&self.unparsed[..]);
            let (header, length) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Ok(None),
                Err(_) => return Err(ReadError::Protocol("unknown opcode")),
            };
            let header_len = cursor.position() as usize;
            // Checked before anything is buffered for it.
            if length > self.max_message as u64 {
                return Err(ReadError::TooBig(self.max_message));
            }
            let total = header_len + length as usize;
            if self.unparsed.len() < total {
                self.wanted = total;
                return Ok(None);
            }
            self.wanted = 0;
            let mut payload = self.unparsed.split_to(total);
            payload.advance(header_len);
            if self.unparsed.is_empty() {
                // Let the allocation go with the frame rather than keeping it for the next.
                self.unparsed = BytesMut::new();
            }
            if let Some(incoming) = self.on_frame(header, payload)? {
                return Ok(Some(incoming));
            }
        }
    }

    fn on_frame(
        &mut self,
        header: FrameHeader,
        mut payload: BytesMut,
    ) -> Result<Option<Incoming>, ReadError> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            // No extension was negotiated.
            return Err(ReadError::Protocol("reserved bits set"));
        }
        let Some(mask) = header.mask else {
            return Err(ReadError::Protocol("client frames must be masked"));
        };
        unmask(&mut payload, mask);
        match header.opcode {
            OpCode::Control(control) => {
                if !header.is_final || payload.len() as u64 > MAX_CONTROL_PAYLOAD {
                    return Err(ReadError::Protocol("fragmented or oversized control frame"));
                }
                match control {
                    Control::Ping => Ok(Some(Incoming::Ping(payload.freeze()))),
                    Control::Pong => Ok(None),
                    Control::Close => close_code(&payload).map(|code| Some(Incoming::Close(code))),
                    Control::Reserved(_) => Err(ReadError::Protocol("unknown opcode")),
                }
            }
            OpCode::Data(Data::Continue) => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err(ReadError::Protocol("continuation without a message"));
                };
                if partial.data.len() + payload.len() > self.max_message {
                    return Err(ReadError::TooBig(self.max_message));
                }
                partial.data.extend_from_slice(&payload);
                if !header.is_final {
                    return Ok(None);
                }
                let Some(Partial { text, data }) = self.partial.take() else {
                    return Ok(None);
                };
                message(text, data).map(Some)
            }
            OpCode::Data(data @ (Data::Text | Data::Binary)) => {
                if self.partial.is_some() {
                    return Err(ReadError::Protocol("new message before the last one ended"));
                }
                let text = data == Data::Text;
                if header.is_final {
                    return message(text, payload).map(Some);
                }
                self.partial = Some(Partial {
                    text,
                    data: payload,
                });
                Ok(None)
            }
            OpCode::Data(Data::Reserved(_)) => Err(ReadError::Protocol("unknown opcode")),
        }
    }
}

fn message(text: bool, data: BytesMut) -> Result<Incoming, ReadError> {
    let data = data.freeze();
    if !text {
        return Ok(Incoming::Binary(data));
    }
    Utf8Bytes::try_from(data)
        .map(Incoming::Text)
        .map_err(|_| ReadError::NotUtf8)
}

/// A close frame's code: none, or two bytes and a UTF-8 reason (RFC 6455, 5.5.1).
fn close_code(payload: &[u8]) -> Result<Option<u16>, ReadError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ReadError::Protocol("close frame of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            // Codes a peer may send: 1000-1014 except the three reserved for local use, and the
            // registered and private ranges.
            let sendable = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !sendable {
                return Err(ReadError::Protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(ReadError::NotUtf8);
            }
            Ok(Some(code))
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A client frame as a browser would send it: masked.
    fn frame(opcode: OpCode, is_final: bool, payload: &[u8]) -> Vec<u8> {
        let header = FrameHeader {
            is_final,
            opcode,
            mask: Some(MASK),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        header
            .format(payload.len() as u64, &mut out)
            .expect("formats into a Vec");
        let mut masked = payload.to_vec();
        unmask(&mut masked, MASK);
        out.extend_from_slice(&masked);
        out
    }

    fn text(payload: &str) -> Vec<u8> {
        frame(OpCode::Data(Data::Text), true, payload.as_bytes())
    }

    /// Reads everything `bytes` holds, handed over `step` bytes per read.
    async fn read_all(
        bytes: Vec<u8>,
        step: usize,
        max: usize,
    ) -> (Vec<Incoming>, ReadError, FrameReader) {
        let (mut client, mut server) = tokio::io::duplex(step.max(1));
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in bytes.chunks(step) {
                client.write_all(chunk).await.expect("written");
            }
        });
        let mut reader = FrameReader::new(max);
        let mut got = Vec::new();
        let end = loop {
            match std::future::poll_fn(|cx| reader.poll_next(cx, &mut server)).await {
                Ok(incoming) => got.push(incoming),
                Err(e) => break e,
            }
        };
        writer.await.expect("writer");
        (got, end, reader)
    }

    #[tokio::test]
    async fn messages_arrive_whole_however_the_bytes_are_split() {
        let mut bytes = text("hello");
        bytes.extend(frame(OpCode::Data(Data::Binary), true, &[1, 2, 3]));
        bytes.extend(frame(OpCode::Data(Data::Text), false, "frag".as_bytes()));
        bytes.extend(frame(OpCode::Control(Control::Ping), true, b"p"));
        bytes.extend(frame(OpCode::Control(Control::Pong), true, b""));
        bytes.extend(frame(
            OpCode::Data(Data::Continue),
            true,
            "ment é".as_bytes(),
        ));
        for step in [1, 2, 7, 64, 4096] {
            let (got, end, _) = read_all(bytes.clone(), step, 1000).await;
            assert!(matches!(end, ReadError::Ended), "step {step}: {end}");
            let shown: Vec<String> = got.iter().map(|i| format!("{i:?}")).collect();
            assert_eq!(got.len(), 4, "step {step}: {shown:?}");
            assert!(matches!(&got[0], Incoming::Text(t) if t.as_str() == "hello"));
            assert!(matches!(&got[1], Incoming::Binary(b) if b[..] == [1, 2, 3]));
            assert!(matches!(&got[2], Incoming::Ping(p) if &p[..] == b"p"));
            assert!(matches!(&got[3], Incoming::Text(t) if t.as_str() == "fragment é"));
        }
    }

    #[tokio::test]
    async fn a_large_frame_leaves_no_buffer_behind() {
        let big = vec![b'a'; 300_000];
        let bytes = frame(OpCode::Data(Data::Binary), true, &big);
        let (got, _, reader) = read_all(bytes, 10_000, 1_000_000).await;
        assert!(matches!(&got[..], [Incoming::Binary(b)] if b.len() == big.len()));
        assert_eq!(reader.unparsed.capacity(), 0);
    }

    #[tokio::test]
    async fn a_large_frame_announced_but_not_sent_gets_little_memory() {
        let bytes = frame(OpCode::Data(Data::Binary), true, &vec![0u8; 900_000]);
        // The header and 20,000 bytes of the payload, then nothing more.
        let (got, end, reader) = read_all(bytes[..20_014].to_vec(), 4096, 1_000_000).await;
        assert!(got.is_empty());
        assert!(matches!(end, ReadError::Ended), "{end}");
        assert!(
            reader.unparsed.capacity() <= 200_000,
            "{} bytes held for 20,014 received",
            reader.unparsed.capacity()
        );
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused_from_its_header() {
        // Two bytes, a 16-bit length and the mask.
        let header_only = frame(OpCode::Data(Data::Text), true, &vec![b'a'; 2_000])[..8].to_vec();
        let (got, end, reader) = read_all(header_only, 8, 1_000).await;
        assert!(got.is_empty());
        assert!(matches!(end, ReadError::TooBig(1_000)), "{end}");
        assert_eq!(end.close_code(), Some(1009));
        assert_eq!(
            reader.unparsed.len(),
            8,
            "nothing was buffered for the payload"
        );
    }

    #[tokio::test]
    async fn fragments_over_the_limit_together_are_refused() {
        let mut bytes = frame(OpCode::Data(Data::Text), false, &[b'a'; 600]);
        bytes.extend(frame(OpCode::Data(Data::Continue), true, &[b'a'; 600]));
        let (_, end, _) = read_all(bytes, 4096, 1_000).await;
        assert_eq!(end.close_code(), Some(1009), "{end}");
    }

    #[tokio::test]
    async fn protocol_errors_get_their_close_codes() {
        let unmasked = {
            let mut f = Vec::new();
            FrameHeader {
                opcode: OpCode::Data(Data::Text),
                ..FrameHeader::default()
            }
            .format(2, &mut f)
            .expect("formats");
            f.extend_from_slice(b"hi");
            f
        };
        let mut reserved_bits = text("hi");
        reserved_bits[0] |= 0x40;
        let cases: Vec<(&str, Vec<u8>, u16)> = vec![
            ("unmasked", unmasked, 1002),
            ("reserved bits", reserved_bits, 1002),
            ("unknown opcode", vec![0x83, 0x80, 0, 0, 0, 0], 1002),
            (
                "continuation first",
                frame(OpCode::Data(Data::Continue), true, b"x"),
                1002,
            ),
            (
                "fragmented ping",
                frame(OpCode::Control(Control::Ping), false, b"x"),
                1002,
            ),
            (
                "long ping",
                frame(OpCode::Control(Control::Ping), true, &[0; 126]),
                1002,
            ),
            (
                "bad UTF-8",
                frame(OpCode::Data(Data::Text), true, &[0xff, 0xfe]),
                1007,
            ),
            (
                "reserved close code",
                frame(
                    OpCode::Control(Control::Close),
                    true,
                    &1005u16.to_be_bytes(),
                ),
                1002,
            ),
            (
                "one-byte close",
                frame(OpCode::Control(Control::Close), true, &[3]),
                1002,
            ),
        ];
        for (name, bytes, code) in cases {
            let (got, end, _) = read_all(bytes, 4096, 1_000).await;
            assert!(got.is_empty(), "{name}");
            assert_eq!(end.close_code(), Some(code), "{name}: {end}");
        }
    }

    #[tokio::test]
    async fn a_close_frame_brings_its_code() {
        let mut payload = 4001u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let mut bytes = frame(OpCode::Control(Control::Close), true, &payload);
        bytes.extend(frame(OpCode::Control(Control::Close), true, b""));
        let (got, _, _) = read_all(bytes, 4096, 1_000).await;
        assert!(matches!(
            &got[..],
            [Incoming::Close(Some(4001)), Incoming::Close(None)]
        ));
    }
}
