//! The TLS 1.3 record layer's framing (RFC 8446 s.5), without the cryptography: record
//! headers, the inner content type under padding, and the handshake messages that may follow
//! a handshake. `tube-net`'s `record` module seals and opens records with these; they are the
//! part a peer controls before authentication succeeds, so they live here, pure and fuzzed.
//!
//! What is accepted: records of outer type application_data, version 0x0303, at most
//! [`MAX_CIPHERTEXT`] bytes of ciphertext and [`MAX_PLAINTEXT`] of plaintext. Handshake
//! messages after the handshake (KeyUpdate, NewSessionTicket) must lie whole within one
//! record, and a KeyUpdate must end its record (a key change happens at a record boundary,
//! RFC 8446 s.5.1).

/// Bytes of a record header: type, version, length.
pub const HEADER_LEN: usize = 5;
/// Most plaintext bytes in one record (2^14).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Most ciphertext bytes in one record (2^14 + 256).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Bytes of the authentication tag of every TLS 1.3 AEAD.
pub const TAG_LEN: usize = 16;
/// What sealing adds to the plaintext of one record: header, inner content type, tag.
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;

const OUTER_TYPE: u8 = 23;
const VERSION: [u8; 2] = [0x03, 0x03];

/// The content type inside a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// An alert (close_notify or an error).
    Alert = 21,
    /// Post-handshake messages (KeyUpdate, NewSessionTicket).
    Handshake = 22,
    /// Application data.
    ApplicationData = 23,
}

/// Why a record was refused. Each closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The outer type was not application_data (TLS 1.3 encrypts everything after the
    /// handshake).
    #[error("tls record of outer type {0} after the handshake")]
    OuterType(u8),
    /// The legacy version field was not 0x0303.
    #[error("tls record with version {0:#06x}")]
    Version(u16),
    /// More ciphertext or plaintext than a record may carry.
    #[error("tls record of {0} bytes is over the limit")]
    Overflow(usize),
    /// Too short to hold a tag and a content type.
    #[error("tls record of {0} bytes is too short")]
    TooShort(usize),
    /// The AEAD tag did not verify: tampered, replayed, reordered or under the wrong key.
    #[error("tls record failed authentication")]
    BadRecordMac,
    /// The plaintext was all zeros: no content type.
    #[error("tls record without a content type")]
    NoContentType,
    /// An inner content type TLS 1.3 does not allow here.
    #[error("tls record of inner type {0}")]
    InnerType(u8),
    /// A handshake message that is cut short, not allowed after the handshake, or not at the
    /// end of its record where it must be.
    #[error("unexpected tls handshake message (type {0})")]
    Handshake(u8),
    /// The sequence number would wrap.
    #[error("tls sequence number exhausted")]
    SeqExhausted,
    /// Keys of a cipher suite tube does not implement.
    #[error("unsupported tls cipher suite")]
    UnsupportedSuite,
}

/// The header of a record whose ciphertext (tag included) is `len` bytes. Sealing never asks
/// for more than [`MAX_CIPHERTEXT`]; a length past the 16-bit field saturates rather than wraps.
pub fn header(len: usize) -> [u8; HEADER_LEN] {
    let len = (len.min(usize::from(u16::MAX)) as u16).to_be_bytes();
    [OUTER_TYPE, VERSION[0], VERSION[1], len[0], len[1]]
}

/// The whole length (header included) of the record at the start of `buf`, once its header is
/// there; `None` while fewer than [`HEADER_LEN`] bytes are. Checked from the header alone.
pub fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    if h[0] != OUTER_TYPE {
        return Err(RecordError::OuterType(h[0]));
    }
    if h[1..3] != VERSION {
        return Err(RecordError::Version(u16::from_be_bytes([h[1], h[2]])));
    }
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if len > MAX_CIPHERTEXT {
        return Err(RecordError::Overflow(len));
    }
    if len < TAG_LEN + 1 {
        return Err(RecordError::TooShort(len));
    }
    Ok(Some(HEADER_LEN + len))
}

/// The content type and content length of a decrypted TLSInnerPlaintext: the type is the last
/// non-zero byte, zeros after it are padding.
pub fn inner_plaintext(plain: &[u8]) -> Result<(ContentType, usize), RecordError> {
    let end = plain
        .iter()
        .rposition(|&b| b != 0)
        .ok_or(RecordError::NoContentType)?;
    let typ = match plain[end] {
        21 => ContentType::Alert,
        22 => ContentType::Handshake,
        23 => ContentType::ApplicationData,
        t => return Err(RecordError::InnerType(t)),
    };
    if end > MAX_PLAINTEXT {
        return Err(RecordError::Overflow(end));
    }
    Ok((typ, end))
}

/// A handshake message received after the handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum PostHandshake<'a> {
    /// The peer's sending keys changed; `requested`: it asks for ours to change too.
    KeyUpdate {
        /// update_requested (1) rather than update_not_requested (0).
        requested: bool,
    },
    /// A session ticket from a server (the body, for rustls to store).
    NewSessionTicket(&'a [u8]),
}

const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;

