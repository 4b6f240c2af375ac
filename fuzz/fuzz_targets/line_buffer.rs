//! The front API's line splitter (`tube_proto::chain::LineBuffer`): the input's first byte is
//! the line limit (0 to 255), the rest a byte stream from the front, fed in pseudo-random
//! chunks the way a socket delivers it.
//!
//! - `poll_line` never panics, always uses up its input when it returns `Ok(None)`, and never
//!   holds more than the limit (`buffered()`).
//! - What it yields matches a simple model: for every `\n`-terminated line, the line itself
//!   (without `\n`) if it is at most the limit, else exactly one `TooLong`; an unterminated
//!   tail over the limit gives one `TooLong` and is dropped, a shorter one stays buffered.
//! - Each line taken with the real limit (`MAX_FRONT_LINE`) goes through `decode_line` without
//!   panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tube_fuzz::{Rng, chunks};
use tube_proto::chain::{LineBuffer, LineError, decode_line};

#[derive(Debug, PartialEq)]
enum Event {
    Line(Vec<u8>),
    TooLong,
}

fuzz_target!(|data: &[u8]| {
    let Some((&limit, stream)) = data.split_first() else {
        return;
    };
    let max_line = usize::from(limit);

    let mut splitter = LineBuffer::new(max_line);
    let mut got = Vec::new();
    for chunk in chunks(stream, &mut Rng::from_bytes(data)) {
        let mut input = chunk;
        while !input.is_empty() {
            let len_before = input.len();
            match splitter.poll_line(&mut input) {
                Ok(Some(line)) => {
                    assert!(line.len() <= max_line, "line over the limit");
                    assert!(!line.contains(&b'\n'), "line with a newline");
                    got.push(Event::Line(line));
                }
                Ok(None) => assert!(input.is_empty(), "Ok(None) left input unread"),
                Err(LineError::TooLong { limit }) => {
                    assert_eq!(limit, max_line);
                    got.push(Event::TooLong);
                }
            }
            assert!(input.len() < len_before, "poll_line made no progress");
            assert!(splitter.buffered() <= max_line, "buffered over the limit");
        }
    }

    let (want, tail) = model(stream, max_line);
    assert_eq!(got, want);
    assert_eq!(splitter.buffered(), tail, "unfinished line held");

    let mut real = LineBuffer::default();
    let mut input = stream;
    while !input.is_empty() {
        if let Ok(Some(line)) = real.poll_line(&mut input) {
            let _ = decode_line(&line);
        }
    }
});

/// The events a stream must give, and the bytes left buffered at its end.
fn model(stream: &[u8], max_line: usize) -> (Vec<Event>, usize) {
    let mut events = Vec::new();
    let mut parts = stream.split(|b| *b == b'\n').peekable();
    let mut tail = 0;
    while let Some(part) = parts.next() {
        let terminated = parts.peek().is_some();
        if part.len() > max_line {
            events.push(Event::TooLong);
        } else if terminated {
            events.push(Event::Line(part.to_vec()));
        } else {
            tail = part.len();
        }
    }
    (events, tail)
}
