//! The `throughput` and `rtt` clients: drive a sink or echo server and measure. They return
//! numbers; printing them is `main`'s job. The connect and percentile helpers here are shared
//! with [`crate::conns`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::within;

/// Size of the one send buffer all streams share.
const SEND_BUF: usize = 256 * 1024;
/// Untimed round trips before measuring.
const WARMUP: u32 = 100;

/// Result of a throughput run.
#[derive(Debug)]
pub(crate) struct Throughput {
    /// Bytes sent and confirmed by the sink, all streams together.
    pub(crate) bytes: u64,
    /// Wall time from the first connect to the last confirmation.
    pub(crate) secs: f64,
    /// `bytes * 8 / secs / 1e9`.
    pub(crate) gbit_s: f64,
}

/// Result of a round-trip run, in microseconds.
#[derive(Debug)]
pub(crate) struct Rtt {
    /// Median.
    pub(crate) p50_us: f64,
    /// 99th percentile (nearest rank).
    pub(crate) p99_us: f64,
    /// Arithmetic mean.
    pub(crate) mean_us: f64,
}

/// Sends `bytes` to the sink at `addr` over `streams` parallel connections; each half-closes
/// and checks the sink's count.
pub(crate) async fn throughput(
    addr: &str,
    bytes: u64,
    streams: u32,
    step: Duration,
) -> anyhow::Result<Throughput> {
    // A fixed, non-constant pattern: what is sent does not matter, only that it is not
    // allocated per write.
    let buf: Arc<[u8]> = (0..SEND_BUF).map(|i| (i * 31 % 251) as u8).collect();
    let per = bytes / u64::from(streams);
    let extra = bytes % u64::from(streams);
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..streams {
        let n = per + u64::from(u64::from(i) < extra);
        let (addr, buf) = (addr.to_string(), buf.clone());
        tasks.spawn(async move {
            send(&addr, n, &buf, step)
                .await
                .with_context(|| format!("stream {i}"))
        });
    }
    let mut total = 0;
    while let Some(joined) = tasks.join_next().await {
        total += joined.context("stream task failed")??;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Throughput {
        bytes: total,
        secs,
        gbit_s: total as f64 * 8.0 / secs / 1e9,
    })
}

/// One throughput stream: returns the bytes the sink confirmed (always `n`).
async fn send(addr: &str, n: u64, buf: &[u8], step: Duration) -> anyhow::Result<u64> {
    let mut sock = connect(addr, step).await?;
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        within(step, "writing", sock.write_all(&buf[..k])).await?;
        left -= k as u64;
    }
    within(step, "half-closing", sock.shutdown()).await?;
    let mut count = [0u8; 8];
    within(
        step,
        "waiting for the sink's count",
        sock.read_exact(&mut count),
    )
    .await?;
    let got = u64::from_be_bytes(count);
    anyhow::ensure!(
        got == n,
        "short count: sent {n} bytes, the sink received {got}"
    );
    Ok(got)
}

/// `count` sequential round trips of `size` bytes to the echo server at `addr`.
pub(crate) async fn rtt(
    addr: &str,
    count: u32,
    size: usize,
    step: Duration,
) -> anyhow::Result<Rtt> {
    let mut sock = connect(addr, step).await?;
    sock.set_nodelay(true)?;
    let out: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; size];
    for _ in 0..WARMUP {
        round_trip(&mut sock, &out, &mut back, step).await?;
    }
    let mut samples = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let t0 = Instant::now();
        round_trip(&mut sock, &out, &mut back, step).await?;
        samples.push(t0.elapsed());
    }
    within(step, "half-closing", sock.shutdown()).await?;
    let mut rest = Vec::new();
    within(
        step,
        "waiting for the echo server to close",
        sock.read_to_end(&mut rest),
    )
    .await?;
    anyhow::ensure!(
        rest.is_empty(),
        "echo server sent {} unexpected bytes",
        rest.len()
    );
    Ok(summarise(samples))
}

async fn round_trip(
    sock: &mut TcpStream,
    out: &[u8],
    back: &mut [u8],
    step: Duration,
) -> anyhow::Result<()> {
    within(step, "writing", sock.write_all(out)).await?;
    within(step, "reading the echo", sock.read_exact(back)).await?;
    anyhow::ensure!(back == out, "the echo differs from what was sent");
    Ok(())
}

/// Connects to `addr` within `step`.
pub(crate) async fn connect(addr: &str, step: Duration) -> anyhow::Result<TcpStream> {
    within(
        step,
        &format!("connecting to {addr}"),
        TcpStream::connect(addr),
    )
    .await
}

/// Percentiles by nearest rank over the samples; `samples` must not be empty.
fn summarise(mut samples: Vec<Duration>) -> Rtt {
    samples.sort_unstable();
    let us = |d: &Duration| d.as_secs_f64() * 1e6;
    let mean = samples.iter().map(us).sum::<f64>() / samples.len() as f64;
    Rtt {
        p50_us: nearest_rank(&samples, 0.50).unwrap_or(0.0),
        p99_us: nearest_rank(&samples, 0.99).unwrap_or(0.0),
        mean_us: mean,
    }
}

/// The `p` quantile (0..=1) of `sorted` by nearest rank, in microseconds; `None` if empty.
pub(crate) fn nearest_rank(sorted: &[Duration], p: f64) -> Option<f64> {
    let i = (p * sorted.len() as f64).ceil() as usize;
    let d = sorted.get(i.clamp(1, sorted.len().max(1)) - 1)?;
    Some(d.as_secs_f64() * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples = (1..=100).rev().map(Duration::from_micros).collect();
        let r = summarise(samples);
        assert_eq!(r.p50_us, 50.0);
        assert_eq!(r.p99_us, 99.0);
        assert!((r.mean_us - 50.5).abs() < 1e-9);
    }

    #[test]
    fn one_sample() {
        let r = summarise(vec![Duration::from_micros(7)]);
        assert_eq!((r.p50_us, r.p99_us), (7.0, 7.0));
    }

    #[test]
    fn no_samples_have_no_percentiles() {
        assert_eq!(nearest_rank(&[], 0.5), None);
    }
}
