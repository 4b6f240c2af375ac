//! Chain hub messages (`tube_proto::chain::HubMessage`): the input is the JSON payload of a
//! CONTROL frame between a node and the hub.
//!
//! - `HubMessage::from_bytes` never panics, and a message it returns passes `validate()`.
//! - A decoded message, encoded again with `to_bytes`, decodes to an equal message; that
//!   encoding is canonical (byte-identical when repeated), its `"type"` is `kind()`, and it fits
//!   `MAX_HUB_MESSAGE`, so it can always be sent back in a CONTROL frame.
//! - The accessors agree with the fields: every message comes from a node or the hub (or
//!   both, for `error`); `tunnel_id()` is a canonical tunnel id; a request id is within
//!   `MAX_REQUEST_ID`; secrets are 32 bytes of lowercase hex; error codes map back.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tube_proto::chain::{
    ChainErrorCode, ChainSecret, HubMessage, MAX_HUB_MESSAGE, MAX_REQUEST_ID, format_tunnel_id,
    parse_tunnel_id, version_compatible,
};

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = HubMessage::from_bytes(data) else {
        return;
    };
    assert_eq!(msg.validate(), Ok(()), "decoded but invalid: {msg:?}");

    let bytes = msg.to_bytes();
    assert!(
        bytes.len() <= MAX_HUB_MESSAGE,
        "valid {msg:?} encodes to {} bytes, over the limit",
        bytes.len()
    );
    let again = match HubMessage::from_bytes(&bytes) {
        Ok(m) => m,
        Err(e) => panic!("re-encoded {msg:?} does not decode: {e}"),
    };
    assert_eq!(again, msg, "round trip");
    assert_eq!(again.to_bytes(), bytes, "encoding is not canonical");

    let value: serde_json::Value = serde_json::from_slice(&bytes).expect("encoding is JSON");
    assert_eq!(
        value.get("type").and_then(serde_json::Value::as_str),
        Some(msg.kind())
    );
    assert!(HubMessage::TYPES.contains(&msg.kind()));

    assert!(msg.is_from_node() || msg.is_from_hub());
    assert_eq!(
        msg.is_from_node() && msg.is_from_hub(),
        matches!(msg, HubMessage::Error { .. })
    );
    if let Some(t) = msg.tunnel_id() {
        let id = parse_tunnel_id(t).expect("tunnel_id() of a valid message parses");
        assert_eq!(format_tunnel_id(&id), t);
    }
    if let Some(id) = msg.request_id() {
        assert!(id <= MAX_REQUEST_ID);
    }

    match &msg {
        HubMessage::Register { version, .. } => {
            let _ = version_compatible(version);
        }
        HubMessage::Auth {
            version, password, ..
        } => {
            let _ = version_compatible(version);
            check_secret(password);
        }
        HubMessage::RegisterResult { password, code, .. } => {
            password.iter().for_each(check_secret);
            code.iter().copied().for_each(check_code);
        }
        HubMessage::AuthResult {
            next_password,
            code,
            ..
        } => {
            next_password.iter().for_each(check_secret);
            code.iter().copied().for_each(check_code);
        }
        HubMessage::MakeTube {
            secret_in,
            secret_out,
            ..
        } => {
            secret_in.iter().for_each(check_secret);
            secret_out.iter().for_each(check_secret);
        }
        HubMessage::RequestTubeResult { code, .. } | HubMessage::CloseTube { code, .. } => {
            code.iter().copied().for_each(check_code);
        }
        HubMessage::Error { code, .. } => check_code(*code),
        _ => {}
    }
});

fn check_secret(secret: &ChainSecret) {
    let bytes = secret
        .to_bytes()
        .expect("a validated secret is 64 lowercase hex digits");
    assert_eq!(ChainSecret::from_bytes(&bytes).expose(), secret.expose());
}

fn check_code(code: u16) {
    let text = ChainErrorCode::describe(code);
    assert!(text.starts_with(&code.to_string()));
    if let Some(c) = ChainErrorCode::from_u16(code) {
        assert_eq!(c as u16, code);
        assert!(text.ends_with(c.name()));
    }
}
