//! The relay's framing layer: one byte stream (inside TLS 1.3) carrying control messages and
//! many multiplexed user streams.
//!
//! Every frame is a 9-byte header followed by a payload (see `docs/protocols/relay.md`):
//!
//! ```text
//! +--------+----------------------+----------------------+-----------------+
//! | type u8| stream id u32 (BE)   | payload length u32 BE| payload ...     |
//! +--------+----------------------+----------------------+-----------------+
//! ```
//!
//! [`decode`] refuses a length above the limit for its type from the header alone, before any
//! memory is reserved, and returns `Ok(None)` while a frame is incomplete.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 9;

/// Largest payload of a control frame (a JSON message).
pub const MAX_CONTROL_PAYLOAD: u32 = 64 * 1024;

/// Largest payload of a DATA frame.
pub const MAX_DATA_PAYLOAD: u32 = 32 * 1024;

/// Largest peer address carried in an OPEN frame.
pub const MAX_OPEN_ADDR: usize = 64;

/// The frame type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON control message on stream 0.
    Control = 0x00,
    /// Opens a stream (relay to agent): tunnel id and the user's address.
    Open = 0x01,
    /// Stream bytes.
    Data = 0x02,
    /// Grants the sender more credit on a stream.
    Window = 0x03,
    /// The sender will send no more data on this stream (half-close).
    Fin = 0x04,
    /// Aborts a stream in both directions.
    Reset = 0x05,
    /// Liveness probe on stream 0; answered with PONG carrying the same 8 bytes.
    Ping = 0x06,
    /// Answer to PING.
    Pong = 0x07,
}

impl FrameKind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0x00 => Self::Control,
            0x01 => Self::Open,
            0x02 => Self::Data,
            0x03 => Self::Window,
            0x04 => Self::Fin,
            0x05 => Self::Reset,
            0x06 => Self::Ping,
            0x07 => Self::Pong,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A control message: UTF-8 JSON, parsed by [`crate::control`].
    Control(Bytes),
    /// A new stream for a user connection on a tunnel.
    Open {
        /// Stream id chosen by the relay (non-zero).
        stream: u32,
        /// The tunnel the user connected to (its UUID bytes).
        tunnel: [u8; 16],
        /// The user's address, for logs and access decisions (ASCII, at most 64 bytes).
        peer: String,
    },
    /// Bytes of one stream (1 to [`MAX_DATA_PAYLOAD`] of them).
    Data {
        /// Stream id.
        stream: u32,
        /// Payload.
        data: Bytes,
    },
    /// Credit for `stream`: the receiver accepts `increment` more bytes.
    Window {
        /// Stream id.
        stream: u32,
        /// Bytes of additional credit (non-zero).
        increment: u32,
    },
    /// End of data in the sender's direction.
    Fin {
        /// Stream id.
        stream: u32,
    },
    /// Abort the stream.
    Reset {
        /// Stream id.
        stream: u32,
        /// Why (a [`crate::control::ErrorCode`] number or 0).
        code: u16,
    },
    /// Liveness probe.
    Ping(u64),
    /// Answer to a probe.
    Pong(u64),
}

/// Why bytes could not be decoded into a frame. Any of these ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The type byte is not one of [`FrameKind`].
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The header announced more payload than this frame type allows.
    #[error("frame type 0x{kind:02x} announces {len} bytes, limit {limit}")]
    TooLarge {
        /// Frame type byte.
        kind: u8,
        /// Announced payload length.
        len: u32,
        /// Limit for that type.
        limit: u32,
    },
    /// The payload does not have the shape its type requires.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    /// A stream frame used stream 0, or a connection frame used a non-zero stream.
    #[error("frame type 0x{kind:02x} on wrong stream {stream}")]
    WrongStream {
        /// Frame type byte.
        kind: u8,
        /// Stream id found.
        stream: u32,
    },
}

