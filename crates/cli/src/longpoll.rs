//! `tube longpoll`: the HTTP long-poll packet proxy (seed 004). Flags, `TUBE_*` variables and
//! the config file (`--config`, see examples/longpoll.toml) merged over the defaults of
//! `docs/protocols/longpoll.md` section 5; the proxy itself lives in `tube-longpoll`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tube_longpoll::{Longpoll, LongpollConfig};

use crate::config;
use crate::stdout::say;

/// The proxy's default address.
const DEFAULT_LISTEN: &str = "0.0.0.0:7840";

/// Flags of `tube longpoll`. Each one overrides the config file.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct LongpollArgs {
    /// Config file (TOML, see examples/longpoll.toml): the same settings as the flags.
    #[arg(long, env = "TUBE_CONFIG")]
    config: Option<PathBuf>,
    /// Address clients send their HTTP requests to [default: 0.0.0.0:7840].
    #[arg(long, env = "TUBE_LISTEN")]
    listen: Option<SocketAddr>,
    /// A backend URL (http://host:port/path), repeatable; the order is the failover order.
    #[arg(long = "backend", value_name = "URL")]
    backends: Vec<String>,
    /// Admin HTTP address: /healthz, /metrics (counts only; bind it to loopback).
    #[arg(long, env = "TUBE_ADMIN")]
    admin: Option<SocketAddr>,
    /// How long `POST /` waits for a packet before answering empty [default: 25s].
    #[arg(long, value_parser = crate::parse_duration)]
    poll_timeout: Option<Duration>,
    /// How long a token stays valid after it was issued [default: 24h].
    #[arg(long, value_parser = crate::parse_duration)]
    token_ttl: Option<Duration>,
    /// A client without a request this long is forgotten with its buffers [default: 10m].
    #[arg(long, value_parser = crate::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Deadline of one request to a backend; backends should hold fetches for less [default: 60s].
    #[arg(long, value_parser = crate::parse_duration)]
    backend_timeout: Option<Duration>,
    /// First rest of a failed backend; doubles on each failure [default: 100ms].
    #[arg(long, value_parser = crate::parse_duration)]
    backoff_min: Option<Duration>,
    /// Longest rest of a failed backend [default: 10s].
    #[arg(long, value_parser = crate::parse_duration)]
    backoff_max: Option<Duration>,
    /// Largest request or backend answer body, bytes; larger requests get 413 [default: 1048576].
    #[arg(long)]
    max_body: Option<usize>,
    /// Packets buffered per client and direction; over it 429 [default: 256].
    #[arg(long)]
    max_client_packets: Option<usize>,
    /// Bytes buffered per client and direction; over it 429 [default: 4194304].
    #[arg(long)]
    max_client_bytes: Option<usize>,
    /// Bytes buffered for all clients together; over it 503 [default: 268435456].
    #[arg(long)]
    max_total_bytes: Option<usize>,
    /// Clients known at once; over it /auth and /register get 503 [default: 100000].
    #[arg(long)]
    max_clients: Option<usize>,
    /// Time to send a whole request body; past it 408 [default: 30s].
    #[arg(long, value_parser = crate::parse_duration)]
    body_timeout: Option<Duration>,
    /// Time to send a whole request header; past it the connection is closed [default: 10s].
    #[arg(long, value_parser = crate::parse_duration)]
    header_timeout: Option<Duration>,
    /// A kept-alive HTTP connection without a request this long is closed [default: 120s].
    #[arg(long, value_parser = crate::parse_duration)]
    http_idle_timeout: Option<Duration>,
    /// HTTP connections open at once; more are closed when accepted [default: 10000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// A write to a client that makes no progress this long closes its connection [default: 30s].
    #[arg(long, value_parser = crate::parse_duration)]
    write_timeout: Option<Duration>,
}

/// `longpoll.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LongpollFile {
    pub(crate) listen: Option<String>,
    pub(crate) admin: Option<String>,
    #[serde(default)]
    pub(crate) backends: Vec<String>,
    pub(crate) poll_timeout: Option<String>,
    pub(crate) token_ttl: Option<String>,
    pub(crate) idle_timeout: Option<String>,
    pub(crate) backend_timeout: Option<String>,
    pub(crate) backoff_min: Option<String>,
    pub(crate) backoff_max: Option<String>,
    pub(crate) max_body: Option<usize>,
    pub(crate) max_client_packets: Option<usize>,
    pub(crate) max_client_bytes: Option<usize>,
    pub(crate) max_total_bytes: Option<usize>,
    pub(crate) max_clients: Option<usize>,
    pub(crate) body_timeout: Option<String>,
    pub(crate) header_timeout: Option<String>,
    pub(crate) http_idle_timeout: Option<String>,
    pub(crate) max_connections: Option<usize>,
    pub(crate) write_timeout: Option<String>,
}

