//! Frames parsed from runs of bytes that stay where they are: DATA payloads come out as ranges
//! of the run they lie in, never copied, so a receiver can write them from its own buffer (the
//! mux's reader writes them from the opened TLS record straight to the user's socket).
//!
//! The byte stream is fed in runs of any length (a TLS record's plaintext, a socket read);
//! frames may span runs. A DATA frame that does comes out as several pieces of one frame, the
//! last marked; a partly received header or the payload of any other frame (at most its type's
//! limit, checked from the header before anything is kept) is copied aside until complete. The
//! frames and errors are exactly those of [`crate::frame::decode`] on the same bytes. No IO.

use std::ops::Range;

use bytes::BytesMut;

use crate::frame::{self, DecodeError, Frame, FrameKind, FrameLimits, HEADER_LEN, Header};

/// One item of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A frame other than DATA.
    Frame(Frame),
    /// A piece of a DATA frame's payload: `payload` is a range of the run given to
    /// [`FrameParser::next`], never empty; `last` ends the frame.
    Data {
        /// Stream id.
        stream: u32,
        /// Where the piece lies in the run.
        payload: Range<usize>,
        /// The frame's last piece.
        last: bool,
    },
}

/// Where the parser is in the stream.
#[derive(Debug, Clone)]
enum State {
    /// Between frames, `held` bytes of the next header copied aside.
    Header { held: usize },
    /// Inside a DATA frame's payload, `left` bytes to come.
    Data { stream: u32, left: usize },
    /// Inside another frame's payload, copied aside until complete.
    Body(Header),
    /// An error was returned: the stream cannot be read further.
    Failed(DecodeError),
}

/// Splits a byte stream fed in runs into frames (see the module docs).
#[derive(Debug)]
pub struct FrameParser {
    limits: FrameLimits,
    state: State,
    header: [u8; HEADER_LEN],
    /// The payload of the frame in [`State::Body`] received so far.
    body: BytesMut,
}

impl FrameParser {
    /// A parser at the start of a stream, enforcing `limits`.
    pub fn new(limits: FrameLimits) -> Self {
        Self {
            limits,
            state: State::Header { held: 0 },
            header: [0; HEADER_LEN],
            body: BytesMut::new(),
        }
    }

    /// Whether part of a frame has been received and the rest has not: the stream may not end
    /// here.
    pub fn mid_frame(&self) -> bool {
        !matches!(self.state, State::Header { held: 0 })
    }

    /// The next item of `run` from `*pos` on, advancing `*pos` past what it used. `Ok(None)`:
    /// everything from `*pos` is used (a frame may be held partly, to be completed by the next
    /// run). After an error every call returns it again.
    pub fn next(&mut self, run: &[u8], pos: &mut usize) -> Result<Option<Parsed>, DecodeError> {
        loop {
            let rest = run.get(*pos..).unwrap_or_default();
            match self.state {
                State::Failed(ref e) => return Err(e.clone()),
                State::Data { stream, left } => {
                    if rest.is_empty() {
                        return Ok(None);
                    }
                    let n = left.min(rest.len());
                    let payload = *pos..*pos + n;
                    *pos += n;
                    let last = n == left;
                    self.state = if last {
                        State::Header { held: 0 }
                    } else {
                        State::Data {
                            stream,
                            left: left - n,
                        }
                    };
                    return Ok(Some(Parsed::Data {
                        stream,
                        payload,
                        last,
                    }));
                }
                State::Body(header) => {
                    let n = (header.len as usize - self.body.len()).min(rest.len());
                    self.body.extend_from_slice(&rest[..n]);
                    *pos += n;
                    if self.body.len() < header.len as usize {
                        return Ok(None);
                    }
                    let payload = std::mem::take(&mut self.body);
                    self.state = State::Header { held: 0 };
                    let f = self.check(frame::decode_payload(header, payload))?;
                    return Ok(Some(Parsed::Frame(f)));
                }
                State::Header { held } => {
                    if rest.is_empty() {
                        return Ok(None);
                    }
                    let header = if held == 0 && rest.len() >= HEADER_LEN {
                        // The common case: the whole header at hand, read where it lies.
                        let mut h = [0; HEADER_LEN];
                        h.copy_from_slice(&rest[..HEADER_LEN]);
                        *pos += HEADER_LEN;
                        h
                    } else {
                        let n = (HEADER_LEN - held).min(rest.len());
                        self.header[held..held + n].copy_from_slice(&rest[..n]);
                        *pos += n;
                        if held + n < HEADER_LEN {
                            self.state = State::Header { held: held + n };
                            return Ok(None);
                        }
                        self.header
                    };
                    let header = self.check(frame::decode_header(&header, &self.limits))?;
                    self.state = match header.kind {
                        FrameKind::Data => State::Data {
                            stream: header.stream,
                            left: header.len as usize,
                        },
                        _ => {
                            self.body.reserve(header.len as usize);
                            State::Body(header)
                        }
                    };
                }
            }
        }
    }

