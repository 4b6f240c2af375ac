//! The long-poll proxy's header vocabulary (seed 004, `docs/protocols/longpoll.md`): header
//! names of the seed's client and backend contracts, tube's acknowledgement extension, and pure
//! parsers for every header value the proxy reads from a peer.
//!
//! Every parser takes the raw header bytes (HTTP allows non-UTF-8 values) and refuses anything
//! outside its small grammar, so a hostile header never reaches the proxy's state.

/// Seed: `Permissions`, comma separated permission codes (client -> proxy -> backend on
/// `/auth` and `/register`; a backend may answer it to narrow what it granted).
pub const PERMISSIONS: &str = "permissions";
/// Seed: `Authorization: Bearer <token>` on `POST /` (and, tube's extension, towards backends).
pub const AUTHORIZATION: &str = "authorization";
/// Seed: `More`, how many packets still wait for the client after this response.
pub const MORE: &str = "more";
/// Seed: `To`, the debug server a client addresses (client -> proxy), or the client a backend
/// answer is for (backend -> proxy).
pub const TO: &str = "to";
/// Seed ("Debugging" prose): `Debug`, accepted as a synonym of `To` from clients.
pub const DEBUG: &str = "debug";
/// Seed: `From`, the sender of a packet (proxy -> backend, and proxy -> debug server).
pub const FROM: &str = "from";
/// Seed: `Type` of a backend request: [`RequestType`].
pub const TYPE: &str = "type";
/// Seed: `Client-Id` of an authorised client (backend -> proxy).
pub const CLIENT_ID: &str = "client-id";
/// Extension: the sequence number of a packet (client -> proxy on a send, so a retried send is
/// stored once; proxy -> client on a delivered packet).
pub const SEQ: &str = "seq";
/// Extension: every packet up to this sequence number has reached the client (client -> proxy).
/// A request carrying it is answered with the oldest packet after it, which the proxy keeps
/// until a later `Ack` covers it.
pub const ACK: &str = "ack";
/// Extension: the same value on every attempt to hand one packet to a backend.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// `Retry-After` on 429 and 503 answers.
pub const RETRY_AFTER: &str = "retry-after";

/// The permission that makes a client a debug server.
pub const ACCEPT_DEBUG: &str = "Accept-Debug";

/// Most permission codes in one header.
pub const MAX_PERMISSIONS: usize = 16;
/// Longest permission code.
pub const MAX_PERMISSION_LEN: usize = 64;
/// Longest client id or token.
pub const MAX_ID_LEN: usize = 256;

/// The kind of request the proxy sends a backend (seed: header `Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// `Auth`: a client logs in.
    Auth,
    /// `Register`: a client registers.
    Register,
    /// `Packet`: a client's packet, or an empty fetch for packets waiting for it.
    Packet,
}

impl RequestType {
    /// The header value, as the seed spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestType::Auth => "Auth",
            RequestType::Register => "Register",
            RequestType::Packet => "Packet",
        }
    }

    /// Parses a `Type` header value (exact spelling).
    pub fn parse(value: &[u8]) -> Option<Self> {
        match value {
            b"Auth" => Some(RequestType::Auth),
            b"Register" => Some(RequestType::Register),
            b"Packet" => Some(RequestType::Packet),
            _ => None,
        }
    }
}

/// Why a header value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The value is not of the header's form.
    #[error("malformed {0} header")]
    Malformed(&'static str),
    /// The value is longer or has more items than allowed.
    #[error("{0} header too long")]
    TooLong(&'static str),
}

/// Whether a header passes between client and backend unchanged (seed: names starting with
/// `X-`, in any case).
pub fn is_passthrough(name: &str) -> bool {
    name.len() > 2 && name.as_bytes()[..2].eq_ignore_ascii_case(b"x-")
}

/// Parses `Permissions`: comma separated codes, blanks around them ignored, empty items
/// skipped, duplicates kept once, in order. Codes are HTTP tokens (`A-Z a-z 0-9 - _ .`).
pub fn parse_permissions(value: &[u8]) -> Result<Vec<String>, HeaderError> {
    let mut out: Vec<String> = Vec::new();
    for item in value.split(|b| *b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() {
            continue;
        }
        if item.len() > MAX_PERMISSION_LEN {
            return Err(HeaderError::TooLong("Permissions"));
        }
        if !item
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(HeaderError::Malformed("Permissions"));
        }
        // Checked ASCII above.
        let code = String::from_utf8_lossy(item).into_owned();
        if !out.contains(&code) {
            if out.len() == MAX_PERMISSIONS {
                return Err(HeaderError::TooLong("Permissions"));
            }
            out.push(code);
        }
    }
    Ok(out)
}

/// Formats permission codes for a `Permissions` header.
pub fn format_permissions(codes: &[String]) -> String {
    codes.join(",")
}

