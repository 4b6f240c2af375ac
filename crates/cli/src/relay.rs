//! `tube relay` and `tube token`: flags, config file and defaults merged into a
//! [`tube_relay::RelayConfig`], the admin listener, and the stdout contract lines.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tube_net::Identity;
use tube_proto::cidr::Cidr;
use tube_proto::ratelimit::RateLimit;
use tube_relay::{JwtSecret, Relay, RelayConfig};

use crate::config::{self, RelayFile};
use crate::stdout::say;

/// Flags of `tube relay`. Each one overrides the config file.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct RelayArgs {
    /// Config file (TOML, see examples/relay.toml).
    #[arg(long, env = "TUBE_CONFIG")]
    config: Option<PathBuf>,
    /// Address agents connect to [default: 0.0.0.0:7835].
    #[arg(long, env = "TUBE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin HTTP address: /metrics, /healthz, /ready, /api/agents, /api/tunnels.
    #[arg(long, env = "TUBE_ADMIN")]
    admin: Option<SocketAddr>,
    /// Host name or address put in tunnel endpoints [default: the address the agent reached].
    #[arg(long, env = "TUBE_PUBLIC_HOST")]
    public_host: Option<String>,
    /// Address public tunnel ports bind on [default: the address each agent connected to].
    #[arg(long, env = "TUBE_PUBLIC_BIND")]
    public_bind: Option<IpAddr>,
    /// Ports tunnels may get, LO-HI [default: 20000-29999].
    #[arg(long, value_parser = parse_range, env = "TUBE_PORT_RANGE")]
    port_range: Option<RangeInclusive<u16>>,
    /// Data dir: certificate, JWT secret, lease database (created on first start).
    #[arg(long, env = "TUBE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Deadline from TCP accept to authenticated agent [default: 10s].
    #[arg(long, value_parser = crate::parse_duration)]
    handshake_timeout: Option<Duration>,
    /// Handshakes in progress at once [default: 256].
    #[arg(long)]
    max_handshakes: Option<usize>,
    /// Handshakes in progress at once from one IPv4 address or IPv6 /64 [default: 32].
    #[arg(long)]
    max_handshakes_per_ip: Option<usize>,
    /// Tunnels one agent connection may hold [default: 64].
    #[arg(long)]
    max_tunnels_per_agent: Option<usize>,
    /// Heartbeat interval expected from agents [default: 30s].
    #[arg(long, value_parser = crate::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// Silent heartbeat intervals before an agent is dropped [default: 3].
    #[arg(long)]
    heartbeat_misses: Option<u32>,
    /// Heartbeats for one tunnel closer than this get RATE_LIMIT [default: 15s].
    #[arg(long, value_parser = crate::parse_duration)]
    heartbeat_min_interval: Option<Duration>,
    /// How long a lost agent keeps its tunnel id and port [default: 5m].
    #[arg(long, value_parser = crate::parse_duration)]
    lease_grace: Option<Duration>,
    /// Range tunnels may allow, repeatable; also the allow-list of tunnels that ask for none.
    #[arg(long = "allow", value_name = "CIDR")]
    allow: Vec<Cidr>,
    /// Most allow-list entries per tunnel [default: 64].
    #[arg(long)]
    max_allowed_ips: Option<usize>,
    /// Authentication attempts per minute, per source IP and per subject [default: 5].
    #[arg(long)]
    auth_attempts_per_minute: Option<u32>,
    /// New tunnels per hour, per subject and per source IP [default: 10].
    #[arg(long)]
    tunnels_per_hour: Option<u32>,
    /// Every failed authentication is answered after this long [default: 100ms].
    #[arg(long, value_parser = crate::parse_duration)]
    auth_failure_delay: Option<Duration>,
    /// On SIGTERM: ports close at once, open user connections get this long to finish
    /// [default: 5s].
    #[arg(long, value_parser = crate::parse_duration)]
    shutdown_grace: Option<Duration>,
    /// Threads serving agents; each holds whole agent connections with their tunnels and
    /// users [default: one per core].
    #[arg(long)]
    threads: Option<usize>,
}

/// Flags of `tube token`.
#[derive(Debug, clap::Args)]
pub(crate) struct TokenArgs {
    /// Who the token is for.
    #[arg(long)]
    subject: String,
    /// How long the token is valid (e.g. 30d, 12h).
    #[arg(long, default_value = "30d", value_parser = crate::parse_duration)]
    ttl: Duration,
    /// The relay's data dir (where its secret is).
    #[arg(long, env = "TUBE_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

fn parse_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or("expected LO-HI, e.g. 20000-29999")?;
    let lo: u16 = lo.trim().parse().map_err(|_| format!("bad port {lo:?}"))?;
    let hi: u16 = hi.trim().parse().map_err(|_| format!("bad port {hi:?}"))?;
    if lo == 0 || lo > hi {
        return Err("the range must be LO-HI with 1 <= LO <= HI".into());
    }
    Ok(lo..=hi)
}