/// The merged settings: where to listen and the proxy's config.
pub(crate) struct Settings {
    listen: SocketAddr,
    admin: Option<SocketAddr>,
    config: LongpollConfig,
}

/// Flags over the file over the defaults.
pub(crate) fn settings(args: LongpollArgs, file: LongpollFile) -> anyhow::Result<Settings> {
    let backends = if args.backends.is_empty() {
        file.backends
    } else {
        args.backends
    };
    if backends.is_empty() {
        anyhow::bail!("error: at least one --backend URL is needed");
    }
    let d = LongpollConfig::new(backends);
    let listen = config::pick(args.listen, file.listen, "listen")?.unwrap_or_else(|| {
        DEFAULT_LISTEN
            .parse()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 7840)))
    });
    let admin = config::pick(args.admin, file.admin, "admin")?;
    let config = LongpollConfig {
        poll_timeout: config::pick_duration(args.poll_timeout, file.poll_timeout, "poll_timeout")?
            .unwrap_or(d.poll_timeout),
        token_ttl: config::pick_duration(args.token_ttl, file.token_ttl, "token_ttl")?
            .unwrap_or(d.token_ttl),
        idle_timeout: config::pick_duration(args.idle_timeout, file.idle_timeout, "idle_timeout")?
            .unwrap_or(d.idle_timeout),
        backend_timeout: config::pick_duration(
            args.backend_timeout,
            file.backend_timeout,
            "backend_timeout",
        )?
        .unwrap_or(d.backend_timeout),
        backoff_min: config::pick_duration(args.backoff_min, file.backoff_min, "backoff_min")?
            .unwrap_or(d.backoff_min),
        backoff_max: config::pick_duration(args.backoff_max, file.backoff_max, "backoff_max")?
            .unwrap_or(d.backoff_max),
        max_body: args.max_body.or(file.max_body).unwrap_or(d.max_body),
        max_client_packets: args
            .max_client_packets
            .or(file.max_client_packets)
            .unwrap_or(d.max_client_packets),
        max_client_bytes: args
            .max_client_bytes
            .or(file.max_client_bytes)
            .unwrap_or(d.max_client_bytes),
        max_total_bytes: args
            .max_total_bytes
            .or(file.max_total_bytes)
            .unwrap_or(d.max_total_bytes),
        max_clients: args
            .max_clients
            .or(file.max_clients)
            .unwrap_or(d.max_clients),
        body_timeout: config::pick_duration(args.body_timeout, file.body_timeout, "body_timeout")?
            .unwrap_or(d.body_timeout),
        http: tube_net::http::HttpLimits {
            header_timeout: config::pick_duration(
                args.header_timeout,
                file.header_timeout,
                "header_timeout",
            )?
            .unwrap_or(d.http.header_timeout),
            idle_timeout: config::pick_duration(
                args.http_idle_timeout,
                file.http_idle_timeout,
                "http_idle_timeout",
            )?
            .unwrap_or(d.http.idle_timeout),
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .unwrap_or(d.http.max_connections),
            write_timeout: config::pick_duration(
                args.write_timeout,
                file.write_timeout,
                "write_timeout",
            )?
            .unwrap_or(d.http.write_timeout),
            ..d.http
        },
        ..d
    };
    Ok(Settings {
        listen,
        admin,
        config,
    })
}

/// Settings from a config file alone (used to check the example).
#[cfg(test)]
pub(crate) fn from_file_only(file: LongpollFile) -> anyhow::Result<()> {
    settings(LongpollArgs::default(), file).map(|_| ())
}

/// `tube longpoll`.
pub(crate) async fn run(args: LongpollArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(p) => config::load(p)?,
        None => LongpollFile::default(),
    };
    let s = settings(args, file)?;
    let proxy =
        Longpoll::new(s.config, shutdown.clone()).map_err(|e| anyhow::anyhow!("error: {e}"))?;
    let listener = TcpListener::bind(s.listen)
        .await
        .with_context(|| format!("error: cannot listen on {} (http)", s.listen))?;
    let admin = match s.admin {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("error: cannot listen on {a} (admin)"))?,
        ),
        None => None,
    };
    say!("listening http {}", listener.local_addr()?)?;
    if let Some(a) = &admin {
        say!("listening admin {}", a.local_addr()?)?;
    }
    tracing::info!(?proxy, "long-poll proxy started");
    let serve_admin = async {
        match admin {
            Some(l) => proxy.run_admin(l).await,
            None => Ok(()),
        }
    };
    let (served, admin_served) = tokio::join!(proxy.run(listener), serve_admin);
    served.context("error: serving clients")?;
    admin_served.context("error: serving admin")?;
    Ok(())
}