/// Parses a client id or token: 1..=[`MAX_ID_LEN`] visible ASCII characters (no blanks, no
/// commas), so it can travel in a header unchanged.
pub fn parse_id(what: &'static str, value: &[u8]) -> Result<String, HeaderError> {
    let value = value.trim_ascii();
    if value.is_empty() {
        return Err(HeaderError::Malformed(what));
    }
    if value.len() > MAX_ID_LEN {
        return Err(HeaderError::TooLong(what));
    }
    if !value.iter().all(|b| b.is_ascii_graphic() && *b != b',') {
        return Err(HeaderError::Malformed(what));
    }
    Ok(String::from_utf8_lossy(value).into_owned())
}

/// Parses `Authorization: Bearer <token>` (scheme case-insensitive) into the token.
pub fn parse_bearer(value: &[u8]) -> Result<String, HeaderError> {
    let value = value.trim_ascii();
    let scheme = b"bearer ";
    if value.len() <= scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return Err(HeaderError::Malformed("Authorization"));
    }
    parse_id("Authorization", &value[scheme.len()..])
}

/// Parses a decimal counter header (`Seq`, `Ack`, `More`): 1 to 20 digits, within u64.
pub fn parse_counter(what: &'static str, value: &[u8]) -> Result<u64, HeaderError> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 20 || !value.iter().all(u8::is_ascii_digit) {
        return Err(HeaderError::Malformed(what));
    }
    value.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or(HeaderError::Malformed(what))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_types_are_spelled_as_the_seed_does() {
        for t in [
            RequestType::Auth,
            RequestType::Register,
            RequestType::Packet,
        ] {
            assert_eq!(RequestType::parse(t.as_str().as_bytes()), Some(t));
        }
        assert_eq!(RequestType::parse(b"auth"), None);
        assert_eq!(RequestType::parse(b""), None);
    }

    #[test]
    fn only_x_headers_pass() {
        assert!(is_passthrough("X-Trace"));
        assert!(is_passthrough("x-a"));
        assert!(!is_passthrough("X-"));
        assert!(!is_passthrough("Xa-b"));
        assert!(!is_passthrough("Authorization"));
        assert!(!is_passthrough("x"));
    }

    #[test]
    fn permissions_parse_and_refuse() {
        assert_eq!(
            parse_permissions(b" Accept-Debug , read,,read ").unwrap(),
            vec!["Accept-Debug".to_string(), "read".to_string()]
        );
        assert_eq!(parse_permissions(b"").unwrap(), Vec::<String>::new());
        assert_eq!(
            parse_permissions(b"a b"),
            Err(HeaderError::Malformed("Permissions"))
        );
        assert_eq!(
            parse_permissions(&[b'a'; 65]),
            Err(HeaderError::TooLong("Permissions"))
        );
        let many: Vec<String> = (0..17).map(|i| format!("p{i}")).collect();
        assert_eq!(
            parse_permissions(many.join(",").as_bytes()),
            Err(HeaderError::TooLong("Permissions"))
        );
        assert_eq!(format_permissions(&["a".into(), "b".into()]), "a,b");
    }

    #[test]
    fn bearer_tokens_and_ids() {
        assert_eq!(parse_bearer(b"Bearer abc").unwrap(), "abc");
        assert_eq!(parse_bearer(b"bearer  abc ").unwrap(), "abc");
        assert!(parse_bearer(b"Basic abc").is_err());
        assert!(parse_bearer(b"Bearer ").is_err());
        assert!(parse_bearer(b"Bearer a b").is_err());
        assert!(parse_id("Client-Id", &[b'a'; 257]).is_err());
        assert!(parse_id("Client-Id", b"a,b").is_err());
        assert!(parse_id("Client-Id", &[0xff]).is_err());
        assert_eq!(parse_id("Client-Id", b"ab-1").unwrap(), "ab-1");
    }

    #[test]
    fn counters() {
        assert_eq!(parse_counter("Seq", b"0").unwrap(), 0);
        assert_eq!(
            parse_counter("Seq", b"18446744073709551615").unwrap(),
            u64::MAX
        );
        assert!(parse_counter("Seq", b"18446744073709551616").is_err());
        assert!(parse_counter("Seq", b"-1").is_err());
        assert!(parse_counter("Seq", b"").is_err());
        assert!(parse_counter("Seq", b"1 2").is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_permissions(&bytes);
            let _ = parse_bearer(&bytes);
            let _ = parse_id("x", &bytes);
            let _ = parse_counter("x", &bytes);
            let _ = RequestType::parse(&bytes);
        }

        #[test]
        fn counters_round_trip(n in any::<u64>()) {
            prop_assert_eq!(parse_counter("Seq", n.to_string().as_bytes()), Ok(n));
        }

        #[test]
        fn permissions_round_trip(codes in proptest::collection::vec("[A-Za-z0-9._-]{1,64}", 0..16)) {
            let mut unique: Vec<String> = Vec::new();
            for c in codes { if !unique.contains(&c) { unique.push(c); } }
            prop_assert_eq!(parse_permissions(format_permissions(&unique).as_bytes()), Ok(unique));
        }
    }
}
