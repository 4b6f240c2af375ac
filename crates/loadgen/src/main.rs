//! `tube-loadgen`: the benchmark helper behind `bench/relay.sh`. Two servers (`echo`, `sink`)
//! stand in for the service behind a tunnel; four clients (`throughput`, `rtt`, `connrate`,
//! `idle`) drive them, directly or through a relay, and print one JSON result line on stdout;
//! a fifth (`verify`, used by `tests/integrity.sh`) checks every echoed byte instead of
//! measuring. These know nothing about tube itself (see `docs/performance.md`).
//!
//! For `bench/parts.sh`, two clients speak tube's message protocols: `mailbox` (a mailbox
//! peer's messages per second and push latency, with tube-mailbox's client) and `longpoll`
//! (packets per second and latency through the long-poll proxy), the latter against the
//! `longpoll-echo` backend.

mod client;
mod conns;
mod delay;
mod latency;
mod longpoll;
mod mailbox;
mod server;
mod verify;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Load generator with echo and sink servers, for measuring tunnels side by side.
#[derive(Debug, Parser)]
#[command(name = "tube-loadgen", version, about)]
struct Cli {
    /// Longest wait for any one step (connect, read, write), in seconds.
    #[arg(long, global = true, default_value_t = 60)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Echo server: sends every byte back; on EOF, shuts down its write side.
    Echo {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Sink server: discards everything; on EOF, replies with the 8-byte big-endian count.
    Sink {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Bulk transfer to a sink over K parallel connections.
    Throughput {
        /// The sink's address (host:port).
        #[arg(long)]
        addr: String,
        /// Total bytes to send, split evenly over the streams.
        #[arg(long)]
        bytes: u64,
        /// Number of parallel connections.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
        streams: u32,
    },
    /// TCP forwarder that holds every chunk for `--ms` milliseconds in each direction (a
    /// wide-area round trip of twice that between two local processes).
    Delay {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long)]
        listen: SocketAddr,
        /// Where to forward each connection (host:port).
        #[arg(long)]
        to: String,
        /// One-way delay in milliseconds.
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=10_000))]
        ms: u64,
    },
    /// Sequential round trips to an echo server over one connection.
    Rtt {
        /// The echo server's address (host:port).
        #[arg(long)]
        addr: String,
        /// Timed round trips (after 100 untimed warm-up ones).
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
        /// Message size in bytes.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
        size: u32,
    },
    /// New connections to an echo server, each one exchange then closed: connections/s.
    Connrate {
        /// The echo server's address (host:port).
        #[arg(long)]
        addr: String,
        /// Connections to open in all.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
        connections: u32,
        /// Most connections in progress at once.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        concurrency: u32,
        /// Bytes each connection sends and reads back.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
        size: u32,
    },
    /// Integrity check against an echo server: S parallel streams each send N bytes of their
    /// own deterministic pattern while reading the echo, and compare every echoed byte with
    /// it. Prints one JSON line (`intact`: streams that got exactly their bytes back) and
    /// exits non-zero, naming the stream and the first differing byte, if any stream was not
    /// intact.
    Verify {
        /// The echo server's address (host:port).
        #[arg(long)]
        addr: String,
        /// Bytes each stream sends (and must get back): the whole run moves streams x bytes
        /// each way.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        bytes: u64,
        /// Number of parallel streams.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
        streams: u32,
        /// Pattern seed; stream i sends the pattern of seed + i.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Opens N echo connections, one exchange each, and holds them until stdin reaches EOF or
    /// SIGTERM/SIGINT (for measuring memory per idle connection).
    Idle {
        /// The echo server's address (host:port).
        #[arg(long)]
        addr: String,
        /// Connections to open and hold (needs `ulimit -n` above this).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        connections: u32,
        /// Most connections being opened at once.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        concurrency: u32,
        /// Bytes each connection sends and reads back once.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=65_536))]
        size: u32,
    },
    /// Mailbox peer load: registers R online recipients, then S senders deliver M messages to
    /// recipients chosen at random; messages/s and send-to-push latency.
    Mailbox {
        /// The peer (`host:port`, or `host:port/<fingerprint>` for TLS).
        #[arg(long)]
        peer: String,
        /// Recipients registered and listening (pushes over their open connections).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        recipients: u32,
        /// Concurrent sending connections (each DELIVER waits for its STORED).
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        senders: u32,
        /// Messages in all.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
        messages: u32,
        /// Message (blob) size in bytes.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(24..=98_304))]
        size: u32,
        /// Seed of the random choice of recipients.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Messages per second offered in all, evenly spaced (0: every sender as fast as it
        /// can, which measures the peer's capacity).
        #[arg(long, default_value_t = 0)]
        rate: u32,
    },
    /// Long-poll proxy load: C clients log in through the proxy (`/auth`) and send P packets
    /// in all, each client one at a time, each echo coming back on a long poll; packets/s and
    /// send-to-echo latency. The proxy's backend must echo (`longpoll-echo`).
    Longpoll {
        /// The proxy's URL (`http://host:port`).
        #[arg(long)]
        url: String,
        /// Clients polling at once.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        clients: u32,
        /// Packets in all, shared out evenly over the clients.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
        packets: u32,
        /// Packet size in bytes.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(24..=1_048_576))]
        size: u32,
        /// Packets per second offered in all, evenly spaced (0: every client as fast as it
        /// can, which measures the proxy's capacity).
        #[arg(long, default_value_t = 0)]
        rate: u32,
    },
    /// A long-poll backend (`docs/protocols/longpoll.md` section 2) that logs in any client
    /// and answers every packet with itself, addressed to its sender.
    LongpollEcho {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long)]
        listen: SocketAddr,
        /// How long an empty fetch is held before its empty answer (keep it under the
        /// proxy's backend timeout).
        #[arg(long, default_value_t = 20)]
        hold_secs: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let step = Duration::from_secs(cli.timeout.max(1));
    // Latency runs on one thread (no cross-thread wake-ups in the measured path); bulk
    // transfer gets a worker per core.
    let single = matches!(cli.command, Command::Echo { .. } | Command::Rtt { .. });
    let mut builder = if single {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let result = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(cli.command, step)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tube-loadgen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, step: Duration) -> anyhow::Result<()> {
    match command {
        Command::Echo { listen } => server::run(server::Kind::Echo, listen, step).await,
        Command::Sink { listen } => server::run(server::Kind::Sink, listen, step).await,
        Command::Delay { listen, to, ms } => {
            delay::run(listen, to, Duration::from_millis(ms)).await
        }
        Command::Throughput {
            addr,
            bytes,
            streams,
        } => {
            let r = client::throughput(&addr, bytes, streams, step).await?;
            print_line(&ThroughputLine {
                test: "throughput",
                streams,
                bytes: r.bytes,
                secs: r.secs,
                gbit_s: r.gbit_s,
            })
        }
        Command::Rtt { addr, count, size } => {
            let r = client::rtt(&addr, count, size as usize, step).await?;
            print_line(&RttLine {
                test: "rtt",
                size,
                count,
                p50_us: r.p50_us,
                p99_us: r.p99_us,
                mean_us: r.mean_us,
            })
        }
        Command::Connrate {
            addr,
            connections,
            concurrency,
            size,
        } => {
            let r = conns::connrate(&addr, connections, concurrency, size as usize, step).await?;
            print_line(&ConnRateLine {
                test: "connrate",
                connections,
                concurrency,
                size,
                seconds: r.secs,
                conns_per_sec: r.conns_per_sec,
                p50_us: r.p50_us,
                p99_us: r.p99_us,
                errors: r.errors,
            })?;
            match r.first_error {
                Some(first) => anyhow::bail!(
                    "{} of {connections} connections failed{}; e.g. {first}",
                    r.errors,
                    if r.errors >= conns::MAX_ERRORS {
                        " (no new ones started after that)"
                    } else {
                        ""
                    },
                ),
                None => Ok(()),
            }
        }
        Command::Verify {
            addr,
            bytes,
            streams,
            seed,
        } => {
            let r = verify::verify(&addr, bytes, streams, seed, step).await?;
            let total = bytes.saturating_mul(u64::from(streams));
            print_line(&VerifyLine {
                test: "verify",
                streams,
                bytes_per_stream: bytes,
                intact: r.intact,
                secs: r.secs,
                gbit_s: total as f64 * 8.0 / r.secs / 1e9,
            })?;
            match r.first_error {
                Some(first) => anyhow::bail!(
                    "{} of {streams} streams not intact; e.g. {first}",
                    streams - r.intact
                ),
                None => Ok(()),
            }
        }
        Command::Idle {
            addr,
            connections,
            concurrency,
            size,
        } => {
            let stop = conns::eof_or_signal()?;
            conns::idle(
                &addr,
                connections,
                concurrency,
                size as usize,
                step,
                stop,
                |opened| {
                    print_line(&IdleLine {
                        idle: connections,
                        test: "idle",
                        concurrency,
                        size,
                        seconds: opened.secs,
                    })
                },
            )
            .await
        }
        Command::Mailbox {
            peer,
            recipients,
            senders,
            messages,
            size,
            seed,
            rate,
        } => {
            let params = mailbox::Params {
                peer: peer.parse().context("--peer")?,
                recipients,
                senders,
                messages,
                size: size as usize,
                seed,
                rate,
            };
            let r = mailbox::mailbox(params, step).await?;
            print_line(&MailboxLine {
                test: "mailbox",
                recipients,
                senders,
                messages,
                size,
                rate,
                register_secs: r.register_secs,
                secs: r.secs,
                msgs_per_sec: r.msgs_per_sec,
                latency: r.latency,
            })
        }
        Command::Longpoll {
            url,
            clients,
            packets,
            size,
            rate,
        } => {
            let params = longpoll::Params {
                url,
                clients,
                packets,
                size: size as usize,
                rate,
            };
            let r = longpoll::longpoll(params, step).await?;
            print_line(&LongpollLine {
                test: "longpoll",
                clients,
                packets,
                size,
                rate,
                login_secs: r.login_secs,
                secs: r.secs,
                packets_per_sec: r.packets_per_sec,
                latency: r.latency,
            })
        }
        Command::LongpollEcho { listen, hold_secs } => {
            longpoll::serve_echo(listen, Duration::from_secs(hold_secs)).await
        }
    }
}

