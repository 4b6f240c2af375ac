//! `tube expose`: the agent. Flags, config file and defaults merged into a
//! [`tube_agent::AgentConfig`]; prints `tunnel <public> <local>` for every tunnel that goes
//! live, again after each reconnect.
//!
//! The agent's runtime has no time driver (cli main.rs): timers made here must come from
//! `tube_net::timer`, as in tube-agent (whose clippy.toml enforces it); `tokio::time`'s would
//! panic.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tube_agent::{AgentConfig, AgentEvent, TunnelSpec};
use tube_net::Fingerprint;
use tube_proto::backoff::BackoffConfig;
use tube_proto::cidr::Cidr;

use crate::config::{self, AgentFile};
use crate::stdout::say;

/// How long a stopping `tube expose` lets open user connections finish (the library's
/// default is none, for embedding and tests).
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Flags of `tube expose`. Each one overrides the config file.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct ExposeArgs {
    /// Local services to expose (host:port), one tunnel each (replaces the file's tunnels).
    local: Vec<String>,
    /// Config file (TOML, see examples/agent.toml).
    #[arg(long, env = "TUBE_CONFIG")]
    config: Option<PathBuf>,
    /// The relay's control address (host:port).
    #[arg(long, env = "TUBE_RELAY")]
    relay: Option<String>,
    /// JWT from `tube token` (prefer the TUBE_TOKEN variable over the command line).
    #[arg(long, env = "TUBE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The relay certificate's fingerprint, `sha256:<hex>`, as `tube relay` printed it.
    #[arg(long, env = "TUBE_FINGERPRINT")]
    fingerprint: Option<String>,
    /// Public port to ask for; repeat once per local address, in order.
    #[arg(long)]
    remote_port: Vec<u16>,
    /// Only these source ranges may use the public ports (CIDR, repeatable).
    #[arg(long = "allow", value_name = "CIDR")]
    allow: Vec<Cidr>,
    /// Heartbeat interval [default: 30s].
    #[arg(long, value_parser = crate::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// Unanswered heartbeat intervals before the relay counts as gone [default: 3].
    #[arg(long)]
    heartbeat_misses: Option<u32>,
    /// First reconnect delay [default: 1s].
    #[arg(long, value_parser = crate::parse_duration)]
    reconnect_initial: Option<Duration>,
    /// Longest reconnect delay [default: 30s].
    #[arg(long, value_parser = crate::parse_duration)]
    reconnect_max: Option<Duration>,
    /// Reconnect attempts before giving up, 0 for no limit [default: 10].
    #[arg(long)]
    reconnect_attempts: Option<u32>,
    /// On SIGTERM: new users are refused at once, open ones get this long to finish
    /// [default: 5s].
    #[arg(long, value_parser = crate::parse_duration)]
    shutdown_grace: Option<Duration>,
}

/// What `tube expose` decided, before the connection.
#[derive(Debug)]
pub(crate) struct AgentSettings {
    relay: String,
    token: Option<String>,
    fingerprint: Fingerprint,
    tunnels: Vec<TunnelSpec>,
    heartbeat_interval: Option<Duration>,
    heartbeat_misses: Option<u32>,
    shutdown_grace: Duration,
    backoff: BackoffConfig,
}

/// Settings from a config file alone (used to check the examples).
#[cfg(test)]
pub(crate) fn from_file_only(file: AgentFile) -> anyhow::Result<AgentSettings> {
    merge(ExposeArgs::default(), file)
}

