//! Mailbox root packets (`tube_proto::mailbox`): the input is a byte stream from a peer.
//!
//! - Decoding any bytes never panics; `Ok(None)` consumes and changes nothing; a length over
//!   `MAX_PAYLOAD` is refused from the header alone, before any memory is reserved.
//! - Every decoded packet, encoded again, starts with its `kind()` byte, decodes to itself and
//!   leaves nothing behind; every strict prefix of that encoding (checked for the first 16
//!   packets of an input) is `Ok(None)`, never an error.
//! - Feeding the stream in pseudo-random chunks gives the same packets and the same end (done,
//!   incomplete or the same error) as decoding it in one piece.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tube_fuzz::{Rng, chunks, prefix_cuts};
use tube_proto::mailbox::{self, Packet, PacketError};

/// Packets of one input whose prefixes are checked: the check costs a decode per byte, and an
/// input of hundreds of tiny packets teaches nothing more after the first few.
const PREFIX_CHECKED: usize = 16;

fuzz_target!(|data: &[u8]| {
    let whole = decode_whole(data);
    for (i, p) in whole.packets.iter().enumerate() {
        check_packet(p, i < PREFIX_CHECKED);
    }
    let streamed = decode_streamed(data, &mut Rng::from_bytes(data));
    assert_eq!(
        streamed, whole,
        "chunked decode differs from one-shot decode"
    );
});

#[derive(Debug, PartialEq)]
enum End {
    /// Every byte was used.
    Done,
    /// This many bytes wait for more.
    Incomplete(usize),
    /// The connection would be closed.
    Error(PacketError),
}

#[derive(Debug, PartialEq)]
struct Outcome {
    packets: Vec<Packet>,
    end: End,
}

/// One decode call with the checks every call must pass. `held` is what `buf` holds (the
/// input not consumed yet), so no copy is needed to see that `Ok(None)` changed nothing.
fn decode_checked(buf: &mut BytesMut, held: &[u8]) -> Result<Option<Packet>, PacketError> {
    let capacity = buf.capacity();
    let got = mailbox::decode(buf);
    match &got {
        Ok(None) => assert!(buf[..] == *held, "Ok(None) must not consume"),
        Ok(Some(p)) => {
            assert_eq!(held.first(), Some(&p.kind()), "type byte of {p:?}");
            assert_eq!(
                held.len() - buf.len(),
                mailbox::to_bytes(p).len(),
                "consumed != packet size"
            );
        }
        Err(PacketError::TooLong(_)) => {
            assert_eq!(
                buf.capacity(),
                capacity,
                "memory reserved for a refused packet"
            )
        }
        Err(_) => {}
    }
    got
}

fn decode_whole(data: &[u8]) -> Outcome {
    let mut buf = BytesMut::from(data);
    let mut consumed = 0;
    let mut packets = Vec::new();
    loop {
        match decode_checked(&mut buf, &data[consumed..]) {
            Ok(Some(p)) => {
                consumed += mailbox::to_bytes(&p).len();
                packets.push(p);
            }
            Ok(None) if buf.is_empty() => {
                return Outcome {
                    packets,
                    end: End::Done,
                };
            }
            Ok(None) => {
                return Outcome {
                    packets,
                    end: End::Incomplete(buf.len()),
                };
            }
            Err(e) => {
                return Outcome {
                    packets,
                    end: End::Error(e),
                };
            }
        }
    }
}

fn decode_streamed(data: &[u8], rng: &mut Rng) -> Outcome {
    let mut buf = BytesMut::new();
    let (mut consumed, mut fed) = (0, 0);
    let mut packets = Vec::new();
    for chunk in chunks(data, rng) {
        buf.extend_from_slice(chunk);
        fed += chunk.len();
        loop {
            match decode_checked(&mut buf, &data[consumed..fed]) {
                Ok(Some(p)) => {
                    consumed += mailbox::to_bytes(&p).len();
                    packets.push(p);
                }
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        packets,
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
    Outcome { packets, end }
}

fn check_packet(p: &Packet, prefixes: bool) {
    let enc = mailbox::to_bytes(p);
    assert_eq!(enc.first(), Some(&p.kind()));

    let mut again = BytesMut::from(&enc[..]);
    assert_eq!(
        mailbox::decode(&mut again),
        Ok(Some(p.clone())),
        "round trip"
    );
    assert!(again.is_empty(), "round trip left bytes behind");

    if !prefixes {
        return;
    }
    for cut in prefix_cuts(enc.len()) {
        let mut part = BytesMut::from(&enc[..cut]);
        assert_eq!(
            mailbox::decode(&mut part),
            Ok(None),
            "prefix of {cut} of {} bytes of {p:?}",
            enc.len()
        );
        assert_eq!(part.len(), cut, "incomplete input consumed");
    }
}