/// Everything `tube relay` decided, before identities are loaded.
pub(crate) struct RelaySettings {
    listen: SocketAddr,
    admin: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    apply: Box<dyn FnOnce(&mut RelayConfig) + Send>,
}

impl std::fmt::Debug for RelaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelaySettings")
            .field("listen", &self.listen)
            .field("admin", &self.admin)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// Settings from a config file alone (used to check the examples).
#[cfg(test)]
pub(crate) fn from_file_only(file: RelayFile) -> anyhow::Result<RelaySettings> {
    merge(RelayArgs::default(), file)
}

fn merge(a: RelayArgs, f: RelayFile) -> anyhow::Result<RelaySettings> {
    let dur = config::pick_duration;
    let listen = config::pick(a.listen, f.listen, "listen")?
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 7835)));
    let admin = config::pick(a.admin, f.admin, "admin")?;
    let public_bind = config::pick(a.public_bind, f.public_bind, "public_bind")?;
    let port_range = match (a.port_range, f.port_range) {
        (Some(r), _) => Some(r),
        (None, Some(s)) => {
            Some(parse_range(&s).map_err(|e| anyhow::anyhow!("error: port_range: {e}"))?)
        }
        (None, None) => None,
    };
    let allow: Vec<Cidr> = if !a.allow.is_empty() {
        a.allow
    } else {
        f.allow
            .unwrap_or_default()
            .iter()
            .map(|s| s.parse().map_err(|e| anyhow::anyhow!("error: allow: {e}")))
            .collect::<anyhow::Result<_>>()?
    };
    let rl = f.rate_limits.unwrap_or_default();
    let handshake_timeout = dur(
        a.handshake_timeout,
        f.handshake_timeout,
        "handshake_timeout",
    )?;
    let heartbeat_interval = dur(
        a.heartbeat_interval,
        f.heartbeat_interval,
        "heartbeat_interval",
    )?;
    let heartbeat_min_interval = dur(
        a.heartbeat_min_interval,
        f.heartbeat_min_interval,
        "heartbeat_min_interval",
    )?;
    let lease_grace = dur(a.lease_grace, f.lease_grace, "lease_grace")?;
    let shutdown_grace = dur(a.shutdown_grace, f.shutdown_grace, "shutdown_grace")?;
    let auth_failure_delay = dur(
        a.auth_failure_delay,
        rl.auth_failure_delay,
        "auth_failure_delay",
    )?;
    let auth_per_min = a.auth_attempts_per_minute.or(rl.auth_attempts_per_minute);
    let tunnels_per_hour = a.tunnels_per_hour.or(rl.tunnels_per_hour);
    let public_host = a.public_host.or(f.public_host);
    let max_handshakes = a.max_handshakes.or(f.max_handshakes);
    let max_handshakes_per_ip = a.max_handshakes_per_ip.or(f.max_handshakes_per_ip);
    let max_tunnels = a.max_tunnels_per_agent.or(f.max_tunnels_per_agent);
    let misses = a.heartbeat_misses.or(f.heartbeat_misses);
    let max_allowed = a.max_allowed_ips.or(f.max_allowed_ips);
    let threads = match a.threads.or(f.threads) {
        Some(n) if !(1..=1024).contains(&n) => {
            anyhow::bail!("error: threads: {n} is out of range 1-1024")
        }
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let apply = move |c: &mut RelayConfig| {
        c.public_host = public_host;
        c.public_bind = public_bind;
        if let Some(v) = port_range {
            c.port_range = v;
        }
        if let Some(v) = handshake_timeout {
            c.handshake_timeout = v;
        }
        if let Some(v) = max_handshakes {
            c.max_handshakes = v;
        }
        if let Some(v) = max_handshakes_per_ip {
            c.max_handshakes_per_ip = v;
        }
        if let Some(v) = max_tunnels {
            c.max_tunnels_per_agent = v;
        }
        if let Some(v) = heartbeat_interval {
            c.heartbeat_interval = v;
        }
        if let Some(v) = misses {
            c.heartbeat_misses = v;
        }
        if let Some(v) = heartbeat_min_interval {
            c.heartbeat_min_interval = v;
        }
        if let Some(v) = lease_grace {
            c.lease_grace = v;
        }
        if let Some(v) = shutdown_grace {
            c.shutdown_grace = v;
        }
        if let Some(v) = max_allowed {
            c.max_allowed_ips = v;
        }
        if let Some(v) = auth_failure_delay {
            c.auth_failure_delay = v;
        }
        if let Some(n) = auth_per_min {
            c.auth_limit_per_ip = RateLimit::per_minute(n);
            c.auth_limit_per_subject = RateLimit::per_minute(n);
        }
        if let Some(n) = tunnels_per_hour {
            c.tunnel_limit_per_subject = RateLimit::per_hour(n);
            c.tunnel_limit_per_ip = RateLimit::per_hour(n);
        }
        c.allowed_ips_policy = allow;
        c.threads = threads;
    };
    Ok(RelaySettings {
        listen,
        admin,
        data_dir: a.data_dir.or(f.data_dir.map(PathBuf::from)),
        apply: Box::new(apply),
    })
}

