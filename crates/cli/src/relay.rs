//! `tube relay` and `tube token`.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tube_net::Identity;
use tube_relay::{JwtSecret, RelayConfig};

/// Flags of `tube relay`.
#[derive(Debug, clap::Args)]
pub(crate) struct RelayArgs {
    /// Address agents connect to.
    #[arg(long, default_value = "0.0.0.0:7835", env = "TUBE_LISTEN")]
    listen: SocketAddr,
    /// Host name or address put in tunnel endpoints (default: the address the agent reached).
    #[arg(long, env = "TUBE_PUBLIC_HOST")]
    public_host: Option<String>,
    /// Address public tunnel ports bind on (default: the --listen address).
    #[arg(long, env = "TUBE_PUBLIC_BIND")]
    public_bind: Option<std::net::IpAddr>,
    /// Ports tunnels may get, LO-HI.
    #[arg(long, default_value = "20000-29999", value_parser = parse_range, env = "TUBE_PORT_RANGE")]
    port_range: RangeInclusive<u16>,
    /// Data dir holding the certificate and JWT secret (created on first start).
    #[arg(long, env = "TUBE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Deadline from TCP accept to authenticated agent.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    handshake_timeout: Duration,
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

pub(crate) async fn run(args: RelayArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dir = crate::data_dir(args.data_dir)?;
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
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("error: cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let fingerprint = identity.fingerprint();
    println!("listening control {addr}");
    println!("fingerprint {fingerprint}");

    let host = args.public_host.clone().unwrap_or_else(|| {
        if addr.ip().is_unspecified() {
            "<relay-host>".into()
        } else {
            addr.ip().to_string()
        }
    });
    let example = jwt.mint("default", Duration::from_secs(24 * 3600));
    tracing::info!(
        "expose a local service with: tube expose 127.0.0.1:3000 --relay {host}:{} --token {example} --fingerprint {fingerprint}",
        addr.port()
    );

    let mut config = RelayConfig::new(identity, jwt);
    config.public_host = args.public_host;
    config.public_bind = args.public_bind;
    config.port_range = args.port_range;
    config.handshake_timeout = args.handshake_timeout;
    tube_relay::run(listener, config, shutdown).await?;
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
    println!("{}", jwt.mint(&args.subject, args.ttl));
    Ok(())
}
