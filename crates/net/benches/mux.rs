//! Criterion benchmarks of the stream multiplexer (`tube_net::mux`): an opener and an acceptor
//! mux joined by an in-memory `tokio::io::duplex` pipe (and, for one case, a loopback TCP
//! pair), on a multi-threaded tokio runtime. Measures bytes/s through one stream and through 8
//! concurrent streams, and streams opened and closed per second. No TLS: this is the mux alone.
//! Run: `cargo bench -p tube-net`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tube_net::codec::handshake_conn;
use tube_net::mux::Inbound;
use tube_net::{Mux, MuxConfig, MuxEvents, MuxStream, Role};

/// Bytes per throughput iteration, split evenly over the streams.
const TOTAL: u64 = 64 * 1024 * 1024;

/// Size of each `send` call (the mux cuts it into DATA frames of at most 32 KiB).
const CHUNK: usize = 256 * 1024;

/// Buffer of the in-memory pipe in each direction.
const DUPLEX_BUF: usize = 256 * 1024;

/// Streams opened at once in the concurrent open/close case.
const OPEN_BATCH: u64 = 100;

/// An opener and an acceptor mux over one connection; the acceptor runs a sink on every
/// stream (counts the bytes, replies with the 8-byte big-endian count, then FIN).
struct Pair {
    opener: Mux,
    stop: CancellationToken,
    _events: MuxEvents,
}

impl Pair {
    /// Starts both ends over `a` and `b`; call inside the runtime.
    fn start<T: tube_net::Transport>(a: T, b: T) -> Pair {
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let cfg = MuxConfig::default();
        let (opener, events) = Mux::start(
            handshake_conn(a),
            Role::Opener,
            cfg.clone(),
            stop.child_token(),
            &tracker,
        );
        let (_acceptor, mut incoming) = Mux::start(
            handshake_conn(b),
            Role::Acceptor,
            cfg,
            stop.child_token(),
            &tracker,
        );
        tokio::spawn(async move {
            while let Some(inc) = incoming.incoming.recv().await {
                tokio::spawn(sink(inc.stream));
            }
        });
        Pair {
            opener,
            stop,
            _events: events,
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn duplex_pair(rt: &Runtime) -> Pair {
    rt.block_on(async {
        let (a, b) = tokio::io::duplex(DUPLEX_BUF);
        Pair::start(a, b)
    })
}

fn tcp_pair(rt: &Runtime) -> Pair {
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (a, (b, _)) = (a.expect("connect"), b.expect("accept"));
        tube_net::tune_tcp(&a);
        tube_net::tune_tcp(&b);
        Pair::start(a, b)
    })
}

/// The acceptor's side of every stream.
async fn sink(mut s: MuxStream) {
    let mut n: u64 = 0;
    loop {
        match s.rx.recv().await {
            Some(Inbound::Data(d)) => {
                n += d.len() as u64;
                s.rx.consumed(d.len());
            }
            Some(Inbound::Fin) => break,
            Some(Inbound::Reset(_)) | None => return,
        }
    }
    let _ = s.tx.send(Bytes::copy_from_slice(&n.to_be_bytes())).await;
    let _ = s.tx.finish().await;
}

/// Opens a stream, sends `n` bytes (in `chunk`-sized sends), half-closes, and waits for the
/// sink's count and FIN; panics unless the count is `n`.
async fn send_and_confirm(mux: Mux, n: u64, chunk: Bytes) {
    let mut s = mux.open([7; 16], "bench".into()).await.expect("open");
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        s.tx.send(chunk.slice(..k)).await.expect("send");
        left -= k as u64;
    }
    s.tx.finish().await.expect("finish");
    let mut count = Vec::with_capacity(8);
    loop {
        match s.rx.recv().await {
            Some(Inbound::Data(d)) => {
                s.rx.consumed(d.len());
                count.extend_from_slice(&d);
            }
            Some(Inbound::Fin) => break,
            other => panic!("stream ended with {other:?}"),
        }
    }
    let count: [u8; 8] = count.try_into().expect("an 8-byte count");
    assert_eq!(u64::from_be_bytes(count), n, "the sink's count");
}

/// Moves [`TOTAL`] bytes over `streams` concurrent streams of `pair`, `iters` times; the time
/// taken, from the first open to the last confirmation.
fn transfer(rt: &Runtime, pair: &Pair, streams: u64, iters: u64) -> Duration {
    let chunk: Bytes = (0..CHUNK).map(|i| (i * 31 % 251) as u8).collect();
    let mux = pair.opener.clone();
    rt.block_on(async move {
        // The timed loop runs on a worker thread, like a relay session does.
        tokio::spawn(async move {
            let start = Instant::now();
            for _ in 0..iters {
                let tasks: Vec<_> = (0..streams)
                    .map(|_| {
                        tokio::spawn(send_and_confirm(
                            mux.clone(),
                            TOTAL / streams,
                            chunk.clone(),
                        ))
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("stream task");
                }
            }
            start.elapsed()
        })
        .await
        .expect("bench task")
    })
}

/// Opens and cleanly closes (FIN both ways) `batch` streams at once, `iters` times.
fn open_close(rt: &Runtime, pair: &Pair, batch: u64, iters: u64) -> Duration {
    let mux = pair.opener.clone();
    rt.block_on(async move {
        tokio::spawn(async move {
            let start = Instant::now();
            for _ in 0..iters {
                if batch == 1 {
                    send_and_confirm(mux.clone(), 0, Bytes::new()).await;
                    continue;
                }
                let tasks: Vec<_> = (0..batch)
                    .map(|_| tokio::spawn(send_and_confirm(mux.clone(), 0, Bytes::new())))
                    .collect();
                for t in tasks {
                    t.await.expect("stream task");
                }
            }
            start.elapsed()
        })
        .await
        .expect("bench task")
    })
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn throughput(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("mux_throughput");
    // Each iteration moves 64 MiB: a few samples are plenty.
    g.sample_size(10);
    g.throughput(Throughput::Bytes(TOTAL));
    for (name, streams) in [("duplex_1_stream", 1), ("duplex_8_streams", 8)] {
        let pair = duplex_pair(&rt);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| transfer(&rt, &pair, streams, iters))
        });
    }
    let pair = tcp_pair(&rt);
    g.bench_function("tcp_1_stream", |b| {
        b.iter_custom(|iters| transfer(&rt, &pair, 1, iters))
    });
    g.finish();
}

fn streams(c: &mut Criterion) {
    let rt = runtime();
    let pair = duplex_pair(&rt);
    let mut g = c.benchmark_group("mux_streams");
    g.throughput(Throughput::Elements(1));
    g.bench_function("open_close_sequential", |b| {
        b.iter_custom(|iters| open_close(&rt, &pair, 1, iters))
    });
    g.throughput(Throughput::Elements(OPEN_BATCH));
    g.bench_function("open_close_100_concurrent", |b| {
        b.iter_custom(|iters| open_close(&rt, &pair, OPEN_BATCH, iters))
    });
    g.finish();
}

criterion_group!(benches, throughput, streams);
criterion_main!(benches);