/// Per-connection limits the decoder enforces from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest control payload accepted.
    pub max_control: u32,
    /// Largest data payload accepted.
    pub max_data: u32,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            max_control: MAX_CONTROL_PAYLOAD,
            max_data: MAX_DATA_PAYLOAD,
        }
    }
}

impl Frame {
    /// The stream this frame belongs to (0 for connection-level frames).
    pub fn stream(&self) -> u32 {
        match self {
            Frame::Control(_) | Frame::Ping(_) | Frame::Pong(_) => 0,
            Frame::Open { stream, .. }
            | Frame::Data { stream, .. }
            | Frame::Window { stream, .. }
            | Frame::Fin { stream }
            | Frame::Reset { stream, .. } => *stream,
        }
    }

    /// Bytes this frame takes on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match self {
                Frame::Control(b) => b.len(),
                Frame::Open { peer, .. } => 16 + 1 + peer.len(),
                Frame::Data { data, .. } => data.len(),
                Frame::Window { .. } => 4,
                Frame::Fin { .. } => 0,
                Frame::Reset { .. } => 2,
                Frame::Ping(_) | Frame::Pong(_) => 8,
            }
    }
}

/// Appends the encoding of `frame` to `dst`.
///
/// The caller keeps payloads within the limits (the mux splits data; control messages are
/// small); an OPEN peer address longer than [`MAX_OPEN_ADDR`] is truncated.
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    dst.reserve(frame.encoded_len());
    let header = |dst: &mut BytesMut, kind: FrameKind, stream: u32, len: usize| {
        dst.put_u8(kind as u8);
        dst.put_u32(stream);
        dst.put_u32(len as u32);
    };
    match frame {
        Frame::Control(b) => {
            header(dst, FrameKind::Control, 0, b.len());
            dst.extend_from_slice(b);
        }
        Frame::Open {
            stream,
            tunnel,
            peer,
        } => {
            let peer = &peer.as_bytes()[..peer.len().min(MAX_OPEN_ADDR)];
            header(dst, FrameKind::Open, *stream, 16 + 1 + peer.len());
            dst.extend_from_slice(tunnel);
            dst.put_u8(peer.len() as u8);
            dst.extend_from_slice(peer);
        }
        Frame::Data { stream, data } => {
            encode_data_header(*stream, data.len(), dst);
            dst.extend_from_slice(data);
        }
        Frame::Window { stream, increment } => {
            header(dst, FrameKind::Window, *stream, 4);
            dst.put_u32(*increment);
        }
        Frame::Fin { stream } => header(dst, FrameKind::Fin, *stream, 0),
        Frame::Reset { stream, code } => {
            header(dst, FrameKind::Reset, *stream, 2);
            dst.put_u16(*code);
        }
        Frame::Ping(v) => {
            header(dst, FrameKind::Ping, 0, 8);
            dst.put_u64(*v);
        }
        Frame::Pong(v) => {
            header(dst, FrameKind::Pong, 0, 8);
            dst.put_u64(*v);
        }
    }
}

/// Appends the 9-byte header of a DATA frame carrying `len` bytes on `stream`: what
/// [`encode`] writes before the payload, for writers that send the payload from where it lies
/// (vectored writes) instead of copying it.
pub fn encode_data_header(stream: u32, len: usize, dst: &mut BytesMut) {
    dst.extend_from_slice(&data_header(stream, len));
}

/// The 9-byte header of a DATA frame carrying `len` bytes on `stream`, for a writer that puts
/// the payload in place first and the header in front of it after.
pub fn data_header(stream: u32, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[0] = FrameKind::Data as u8;
    h[1..5].copy_from_slice(&stream.to_be_bytes());
    h[5..9].copy_from_slice(&(len as u32).to_be_bytes());
    h
}

/// A frame header that passed every check a header alone allows: `len` bytes of payload
/// follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The frame type.
    pub kind: FrameKind,
    /// Stream id (0 for connection-level frames).
    pub stream: u32,
    /// Payload length, within the limit for `kind`.
    pub len: u32,
}

