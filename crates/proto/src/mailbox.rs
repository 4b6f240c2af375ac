//! The mailbox wire format (seed 003, `docs/protocols/mailbox.md`): root packets
//! `[type u8][length u32 BE][payload]`, where types 1 (OK, no payload) and 2 (register:
//! `[u16 BE cert length][cert]`) are exactly the seed's and the others are tube's additions.
//!
//! [`decode`] takes a packet off the front of a buffer: `Ok(None)` while it is incomplete
//! (every prefix of a valid packet), an error as soon as the header or payload is malformed.
//! A length over [`MAX_PAYLOAD`] is refused from the header alone, before anything is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of the root header: type and length.
pub const HEADER_LEN: usize = 5;

/// Largest payload of any packet.
pub const MAX_PAYLOAD: usize = 128 * 1024;

/// Largest certificate in `register` and `cert`.
pub const MAX_CERT: usize = 4096;

/// Largest message blob (the sealed envelope) in `deliver` and `message`.
pub const MAX_BLOB: usize = 96 * 1024;

/// Largest error text.
pub const MAX_ERROR_TEXT: usize = 512;

/// A SHA-256 certificate fingerprint: how clients are known.
pub type Fingerprint = [u8; 32];

/// A message id, chosen at random by the sender.
pub type MessageId = [u8; 16];

/// One root packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// 1, peer -> client: the operation succeeded (registration complete). No payload.
    Ok,
    /// 2, client -> peer: "this is my certificate" (seed). Answered by [`Packet::Challenge`].
    Register {
        /// DER certificate, 1..=[`MAX_CERT`] bytes.
        cert: Bytes,
    },
    /// 3, peer -> client: prove the certificate is yours by signing this.
    Challenge {
        /// Fresh random bytes.
        nonce: [u8; 32],
    },
    /// 4, client -> peer: Ed25519 signature over [`proof_message`].
    Proof {
        /// The signature.
        signature: [u8; 64],
    },
    /// 5, sender -> recipient's peer: store this for `to`.
    Deliver {
        /// Recipient's fingerprint.
        to: Fingerprint,
        /// Sender-chosen id, echoed in [`Packet::Stored`].
        id: MessageId,
        /// The sealed envelope, 1..=[`MAX_BLOB`] bytes (opaque to the peer).
        blob: Bytes,
    },
    /// 6, peer -> sender: the message is queued for its recipient.
    Stored {
        /// The delivered message's id.
        id: MessageId,
    },
    /// 7, client -> peer: send me my queue, then keep pushing.
    Fetch,
    /// 8, peer -> client: one queued or pushed message.
    Message {
        /// Position in the recipient's queue (increasing, from 1).
        seq: u64,
        /// When the peer stored it, Unix milliseconds.
        received_ms: u64,
        /// The sealed envelope as delivered.
        blob: Bytes,
    },
    /// 9, client -> peer: every message up to and including `seq` is processed; forget them.
    Ack {
        /// The last processed sequence number.
        seq: u64,
    },
    /// 10, either way: keeps the connection (and NAT bindings) alive; the peer echoes it.
    Keepalive,
    /// 11, peer -> client: the queue as of the fetch has been sent.
    QueueEnd {
        /// How many messages the fetch sent.
        count: u32,
    },
    /// 12, sender -> peer: the certificate of the registered client `fingerprint`, please.
    CertRequest {
        /// Whose certificate.
        fingerprint: Fingerprint,
    },
    /// 13, peer -> sender: the certificate asked for (the sender checks its fingerprint).
    Cert {
        /// DER certificate.
        cert: Bytes,
    },
    /// 15, either way: a refusal with a code (see [`MailboxError`]).
    Error {
        /// The code.
        code: u16,
        /// A short text, at most [`MAX_ERROR_TEXT`] bytes of UTF-8.
        message: String,
    },
    /// 16, client -> peer over HTTP (`longpoll.md` section 7): follows [`Packet::Register`] in
    /// a registration body, proving possession without a challenge round trip.
    HttpProof {
        /// The client's clock, Unix milliseconds (the peer accepts 2 minutes either way).
        time_ms: u64,
        /// Ed25519 signature over [`http_proof_message`].
        signature: [u8; 64],
    },
}

