//! Relay control messages (`tube_proto::control`): the input is the JSON payload of a CONTROL
//! frame from a peer.
//!
//! - `ControlMessage::from_bytes` never panics.
//! - A decoded message, encoded again with `to_bytes`, decodes to an equal message, and that
//!   second encoding is byte-identical to the first (the encoding is canonical).
//! - The encoding's `"type"` is `kind()`; when it fits a CONTROL frame it survives the frame
//!   codec too.
//! - Peer-chosen numbers and strings that the services read further (`code`, `version`,
//!   `allowed_ips`) go through their helpers without panicking; a known error code maps back
//!   to its number.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tube_proto::cidr::Cidr;
use tube_proto::control::{ControlMessage, ErrorCode, describe_code};
use tube_proto::frame::{self, Frame, FrameLimits, MAX_CONTROL_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    if let [a, b, ..] = data {
        check_code(u16::from_be_bytes([*a, *b]));
    }
    let Ok(msg) = ControlMessage::from_bytes(data) else {
        return;
    };

    let bytes = msg.to_bytes();
    let again = match ControlMessage::from_bytes(&bytes) {
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

    if bytes.len() <= MAX_CONTROL_PAYLOAD as usize {
        let mut buf = BytesMut::new();
        frame::encode(&Frame::Control(bytes.clone()), &mut buf);
        let got = frame::decode(&mut buf, &FrameLimits::default());
        assert_eq!(got, Ok(Some(Frame::Control(Bytes::clone(&bytes)))));
    }

    match &msg {
        ControlMessage::Hello { version, .. } | ControlMessage::Auth { version, .. } => {
            let _ = tube_proto::relay_version_compatible(version);
        }
        ControlMessage::Register { tunnel_info } => {
            for ip in &tunnel_info.allowed_ips {
                let _ = ip.parse::<Cidr>();
            }
        }
        ControlMessage::RegisterResponse { config, .. } => {
            for ip in &config.allowed_ips {
                let _ = ip.parse::<Cidr>();
            }
        }
        ControlMessage::Error { code, .. } => check_code(*code),
        _ => {}
    }
});

fn check_code(code: u16) {
    let text = describe_code(code);
    assert!(text.starts_with(&code.to_string()));
    if let Some(c) = ErrorCode::from_u16(code) {
        assert_eq!(c as u16, code);
        assert!(text.ends_with(c.name()));
        let _ = c.is_final();
    } else {
        assert!(text.ends_with("UNKNOWN"));
    }
}
