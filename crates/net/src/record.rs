//! TLS 1.3 record protection (RFC 8446 s.5), for connections whose handshake rustls did.
//!
//! rustls runs the handshake and hands over the traffic keys ([`rustls::ExtractedSecrets`],
//! the API it offers for kernel TLS); [`Sealer`] and [`Opener`] seal and open the records that
//! follow, in buffers the caller owns, so a byte is copied once on each side instead of three
//! times on the receiving one (see [`crate::secure`] for the stream built on them and
//! `docs/protocols/relay.md` s.1). The framing (headers, padding, post-handshake messages) is
//! [`tube_proto::tls13`]; this adds the AEAD, from ring. No IO.
//!
//! The nonce of a record is the IV xor its sequence number, so a replayed, dropped or
//! reordered record fails authentication.

pub use tube_proto::tls13::*;

use ring::aead::{
    AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};
use rustls::ConnectionTrafficSecrets;

const NONCE_LEN: usize = 12;

/// The key, IV and sequence number of one direction.
struct Keys {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Self, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => return Err(RecordError::UnsupportedSuite),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::UnsupportedSuite)?;
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::UnsupportedSuite)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record (RFC 8446 s.5.3), advancing the sequence number.
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq = self.seq.checked_add(1).ok_or(RecordError::SeqExhausted)?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// Seals the records one direction sends.
pub struct Sealer(Keys);

impl Sealer {
    /// Keys from rustls, and the sequence number of the next record.
    pub fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Self, RecordError> {
        Keys::new(secrets, seq).map(Self)
    }

    /// Records sealed under these keys so far.
    pub fn seq(&self) -> u64 {
        self.0.seq
    }

    /// Starts a record at the end of `out`: reserves its header and returns where it starts.
    /// Append at most [`MAX_PLAINTEXT`] bytes of plaintext, then call [`Sealer::finish`].
    pub fn begin(out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        start
    }

    /// Seals the record [`Sealer::begin`] started at `start`, whose plaintext is everything
    /// after its header, as content of type `typ`: appends the type and the tag, fills in the
    /// header. On an error the record is removed again.
    pub fn finish(
        &mut self,
        out: &mut Vec<u8>,
        start: usize,
        typ: ContentType,
    ) -> Result<(), RecordError> {
        let plain = out.len() - start - HEADER_LEN;
        if plain > MAX_PLAINTEXT {
            out.truncate(start);
            return Err(RecordError::Overflow(plain));
        }
        let nonce = match self.0.next_nonce() {
            Ok(n) => n,
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        };
        out.push(typ as u8);
        let head = header(plain + 1 + TAG_LEN);
        out[start..start + HEADER_LEN].copy_from_slice(&head);
        let body = &mut out[start + HEADER_LEN..];
        match self
            .0
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(head), body)
        {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(_) => {
                out.truncate(start);
                Err(RecordError::Overflow(plain))
            }
        }
    }

    /// Appends one sealed record of type `typ` holding `plain` (at most [`MAX_PLAINTEXT`]).
    pub fn seal(
        &mut self,
        typ: ContentType,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let start = Self::begin(out);
        out.extend_from_slice(plain);
        self.finish(out, start, typ)
    }
}

/// Opens the records one direction receives.
pub struct Opener(Keys);

impl Opener {
    /// Keys from rustls, and the sequence number of the next record.
    pub fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Self, RecordError> {
        Keys::new(secrets, seq).map(Self)
    }

    /// Opens in place the one whole record in `record` (its length from [`record_len`]):
    /// returns its content type and plaintext length; the plaintext is then at
    /// `record[HEADER_LEN..HEADER_LEN + len]`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(ContentType, usize), RecordError> {
        let total = record_len(record)?.ok_or(RecordError::TooShort(record.len()))?;
        if total != record.len() {
            return Err(RecordError::TooShort(record.len()));
        }
        let (head, body) = record.split_at_mut(HEADER_LEN);
        let nonce = self.0.next_nonce()?;
        let aad =
            Aad::from(<[u8; HEADER_LEN]>::try_from(&*head).map_err(|_| RecordError::BadRecordMac)?);
        let plain = self
            .0
            .key
            .open_in_place(nonce, aad, body)
            .map_err(|_| RecordError::BadRecordMac)?;
        inner_plaintext(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn secrets(k: u8) -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([k; 32]),
            iv: Iv::from([k ^ 0x5a; 12]),
        }
    }

    fn pair(seq: u64) -> (Sealer, Opener) {
        let s = secrets(7);
        (Sealer::new(&s, seq).unwrap(), Opener::new(&s, seq).unwrap())
    }

    fn open_one(o: &mut Opener, buf: &mut [u8]) -> Result<(ContentType, Vec<u8>), RecordError> {
        let (t, n) = o.open(buf)?;
        Ok((t, buf[HEADER_LEN..HEADER_LEN + n].to_vec()))
    }

    #[test]
    fn records_open_in_order_and_not_out_of_it() {
        let (mut s, mut o) = pair(3);
        let mut wire = Vec::new();
        s.seal(ContentType::ApplicationData, b"first", &mut wire)
            .unwrap();
        let cut = wire.len();
        s.seal(ContentType::Handshake, &key_update(false), &mut wire)
            .unwrap();
        assert_eq!(record_len(&wire).unwrap(), Some(cut));
        assert_eq!(cut, OVERHEAD + 5);
        // The second record first: its nonce is not the one expected.
        let mut second = wire[cut..].to_vec();
        assert_eq!(o.open(&mut second.clone()), Err(RecordError::BadRecordMac));
        // A failed open still consumed a sequence number, so a fresh opener is needed; real
        // connections close on the first failure.
        let (_, mut o) = pair(3);
        let (t, p) = open_one(&mut o, &mut wire[..cut]).unwrap();
        assert_eq!(
            (t, p.as_slice()),
            (ContentType::ApplicationData, &b"first"[..])
        );
        let (t, p) = open_one(&mut o, &mut second).unwrap();
        assert_eq!(t, ContentType::Handshake);
        assert_eq!(
            post_handshake(&p).unwrap(),
            vec![PostHandshake::KeyUpdate { requested: false }]
        );
    }

    #[test]
    fn a_flipped_bit_anywhere_fails_authentication() {
        let (mut s, _) = pair(0);
        let mut wire = Vec::new();
        s.seal(ContentType::ApplicationData, &[9; 100], &mut wire)
            .unwrap();
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x10;
            let (_, mut o) = pair(0);
            let got = o.open(&mut bad);
            assert!(got.is_err(), "byte {i} flipped still opened");
        }
    }

    #[test]
    fn sealing_refuses_oversized_plaintext_and_leaves_the_buffer_as_it_was() {
        let (mut s, _) = pair(0);
        let mut out = vec![1, 2, 3];
        assert_eq!(
            s.seal(
                ContentType::ApplicationData,
                &[0; MAX_PLAINTEXT + 1],
                &mut out
            ),
            Err(RecordError::Overflow(MAX_PLAINTEXT + 1))
        );
        assert_eq!(out, [1, 2, 3]);
        s.seal(ContentType::ApplicationData, &[0; MAX_PLAINTEXT], &mut out)
            .unwrap();
        assert_eq!(out.len(), 3 + MAX_PLAINTEXT + OVERHEAD);
    }

    #[test]
    fn the_sequence_number_never_wraps() {
        let (mut s, _) = pair(u64::MAX);
        let mut out = Vec::new();
        assert_eq!(
            s.seal(ContentType::ApplicationData, b"x", &mut out),
            Err(RecordError::SeqExhausted)
        );
        assert!(out.is_empty());
    }
}
