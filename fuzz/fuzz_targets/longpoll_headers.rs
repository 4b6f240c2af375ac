//! The long-poll proxy's header parsers (`tube_proto::longpoll`): the input is one raw header
//! value (HTTP allows any bytes), given to every parser.
//!
//! - No parser panics.
//! - `parse_permissions`: at most `MAX_PERMISSIONS` distinct codes of 1 to
//!   `MAX_PERMISSION_LEN` token characters; `format_permissions` of them parses back to them.
//! - `parse_id`: the trimmed input, 1 to `MAX_ID_LEN` visible ASCII characters without a comma;
//!   parsing it again gives it back.
//! - `parse_bearer`: a token that `parse_id` accepts, and `Bearer <token>` parses back to it.
//! - `parse_counter`: agrees with a reference (1 to 20 ASCII digits, value within u64), and the
//!   decimal form of the number parses back to it.
//! - `RequestType::parse` accepts exactly the three spellings `as_str` gives; `is_passthrough`
//!   is "longer than 2 bytes and starts with `x-` in any case".

#![no_main]

use libfuzzer_sys::fuzz_target;
use tube_proto::longpoll::{
    MAX_ID_LEN, MAX_PERMISSION_LEN, MAX_PERMISSIONS, RequestType, format_permissions,
    is_passthrough, parse_bearer, parse_counter, parse_id, parse_permissions,
};

fuzz_target!(|value: &[u8]| {
    if let Ok(codes) = parse_permissions(value) {
        assert!(codes.len() <= MAX_PERMISSIONS);
        for (i, c) in codes.iter().enumerate() {
            assert!((1..=MAX_PERMISSION_LEN).contains(&c.len()), "{c:?}");
            assert!(
                c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
                "{c:?}"
            );
            assert!(!codes[..i].contains(c), "duplicate {c:?}");
        }
        assert_eq!(
            parse_permissions(format_permissions(&codes).as_bytes()),
            Ok(codes)
        );
    }

    if let Ok(id) = parse_id("Client-Id", value) {
        assert_eq!(id.as_bytes(), value.trim_ascii());
        check_id(&id);
    }

    if let Ok(token) = parse_bearer(value) {
        check_id(&token);
        assert_eq!(
            parse_bearer(format!("Bearer {token}").as_bytes()),
            Ok(token)
        );
    }

    let counter = parse_counter("Seq", value);
    assert_eq!(
        counter.is_ok(),
        reference_counter(value).is_some(),
        "{value:?}"
    );
    if let Ok(n) = counter {
        assert_eq!(Some(n), reference_counter(value));
        assert_eq!(parse_counter("Seq", n.to_string().as_bytes()), Ok(n));
    }

    if let Some(t) = RequestType::parse(value) {
        assert_eq!(t.as_str().as_bytes(), value);
    }

    if let Ok(name) = std::str::from_utf8(value) {
        let want = name.len() > 2 && name.as_bytes()[..2].eq_ignore_ascii_case(b"x-");
        assert_eq!(is_passthrough(name), want, "{name:?}");
    }
});

fn check_id(id: &str) {
    assert!((1..=MAX_ID_LEN).contains(&id.len()), "{id:?}");
    assert!(
        id.bytes().all(|b| b.is_ascii_graphic() && b != b','),
        "{id:?}"
    );
    assert_eq!(parse_id("Client-Id", id.as_bytes()).as_deref(), Ok(id));
}

/// 1 to 20 ASCII digits (after trimming blanks) whose value fits in a u64.
fn reference_counter(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u128, |n, d| n * 10 + u128::from(d - b'0'));
    u64::try_from(n).ok()
}