/// Error codes carried by [`Packet::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum MailboxError {
    /// A malformed packet, or one not allowed in this phase. The connection is closed.
    Protocol = 7001,
    /// The proof of possession did not verify. The connection is closed.
    BadProof = 7002,
    /// Unknown recipient (never registered since the peer started).
    UnknownRecipient = 7003,
    /// The recipient's queue is full (count or bytes), or the peer's total is.
    QueueFull = 7004,
    /// Too many registrations or deliveries from this address or for this fingerprint.
    RateLimited = 7005,
    /// The operation needs a registered connection.
    NotRegistered = 7006,
    /// The peer is at its client limit.
    Busy = 7007,
    /// The peer is shutting down.
    ShuttingDown = 7008,
}

impl MailboxError {
    /// The code's name, as the CLI prints it (`error 7004 QUEUE_FULL: ...`).
    pub fn name(code: u16) -> &'static str {
        match code {
            7001 => "PROTOCOL_ERROR",
            7002 => "BAD_PROOF",
            7003 => "UNKNOWN_RECIPIENT",
            7004 => "QUEUE_FULL",
            7005 => "RATE_LIMITED",
            7006 => "NOT_REGISTERED",
            7007 => "BUSY",
            7008 => "SHUTTING_DOWN",
            _ => "UNKNOWN",
        }
    }
}

/// What the signature of a [`Packet::Proof`] covers: a domain tag, the peer's challenge and
/// the SHA-256 fingerprint of the certificate being registered.
pub fn proof_message(nonce: &[u8; 32], fingerprint: &Fingerprint) -> Vec<u8> {
    let mut m = Vec::with_capacity(PROOF_TAG.len() + 64);
    m.extend_from_slice(PROOF_TAG);
    m.extend_from_slice(nonce);
    m.extend_from_slice(fingerprint);
    m
}

const PROOF_TAG: &[u8] = b"tube-mailbox register v1\0";

/// What the signature of a [`Packet::HttpProof`] covers: a domain tag, the client's time and
/// the SHA-256 fingerprint of the certificate being registered.
pub fn http_proof_message(time_ms: u64, fingerprint: &Fingerprint) -> Vec<u8> {
    let mut m = Vec::with_capacity(HTTP_PROOF_TAG.len() + 40);
    m.extend_from_slice(HTTP_PROOF_TAG);
    m.extend_from_slice(&time_ms.to_be_bytes());
    m.extend_from_slice(fingerprint);
    m
}

const HTTP_PROOF_TAG: &[u8] = b"tube-mailbox http register v1\0";

/// Why bytes are not a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The type byte names no packet.
    #[error("unknown packet type {0}")]
    UnknownType(u8),
    /// The header claims more than [`MAX_PAYLOAD`] bytes.
    #[error("packet of {0} bytes is over the limit")]
    TooLong(u32),
    /// The payload does not have the type's layout.
    #[error("malformed {0} packet")]
    Malformed(&'static str),
}

impl Packet {
    /// The type byte.
    pub fn kind(&self) -> u8 {
        match self {
            Packet::Ok => 1,
            Packet::Register { .. } => 2,
            Packet::Challenge { .. } => 3,
            Packet::Proof { .. } => 4,
            Packet::Deliver { .. } => 5,
            Packet::Stored { .. } => 6,
            Packet::Fetch => 7,
            Packet::Message { .. } => 8,
            Packet::Ack { .. } => 9,
            Packet::Keepalive => 10,
            Packet::QueueEnd { .. } => 11,
            Packet::CertRequest { .. } => 12,
            Packet::Cert { .. } => 13,
            Packet::Error { .. } => 15,
            Packet::HttpProof { .. } => 16,
        }
    }

