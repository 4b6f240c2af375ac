//! The chain's text forms (`tube_proto::chain`): tunnel ids (`parse_tunnel_id`,
//! `format_tunnel_id`), secrets as hex (`ChainSecret`) and protocol version strings
//! (`version_compatible`, and the relay's `relay_version_compatible`). The input is the text a
//! peer sent (lossily made UTF-8), and also raw bytes to format.
//!
//! - Nothing panics.
//! - `parse_tunnel_id` accepts exactly the canonical form (36 bytes, lowercase hex, hyphens at
//!   8, 13, 18 and 23), and formatting what it returns gives the input back.
//! - `ChainSecret::to_bytes` accepts exactly 64 lowercase hex digits, and `from_bytes` of the
//!   result gives the text back.
//! - Any 16 bytes format to a canonical id that parses back to them; any 32 bytes make a secret
//!   whose `to_bytes` is them.
//! - A compatible version string starts with the major number 1.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tube_proto::chain::{ChainSecret, format_tunnel_id, parse_tunnel_id, version_compatible};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);

    let parsed = parse_tunnel_id(&text);
    assert_eq!(
        parsed.is_some(),
        is_canonical_id(text.as_bytes()),
        "{text:?}"
    );
    if let Some(id) = parsed {
        assert_eq!(format_tunnel_id(&id), text);
    }

    let secret = ChainSecret::new(text.as_ref());
    let bytes = secret.to_bytes();
    let lower_hex = text.len() == 64 && text.bytes().all(is_lower_hex);
    assert_eq!(bytes.is_some(), lower_hex, "{text:?}");
    if let Some(b) = bytes {
        assert_eq!(ChainSecret::from_bytes(&b).expose(), text);
    }

    for ok in [
        version_compatible(&text),
        tube_proto::relay_version_compatible(&text),
    ] {
        if ok {
            let major = text.split('.').next().unwrap_or_default();
            assert_eq!(major.parse::<u32>(), Ok(1), "{text:?}");
        }
    }

    let mut raw = [0u8; 32];
    for (dst, src) in raw.iter_mut().zip(data) {
        *dst = *src;
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&raw[..16]);
    let formatted = format_tunnel_id(&id);
    assert!(is_canonical_id(formatted.as_bytes()), "{formatted:?}");
    assert_eq!(parse_tunnel_id(&formatted), Some(id));
    assert_eq!(ChainSecret::from_bytes(&raw).to_bytes(), Some(raw));
});

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn is_canonical_id(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => is_lower_hex(c),
        })
}
