//! Floods against the stream multiplexer. A peer that keeps sending frames it is owed answers
//! for (OPENs past the stream cap, PINGs) without reading the answers is cut off with
//! PROTOCOL_ERROR (4001) once `max_peer_urgent` answers are waiting, after a bounded number of
//! frames; RESETs of streams that do not exist cost nothing and close nothing; OPEN+RESET
//! churn never leaves more than `max_streams` streams waiting to be accepted. One end is a
//! real [`Mux`]; the other writes raw frames over an in-memory pipe whose small buffer fills
//! once the raw end stops reading.
//!
//! The refusal itself (RESET TOO_MANY_STREAMS for an OPEN past `max_streams`) is the unit test
//! `the_acceptor_refuses_opens_beyond_max_streams` in `src/mux.rs`.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::DuplexStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tube_net::codec::{HandshakeConn, handshake_conn};
use tube_net::mux::Inbound;
use tube_net::{Mux, MuxConfig, MuxError, MuxEvents, Role};
use tube_proto::control::{ControlMessage, ErrorCode};
use tube_proto::frame::Frame;

/// Deadline of every test body.
const LIMIT: Duration = Duration::from_secs(30);

/// Buffer of the in-memory pipe in each direction: a few hundred frames fill it.
const PIPE: usize = 4096;

/// Answers the mux may owe before it gives up on the peer (the default is 1024).
const MAX_OWED: usize = 16;

/// Streams the acceptor takes before refusing.
const CAP: usize = 2;

/// Most frames a flood sends before the test counts it as never cut off.
const FLOOD_LIMIT: usize = 1_000_000;

/// Encoded sizes: the 9-byte header plus the payload.
const RESET_LEN: usize = 9 + 2;
const PING_LEN: usize = 9 + 8;
const OPEN_PEER: &str = "127.0.0.1:1";
const OPEN_LEN: usize = 9 + 16 + 1 + OPEN_PEER.len();

/// The most frames a flood can get in before the mux closes: the answers that fit in the
/// pipe towards the peer, one batch the writer took before blocking and the answers owed
/// (each at most `MAX_OWED` + 1), and the frames still in the pipe towards the mux.
fn cut_off_bound(answer_len: usize, frame_len: usize) -> usize {
    PIPE / answer_len + 1 + 2 * (MAX_OWED + 1) + PIPE / frame_len + 1
}

async fn within<F: Future>(fut: F) -> F::Output {
    tube_net::timer::timeout(LIMIT, fut)
        .await
        .expect("test did not finish within its deadline")
}

/// A mux in `role` on one end of a pipe; raw frames on the other.
fn pair(role: Role) -> (Mux, MuxEvents, HandshakeConn<DuplexStream>) {
    let cfg = MuxConfig {
        max_streams: CAP,
        max_peer_urgent: MAX_OWED,
        ..MuxConfig::default()
    };
    let (a, b) = tokio::io::duplex(PIPE);
    let (mux, events) = Mux::start(
        handshake_conn(a),
        role,
        cfg,
        CancellationToken::new(),
        &TaskTracker::new(),
    );
    (mux, events, handshake_conn(b))
}

/// Sends `frame(i)` for i = 1, 2, ... without reading, until the mux closes; returns how
/// many were sent.
async fn flood(
    mux: &Mux,
    raw: &mut HandshakeConn<DuplexStream>,
    frame: impl Fn(u32) -> Frame,
) -> usize {
    for i in 1..=FLOOD_LIMIT {
        tokio::select! {
            biased;
            _ = mux.closed() => return i - 1,
            r = raw.send(frame(i as u32)) => r.expect("send to the mux"),
        }
        // Lets the mux read the frame and write its answer before the next one, so the pipe
        // towards the peer fills first (a burst faster than the writer is cut off sooner).
        tokio::task::yield_now().await;
    }
    panic!("the mux still took frames after {FLOOD_LIMIT} of them");
}

/// Reads what the mux wrote until its ERROR message; returns the code and how many answers
/// (RESET or PONG frames) came before it.
async fn closing_error(raw: &mut HandshakeConn<DuplexStream>) -> (u16, usize) {
    let mut answers = 0;
    while let Some(frame) = raw.next().await {
        match frame.expect("a valid frame from the mux") {
            Frame::Control(b) => {
                if let Ok(ControlMessage::Error { code, .. }) = ControlMessage::from_bytes(&b) {
                    return (code, answers);
                }
            }
            Frame::Reset { .. } | Frame::Pong(_) => answers += 1,
            _ => {}
        }
    }
    panic!("the mux closed without an ERROR message");
}