/// Checks a frame header: a known type, a length within the limit for it (so nothing is
/// reserved for a frame that will be refused), stream 0 exactly for connection-level frames, and
/// DATA not empty.
pub fn decode_header(b: &[u8; HEADER_LEN], limits: &FrameLimits) -> Result<Header, DecodeError> {
    let kind_byte = b[0];
    let stream = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
    let len = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
    let kind = FrameKind::from_byte(kind_byte).ok_or(DecodeError::UnknownType(kind_byte))?;
    let (limit, connection_level) = match kind {
        FrameKind::Control => (limits.max_control, true),
        FrameKind::Open => (16 + 1 + MAX_OPEN_ADDR as u32, false),
        FrameKind::Data => (limits.max_data, false),
        FrameKind::Window => (4, false),
        FrameKind::Fin => (0, false),
        FrameKind::Reset => (2, false),
        FrameKind::Ping | FrameKind::Pong => (8, true),
    };
    if len > limit {
        return Err(DecodeError::TooLarge {
            kind: kind_byte,
            len,
            limit,
        });
    }
    if connection_level != (stream == 0) {
        return Err(DecodeError::WrongStream {
            kind: kind_byte,
            stream,
        });
    }
    if kind == FrameKind::Data && len == 0 {
        return Err(DecodeError::Malformed("data"));
    }
    Ok(Header { kind, stream, len })
}

