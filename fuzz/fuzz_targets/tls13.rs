//! The TLS 1.3 record framing (`tube_proto::tls13`): the input is read three ways, as the
//! bytes a peer sends on the connection (record headers), as the plaintext of a decrypted
//! record (content type under padding) and as the plaintext of a handshake record
//! (post-handshake messages).
//!
//! - Nothing panics.
//! - `record_len`: `Ok(None)` exactly when fewer than `HEADER_LEN` bytes arrived; otherwise the
//!   answer depends on the first `HEADER_LEN` bytes alone, and it is exactly: `OuterType` when
//!   the type is not 23, `Version` when the version is not 0x0303, `Overflow` / `TooShort` when
//!   the length is over `MAX_CIPHERTEXT` / under `TAG_LEN + 1`, else `Ok(Some(n))` with
//!   `HEADER_LEN + TAG_LEN + 1 <= n <= HEADER_LEN + MAX_CIPHERTEXT` and `header(n - HEADER_LEN)`
//!   the input's header, which `record_len` reads back as `n`. Each header of the input read
//!   as a stream of records is checked the same way, and `header` of any 16-bit length from the
//!   input reads back as that length or the matching error.
//! - `inner_plaintext`: `Ok((typ, len))` has `len <= MAX_PLAINTEXT`, `typ` at `len` and only
//!   zeros after it; `NoContentType` exactly when every byte is zero (or there is none);
//!   `InnerType` / `Overflow` name the last non-zero byte / its position. Padding the input
//!   with zeros changes nothing; content followed by any content type reads back as that type
//!   and content length (a close_notify too).
//! - `post_handshake`: `Ok` holds at least one message, a KeyUpdate only last, and encoding
//!   the messages again (`key_update`, or type 4, 24-bit length, body) gives the input back;
//!   every error is `Handshake`. A KeyUpdate appended to messages without one reads back
//!   after them; anything after a KeyUpdate is refused.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tube_fuzz::Rng;
use tube_proto::tls13::{
    CLOSE_NOTIFY, ContentType, HEADER_LEN, MAX_CIPHERTEXT, MAX_PLAINTEXT, PostHandshake,
    RecordError, TAG_LEN, header, inner_plaintext, key_update, post_handshake, record_len,
};

/// Headers of one input checked as a stream of records: past the first few, more teach
/// nothing.
const RECORDS_CHECKED: usize = 64;

fuzz_target!(|data: &[u8]| {
    let mut rng = Rng::from_bytes(data);

    check_record_len(data);
    let mut rest = data;
    for _ in 0..RECORDS_CHECKED {
        match record_len(rest) {
            Ok(Some(n)) if n <= rest.len() => {
                rest = &rest[n..];
                check_record_len(rest);
            }
            _ => break,
        }
    }
    if let [a, b, ..] = data {
        check_header(usize::from(u16::from_be_bytes([*a, *b])));
    }

    check_inner_plaintext(data, &mut rng);
    check_post_handshake(data);
});

/// The answer `record_len` must give for a header from a peer.
fn check_record_len(data: &[u8]) {
    let got = record_len(data);
    let Some(h) = data.get(..HEADER_LEN) else {
        assert_eq!(got, Ok(None), "{} bytes are no header", data.len());
        return;
    };
    assert_eq!(
        record_len(h),
        got,
        "the bytes after the header changed the answer"
    );
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    match got {
        Ok(None) => panic!("Ok(None) for a whole header {h:?}"),
        Ok(Some(n)) => {
            assert!(h[0] == 23 && h[1..3] == [3, 3], "accepted {h:?}");
            assert!(
                (HEADER_LEN + TAG_LEN + 1..=HEADER_LEN + MAX_CIPHERTEXT).contains(&n),
                "record of {n} bytes accepted"
            );
            assert_eq!(n, HEADER_LEN + len);
            assert_eq!(header(n - HEADER_LEN), h, "header does not rebuild {h:?}");
            assert_eq!(record_len(&header(n - HEADER_LEN)), Ok(Some(n)));
        }
        Err(RecordError::OuterType(t)) => assert!(t == h[0] && t != 23, "{h:?}"),
        Err(RecordError::Version(v)) => {
            assert!(h[0] == 23, "{h:?}");
            assert!(
                v == u16::from_be_bytes([h[1], h[2]]) && v != 0x0303,
                "{h:?}"
            );
        }
        Err(RecordError::Overflow(l)) => {
            assert!(h[0] == 23 && h[1..3] == [3, 3], "{h:?}");
            assert!(l == len && l > MAX_CIPHERTEXT, "{h:?}");
        }
        Err(RecordError::TooShort(l)) => {
            assert!(h[0] == 23 && h[1..3] == [3, 3], "{h:?}");
            assert!(l == len && l < TAG_LEN + 1, "{h:?}");
        }
        Err(e) => panic!("record_len refused {h:?} with {e:?}"),
    }
}