fn assert_flood_reason(mux: &Mux) {
    match mux.close_reason() {
        MuxError::Protocol { code, message } => {
            assert_eq!(code, ErrorCode::ProtocolError);
            assert_eq!(message, "too many unanswered requests");
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn opens_past_the_cap_from_a_peer_that_never_reads_are_cut_off_with_4001() {
    within(async {
        let (mux, _events, mut raw) = pair(Role::Acceptor);
        let sent = flood(&mux, &mut raw, |i| Frame::Open {
            stream: i,
            tunnel: [7; 16],
            peer: OPEN_PEER.into(),
        })
        .await;
        assert_flood_reason(&mux);
        let (code, answers) = closing_error(&mut raw).await;
        assert_eq!(code, ErrorCode::ProtocolError as u16);
        let bound = cut_off_bound(RESET_LEN, OPEN_LEN);
        println!("{sent} OPENs sent (bound {bound}), {answers} refusals read before the error");
        assert!(
            sent > CAP + MAX_OWED,
            "closed after {sent} OPENs: before owing {MAX_OWED} refusals"
        );
        assert!(sent <= bound, "{sent} OPENs got in (at most {bound})");
        assert!(answers <= sent - CAP, "{answers} refusals for {sent} OPENs");
    })
    .await;
}

#[tokio::test]
async fn pings_from_a_peer_that_never_reads_are_cut_off_with_4001() {
    within(async {
        // The relay's side: an agent can send PINGs, never OPENs.
        let (mux, _events, mut raw) = pair(Role::Opener);
        let sent = flood(&mux, &mut raw, |i| Frame::Ping(u64::from(i))).await;
        assert_flood_reason(&mux);
        let (code, answers) = closing_error(&mut raw).await;
        assert_eq!(code, ErrorCode::ProtocolError as u16);
        let bound = cut_off_bound(PING_LEN, PING_LEN);
        println!("{sent} PINGs sent (bound {bound}), {answers} PONGs read before the error");
        assert!(
            sent > MAX_OWED,
            "closed after {sent} PINGs: before owing {MAX_OWED} PONGs"
        );
        assert!(sent <= bound, "{sent} PINGs got in (at most {bound})");
    })
    .await;
}

/// RESETs sent for streams that do not exist (far more than any answer bound).
const STRAY_RESETS: u32 = 100_000;

#[tokio::test]
async fn resets_of_unknown_streams_are_ignored_and_close_nothing() {
    within(async {
        let (mux, _events, mut raw) = pair(Role::Opener);
        let mut stream = mux.open([3; 16], "u".into()).await.expect("open");
        let id = match raw.next().await {
            Some(Ok(Frame::Open { stream, .. })) => stream,
            other => panic!("expected OPEN, got {other:?}"),
        };
        let code = ErrorCode::StreamAborted as u16;
        for i in 1..=STRAY_RESETS {
            let stray = id + i;
            raw.feed(Frame::Reset {
                stream: stray,
                code,
            })
            .await
            .expect("send");
        }
        // The open stream still carries data after the flood.
        raw.send(Frame::Data {
            stream: id,
            data: Bytes::from_static(b"after the flood"),
        })
        .await
        .expect("send");
        match stream.rx.recv().await {
            Some(Inbound::Data(d)) => assert_eq!(&d[..], b"after the flood"),
            other => panic!("expected data, got {other:?}"),
        }
        assert!(!mux.is_closed(), "stray RESETs closed the connection");
        assert_eq!(mux.stream_count(), 1);
    })
    .await;
}

/// OPEN + RESET pairs in the churn test.
const CHURN: u32 = 10_000;

#[tokio::test]
async fn open_reset_churn_cannot_queue_more_than_the_cap_of_unaccepted_streams() {
    within(async {
        let (mux, mut events, raw) = pair(Role::Acceptor);
        let (mut tx, mut rx) = raw.split();
        // The peer reads everything (no answers owed); PONG 0 marks the end of the churn.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let reader = tokio::spawn(async move {
            let mut done = Some(done_tx);
            while let Some(Ok(f)) = rx.next().await {
                if f == Frame::Pong(0)
                    && let Some(d) = done.take()
                {
                    let _ = d.send(());
                }
            }
        });
        let code = ErrorCode::StreamAborted as u16;
        for stream in 1..=CHURN {
            let open = Frame::Open {
                stream,
                tunnel: [7; 16],
                peer: OPEN_PEER.into(),
            };
            if tx.send(open).await.is_err() || tx.send(Frame::Reset { stream, code }).await.is_err()
            {
                break;
            }
        }
        if tx.send(Frame::Ping(0)).await.is_ok() {
            tokio::select! {
                _ = done_rx => {}
                _ = mux.closed() => {}
            }
        }
        let mut queued = 0;
        while events.incoming.try_recv().is_ok() {
            queued += 1;
        }
        println!("{queued} unaccepted streams queued after {CHURN} OPEN/RESET pairs");
        let cut_off = matches!(mux.close_reason(), MuxError::Protocol { .. }) && mux.is_closed();
        assert!(
            queued <= CAP || cut_off,
            "{queued} unaccepted streams queued (cap {CAP}) and the connection is still open"
        );
        reader.abort();
    })
    .await;
}
