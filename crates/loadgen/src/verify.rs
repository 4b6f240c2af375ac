//! The `verify` client: integrity, not speed. Each of S parallel connections to an echo server
//! sends N bytes of its own deterministic pattern while reading the echo back, and compares
//! every byte it gets with the pattern at that offset. A stream is intact when exactly N bytes
//! came back, all equal, and the server then ended the stream. Streams run to their end even
//! when another one failed, so the result says how many were intact.

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::client::connect;
use crate::within;

/// Bytes written or compared at a time, per stream.
const CHUNK: usize = 64 * 1024;

/// Result of a verify run.
#[derive(Debug)]
pub(crate) struct Verified {
    /// Streams that got exactly their own bytes back.
    pub(crate) intact: u32,
    /// Wall time from the first connect to the last stream's end.
    pub(crate) secs: f64,
    /// The first failure, naming its stream (`None` when all were intact).
    pub(crate) first_error: Option<String>,
}

/// Runs `streams` parallel echo streams of `bytes` each against `addr` (see the module docs).
/// Stream `i` sends the pattern of key `seed + i`.
pub(crate) async fn verify(
    addr: &str,
    bytes: u64,
    streams: u32,
    seed: u64,
    step: Duration,
) -> anyhow::Result<Verified> {
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..streams {
        let addr = addr.to_string();
        let key = seed.wrapping_add(u64::from(i));
        tasks.spawn(async move {
            let r = async {
                let sock = connect(&addr, step).await?;
                let (mut rd, mut wr) = sock.into_split();
                tokio::try_join!(
                    send_pattern(&mut wr, key, bytes, step),
                    check_echo(&mut rd, key, bytes, step),
                )
            }
            .await;
            r.with_context(|| format!("stream {i}"))
        });
    }
    let mut intact = 0;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("stream task failed")? {
            Ok(_) => intact += 1,
            Err(e) => {
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    Ok(Verified {
        intact,
        secs: start.elapsed().as_secs_f64(),
        first_error,
    })
}

/// Writes `bytes` of the pattern `key`, then half-closes.
async fn send_pattern<W: AsyncWrite + Unpin>(
    w: &mut W,
    key: u64,
    bytes: u64,
    step: Duration,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0;
    while offset < bytes {
        let n = (bytes - offset).min(CHUNK as u64) as usize;
        fill(&mut buf[..n], key, offset);
        within(step, "writing", w.write_all(&buf[..n])).await?;
        offset += n as u64;
    }
    within(step, "half-closing", w.shutdown()).await
}

/// Reads until the end of the stream, comparing every byte with the pattern `key`; fails at
/// the first difference, or when the stream does not end after exactly `bytes`.
async fn check_echo<R: AsyncRead + Unpin>(
    r: &mut R,
    key: u64,
    bytes: u64,
    step: Duration,
) -> anyhow::Result<()> {
    let mut got = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut offset = 0u64;
    loop {
        let n = within(step, "reading the echo", r.read(&mut got)).await?;
        if n == 0 {
            break;
        }
        anyhow::ensure!(
            offset + n as u64 <= bytes,
            "the echo is longer than the {bytes} bytes sent"
        );
        fill(&mut want[..n], key, offset);
        if got[..n] != want[..n]
            && let Some(j) = (0..n).find(|&j| got[j] != want[j])
        {
            anyhow::bail!(
                "byte {} of the echo differs: got {:#04x}, sent {:#04x}",
                offset + j as u64,
                got[j],
                want[j]
            );
        }
        offset += n as u64;
    }
    anyhow::ensure!(
        offset == bytes,
        "the echo ended after {offset} of {bytes} bytes"
    );
    Ok(())
}

/// Fills `buf` with the bytes of pattern `key` from `offset` on. Byte `k` of the pattern is
/// byte `k % 8` (little-endian) of [`word`]`(key, k / 8)`, so any range can be made without
/// the ones before it.
fn fill(buf: &mut [u8], key: u64, offset: u64) {
    // Up to the next word boundary byte by byte, then whole words, then the tail.
    let head = ((8 - offset % 8) % 8).min(buf.len() as u64) as usize;
    let (first, rest) = buf.split_at_mut(head);
    let lead = word(key, offset / 8).to_le_bytes();
    let skip = (offset % 8) as usize;
    first.copy_from_slice(&lead[skip..skip + head]);
    let mut index = (offset + head as u64) / 8;
    let mut words = rest.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&word(key, index).to_le_bytes());
        index += 1;
    }
    let tail = words.into_remainder();
    let n = tail.len();
    tail.copy_from_slice(&word(key, index).to_le_bytes()[..n]);
}

/// Word `index` of pattern `key`: the SplitMix64 output for state `key + (index + 1) * gamma`,
/// so neighbouring words and neighbouring keys look unrelated.
fn word(key: u64, index: u64) -> u64 {
    let mut z = key.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_range_of_the_pattern_matches_the_whole() {
        let mut whole = vec![0u8; 100];
        fill(&mut whole, 7, 0);
        for start in 0..whole.len() {
            for len in [0usize, 1, 5, 7, 8, 9, 16, 20, 33] {
                let end = (start + len).min(whole.len());
                let mut part = vec![0u8; end - start];
                fill(&mut part, 7, start as u64);
                assert_eq!(part, whole[start..end], "range {start}..{end}");
            }
        }
    }

    #[test]
    fn keys_give_different_patterns() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        fill(&mut a, 1, 0);
        fill(&mut b, 2, 0);
        assert_ne!(a, b);
        assert_ne!(a[..8], a[8..16], "neighbouring words differ");
    }

    /// An in-memory echo: the checker accepts exactly the sent bytes and names the first
    /// changed byte, a short echo and a long one.
    #[tokio::test]
    async fn the_checker_finds_a_changed_a_missing_and_an_extra_byte() {
        let step = Duration::from_secs(5);
        let mut sent = Vec::new();
        send_pattern(&mut sent, 3, 1000, step).await.unwrap();
        assert_eq!(sent.len(), 1000);
        check_echo(&mut &sent[..], 3, 1000, step).await.unwrap();

        let mut changed = sent.clone();
        changed[517] ^= 1;
        let e = check_echo(&mut &changed[..], 3, 1000, step)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("byte 517 "), "{e}");

        let e = check_echo(&mut &sent[..999], 3, 1000, step)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("after 999 of 1000"), "{e}");

        let mut longer = sent.clone();
        longer.push(0);
        let e = check_echo(&mut &longer[..], 3, 1000, step)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("longer"), "{e}");

        let e = check_echo(&mut &sent[..], 4, 1000, step).await.unwrap_err();
        assert!(e.to_string().contains("byte 0 "), "another key: {e}");
    }
}