fn merge(a: ExposeArgs, f: AgentFile) -> anyhow::Result<AgentSettings> {
    let relay = a
        .relay
        .or(f.relay)
        .context("error: --relay is required (or `relay` in the config file)")?;
    let fingerprint: Fingerprint = a
        .fingerprint
        .or(f.fingerprint)
        .context("error: --fingerprint is required (or `fingerprint` in the config file)")?
        .parse()
        .context("error: --fingerprint must be sha256:<64 hex digits>")?;
    let allow: Vec<String> = a.allow.iter().map(|c| c.to_string()).collect();
    let tunnels: Vec<TunnelSpec> = if !a.local.is_empty() {
        if a.remote_port.len() > a.local.len() {
            anyhow::bail!("error: more --remote-port values than local addresses");
        }
        a.local
            .iter()
            .enumerate()
            .map(|(i, local)| TunnelSpec {
                local: local.clone(),
                remote_port: a.remote_port.get(i).copied(),
                name: local.clone(),
                allow: allow.clone(),
            })
            .collect()
    } else {
        f.tunnel
            .into_iter()
            .map(|t| {
                for c in &t.allow {
                    c.parse::<Cidr>()
                        .map_err(|e| anyhow::anyhow!("error: tunnel {}: {e}", t.local))?;
                }
                Ok(TunnelSpec {
                    name: t.name.unwrap_or_else(|| t.local.clone()),
                    local: t.local,
                    remote_port: t.remote_port,
                    allow: if allow.is_empty() {
                        t.allow
                    } else {
                        allow.clone()
                    },
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    if tunnels.is_empty() {
        anyhow::bail!(
            "error: no local address to expose (give LOCAL_ADDR... or [[tunnel]] in the config file)"
        );
    }
    let rc = f.reconnect.unwrap_or_default();
    let mut backoff = BackoffConfig::default();
    if let Some(d) = a.reconnect_initial.map(Ok).or(rc
        .initial_delay
        .map(|s| config::duration("initial_delay", &s)))
    {
        backoff.initial = d?;
    }
    if let Some(d) = a
        .reconnect_max
        .map(Ok)
        .or(rc.max_delay.map(|s| config::duration("max_delay", &s)))
    {
        backoff.max = d?;
    }
    if let Some(n) = a.reconnect_attempts.or(rc.max_attempts) {
        backoff.max_attempts = n;
    }
    if let Some(x) = rc.backoff_factor {
        backoff.factor = x;
    }
    if let Some(x) = rc.jitter {
        backoff.jitter = x;
    }
    let heartbeat_interval = match (a.heartbeat_interval, f.heartbeat_interval) {
        (Some(d), _) => Some(d),
        (None, Some(s)) => Some(config::duration("heartbeat_interval", &s)?),
        (None, None) => None,
    };
    let shutdown_grace = match (a.shutdown_grace, f.shutdown_grace) {
        (Some(d), _) => d,
        (None, Some(s)) => config::duration("shutdown_grace", &s)?,
        (None, None) => DEFAULT_SHUTDOWN_GRACE,
    };
    Ok(AgentSettings {
        relay,
        shutdown_grace,
        token: a.token.or(f.token),
        fingerprint,
        tunnels,
        heartbeat_interval,
        heartbeat_misses: a.heartbeat_misses.or(f.heartbeat_misses),
        backoff,
    })
}

pub(crate) async fn run(args: ExposeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(p) => config::load(p)?,
        None => AgentFile::default(),
    };
    let s = merge(args, file)?;
    let token = s
        .token
        .context("error: --token is required (or TUBE_TOKEN, or `token` in the config file)")?;
    let mut config = AgentConfig::new(s.relay, token, s.fingerprint, s.tunnels);
    config.backoff = s.backoff;
    config.shutdown_grace = s.shutdown_grace;
    if let Some(d) = s.heartbeat_interval {
        config.heartbeat_interval = d;
    }
    if let Some(n) = s.heartbeat_misses {
        config.heartbeat_misses = n;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let printer = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if let AgentEvent::TunnelUp { public, local, .. } = ev
                && let Err(e) = say!("tunnel {public} {local}")
            {
                tracing::warn!(%public, error = %e.0, "cannot print the tunnel line");
            }
        }
    });
    let result = tube_agent::run(config, tx, shutdown).await;
    let _ = printer.await;
    result.map_err(|e| match e {
        tube_agent::AgentError::Relay { .. } => anyhow::anyhow!("{e}"),
        other => anyhow::anyhow!("error: {other}"),
    })
}