pub(crate) async fn run(args: RelayArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(p) => config::load(p)?,
        None => RelayFile::default(),
    };
    let settings = merge(args, file)?;
    let dir = crate::data_dir(settings.data_dir)?;
    let (identity, created) = Identity::load_or_create(&dir, "relay").with_context(|| {
        format!(
            "error: loading the relay certificate from {}",
            dir.display()
        )
    })?;
    if created {
        tracing::info!(dir = %dir.display(), "created relay certificate");
    }
    let (jwt, created) = JwtSecret::load_or_create(&dir)
        .with_context(|| format!("error: loading the JWT secret from {}", dir.display()))?;
    if created {
        tracing::info!(dir = %dir.display(), "created jwt secret");
    }
    let fingerprint = identity.fingerprint();
    let mut config = RelayConfig::new(identity, jwt);
    config.data_dir = Some(dir.clone());
    (settings.apply)(&mut config);
    let public_host = config.public_host.clone();
    let relay = Relay::new(config).context("error: opening the relay's lease database")?;
    let listener = tube_relay::bind(settings.listen)
        .with_context(|| format!("error: cannot listen on {}", settings.listen))?;
    let addr = listener.local_addr()?;
    let admin = match settings.admin {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("error: cannot listen on {a} (admin)"))?,
        ),
        None => None,
    };
    say!("listening control {addr}")?;
    if let Some(a) = &admin {
        say!("listening admin {}", a.local_addr()?)?;
    }
    say!("fingerprint {fingerprint}")?;

    let host = public_host.unwrap_or_else(|| {
        if addr.ip().is_unspecified() {
            "<relay-host>".into()
        } else {
            addr.ip().to_string()
        }
    });
    // No token on this line: logs travel (journald, aggregators) and a JWT in them is a
    // credential anyone reading them could use. The command mints its own.
    tracing::info!(
        "expose a local service with: TUBE_TOKEN=$(tube token --subject agent --data-dir {}) tube expose 127.0.0.1:3000 --relay {host}:{} --fingerprint {fingerprint}",
        dir.display(),
        addr.port()
    );
    let admin_task =
        admin.map(|l| tokio::spawn(tube_relay::admin::serve(l, relay.state(), shutdown.clone())));
    relay.run(listener, shutdown).await?;
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    Ok(())
}

pub(crate) fn token(args: TokenArgs) -> anyhow::Result<()> {
    let dir = crate::data_dir(args.data_dir)?;
    let path = dir.join(tube_relay::auth::SECRET_FILE);
    if !path.exists() {
        anyhow::bail!(
            "error: no relay secret at {} (start `tube relay --data-dir {}` once, or pass the relay's --data-dir)",
            path.display(),
            dir.display()
        );
    }
    let (jwt, _) = JwtSecret::load_or_create(&dir)
        .with_context(|| format!("error: reading {}", path.display()))?;
    say!("{}", jwt.mint(&args.subject, args.ttl))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cmd {
        #[command(flatten)]
        relay: RelayArgs,
    }

    /// The relay config `tube relay FLAGS` with `FILE` as its config file would run with.
    fn applied(flags: &[&str], file: &str) -> RelayConfig {
        let args = Cmd::try_parse_from(std::iter::once("relay").chain(flags.iter().copied()))
            .unwrap()
            .relay;
        let settings = merge(args, toml::from_str(file).unwrap()).unwrap();
        let identity = Identity::generate(&["localhost"]).unwrap();
        let mut c = RelayConfig::new(identity, JwtSecret::generate().unwrap());
        (settings.apply)(&mut c);
        c
    }

    #[test]
    fn handshake_caps_come_from_flags_over_the_file_over_defaults() {
        let c = applied(&[], "");
        assert_eq!((c.max_handshakes, c.max_handshakes_per_ip), (256, 32));
        let file = "max_handshakes = 100\nmax_handshakes_per_ip = 7\n";
        let c = applied(&[], file);
        assert_eq!((c.max_handshakes, c.max_handshakes_per_ip), (100, 7));
        let c = applied(&["--max-handshakes-per-ip", "3"], file);
        assert_eq!((c.max_handshakes, c.max_handshakes_per_ip), (100, 3));
    }

    #[test]
    fn threads_come_from_flags_over_the_file_over_one_per_core() {
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(applied(&[], "").threads, cores);
        assert_eq!(applied(&[], "threads = 3").threads, 3);
        assert_eq!(applied(&["--threads", "1"], "threads = 3").threads, 1);
        // Out of range from the flag or the file alike, checked in one place.
        let flag = Cmd::try_parse_from(["relay", "--threads", "0"])
            .unwrap()
            .relay;
        let err = merge(flag, toml::from_str("").unwrap()).unwrap_err();
        assert_eq!(err.to_string(), "error: threads: 0 is out of range 1-1024");
        let args = Cmd::try_parse_from(["relay"]).unwrap().relay;
        let err = merge(args, toml::from_str("threads = 1025").unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "error: threads: 1025 is out of range 1-1024"
        );
    }
}