    /// A refusal.
    pub fn error(code: MailboxError, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_TEXT {
            let mut end = MAX_ERROR_TEXT;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Packet::Error {
            code: code as u16,
            message,
        }
    }
}

/// Appends `packet` to `dst`. Panics never; payload bounds are the caller's (the types make
/// most of them impossible to break, and [`decode`] refuses the rest on the other side).
pub fn encode(packet: &Packet, dst: &mut BytesMut) {
    let start = dst.len();
    dst.put_u8(packet.kind());
    dst.put_u32(0);
    match packet {
        Packet::Ok | Packet::Fetch | Packet::Keepalive => {}
        Packet::Register { cert } | Packet::Cert { cert } => {
            dst.put_u16(u16::try_from(cert.len()).unwrap_or(u16::MAX));
            dst.put_slice(cert);
        }
        Packet::Challenge { nonce } => dst.put_slice(nonce),
        Packet::Proof { signature } => dst.put_slice(signature),
        Packet::Deliver { to, id, blob } => {
            dst.put_slice(to);
            dst.put_slice(id);
            dst.put_slice(blob);
        }
        Packet::Stored { id } => dst.put_slice(id),
        Packet::Message {
            seq,
            received_ms,
            blob,
        } => {
            dst.put_u64(*seq);
            dst.put_u64(*received_ms);
            dst.put_slice(blob);
        }
        Packet::Ack { seq } => dst.put_u64(*seq),
        Packet::QueueEnd { count } => dst.put_u32(*count),
        Packet::CertRequest { fingerprint } => dst.put_slice(fingerprint),
        Packet::Error { code, message } => {
            dst.put_u16(*code);
            dst.put_u16(u16::try_from(message.len()).unwrap_or(u16::MAX));
            dst.put_slice(message.as_bytes());
        }
        Packet::HttpProof { time_ms, signature } => {
            dst.put_u64(*time_ms);
            dst.put_slice(signature);
        }
    }
    let len = u32::try_from(dst.len() - start - HEADER_LEN).unwrap_or(u32::MAX);
    dst[start + 1..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

/// The encoded bytes of one packet.
pub fn to_bytes(packet: &Packet) -> Bytes {
    let mut b = BytesMut::new();
    encode(packet, &mut b);
    b.freeze()
}

/// Takes one packet off the front of `src`: `Ok(None)` (nothing consumed) while incomplete.
///
/// Zero-copy: the byte fields of the packet (`cert`, `blob`) share `src`'s allocation, so one
/// kept after the packet is handled keeps that whole buffer alive; whoever stores one copies
/// it (the mailbox peer copies what it queues and registers).
pub fn decode(src: &mut BytesMut) -> Result<Option<Packet>, PacketError> {
    let Some(&kind) = src.first() else {
        return Ok(None);
    };
    if !matches!(kind, 1..=13 | 15 | 16) {
        return Err(PacketError::UnknownType(kind));
    }
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]);
    if len as usize > MAX_PAYLOAD {
        return Err(PacketError::TooLong(len));
    }
    let len = len as usize;
    if src.len() < HEADER_LEN + len {
        src.reserve(HEADER_LEN + len - src.len());
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    let payload = src.split_to(len).freeze();
    parse(kind, payload).map(Some)
}

fn fixed<const N: usize>(p: &[u8], what: &'static str) -> Result<[u8; N], PacketError> {
    p.try_into().map_err(|_| PacketError::Malformed(what))
}

fn parse(kind: u8, mut p: Bytes) -> Result<Packet, PacketError> {
    Ok(match kind {
        1 | 7 | 10 => {
            let (packet, name) = match kind {
                1 => (Packet::Ok, "ok"),
                7 => (Packet::Fetch, "fetch"),
                _ => (Packet::Keepalive, "keepalive"),
            };
            if !p.is_empty() {
                return Err(PacketError::Malformed(name));
            }
            packet
        }
        2 | 13 => {
            let name = if kind == 2 { "register" } else { "cert" };
            if p.len() < 2 {
                return Err(PacketError::Malformed(name));
            }
            let n = p.get_u16() as usize;
            if n == 0 || n > MAX_CERT || p.len() != n {
                return Err(PacketError::Malformed(name));
            }
            if kind == 2 {
                Packet::Register { cert: p }
            } else {
                Packet::Cert { cert: p }
            }
        }
        3 => Packet::Challenge {
            nonce: fixed(&p, "challenge")?,
        },
        4 => Packet::Proof {
            signature: fixed(&p, "proof")?,
        },
        5 => {
            if p.len() < 48 + 1 || p.len() > 48 + MAX_BLOB {
                return Err(PacketError::Malformed("deliver"));
            }
            let to = fixed(&p[..32], "deliver")?;
            let id = fixed(&p[32..48], "deliver")?;
            p.advance(48);
            Packet::Deliver { to, id, blob: p }
        }
        6 => Packet::Stored {
            id: fixed(&p, "stored")?,
        },
        8 => {
            if p.len() < 16 + 1 || p.len() > 16 + MAX_BLOB {
                return Err(PacketError::Malformed("message"));
            }
            let seq = p.get_u64();
            let received_ms = p.get_u64();
            Packet::Message {
                seq,
                received_ms,
                blob: p,
            }
        }
        9 => Packet::Ack {
            seq: u64::from_be_bytes(fixed(&p, "ack")?),
        },
        11 => Packet::QueueEnd {
            count: u32::from_be_bytes(fixed(&p, "queue_end")?),
        },
        12 => Packet::CertRequest {
            fingerprint: fixed(&p, "cert_request")?,
        },
        15 => {
            if p.len() < 4 {
                return Err(PacketError::Malformed("error"));
            }
            let code = p.get_u16();
            let n = p.get_u16() as usize;
            if n > MAX_ERROR_TEXT || p.len() != n {
                return Err(PacketError::Malformed("error"));
            }
            let message =
                String::from_utf8(p.to_vec()).map_err(|_| PacketError::Malformed("error"))?;
            Packet::Error { code, message }
        }
        16 => {
            if p.len() != 8 + 64 {
                return Err(PacketError::Malformed("http_proof"));
            }
            let time_ms = p.get_u64();
            Packet::HttpProof {
                time_ms,
                signature: fixed(&p, "http_proof")?,
            }
        }
        other => return Err(PacketError::UnknownType(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Packet> {
        vec![
            Packet::Ok,
            Packet::Register {
                cert: Bytes::from_static(b"\x30\x82certificate"),
            },
            Packet::Challenge { nonce: [7; 32] },
            Packet::Proof { signature: [9; 64] },
            Packet::Deliver {
                to: [1; 32],
                id: [2; 16],
                blob: Bytes::from_static(b"sealed"),
            },
            Packet::Stored { id: [2; 16] },
            Packet::Fetch,
            Packet::Message {
                seq: 42,
                received_ms: 1_700_000_000_000,
                blob: Bytes::from_static(b"sealed"),
            },
            Packet::Ack { seq: 42 },
            Packet::Keepalive,
            Packet::QueueEnd { count: 3 },
            Packet::CertRequest {
                fingerprint: [4; 32],
            },
            Packet::Cert {
                cert: Bytes::from_static(b"der"),
            },
            Packet::error(MailboxError::QueueFull, "queue full"),
            Packet::HttpProof {
                time_ms: 1_700_000_000_000,
                signature: [5; 64],
            },
        ]
    }

    #[test]
    fn seed_packets_are_byte_exact() {
        // Type 1, no payload; type 2, uint16 length then the certificate (seed 003).
        assert_eq!(&to_bytes(&Packet::Ok)[..], &[1, 0, 0, 0, 0]);
        let reg = to_bytes(&Packet::Register {
            cert: Bytes::from_static(b"ABC"),
        });
        assert_eq!(&reg[..], &[2, 0, 0, 0, 5, 0, 3, b'A', b'B', b'C']);
        // Type 16 (tube, HTTP registration): [unix ms u64][signature 64].
        let proof = to_bytes(&Packet::HttpProof {
            time_ms: 0x0102_0304_0506_0708,
            signature: [0xaa; 64],
        });
        let mut want = vec![16, 0, 0, 0, 72, 1, 2, 3, 4, 5, 6, 7, 8];
        want.extend_from_slice(&[0xaa; 64]);
        assert_eq!(&proof[..], &want[..]);
    }

    #[test]
    fn http_proof_message_layout() {
        let m = http_proof_message(0x0102_0304_0506_0708, &[9; 32]);
        let mut want = b"tube-mailbox http register v1\0".to_vec();
        want.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        want.extend_from_slice(&[9; 32]);
        assert_eq!(m, want);
    }

    #[test]
    fn every_packet_round_trips_and_every_prefix_is_incomplete() {
        for p in samples() {
            let bytes = to_bytes(&p);
            let mut buf = BytesMut::from(&bytes[..]);
            assert_eq!(decode(&mut buf), Ok(Some(p.clone())));
            assert!(buf.is_empty());
            for cut in 0..bytes.len() {
                let mut buf = BytesMut::from(&bytes[..cut]);
                assert_eq!(decode(&mut buf), Ok(None), "{p:?} cut at {cut}");
                assert_eq!(buf.len(), cut, "nothing consumed");
            }
        }
    }

    #[test]
    fn a_huge_length_is_refused_from_the_header() {
        let mut buf = BytesMut::from(&[8u8, 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(decode(&mut buf), Err(PacketError::TooLong(u32::MAX)));
        assert!(
            buf.capacity() < 1024,
            "nothing reserved for the claimed length"
        );
    }

    #[test]
    fn malformed_packets_are_refused() {
        let cases: &[(&[u8], PacketError)] = &[
            (&[0], PacketError::UnknownType(0)),
            (&[14, 0, 0, 0, 0], PacketError::UnknownType(14)),
            (&[17], PacketError::UnknownType(17)),
            (&[16, 0, 0, 0, 71], PacketError::Malformed("http_proof")),
            (&[16, 0, 0, 0, 73], PacketError::Malformed("http_proof")),
            (&[255], PacketError::UnknownType(255)),
            (&[1, 0, 0, 0, 1, 0], PacketError::Malformed("ok")),
            (&[7, 0, 0, 0, 1, 0], PacketError::Malformed("fetch")),
            (&[10, 0, 0, 0, 1, 0], PacketError::Malformed("keepalive")),
            (&[2, 0, 0, 0, 0], PacketError::Malformed("register")),
            (&[2, 0, 0, 0, 1, 0], PacketError::Malformed("register")),
            (&[2, 0, 0, 0, 2, 0, 0], PacketError::Malformed("register")),
            (
                &[2, 0, 0, 0, 3, 0, 2, 1],
                PacketError::Malformed("register"),
            ),
            (
                &[2, 0, 0, 0, 4, 0, 1, 1, 1],
                PacketError::Malformed("register"),
            ),
            (&[13, 0, 0, 0, 2, 0, 0], PacketError::Malformed("cert")),
            (&[3, 0, 0, 0, 1, 0], PacketError::Malformed("challenge")),
            (&[4, 0, 0, 0, 0], PacketError::Malformed("proof")),
            (&[5, 0, 0, 0, 48], PacketError::Malformed("deliver")),
            (&[6, 0, 0, 0, 15], PacketError::Malformed("stored")),
            (&[8, 0, 0, 0, 16], PacketError::Malformed("message")),
            (&[9, 0, 0, 0, 7], PacketError::Malformed("ack")),
            (&[11, 0, 0, 0, 5], PacketError::Malformed("queue_end")),
            (&[12, 0, 0, 0, 31], PacketError::Malformed("cert_request")),
            (&[15, 0, 0, 0, 3], PacketError::Malformed("error")),
            (
                &[15, 0, 0, 0, 5, 0x1b, 0x59, 0, 2, b'x'],
                PacketError::Malformed("error"),
            ),
            (
                &[15, 0, 0, 0, 6, 0x1b, 0x59, 0, 2, 0xff, 0xfe],
                PacketError::Malformed("error"),
            ),
        ];
        for (bytes, want) in cases {
            // Pad so the payload is complete where the header says it is.
            let mut v = bytes.to_vec();
            if v.len() >= HEADER_LEN {
                let len = u32::from_be_bytes([v[1], v[2], v[3], v[4]]) as usize;
                v.resize(HEADER_LEN + len.max(v.len() - HEADER_LEN), 0);
            }
            let mut buf = BytesMut::from(&v[..]);
            assert_eq!(decode(&mut buf).as_ref(), Err(want), "{bytes:?}");
        }
        // Over the blob limit.
        let mut v = vec![5u8];
        let len = (48 + MAX_BLOB + 1) as u32;
        v.extend_from_slice(&len.to_be_bytes());
        v.resize(HEADER_LEN + len as usize, 0);
        assert_eq!(
            decode(&mut BytesMut::from(&v[..])),
            Err(PacketError::Malformed("deliver"))
        );
    }

    #[test]
    fn error_codes_have_names() {
        assert_eq!(
            MailboxError::name(MailboxError::QueueFull as u16),
            "QUEUE_FULL"
        );
        assert_eq!(MailboxError::name(1), "UNKNOWN");
        let long = "é".repeat(MAX_ERROR_TEXT);
        let Packet::Error { message, .. } = Packet::error(MailboxError::Protocol, long) else {
            unreachable!()
        };
        assert!(message.len() <= MAX_ERROR_TEXT);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut buf) {}
        }

        #[test]
        fn messages_round_trip(seq: u64, ms: u64, blob in proptest::collection::vec(any::<u8>(), 1..2048)) {
            let p = Packet::Message { seq, received_ms: ms, blob: Bytes::from(blob) };
            let mut buf = BytesMut::from(&to_bytes(&p)[..]);
            prop_assert_eq!(decode(&mut buf), Ok(Some(p)));
        }

        #[test]
        fn http_proofs_round_trip(time_ms: u64, sig in proptest::collection::vec(any::<u8>(), 64)) {
            let signature: [u8; 64] = sig.try_into().expect("64 bytes");
            let p = Packet::HttpProof { time_ms, signature };
            let mut buf = BytesMut::from(&to_bytes(&p)[..]);
            prop_assert_eq!(decode(&mut buf), Ok(Some(p)));
            prop_assert!(buf.is_empty());
        }
    }
}
