//! The `delay` forwarder: a TCP relay that holds every chunk for a fixed time in each
//! direction, so a benchmark can put a wide-area round trip between two processes on one
//! machine (where `tc netem` is not available). Order is kept; what is held is bounded (a
//! reader that gets too far ahead waits), so a fast sender meets TCP backpressure as it would
//! on a real path.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Most bytes one read takes.
const CHUNK: usize = 64 * 1024;

/// Most chunks held per direction (with CHUNK, at most 64 MiB: a 100 ms one-way delay at
/// 5 Gbit/s).
const HELD: usize = 1024;

/// Binds `listen`, prints `listening delay <addr>`, and forwards every connection to `to`,
/// delaying each direction by `delay`, until killed.
pub(crate) async fn run(listen: SocketAddr, to: String, delay: Duration) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("listening delay {}", listener.local_addr()?);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (sock, peer) = accepted.context("accept")?;
                let to = to.clone();
                conns.spawn(async move {
                    if let Err(e) = forward(sock, &to, delay).await {
                        eprintln!("tube-loadgen: delay {peer}: {e:#}");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn forward(a: TcpStream, to: &str, delay: Duration) -> anyhow::Result<()> {
    let b = TcpStream::connect(to)
        .await
        .with_context(|| format!("connecting to {to}"))?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    tokio::try_join!(one_way(ar, bw, delay), one_way(br, aw, delay))?;
    Ok(())
}

/// Copies `rd` to `wr`, each chunk written `delay` after it was read; EOF is passed on (after
/// the same delay) as a shutdown.
async fn one_way(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    delay: Duration,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(HELD);
    let reader = async move {
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK);
            let n = rd.read_buf(&mut buf).await.context("reading")?;
            // An empty chunk carries the EOF.
            if tx
                .send((Instant::now() + delay, buf.freeze()))
                .await
                .is_err()
                || n == 0
            {
                return anyhow::Ok(());
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if chunk.is_empty() {
                break;
            }
            wr.write_all(&chunk).await.context("writing")?;
        }
        wr.shutdown().await.context("shutting down")
    };
    tokio::try_join!(reader, writer)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_and_the_end_pass_in_order_each_way_after_the_delay() {
        // An echo service behind the forwarder: a round trip crosses the delay twice.
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let delay = Duration::from_millis(50);
        tokio::spawn(async move {
            let (s, _) = front.accept().await.unwrap();
            forward(s, &echo_addr, delay).await.unwrap();
        });
        let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let start = Instant::now();
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        let (mut r, mut w) = c.split();
        let (_, got) = tokio::try_join!(
            async {
                w.write_all(&sent).await?;
                w.shutdown().await
            },
            async {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.map(|_| got)
            }
        )
        .unwrap();
        assert_eq!(got, sent);
        assert!(start.elapsed() >= delay * 2);
    }
}
