//! Criterion micro-benchmarks of tube-proto's codecs: relay frames (DATA of 16 KiB and 64 B,
//! WINDOW, PING, CONTROL with its JSON), mailbox packets, and the chain service's hub messages,
//! front API lines and hop preamble. Each case encodes and decodes one item (so a round trip
//! is what is timed) and reports bytes/s or items/s. Run: `cargo bench -p tube-proto`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use tube_proto::chain::{self, ChainSecret, FrontMessage, HubMessage, LineBuffer};
use tube_proto::control::{ControlMessage, TunnelStats};
use tube_proto::frame::{self, Frame, FrameLimits};
use tube_proto::mailbox::{self, Packet};

/// A chain id as the hub writes it.
const TID: &str = "8fb889f4-a766-48f0-8e58-1c5ebdb9d088";

/// A 64-hex-digit secret.
const SECRET: &str = "1f890c0fe070e03e42178de6814adc0760a559019f01794fe54a9995d44f57ec";

fn payload(n: usize) -> Bytes {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

/// Encodes `f` into a reused buffer and decodes it back, checking the result is a frame.
fn frame_round_trip(buf: &mut BytesMut, f: &Frame, limits: &FrameLimits) -> Frame {
    frame::encode(f, buf);
    match frame::decode(buf, limits) {
        Ok(Some(f)) => f,
        other => panic!("frame did not round-trip: {other:?}"),
    }
}

/// Benchmarks one frame's encode + decode under `name`, with `throughput` per frame.
fn bench_frame(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, f: Frame, t: Throughput) {
    let limits = FrameLimits::default();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    g.throughput(t);
    g.bench_function(name, |b| {
        b.iter(|| black_box(frame_round_trip(&mut buf, black_box(&f), &limits)))
    });
}

fn frames(c: &mut Criterion) {
    let data = |n| Frame::Data {
        stream: 7,
        data: payload(n),
    };
    let mut g = c.benchmark_group("frame_bytes");
    for (name, n) in [("data_16k", 16 * 1024), ("data_64b", 64)] {
        let f = data(n);
        let len = f.encoded_len() as u64;
        bench_frame(&mut g, name, f, Throughput::Bytes(len));
    }
    g.finish();

    let mut g = c.benchmark_group("frame_count");
    let one = || Throughput::Elements(1);
    bench_frame(&mut g, "data_64b", data(64), one());
    bench_frame(
        &mut g,
        "window",
        Frame::Window {
            stream: 7,
            increment: 128 * 1024,
        },
        one(),
    );
    bench_frame(&mut g, "ping", Frame::Ping(0x0123_4567_89ab_cdef), one());
    bench_frame(
        &mut g,
        "open",
        Frame::Open {
            stream: 7,
            tunnel: [0x5a; 16],
            peer: "203.0.113.77:51234".into(),
        },
        one(),
    );
    // A CONTROL frame with its JSON, as the mux sends and reads a heartbeat: serialise, frame,
    // unframe, parse.
    let heartbeat = ControlMessage::Heartbeat {
        tunnel_id: TID.into(),
        stats: TunnelStats {
            bytes_in: 123_456_789,
            bytes_out: 987_654_321,
            connected_since: "2026-11-23T10:00:00Z".into(),
        },
    };
    let limits = FrameLimits::default();
    let mut buf = BytesMut::with_capacity(4096);
    g.throughput(one());
    g.bench_function("control_heartbeat_json", |b| {
        b.iter(|| {
            let f = Frame::Control(black_box(&heartbeat).to_bytes());
            let Frame::Control(json) = frame_round_trip(&mut buf, &f, &limits) else {
                panic!("not a control frame");
            };
            black_box(ControlMessage::from_bytes(&json).expect("heartbeat parses"))
        })
    });
    g.finish();
}

fn mailbox_packets(c: &mut Criterion) {
    let mut g = c.benchmark_group("mailbox");
    let mut buf = BytesMut::with_capacity(128 * 1024);
    let mut round_trip = |g: &mut BenchmarkGroup<'_, WallTime>, name: &str, p: Packet| {
        let len = mailbox::to_bytes(&p).len() as u64;
        g.throughput(Throughput::Bytes(len));
        g.bench_function(name, |b| {
            b.iter(|| {
                mailbox::encode(black_box(&p), &mut buf);
                match mailbox::decode(&mut buf) {
                    Ok(Some(p)) => black_box(p),
                    other => panic!("packet did not round-trip: {other:?}"),
                }
            })
        });
    };
    round_trip(
        &mut g,
        "deliver_1k",
        Packet::Deliver {
            to: [1; 32],
            id: [2; 16],
            blob: payload(1024),
        },
    );
    round_trip(
        &mut g,
        "message_64k",
        Packet::Message {
            seq: 42,
            received_ms: 1_795_000_000_000,
            blob: payload(64 * 1024),
        },
    );
    round_trip(&mut g, "ack", Packet::Ack { seq: 42 });
    g.finish();
}

fn chain_messages(c: &mut Criterion) {
    let mut g = c.benchmark_group("chain");
    g.throughput(Throughput::Elements(1));
    let make_tube = HubMessage::MakeTube {
        id: 9,
        tunnel_id: TID.into(),
        from: Some("203.0.113.10:41001".into()),
        to: Some("198.51.100.12".into()),
        secret_in: Some(ChainSecret::new(SECRET)),
        secret_out: Some(ChainSecret::new(SECRET)),
    };
    let json = make_tube.to_bytes();
    assert_eq!(
        HubMessage::from_bytes(&json).ok().as_ref(),
        Some(&make_tube)
    );
    g.bench_function("hub_make_tube_encode", |b| {
        b.iter(|| black_box(black_box(&make_tube).to_bytes()))
    });
    g.bench_function("hub_make_tube_decode", |b| {
        b.iter(|| black_box(HubMessage::from_bytes(black_box(&json)).expect("valid")))
    });

    let established = FrontMessage::Established {
        tunnel_id: TID.into(),
        local_id: "ssh-to-office".into(),
        endpoint_user: "office".into(),
        port: 40_123,
    };
    let line = chain::encode_line(&established);
    g.bench_function("front_line_encode", |b| {
        b.iter(|| black_box(chain::encode_line(black_box(&established))))
    });
    g.bench_function("front_line_decode", |b| {
        b.iter(|| black_box(chain::decode_line(black_box(&line)).expect("valid")))
    });

    let (tunnel, secret) = ([0x3c; 16], [0xa5; 32]);
    g.bench_function("hop_hello_round_trip", |b| {
        b.iter(|| {
            let hello = chain::encode_hop_hello(black_box(tunnel), black_box(secret));
            black_box(chain::decode_hop_hello(&hello).expect("valid"))
        })
    });
    g.finish();

    // Cutting a front API byte stream into lines: 64 lines per chunk, fed in 4 KiB reads.
    let mut g = c.benchmark_group("chain_lines");
    let stream: Vec<u8> = line.repeat(64);
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("line_buffer_64_lines", |b| {
        let mut lines = LineBuffer::default();
        b.iter(|| {
            let mut n = 0;
            for mut read in stream.chunks(4096) {
                while let Some(l) = lines.poll_line(&mut read).expect("lines fit") {
                    n += l.len();
                }
            }
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, frames, mailbox_packets, chain_messages);
criterion_main!(benches);
