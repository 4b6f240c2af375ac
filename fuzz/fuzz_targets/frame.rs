//! Relay frames (`tube_proto::frame`): the input is a byte stream from a peer.
//!
//! - Decoding any bytes never panics; `Ok(None)` consumes and changes nothing; a length over
//!   the limit is refused from the header alone, before any memory is reserved.
//! - Every decoded frame, encoded again, is `encoded_len` bytes, decodes to itself and leaves
//!   nothing behind; every strict prefix of that encoding (checked for the first 16 frames of
//!   an input) is `Ok(None)`, never an error.
//! - Feeding the stream in pseudo-random chunks gives the same frames and the same end
//!   (done, incomplete or the same error) as decoding it in one piece.
//! - Tighter limits only refuse (`TooLarge`), they never change what a frame decodes to.
//! - `FrameParser`, fed the stream in pseudo-random runs, gives the same frames (DATA joined
//!   from its pieces, each piece within its run and not empty) and the same end.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tube_fuzz::{Rng, chunks, prefix_cuts};
use tube_proto::frame::{self, DecodeError, Frame, FrameLimits};
use tube_proto::frame_parser::{FrameParser, Parsed};

/// Frames of one input whose prefixes are checked: the check costs a decode per byte, and an
/// input of hundreds of tiny frames teaches nothing more after the first few.
const PREFIX_CHECKED: usize = 16;

fuzz_target!(|data: &[u8]| {
    let limits = FrameLimits::default();
    let whole = decode_whole(data, &limits);
    for (i, f) in whole.frames.iter().enumerate() {
        check_frame(f, &limits, i < PREFIX_CHECKED);
    }

    let streamed = decode_streamed(data, &limits, &mut Rng::from_bytes(data));
    assert_eq!(
        streamed, whole,
        "chunked decode differs from one-shot decode"
    );

    let parsed = parse_in_runs(data, &limits, &mut Rng::from_bytes(data));
    assert_eq!(
        parsed.frames, whole.frames,
        "the parser differs from decode"
    );
    match (&parsed.end, &whole.end) {
        (End::Incomplete(_), End::Incomplete(_)) => {}
        (p, w) => assert_eq!(p, w, "the parser ends differently"),
    }

    let tight = FrameLimits {
        max_control: 32,
        max_data: 16,
    };
    let narrow = decode_whole(data, &tight);
    assert!(narrow.frames.len() <= whole.frames.len());
    assert_eq!(narrow.frames[..], whole.frames[..narrow.frames.len()]);
    if narrow.frames.len() < whole.frames.len() || narrow.end != whole.end {
        match &narrow.end {
            End::Error(DecodeError::TooLarge { len, limit, .. }) => assert!(len > limit),
            other => panic!("tighter limits ended with {other:?}, not TooLarge"),
        }
    }
});

#[derive(Debug, PartialEq)]
enum End {
    /// Every byte was used.
    Done,
    /// This many bytes wait for more.
    Incomplete(usize),
    /// The connection would be closed.
    Error(DecodeError),
}

#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Frame>,
    end: End,
}

/// One decode call with the checks every call must pass. `held` is what `buf` holds (the
/// input not consumed yet), so no copy is needed to see that `Ok(None)` changed nothing.
fn decode_checked(
    buf: &mut BytesMut,
    held: &[u8],
    limits: &FrameLimits,
) -> Result<Option<Frame>, DecodeError> {
    let capacity = buf.capacity();
    let got = frame::decode(buf, limits);
    match &got {
        Ok(None) => assert!(buf[..] == *held, "Ok(None) must not consume"),
        Ok(Some(f)) => {
            assert_eq!(
                held.len() - buf.len(),
                f.encoded_len(),
                "consumed != frame size"
            );
            let conn_level = matches!(f, Frame::Control(_) | Frame::Ping(_) | Frame::Pong(_));
            assert_eq!(
                conn_level,
                f.stream() == 0,
                "frame on the wrong stream: {f:?}"
            );
        }
        Err(DecodeError::TooLarge { .. }) => {
            assert_eq!(
                buf.capacity(),
                capacity,
                "memory reserved for a refused frame"
            )
        }
        Err(_) => {}
    }
    got
}

