//! Per-stream receive windows (`tube_proto::flow::RecvWindow`), driven by a peer: the input is
//! a window size and a sequence of DATA arrivals (peer-chosen lengths, any `usize`) and reads
//! by the application (at most what is buffered, as the mux guarantees).
//!
//! - Nothing panics.
//! - `on_data` accepts exactly the arrivals within the peer's credit, so the bytes buffered
//!   never exceed the window; credit, buffered bytes and credit waiting to be returned always
//!   add up to the window (nothing is lost or created).
//! - `on_consumed` returns credit exactly when at least half the window waits, and then all of
//!   it; for any window of 2 bytes or more (the mux clamps windows to 32 KiB and up) the
//!   increment is non-zero, so it makes a WINDOW frame the peer's decoder accepts, and the
//!   peer's credit never passes `MAX_CREDIT` for windows within it.

#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tube_proto::flow::{FlowError, MAX_CREDIT, RecvWindow};
use tube_proto::frame::{self, Frame, FrameLimits};

#[derive(Debug, Arbitrary)]
enum Op {
    /// A DATA frame of this many bytes arrives.
    Data(u32),
    /// A DATA frame of a length beyond u32 arrives (a hostile or buggy caller).
    HugeData(u64),
    /// The application reads this share (in 1/256) of what is buffered.
    Read(u8),
}

#[derive(Debug, Arbitrary)]
struct Input {
    window: u32,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let window = input.window;
    let mut w = RecvWindow::new(window);
    // The model: credit the peer has, bytes buffered, bytes read but not yet returned.
    let (mut credit, mut held, mut pending) = (u64::from(window), 0u64, 0u64);
    assert_eq!(u64::from(w.peer_credit()), credit);

    for op in input.ops {
        match op {
            Op::Data(n) => data(&mut w, u64::from(n), &mut credit, &mut held),
            Op::HugeData(n) => data(&mut w, n, &mut credit, &mut held),
            Op::Read(share) => {
                let n = held * u64::from(share) / 255;
                held -= n;
                pending += n;
                let got = w.on_consumed(usize::try_from(n).expect("held fits usize"));
                if pending >= u64::from(window / 2) {
                    assert_eq!(got.map(u64::from), Some(pending), "all waiting credit");
                    credit += pending;
                    pending = 0;
                    let inc = got.expect("checked above");
                    if window >= 2 {
                        assert!(inc > 0, "zero WINDOW increment");
                        check_window_frame(inc);
                    }
                } else {
                    assert_eq!(got, None, "credit returned early");
                }
            }
        }
        assert_eq!(u64::from(w.peer_credit()), credit);
        assert_eq!(
            credit + held + pending,
            u64::from(window),
            "credit lost or made"
        );
        assert!(held <= u64::from(window));
        if u64::from(window) <= MAX_CREDIT {
            assert!(u64::from(w.peer_credit()) <= MAX_CREDIT);
        }
    }
});

fn data(w: &mut RecvWindow, n: u64, credit: &mut u64, held: &mut u64) {
    let Ok(len) = usize::try_from(n) else {
        return;
    };
    let before = w.peer_credit();
    match w.on_data(len) {
        Ok(()) => {
            assert!(n <= *credit, "accepted {n} bytes with {credit} credit");
            *credit -= n;
            *held += n;
        }
        Err(FlowError { got, allowed }) => {
            assert!(n > *credit, "refused {n} bytes with {credit} credit");
            assert_eq!((got, allowed), (len, before));
            assert_eq!(w.peer_credit(), before, "a refusal changed the credit");
        }
    }
}

fn check_window_frame(increment: u32) {
    let f = Frame::Window {
        stream: 1,
        increment,
    };
    let mut buf = BytesMut::new();
    frame::encode(&f, &mut buf);
    assert_eq!(
        frame::decode(&mut buf, &FrameLimits::default()),
        Ok(Some(f))
    );
}
