//! Chain front API lines (`tube_proto::chain::decode_line`): the input is one line from the
//! node's local front end (with or without its `\n`).
//!
//! - `decode_line` never panics, and a message it returns passes `validate()`.
//! - A decoded message, encoded again with `encode_line`, is exactly one line (a single `\n`,
//!   at the end) of at most `MAX_FRONT_LINE` bytes before it, as the codec promises, and decodes
//!   to an equal message (with and without the `\n`); the encoding is canonical.
//! - The line survives `LineBuffer` (the stream splitter the node uses) unchanged.
//! - Its `"type"` is `kind()`; tunnel ids in it are canonical.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tube_proto::chain::{
    ChainErrorCode, FrontMessage, LineBuffer, MAX_FRONT_LINE, decode_line, encode_line,
    format_tunnel_id, parse_tunnel_id,
};

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = decode_line(data) else {
        return;
    };
    assert_eq!(msg.validate(), Ok(()), "decoded but invalid: {msg:?}");

    let line = encode_line(&msg);
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(
        line.iter().filter(|b| **b == b'\n').count(),
        1,
        "encoded line has an inner newline"
    );
    assert!(
        line.len() - 1 <= MAX_FRONT_LINE,
        "valid {} message encodes to {} bytes, over the limit",
        msg.kind(),
        line.len() - 1
    );
    for form in [&line[..], &line[..line.len() - 1]] {
        match decode_line(form) {
            Ok(m) => assert_eq!(m, msg, "round trip"),
            Err(e) => panic!("re-encoded {msg:?} does not decode: {e}"),
        }
    }
    assert_eq!(
        encode_line(&decode_line(&line).expect("decoded above")),
        line
    );

    let mut splitter = LineBuffer::default();
    let mut input = &line[..];
    assert_eq!(
        splitter.poll_line(&mut input),
        Ok(Some(line[..line.len() - 1].to_vec()))
    );
    assert!(input.is_empty());

    let value: serde_json::Value =
        serde_json::from_slice(&line[..line.len() - 1]).expect("encoding is JSON");
    assert_eq!(
        value.get("type").and_then(serde_json::Value::as_str),
        Some(msg.kind())
    );
    assert!(FrontMessage::TYPES.contains(&msg.kind()));

    let mut ids: Vec<&str> = Vec::new();
    match &msg {
        FrontMessage::RequestCloseTube { tunnel_id, .. }
        | FrontMessage::TubeResult { tunnel_id, .. } => ids.extend(tunnel_id.as_deref()),
        FrontMessage::Approve { tunnel_id, .. }
        | FrontMessage::Listening { tunnel_id, .. }
        | FrontMessage::ConnectionRequest { tunnel_id, .. }
        | FrontMessage::Listen { tunnel_id }
        | FrontMessage::Established { tunnel_id, .. }
        | FrontMessage::Closed { tunnel_id, .. } => ids.push(tunnel_id),
        FrontMessage::Tubes { items } => ids.extend(items.iter().map(|i| i.tunnel_id.as_str())),
        FrontMessage::Error { code, .. } => {
            let _ = ChainErrorCode::describe(*code);
        }
        _ => {}
    }
    for t in ids {
        let id = parse_tunnel_id(t).expect("a validated tunnel id parses");
        assert_eq!(format_tunnel_id(&id), t);
    }
});