fn decode_whole(data: &[u8], limits: &FrameLimits) -> Outcome {
    let mut buf = BytesMut::from(data);
    let mut consumed = 0;
    let mut frames = Vec::new();
    loop {
        match decode_checked(&mut buf, &data[consumed..], limits) {
            Ok(Some(f)) => {
                consumed += f.encoded_len();
                frames.push(f);
            }
            Ok(None) if buf.is_empty() => {
                return Outcome {
                    frames,
                    end: End::Done,
                };
            }
            Ok(None) => {
                return Outcome {
                    frames,
                    end: End::Incomplete(buf.len()),
                };
            }
            Err(e) => {
                return Outcome {
                    frames,
                    end: End::Error(e),
                };
            }
        }
    }
}

fn decode_streamed(data: &[u8], limits: &FrameLimits, rng: &mut Rng) -> Outcome {
    let mut buf = BytesMut::new();
    let (mut consumed, mut fed) = (0, 0);
    let mut frames = Vec::new();
    for chunk in chunks(data, rng) {
        buf.extend_from_slice(chunk);
        fed += chunk.len();
        loop {
            match decode_checked(&mut buf, &data[consumed..fed], limits) {
                Ok(Some(f)) => {
                    consumed += f.encoded_len();
                    frames.push(f);
                }
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        frames,
                        end: End::Error(e),
                    };
                }
            }
        }
    }
    let end = if buf.is_empty() {
        End::Done
    } else {
        End::Incomplete(buf.len())
    };
    Outcome { frames, end }
}

/// Feeds `data` to a [`FrameParser`] in runs, joining DATA pieces back into frames.
fn parse_in_runs(data: &[u8], limits: &FrameLimits, rng: &mut Rng) -> Outcome {
    let mut parser = FrameParser::new(*limits);
    let mut frames = Vec::new();
    let mut piece: Option<(u32, Vec<u8>)> = None;
    for run in chunks(data, rng) {
        let mut pos = 0;
        loop {
            match parser.next(run, &mut pos) {
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
                    assert!(
                        !payload.is_empty() && payload.end <= run.len(),
                        "a bad piece"
                    );
                    let (s, mut bytes) = piece.take().unwrap_or((stream, Vec::new()));
                    assert_eq!(s, stream, "pieces of one frame on two streams");
                    bytes.extend_from_slice(&run[payload]);
                    if last {
                        frames.push(Frame::Data {
                            stream,
                            data: bytes.into(),
                        });
                    } else {
                        piece = Some((s, bytes));
                    }
                }
                Err(e) => {
                    return Outcome {
                        frames,
                        end: End::Error(e),
                    };
                }
            }
        }
        assert_eq!(pos, run.len(), "a run not used up");
    }
    let end = if parser.mid_frame() {
        End::Incomplete(0)
    } else {
        End::Done
    };
    Outcome { frames, end }
}

fn check_frame(f: &Frame, limits: &FrameLimits, prefixes: bool) {
    let mut enc = BytesMut::new();
    frame::encode(f, &mut enc);
    assert_eq!(enc.len(), f.encoded_len(), "encoded_len is wrong for {f:?}");

    let mut again = enc.clone();
    assert_eq!(
        frame::decode(&mut again, limits),
        Ok(Some(f.clone())),
        "round trip"
    );
    assert!(again.is_empty(), "round trip left bytes behind");

    if !prefixes {
        return;
    }
    for cut in prefix_cuts(enc.len()) {
        let mut part = BytesMut::from(&enc[..cut]);
        assert_eq!(
            frame::decode(&mut part, limits),
            Ok(None),
            "prefix of {cut} of {} bytes of {f:?}",
            enc.len()
        );
        assert_eq!(part.len(), cut, "incomplete input consumed");
    }
}