/// The result line of `mailbox`; field order is the output order (the latency fields
/// `p50_us`, `p99_us`, `mean_us`, `max_us` last).
#[derive(Debug, serde::Serialize)]
struct MailboxLine {
    test: &'static str,
    recipients: u32,
    senders: u32,
    messages: u32,
    size: u32,
    rate: u32,
    register_secs: f64,
    secs: f64,
    msgs_per_sec: f64,
    #[serde(flatten)]
    latency: latency::Latency,
}

/// The result line of `longpoll`; field order is the output order (the latency fields last).
#[derive(Debug, serde::Serialize)]
struct LongpollLine {
    test: &'static str,
    clients: u32,
    packets: u32,
    size: u32,
    rate: u32,
    login_secs: f64,
    secs: f64,
    packets_per_sec: f64,
    #[serde(flatten)]
    latency: latency::Latency,
}

/// The result line of `throughput`; field order is the output order.
#[derive(Debug, serde::Serialize)]
struct ThroughputLine {
    test: &'static str,
    streams: u32,
    bytes: u64,
    secs: f64,
    gbit_s: f64,
}

/// The result line of `rtt`; field order is the output order.
#[derive(Debug, serde::Serialize)]
struct RttLine {
    test: &'static str,
    size: u32,
    count: u32,
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
}