/// Takes one frame off the front of `src`.
///
/// `Ok(None)`: not enough bytes yet (nothing consumed). `Err`: the connection must be closed.
pub fn decode(src: &mut BytesMut, limits: &FrameLimits) -> Result<Option<Frame>, DecodeError> {
    let Some(head) = src.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = decode_header(head, limits)?;
    let total = HEADER_LEN + header.len as usize;
    if src.len() < total {
        src.reserve(total - src.len());
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    let payload = src.split_to(header.len as usize);
    decode_payload(header, payload).map(Some)
}

/// The frame `header` announced, from its payload (`header.len` bytes).
pub fn decode_payload(header: Header, mut payload: BytesMut) -> Result<Frame, DecodeError> {
    let Header { kind, stream, .. } = header;
    let frame = match kind {
        FrameKind::Control => {
            if payload.is_empty() {
                return Err(DecodeError::Malformed("control"));
            }
            Frame::Control(payload.freeze())
        }
        FrameKind::Open => {
            if payload.len() < 17 {
                return Err(DecodeError::Malformed("open"));
            }
            let mut tunnel = [0u8; 16];
            tunnel.copy_from_slice(&payload[..16]);
            let addr_len = payload[16] as usize;
            if payload.len() != 17 + addr_len {
                return Err(DecodeError::Malformed("open"));
            }
            let peer = std::str::from_utf8(&payload[17..])
                .ok()
                .filter(|s| s.is_ascii())
                .ok_or(DecodeError::Malformed("open"))?
                .to_owned();
            Frame::Open {
                stream,
                tunnel,
                peer,
            }
        }
        FrameKind::Data => {
            if payload.is_empty() {
                return Err(DecodeError::Malformed("data"));
            }
            Frame::Data {
                stream,
                data: payload.freeze(),
            }
        }
        FrameKind::Window => {
            if payload.len() != 4 {
                return Err(DecodeError::Malformed("window"));
            }
            let increment = payload.get_u32();
            if increment == 0 {
                return Err(DecodeError::Malformed("window"));
            }
            Frame::Window { stream, increment }
        }
        FrameKind::Fin => Frame::Fin { stream },
        FrameKind::Reset => {
            if payload.len() != 2 {
                return Err(DecodeError::Malformed("reset"));
            }
            Frame::Reset {
                stream,
                code: payload.get_u16(),
            }
        }
        FrameKind::Ping | FrameKind::Pong => {
            if payload.len() != 8 {
                return Err(DecodeError::Malformed("ping"));
            }
            let v = payload.get_u64();
            if kind == FrameKind::Ping {
                Frame::Ping(v)
            } else {
                Frame::Pong(v)
            }
        }
    };
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: Frame) {
        let mut buf = BytesMut::new();
        encode(&f, &mut buf);
        assert_eq!(buf.len(), f.encoded_len());
        let got = decode(&mut buf, &FrameLimits::default()).unwrap().unwrap();
        assert_eq!(got, f);
        assert!(buf.is_empty());
    }

    #[test]
    fn byte_layout_matches_the_spec() {
        let mut buf = BytesMut::new();
        encode(
            &Frame::Window {
                stream: 7,
                increment: 65536,
            },
            &mut buf,
        );
        assert_eq!(&buf[..], &[0x03, 0, 0, 0, 7, 0, 0, 0, 4, 0, 1, 0, 0]);
        buf.clear();
        encode(
            &Frame::Data {
                stream: 1,
                data: Bytes::from_static(b"hi"),
            },
            &mut buf,
        );
        assert_eq!(&buf[..], &[0x02, 0, 0, 0, 1, 0, 0, 0, 2, b'h', b'i']);
        buf.clear();
        encode(
            &Frame::Reset {
                stream: 2,
                code: 4001,
            },
            &mut buf,
        );
        assert_eq!(&buf[..], &[0x05, 0, 0, 0, 2, 0, 0, 0, 2, 0x0f, 0xa1]);
        buf.clear();
        encode(&Frame::Fin { stream: 3 }, &mut buf);
        assert_eq!(&buf[..], &[0x04, 0, 0, 0, 3, 0, 0, 0, 0]);
        buf.clear();
        encode(
            &Frame::Open {
                stream: 1,
                tunnel: [0xab; 16],
                peer: "1.2.3.4:5".into(),
            },
            &mut buf,
        );
        let mut want = vec![0x01, 0, 0, 0, 1, 0, 0, 0, 26];
        want.extend([0xab; 16]);
        want.push(9);
        want.extend(b"1.2.3.4:5");
        assert_eq!(&buf[..], &want[..]);
    }

    #[test]
    fn every_kind_roundtrips() {
        roundtrip(Frame::Control(Bytes::from_static(b"{\"type\":\"hello\"}")));
        roundtrip(Frame::Open {
            stream: 9,
            tunnel: [1; 16],
            peer: "127.0.0.1:4000".into(),
        });
        roundtrip(Frame::Data {
            stream: 1,
            data: Bytes::from(vec![7u8; 32 * 1024]),
        });
        roundtrip(Frame::Window {
            stream: 1,
            increment: u32::MAX,
        });
        roundtrip(Frame::Fin { stream: u32::MAX });
        roundtrip(Frame::Reset { stream: 5, code: 0 });
        roundtrip(Frame::Ping(42));
        roundtrip(Frame::Pong(u64::MAX));
    }

    #[test]
    fn huge_length_is_refused_from_the_header_alone() {
        let mut buf = BytesMut::from(&[0x02, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff][..]);
        let cap = buf.capacity();
        let err = decode(&mut buf, &FrameLimits::default()).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { len: u32::MAX, .. }));
        assert_eq!(
            buf.capacity(),
            cap,
            "no memory reserved for a refused frame"
        );
        let mut buf = BytesMut::from(&[0x00, 0, 0, 0, 0, 0, 1, 0, 1][..]);
        assert!(matches!(
            decode(&mut buf, &FrameLimits::default()),
            Err(DecodeError::TooLarge {
                kind: 0,
                len: 65537,
                ..
            })
        ));
    }

    #[test]
    fn malformed_frames_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (&[0x09, 0, 0, 0, 0, 0, 0, 0, 0], "unknown type"),
            (&[0xff, 0, 0, 0, 0, 0, 0, 0, 0], "unknown type ff"),
            (&[0x00, 0, 0, 0, 1, 0, 0, 0, 1, b'{'], "control on a stream"),
            (&[0x00, 0, 0, 0, 0, 0, 0, 0, 0], "empty control"),
            (&[0x02, 0, 0, 0, 0, 0, 0, 0, 1, 1], "data on stream 0"),
            (&[0x02, 0, 0, 0, 1, 0, 0, 0, 0], "empty data"),
            (&[0x03, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0], "zero window"),
            (&[0x03, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 1], "short window"),
            (
                &[0x03, 0, 0, 0, 1, 0, 0, 0, 5, 0, 0, 0, 0, 1],
                "long window",
            ),
            (&[0x04, 0, 0, 0, 1, 0, 0, 0, 1, 0], "fin with payload"),
            (&[0x04, 0, 0, 0, 0, 0, 0, 0, 0], "fin on stream 0"),
            (&[0x05, 0, 0, 0, 1, 0, 0, 0, 1, 0], "short reset"),
            (&[0x06, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0], "short ping"),
            (
                &[0x06, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0],
                "ping on a stream",
            ),
            (
                &[0x07, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                "long pong",
            ),
            (
                &[
                    0x01, 0, 0, 0, 0, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    0,
                ],
                "open 0",
            ),
            (&[0x01, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0], "short open"),
            (&[0x01, 0, 0, 0, 1, 0, 0, 0, 200], "open too long"),
        ];
        for (bytes, name) in cases {
            let mut buf = BytesMut::from(*bytes);
            assert!(
                decode(&mut buf, &FrameLimits::default()).is_err(),
                "{name} must be an error"
            );
        }
        // OPEN whose address length disagrees with the frame length, or is not ASCII.
        let mut bad = vec![0x01, 0, 0, 0, 1, 0, 0, 0, 19];
        bad.extend([0; 16]);
        bad.extend([5, b'a', b'b']);
        assert_eq!(
            decode(&mut BytesMut::from(&bad[..]), &FrameLimits::default()),
            Err(DecodeError::Malformed("open"))
        );
        let mut bad = vec![0x01, 0, 0, 0, 1, 0, 0, 0, 19];
        bad.extend([0; 16]);
        bad.extend([2, 0xc3, 0xa9]);
        assert_eq!(
            decode(&mut BytesMut::from(&bad[..]), &FrameLimits::default()),
            Err(DecodeError::Malformed("open"))
        );
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 1..512)
                .prop_map(|v| Frame::Control(Bytes::from(v))),
            (1u32.., any::<[u8; 16]>(), "[ -~]{0,64}").prop_map(|(stream, tunnel, peer)| {
                Frame::Open {
                    stream,
                    tunnel,
                    peer,
                }
            }),
            (1u32.., proptest::collection::vec(any::<u8>(), 1..2048)).prop_map(|(stream, d)| {
                Frame::Data {
                    stream,
                    data: Bytes::from(d),
                }
            }),
            (1u32.., 1u32..).prop_map(|(stream, increment)| Frame::Window { stream, increment }),
            (1u32..).prop_map(|stream| Frame::Fin { stream }),
            (1u32.., any::<u16>()).prop_map(|(stream, code)| Frame::Reset { stream, code }),
            any::<u64>().prop_map(Frame::Ping),
            any::<u64>().prop_map(Frame::Pong),
        ]
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut buf, &FrameLimits::default()) {}
        }

        #[test]
        fn encode_then_decode_is_identity(frames in proptest::collection::vec(arb_frame(), 1..8)) {
            let mut buf = BytesMut::new();
            for f in &frames { encode(f, &mut buf); }
            for f in &frames {
                prop_assert_eq!(&decode(&mut buf, &FrameLimits::default()).unwrap().unwrap(), f);
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn every_prefix_is_incomplete(f in arb_frame()) {
            let mut full = BytesMut::new();
            encode(&f, &mut full);
            for cut in 0..full.len() {
                let mut part = BytesMut::from(&full[..cut]);
                prop_assert_eq!(decode(&mut part, &FrameLimits::default()), Ok(None));
                prop_assert_eq!(part.len(), cut, "incomplete input is not consumed");
            }
        }
    }
}