/// The handshake messages in the plaintext of one handshake record, in order: at least one,
/// each whole, a KeyUpdate only last.
pub fn post_handshake(plain: &[u8]) -> Result<Vec<PostHandshake<'_>>, RecordError> {
    let mut out = Vec::new();
    let mut rest = plain;
    while let [typ, l0, l1, l2, body @ ..] = rest {
        let len = usize::from(*l0) << 16 | usize::from(*l1) << 8 | usize::from(*l2);
        let Some(msg) = body.get(..len) else {
            return Err(RecordError::Handshake(*typ));
        };
        rest = &body[len..];
        match (*typ, msg) {
            (KEY_UPDATE, [r @ (0 | 1)]) if rest.is_empty() => {
                out.push(PostHandshake::KeyUpdate { requested: *r == 1 })
            }
            (NEW_SESSION_TICKET, _) => out.push(PostHandshake::NewSessionTicket(msg)),
            (t, _) => return Err(RecordError::Handshake(t)),
        }
    }
    match rest {
        [] if !out.is_empty() => Ok(out),
        [] => Err(RecordError::Handshake(0)),
        [t, ..] => Err(RecordError::Handshake(*t)),
    }
}

/// The plaintext of a KeyUpdate handshake message; `requested`: ask the peer to update too.
pub fn key_update(requested: bool) -> [u8; 5] {
    [KEY_UPDATE, 0, 0, 1, u8::from(requested)]
}

/// The plaintext of a close_notify alert (level warning, description 0).
pub const CLOSE_NOTIFY: [u8; 2] = [1, 0];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_checked_before_any_decryption() {
        assert_eq!(record_len(&[23, 3, 3, 0]), Ok(None));
        assert_eq!(
            record_len(&[22, 3, 3, 0, 40]),
            Err(RecordError::OuterType(22))
        );
        assert_eq!(
            record_len(&[23, 3, 1, 0, 40]),
            Err(RecordError::Version(0x0301))
        );
        assert_eq!(
            record_len(&[23, 3, 3, 0x41, 0x01]),
            Err(RecordError::Overflow(0x4101))
        );
        assert_eq!(
            record_len(&[23, 3, 3, 0, 16]),
            Err(RecordError::TooShort(16))
        );
        assert_eq!(
            record_len(&[23, 3, 3, 0x41, 0]),
            Ok(Some(HEADER_LEN + MAX_CIPHERTEXT))
        );
        assert_eq!(
            record_len(&[23, 3, 3, 0xff, 0xff]),
            Err(RecordError::Overflow(65535))
        );
        assert_eq!(record_len(&header(300)), Ok(Some(305)));
    }

    #[test]
    fn the_content_type_is_the_last_byte_that_is_not_padding() {
        assert_eq!(
            inner_plaintext(b"abc\x17"),
            Ok((ContentType::ApplicationData, 3))
        );
        assert_eq!(
            inner_plaintext(b"ab\x15\0\0\0"),
            Ok((ContentType::Alert, 2))
        );
        assert_eq!(inner_plaintext(&[22]), Ok((ContentType::Handshake, 0)));
        assert_eq!(inner_plaintext(&[0, 0]), Err(RecordError::NoContentType));
        assert_eq!(inner_plaintext(&[]), Err(RecordError::NoContentType));
        assert_eq!(inner_plaintext(b"x\x14"), Err(RecordError::InnerType(20)));
        let mut big = vec![1; MAX_PLAINTEXT + 1];
        big.push(23);
        assert_eq!(
            inner_plaintext(&big),
            Err(RecordError::Overflow(MAX_PLAINTEXT + 1))
        );
        big.remove(0);
        assert_eq!(
            inner_plaintext(&big),
            Ok((ContentType::ApplicationData, MAX_PLAINTEXT))
        );
    }

    #[test]
    fn post_handshake_messages_must_be_whole_and_key_updates_last() {
        let ku = key_update(true);
        assert_eq!(
            post_handshake(&ku).unwrap(),
            vec![PostHandshake::KeyUpdate { requested: true }]
        );
        let mut two = vec![4, 0, 0, 2, 0xaa, 0xbb];
        two.extend_from_slice(&ku);
        assert_eq!(
            post_handshake(&two).unwrap(),
            vec![
                PostHandshake::NewSessionTicket(&[0xaa, 0xbb]),
                PostHandshake::KeyUpdate { requested: true }
            ]
        );
        let mut after = ku.to_vec();
        after.extend_from_slice(&[4, 0, 0, 0]);
        assert_eq!(post_handshake(&after), Err(RecordError::Handshake(24)));
        assert_eq!(
            post_handshake(&[24, 0, 0, 1, 2]),
            Err(RecordError::Handshake(24))
        );
        assert_eq!(
            post_handshake(&[4, 0, 0, 9, 1]),
            Err(RecordError::Handshake(4))
        );
        assert_eq!(
            post_handshake(&[1, 0, 0, 0]),
            Err(RecordError::Handshake(1))
        );
        assert_eq!(post_handshake(&[4, 0]), Err(RecordError::Handshake(4)));
        assert_eq!(post_handshake(&[]), Err(RecordError::Handshake(0)));
    }
}