/// The result line of `connrate`; field order is the output order. Percentiles are `null` when
/// no connection succeeded.
#[derive(Debug, serde::Serialize)]
struct ConnRateLine {
    test: &'static str,
    connections: u32,
    concurrency: u32,
    size: u32,
    seconds: f64,
    conns_per_sec: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    errors: u32,
}

/// The result line of `verify`; field order is the output order. `gbit_s` counts one
/// direction (streams x bytes_per_stream), like `throughput`.
#[derive(Debug, serde::Serialize)]
struct VerifyLine {
    test: &'static str,
    streams: u32,
    bytes_per_stream: u64,
    intact: u32,
    secs: f64,
    gbit_s: f64,
}

/// The line `idle` prints once all its connections are open (`seconds`: time to open them);
/// field order is the output order.
#[derive(Debug, serde::Serialize)]
struct IdleLine {
    idle: u32,
    test: &'static str,
    concurrency: u32,
    size: u32,
    seconds: f64,
}

/// Prints `line` as one JSON line on stdout.
fn print_line(line: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(line)?);
    Ok(())
}

/// Runs `fut`, failing with `timed out after .. <what>` if it takes longer than `limit`.
pub(crate) async fn within<T, E>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.with_context(|| what.to_string()),
        Err(_) => anyhow::bail!("timed out after {}s {what}", limit.as_secs()),
    }
}
