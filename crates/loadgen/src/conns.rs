//! The `connrate` and `idle` clients: many short echo connections, or many open idle ones.
//! Both open connections with bounded concurrency and do one echo exchange on each, so a
//! connection counts only once it works end to end through whatever tunnel is in between.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::client::{connect, nearest_rank};
use crate::within;

/// After this many failed connections `connrate` starts no new ones: a broken tunnel would
/// otherwise cost one `--timeout` per remaining connection.
pub(crate) const MAX_ERRORS: u32 = 10;

/// File descriptors a process needs besides its connections (std streams, epoll, wakers, and
/// the like), with room to spare.
const FD_HEADROOM: u64 = 32;

/// Result of a connection-rate run.
#[derive(Debug)]
pub(crate) struct ConnRate {
    /// Wall time from the first connect to the last close.
    pub(crate) secs: f64,
    /// Completed connections per second.
    pub(crate) conns_per_sec: f64,
    /// Median connect-to-first-echoed-byte, in microseconds (`None` if none succeeded).
    pub(crate) p50_us: Option<f64>,
    /// 99th percentile (nearest rank) of the same.
    pub(crate) p99_us: Option<f64>,
    /// Connections that failed.
    pub(crate) errors: u32,
    /// One failure (the first one a worker saw), for the error line.
    pub(crate) first_error: Option<String>,
}

/// Opens `connections` connections to the echo server at `addr`, at most `concurrency` at
/// once; each sends `size` bytes, reads them back, half-closes and waits for the server's
/// end of stream. Failures are counted, not fatal (see [`MAX_ERRORS`]).
pub(crate) async fn connrate(
    addr: &str,
    connections: u32,
    concurrency: u32,
    size: usize,
    step: Duration,
) -> anyhow::Result<ConnRate> {
    check_fd_limit(u64::from(concurrency), "connrate --concurrency")?;
    let msg: Arc<[u8]> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let next = Arc::new(AtomicU32::new(0));
    let errors = Arc::new(AtomicU32::new(0));
    let start = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.min(connections) {
        let (addr, msg) = (addr.to_string(), msg.clone());
        let (next, errors) = (next.clone(), errors.clone());
        workers.spawn(async move {
            let mut samples = Vec::new();
            let mut first_error = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= connections || errors.load(Ordering::Relaxed) >= MAX_ERRORS {
                    break;
                }
                match short_lived(&addr, &msg, step).await {
                    Ok(d) => samples.push(d),
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert_with(|| format!("connection {i}: {e:#}"));
                    }
                }
            }
            (samples, first_error)
        });
    }
    let mut samples = Vec::with_capacity(connections as usize);
    let mut first_error = None;
    while let Some(joined) = workers.join_next().await {
        let (s, e) = joined.context("connection task failed")?;
        samples.extend(s);
        first_error = first_error.or(e);
    }
    let secs = start.elapsed().as_secs_f64();
    samples.sort_unstable();
    Ok(ConnRate {
        secs,
        conns_per_sec: samples.len() as f64 / secs,
        p50_us: nearest_rank(&samples, 0.50),
        p99_us: nearest_rank(&samples, 0.99),
        errors: errors.load(Ordering::Relaxed),
        first_error,
    })
}

/// One `connrate` connection: returns its connect-to-first-byte time.
async fn short_lived(addr: &str, msg: &[u8], step: Duration) -> anyhow::Result<Duration> {
    let (mut sock, first) = open_echoed(addr, msg, step).await?;
    within(step, "half-closing", sock.shutdown()).await?;
    let mut rest = [0u8; 64];
    let n = within(
        step,
        "waiting for the echo server to close",
        sock.read(&mut rest),
    )
    .await?;
    anyhow::ensure!(n == 0, "echo server sent {n} unexpected bytes");
    Ok(first)
}

/// Connects to `addr`, sends `msg` and reads the echo back fully, checking it. Returns the
/// socket and the time from the start of connect to the first echoed byte.
async fn open_echoed(
    addr: &str,
    msg: &[u8],
    step: Duration,
) -> anyhow::Result<(TcpStream, Duration)> {
    let t0 = Instant::now();
    let mut sock = connect(addr, step).await.map_err(fd_hint)?;
    sock.set_nodelay(true)?;
    within(step, "writing", sock.write_all(msg)).await?;
    let mut back = vec![0u8; msg.len()];
    let n = within(step, "reading the echo", sock.read(&mut back)).await?;
    let first = t0.elapsed();
    anyhow::ensure!(n > 0, "the echo server closed before echoing");
    within(step, "reading the echo", sock.read_exact(&mut back[n..])).await?;
    anyhow::ensure!(*back == *msg, "the echo differs from what was sent");
    Ok((sock, first))
}

/// What an `idle` run measured while opening its connections.
#[derive(Debug)]
pub(crate) struct Opened {
    /// Wall time to open all of them.
    pub(crate) secs: f64,
}