/// `header` of a ciphertext length that fits its 16 bits reads back as that length, or as the
/// error for it.
fn check_header(len: usize) {
    let want = if len > MAX_CIPHERTEXT {
        Err(RecordError::Overflow(len))
    } else if len < TAG_LEN + 1 {
        Err(RecordError::TooShort(len))
    } else {
        Ok(Some(HEADER_LEN + len))
    };
    assert_eq!(record_len(&header(len)), want, "header({len})");
}

fn check_inner_plaintext(data: &[u8], rng: &mut Rng) {
    let got = inner_plaintext(data);
    let last = data.iter().rposition(|&b| b != 0);
    assert_eq!(
        got == Err(RecordError::NoContentType),
        last.is_none(),
        "NoContentType is for all zeros"
    );
    match got {
        Ok((typ, len)) => {
            assert!(len <= MAX_PLAINTEXT, "{len} bytes of plaintext accepted");
            assert_eq!(data[len], typ as u8, "content type is not at {len}");
            assert!(data[len + 1..].iter().all(|&b| b == 0), "non-zero padding");
        }
        Err(RecordError::NoContentType) => {}
        Err(RecordError::InnerType(t)) => {
            let end = last.expect("a type byte");
            assert_eq!(data[end], t);
            assert!(!(21..=23).contains(&t), "refused inner type {t}");
        }
        Err(RecordError::Overflow(end)) => {
            assert_eq!(last, Some(end));
            assert!(end > MAX_PLAINTEXT && (21..=23).contains(&data[end]));
        }
        Err(e) => panic!("inner_plaintext refused with {e:?}"),
    }

    let pad = 1 + rng.below(512);
    let mut padded = data.to_vec();
    padded.resize(data.len() + pad, 0);
    assert_eq!(inner_plaintext(&padded), got, "{pad} bytes of padding");

    if data.len() <= MAX_PLAINTEXT {
        for typ in [
            ContentType::Alert,
            ContentType::Handshake,
            ContentType::ApplicationData,
        ] {
            let mut plain = data.to_vec();
            plain.push(typ as u8);
            plain.resize(plain.len() + pad, 0);
            assert_eq!(inner_plaintext(&plain), Ok((typ, data.len())), "{typ:?}");
        }
    }

    let mut alert = CLOSE_NOTIFY.to_vec();
    alert.push(ContentType::Alert as u8);
    alert.resize(alert.len() + pad, 0);
    assert_eq!(
        inner_plaintext(&alert),
        Ok((ContentType::Alert, CLOSE_NOTIFY.len()))
    );
}

fn check_post_handshake(data: &[u8]) {
    let got = post_handshake(data);
    let msgs = match got {
        Ok(msgs) => msgs,
        Err(RecordError::Handshake(_)) => return,
        Err(e) => panic!("post_handshake refused with {e:?}"),
    };
    assert!(!msgs.is_empty(), "Ok with no message");
    let key_updates = msgs
        .iter()
        .filter(|m| matches!(m, PostHandshake::KeyUpdate { .. }))
        .count();
    let ends_in_key_update = matches!(msgs.last(), Some(PostHandshake::KeyUpdate { .. }));
    assert!(
        key_updates == usize::from(ends_in_key_update),
        "KeyUpdate not last: {msgs:?}"
    );

    let mut enc = Vec::with_capacity(data.len());
    for m in &msgs {
        match m {
            PostHandshake::KeyUpdate { requested } => {
                enc.extend_from_slice(&key_update(*requested))
            }
            PostHandshake::NewSessionTicket(body) => {
                let len = body.len();
                assert!(len < 1 << 24, "ticket of {len} bytes");
                enc.extend_from_slice(&[4, (len >> 16) as u8, (len >> 8) as u8, len as u8]);
                enc.extend_from_slice(body);
            }
        }
    }
    assert_eq!(enc, data, "messages do not encode back to the input");

    let mut more = data.to_vec();
    if ends_in_key_update {
        more.extend_from_slice(data);
        assert_eq!(post_handshake(&more), Err(RecordError::Handshake(24)));
    } else {
        let requested = data.len() % 2 == 1;
        more.extend_from_slice(&key_update(requested));
        let mut want = msgs;
        want.push(PostHandshake::KeyUpdate { requested });
        assert_eq!(post_handshake(&more), Ok(want));
    }
}
