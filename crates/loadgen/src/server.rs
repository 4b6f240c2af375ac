//! The `echo` and `sink` servers: the local services a benchmark exposes through a tunnel.
//! They serve until killed; one connection's failure is reported on stderr and ends only it.
//! The echo server waits for a client's next message without a time limit (`idle` holds
//! connections open for as long as a measurement takes); every other step is bounded.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::within;

/// Read buffer size per sink connection.
const BUF: usize = 256 * 1024;

/// Read buffer size per echo connection: small, as `idle` may hold 10,000 of them open.
const ECHO_BUF: usize = 16 * 1024;

/// Which server to run.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// Sends every byte back.
    Echo,
    /// Discards everything, then reports the count.
    Sink,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Echo => "echo",
            Kind::Sink => "sink",
        }
    }
}

/// Binds `listen`, prints `listening <kind> <addr>` on stdout and serves until killed.
/// `step` bounds every read and write on a connection.
pub(crate) async fn run(kind: Kind, listen: SocketAddr, step: Duration) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    println!("listening {} {addr}", kind.name());
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    conns.spawn(async move {
                        let r = match kind {
                            Kind::Echo => echo(sock, step).await,
                            Kind::Sink => sink(sock, step).await,
                        };
                        if let Err(e) = r {
                            eprintln!("tube-loadgen: {} {peer}: {e:#}", kind.name());
                        }
                    });
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    eprintln!("tube-loadgen: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn echo(mut sock: TcpStream, step: Duration) -> anyhow::Result<()> {
    sock.set_nodelay(true)?;
    let mut buf = vec![0u8; ECHO_BUF];
    loop {
        // Unbounded: an idle client is no error (the client bounds its own waits).
        let n = sock.read(&mut buf).await.context("reading")?;
        if n == 0 {
            break;
        }
        within(step, "writing", sock.write_all(&buf[..n])).await?;
    }
    within(step, "shutting down", sock.shutdown()).await
}

async fn sink(mut sock: TcpStream, step: Duration) -> anyhow::Result<()> {
    let mut buf = vec![0u8; BUF];
    let mut count: u64 = 0;
    loop {
        let n = within(step, "reading", sock.read(&mut buf)).await?;
        if n == 0 {
            break;
        }
        count += n as u64;
    }
    within(
        step,
        "writing the count",
        sock.write_all(&count.to_be_bytes()),
    )
    .await?;
    within(step, "shutting down", sock.shutdown()).await
}