/// Opens `connections` echoed connections (at most `concurrency` at once), calls `opened`
/// once all are up, then holds them until `stop` resolves (with what stopped it); the first
/// failure ends the run, as does a held connection that the far end closes or writes to, and
/// so does `stop` resolving before all are open.
pub(crate) async fn idle(
    addr: &str,
    connections: u32,
    concurrency: u32,
    size: usize,
    step: Duration,
    stop: impl Future<Output = &'static str>,
    opened: impl FnOnce(Opened) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    check_fd_limit(u64::from(connections), "idle --connections")?;
    tokio::pin!(stop);
    let msg: Arc<[u8]> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
    let next = Arc::new(AtomicU32::new(0));
    let start = Instant::now();
    let mut workers: JoinSet<anyhow::Result<Vec<(u32, TcpStream)>>> = JoinSet::new();
    for _ in 0..concurrency.min(connections) {
        let (addr, msg, next) = (addr.to_string(), msg.clone(), next.clone());
        workers.spawn(async move {
            let mut socks = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= connections {
                    return Ok(socks);
                }
                let (sock, _) = open_echoed(&addr, &msg, step)
                    .await
                    .with_context(|| format!("connection {i}"))?;
                socks.push((i, sock));
            }
        });
    }
    let mut socks = Vec::with_capacity(connections as usize);
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                Some(r) => socks.extend(r.context("connection task failed")??),
                None => break,
            },
            why = &mut stop => anyhow::bail!(
                "{why} while opening connections ({} of {connections} open); `idle` holds \
                 them until stdin reaches EOF, so keep stdin open (e.g. a pipe or a fifo)",
                socks.len()
            ),
        }
    }
    opened(Opened {
        secs: start.elapsed().as_secs_f64(),
    })?;
    let held = Instant::now();
    let mut watchers = JoinSet::new();
    for (i, sock) in socks {
        watchers.spawn(watch(i, sock));
    }
    tokio::select! {
        _ = &mut stop => {}
        Some(joined) = watchers.join_next() => {
            let e = joined.context("watch task failed")?;
            anyhow::bail!("{e} after holding for {:.1}s", held.elapsed().as_secs_f64());
        }
    }
    // Aborting the watchers drops their sockets, which closes them.
    watchers.shutdown().await;
    Ok(())
}

/// Resolves when stdin reaches EOF (or fails) or on SIGTERM or SIGINT, naming which. The
/// handlers are in place once this returns, so a signal sent after it is never lost.
pub(crate) fn eof_or_signal() -> anyhow::Result<impl Future<Output = &'static str>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            // A read error ends the hold like EOF does: nobody is left to tell us when to stop.
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = tx.send(());
        })
        .context("cannot start the stdin thread")?;
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        )
    };
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = rx => "stdin reached EOF",
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
        #[cfg(not(unix))]
        tokio::select! {
            _ = rx => "stdin reached EOF",
            _ = tokio::signal::ctrl_c() => "Ctrl-C",
        }
    })
}

/// Waits on a held connection; returns (as the error text) what ended its idleness.
async fn watch(i: u32, mut sock: TcpStream) -> String {
    let mut byte = [0u8; 1];
    match sock.read(&mut byte).await {
        Ok(0) => format!("connection {i} was closed by the far end"),
        Ok(_) => format!("connection {i} received unexpected bytes"),
        Err(e) => format!("connection {i} failed: {e}"),
    }
}

/// Fails with a clear message if the soft open-file limit is below `conns` plus headroom.
/// Only Linux is checked (`/proc/self/limits`); elsewhere running out shows up as a connect
/// error, with [`fd_hint`]'s note.
fn check_fd_limit(conns: u64, what: &str) -> anyhow::Result<()> {
    let Some((soft, hard)) = nofile_limits() else {
        return Ok(());
    };
    let need = conns + FD_HEADROOM;
    anyhow::ensure!(
        soft >= need,
        "{what} {conns} needs about {need} open files, but the soft limit (ulimit -n, \
         RLIMIT_NOFILE) is {soft} (hard limit {hard}); raise it first, e.g. `ulimit -n {need}`"
    );
    Ok(())
}

/// The soft and hard `Max open files` limits from `/proc/self/limits`, if readable
/// (`unlimited` as `u64::MAX`).
fn nofile_limits() -> Option<(u64, String)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let rest = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    let mut words = rest.split_whitespace();
    let parse = |w: &str| {
        if w == "unlimited" {
            Some(u64::MAX)
        } else {
            w.parse().ok()
        }
    };
    let soft = parse(words.next()?)?;
    let hard = words.next()?.to_string();
    Some((soft, hard))
}

/// Adds a note naming the limit when a connect failed for lack of file descriptors.
fn fd_hint(e: anyhow::Error) -> anyhow::Error {
    let emfile = e
        .chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.raw_os_error() == Some(24));
    if emfile {
        e.context("out of file descriptors: raise the open-file limit (ulimit -n)")
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let (soft, _) = nofile_limits().expect("Max open files in /proc/self/limits");
            assert!(soft > 0);
        }
    }

    #[test]
    fn an_impossible_fd_demand_is_refused_by_name() {
        if nofile_limits().is_some_and(|(soft, _)| soft < u64::MAX - FD_HEADROOM) {
            let e = check_fd_limit(u64::MAX - FD_HEADROOM, "idle --connections").unwrap_err();
            let text = e.to_string();
            assert!(text.contains("ulimit -n"), "{text}");
            assert!(text.contains("idle --connections"), "{text}");
        }
    }
}