    /// Keeps an error, so the stream stays failed.
    fn check<T>(&mut self, r: Result<T, DecodeError>) -> Result<T, DecodeError> {
        if let Err(e) = &r {
            self.state = State::Failed(e.clone());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    /// Feeds `data` in runs cut at `cuts`, joining DATA pieces back into frames.
    fn parse_in_runs(data: &[u8], cuts: &[usize], limits: FrameLimits) -> (Vec<Frame>, End) {
        let mut p = FrameParser::new(limits);
        let mut frames = Vec::new();
        let mut piece: Option<(u32, Vec<u8>)> = None;
        let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(data.len())).collect();
        bounds.push(data.len());
        bounds.sort_unstable();
        let mut from = 0;
        for to in bounds {
            let run = &data[from..to];
            from = to;
            let mut pos = 0;
            loop {
                match p.next(run, &mut pos) {
                    Ok(None) => break,
                    Ok(Some(Parsed::Frame(f))) => {
                        assert!(piece.is_none(), "a frame inside a DATA frame");
                        frames.push(f);
                    }
                    Ok(Some(Parsed::Data {
                        stream,
                        payload,
                        last,
                    })) => {
                        assert!(!payload.is_empty(), "an empty piece");
                        let (s, mut bytes) = piece.take().unwrap_or((stream, Vec::new()));
                        assert_eq!(s, stream, "pieces of one frame on two streams");
                        bytes.extend_from_slice(&run[payload]);
                        if last {
                            frames.push(Frame::Data {
                                stream,
                                data: Bytes::from(bytes),
                            });
                        } else {
                            piece = Some((s, bytes));
                        }
                    }
                    Err(e) => {
                        assert_eq!(p.next(run, &mut pos), Err(e.clone()), "error not kept");
                        return (frames, End::Error(e));
                    }
                }
            }
            assert_eq!(pos, run.len(), "a run not used up");
        }
        let end = if p.mid_frame() {
            End::Incomplete
        } else {
            End::Done
        };
        (frames, end)
    }

    #[derive(Debug, PartialEq)]
    enum End {
        Done,
        Incomplete,
        Error(DecodeError),
    }

    fn decode_whole(data: &[u8], limits: FrameLimits) -> (Vec<Frame>, End) {
        let mut buf = BytesMut::from(data);
        let mut frames = Vec::new();
        loop {
            match frame::decode(&mut buf, &limits) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) if buf.is_empty() => return (frames, End::Done),
                Ok(None) => return (frames, End::Incomplete),
                Err(e) => return (frames, End::Error(e)),
            }
        }
    }

    fn encoded(frames: &[Frame]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        for f in frames {
            frame::encode(f, &mut buf);
        }
        buf.to_vec()
    }

    #[test]
    fn a_data_frame_spanning_runs_comes_out_in_pieces_where_it_lies() {
        let data = encoded(&[
            Frame::Data {
                stream: 3,
                data: Bytes::from_static(b"hello world"),
            },
            Frame::Fin { stream: 3 },
        ]);
        let mut p = FrameParser::new(FrameLimits::default());
        // The header and the first 5 payload bytes in one run, the rest in the next.
        let first = &data[..HEADER_LEN + 5];
        let mut pos = 0;
        assert_eq!(
            p.next(first, &mut pos),
            Ok(Some(Parsed::Data {
                stream: 3,
                payload: HEADER_LEN..HEADER_LEN + 5,
                last: false
            }))
        );
        assert_eq!(p.next(first, &mut pos), Ok(None));
        assert!(p.mid_frame());
        let second = &data[HEADER_LEN + 5..];
        let mut pos = 0;
        assert_eq!(
            p.next(second, &mut pos),
            Ok(Some(Parsed::Data {
                stream: 3,
                payload: 0..6,
                last: true
            }))
        );
        assert_eq!(&second[0..6], b" world");
        assert_eq!(
            p.next(second, &mut pos),
            Ok(Some(Parsed::Frame(Frame::Fin { stream: 3 })))
        );
        assert_eq!(p.next(second, &mut pos), Ok(None));
        assert!(!p.mid_frame());
    }

    #[test]
    fn an_oversized_header_is_refused_before_its_payload_arrives() {
        let mut header = vec![0x00, 0, 0, 0, 0];
        header.extend((MAX_TEST_CONTROL + 1).to_be_bytes());
        let limits = FrameLimits {
            max_control: MAX_TEST_CONTROL,
            ..FrameLimits::default()
        };
        let mut p = FrameParser::new(limits);
        // Split inside the header: the copy aside is checked the same way.
        let mut pos = 0;
        assert_eq!(p.next(&header[..4], &mut pos), Ok(None));
        let mut pos = 0;
        let got = p.next(&header[4..], &mut pos);
        assert!(
            matches!(got, Err(DecodeError::TooLarge { len, .. }) if len == MAX_TEST_CONTROL + 1)
        );
        assert_eq!(p.body.capacity(), 0, "memory reserved for a refused frame");
    }

    const MAX_TEST_CONTROL: u32 = 100;

    fn frame_strategy() -> impl Strategy<Value = Frame> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 1..300)
                .prop_map(|d| Frame::Control(Bytes::from(d))),
            (1u32..5, proptest::collection::vec(any::<u8>(), 1..3000)).prop_map(|(stream, d)| {
                Frame::Data {
                    stream,
                    data: Bytes::from(d),
                }
            }),
            (1u32..5, 1u32..1000)
                .prop_map(|(stream, increment)| Frame::Window { stream, increment }),
            (1u32..5).prop_map(|stream| Frame::Fin { stream }),
            (1u32..5, any::<u16>()).prop_map(|(stream, code)| Frame::Reset { stream, code }),
            any::<u64>().prop_map(Frame::Ping),
            (1u32..5, "[a-z0-9.:]{0,20}").prop_map(|(stream, peer)| Frame::Open {
                stream,
                tunnel: [7; 16],
                peer
            }),
        ]
    }

    proptest! {
        #[test]
        fn frames_cut_into_any_runs_parse_to_what_decode_gives(
            frames in proptest::collection::vec(frame_strategy(), 0..12),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
            tail in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let mut data = encoded(&frames);
            let full = data.len();
            data.extend(tail);
            let cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
            let limits = FrameLimits { max_control: 200, ..FrameLimits::default() };
            let want = decode_whole(&data, limits);
            let got = parse_in_runs(&data, &cuts, limits);
            prop_assert_eq!(&got, &want);
            // The well-formed part on its own parses completely.
            let (parsed, end) = parse_in_runs(&data[..full], &cuts, FrameLimits::default());
            prop_assert_eq!(parsed, frames);
            prop_assert_eq!(end, End::Done);
        }
    }
}
