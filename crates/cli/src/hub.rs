//! `tube hub` and `tube node`: the two services of chains (seed 000). Flags (and `TUBE_*`
//! variables) become a [`tube_chain::hub::HubConfig`] or [`tube_chain::node::NodeConfig`];
//! this file only adds the data dir, the listeners and the stdout contract lines.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tube_chain::SqliteAccounts;
use tube_chain::hub::{Hub, HubConfig};
use tube_chain::node::{NodeConfig, NodeError};
use tube_net::{Fingerprint, Identity};
use tube_proto::ratelimit::RateLimit;

use crate::stdout::say;

/// The hub's default control address.
const DEFAULT_HUB_LISTEN: &str = "0.0.0.0:7838";

/// The file of node accounts in the hub's data dir.
const ACCOUNTS_FILE: &str = "chain-nodes.sqlite3";

/// Flags of `tube hub`.
#[derive(Debug, clap::Args)]
pub(crate) struct HubArgs {
    /// Address nodes connect to.
    #[arg(long, env = "TUBE_LISTEN", default_value = DEFAULT_HUB_LISTEN)]
    listen: SocketAddr,
    /// Admin HTTP address: /metrics, /healthz, /api/nodes, /api/chains.
    #[arg(long, env = "TUBE_ADMIN")]
    admin: Option<SocketAddr>,
    /// Data dir: certificate and the node account database (created on first start).
    #[arg(long, env = "TUBE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Intermediate nodes per chain (fewer when fewer online nodes relay).
    #[arg(long, default_value_t = tube_chain::plan::DEFAULT_INTERMEDIATES)]
    intermediates: usize,
    /// Time the endpoint's front has to approve a chain.
    #[arg(long, value_parser = crate::parse_duration, default_value = "30s")]
    approval_timeout: Duration,
    /// Time each node has to answer its make_tube.
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    hop_timeout: Duration,
    /// Time from TCP accept to the node's first message (TLS included).
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    handshake_timeout: Duration,
    /// Chains one node may take part in at once.
    #[arg(long, default_value_t = tube_proto::chain::DEFAULT_MAX_CHAINS_PER_NODE)]
    max_chains_per_node: usize,
    /// New accounts (`register`) per source address (IPv6: per /64) per hour; more get 6008.
    #[arg(long, default_value_t = tube_chain::hub::DEFAULT_REGISTRATIONS_PER_HOUR)]
    registrations_per_hour: u32,
    /// Nodes logged in at once from one source address (IPv6: per /64); more get 6008.
    #[arg(long, default_value_t = tube_chain::hub::DEFAULT_MAX_NODES_PER_SOURCE)]
    max_nodes_per_source: usize,
    /// Accounts the hub keeps at most. At the limit a new node takes the place of the account
    /// unseen longest, if its node is not logged in and was last seen --evict-unseen-after
    /// ago or more; otherwise registering gets 6008 (the node retries later).
    #[arg(long, default_value_t = tube_chain::hub::DEFAULT_MAX_ACCOUNTS)]
    max_accounts: usize,
    /// How long an account's node must have been away (not logged in) before its account may
    /// give way to a new one at --max-accounts.
    #[arg(long, value_parser = crate::parse_duration, default_value = "30days")]
    evict_unseen_after: Duration,
    /// Register new nodes only when they bring this token (64 hex digits, e.g. from
    /// `openssl rand -hex 32`; give it to `tube node --registration-token`). Without it anyone
    /// who reaches the hub may register. Prefer the variable to the flag (ps shows flags).
    #[arg(long, env = "TUBE_REGISTRATION_TOKEN", hide_env_values = true)]
    registration_token: Option<String>,
}

/// Flags of `tube node`.
#[derive(Debug, clap::Args)]
pub(crate) struct NodeArgs {
    /// The hub, HOST:PORT.
    #[arg(long, env = "TUBE_HUB")]
    hub: String,
    /// The hub certificate's fingerprint, `sha256:<hex>`, as `tube hub` printed it.
    #[arg(long, env = "TUBE_HUB_FINGERPRINT")]
    hub_fingerprint: String,
    /// This node's account name (1 to 64 of A-Z a-z 0-9 _ . -).
    #[arg(long, env = "TUBE_NODE_NAME")]
    name: String,
    /// Address for the hub connection, hop listeners and hop dials [default: any].
    #[arg(long)]
    bind: Option<IpAddr>,
    /// The local front API (a loopback address: it has no authentication).
    #[arg(long, env = "TUBE_NODE_API", default_value = crate::chain::DEFAULT_API)]
    api: SocketAddr,
    /// Data dir: the node's one-time password file.
    #[arg(long, env = "TUBE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Refuse to be an intermediate of other nodes' chains.
    #[arg(long)]
    no_relay: bool,
    /// Build timeout for this node's hops (dials and reads get half of it).
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    hop_timeout: Duration,
    /// Chains this node takes part in at once.
    #[arg(long, default_value_t = tube_proto::chain::DEFAULT_MAX_CHAINS_PER_NODE)]
    max_chains: usize,
    /// Longest delay between reconnect attempts to the hub.
    #[arg(long, value_parser = crate::parse_duration, default_value = "60s")]
    reconnect_max: Duration,
    /// The hub's registration token, for a hub run with --registration-token (sent only to
    /// register, when the node has no password yet).
    #[arg(long, env = "TUBE_REGISTRATION_TOKEN", hide_env_values = true)]
    registration_token: Option<String>,
}

/// `--registration-token` as a secret: 64 hex digits (lowercase on the wire).
fn registration_token(
    token: Option<String>,
) -> anyhow::Result<Option<tube_proto::chain::ChainSecret>> {
    let Some(t) = token else {
        return Ok(None);
    };
    let t = t.trim().to_ascii_lowercase();
    let secret = tube_proto::chain::ChainSecret::new(t);
    if secret.to_bytes().is_none() {
        anyhow::bail!(
            "error: --registration-token must be 64 hex digits (e.g. from `openssl rand -hex 32`)"
        );
    }
    Ok(Some(secret))
}

pub(crate) async fn run_hub(args: HubArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dir = crate::data_dir(args.data_dir)?;
    let (identity, created) = Identity::load_or_create(&dir, "hub")
        .with_context(|| format!("error: loading the hub certificate from {}", dir.display()))?;
    if created {
        tracing::info!(dir = %dir.display(), "created hub certificate");
    }
    let db = dir.join(ACCOUNTS_FILE);
    let accounts = SqliteAccounts::open(&db)
        .with_context(|| format!("error: opening the node accounts {}", db.display()))?;
    let fingerprint = identity.fingerprint();
    let mut config = HubConfig::new(identity, Arc::new(accounts));
    config.intermediates = args.intermediates;
    config.approval_timeout = args.approval_timeout;
    config.hop_timeout = args.hop_timeout;
    config.handshake_timeout = args.handshake_timeout;
    config.max_chains_per_node = args.max_chains_per_node;
    config.register_limit = RateLimit::per_hour(args.registrations_per_hour);
    config.max_nodes_per_source = args.max_nodes_per_source.max(1);
    config.max_accounts = args.max_accounts.max(1);
    config.evict_unseen_after = args.evict_unseen_after;
    config.registration_token = registration_token(args.registration_token)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("error: cannot listen on {}", args.listen))?;
    let admin = match args.admin {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("error: cannot listen on {a} (admin)"))?,
        ),
        None => None,
    };
    let addr = listener.local_addr()?;
    say!("listening control {addr}")?;
    if let Some(a) = &admin {
        say!("listening admin {}", a.local_addr()?)?;
    }
    say!("fingerprint {fingerprint}")?;
    let host = if addr.ip().is_unspecified() {
        "<hub-host>".to_owned()
    } else {
        addr.ip().to_string()
    };
    tracing::info!(
        "start a node with: tube node --hub {host}:{} --hub-fingerprint {fingerprint} --name NAME",
        addr.port()
    );
    let hub = Hub::new(config);
    let admin_task = admin.map(|l| {
        tokio::spawn(tube_chain::hub::admin::serve(
            l,
            hub.state(),
            shutdown.clone(),
        ))
    });
    hub.run(listener, shutdown).await?;
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    Ok(())
}

pub(crate) async fn run_node(args: NodeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let fingerprint: Fingerprint = args
        .hub_fingerprint
        .parse()
        .context("error: --hub-fingerprint must be sha256:<64 hex digits>")?;
    if !tube_chain::accounts::is_valid_name(&args.name) {
        anyhow::bail!("error: --name must be 1 to 64 of A-Z a-z 0-9 _ . -");
    }
    if !args.api.ip().is_loopback() {
        anyhow::bail!(
            "error: --api {} is not a loopback address (the API has no authentication)",
            args.api
        );
    }
    let dir = crate::data_dir(args.data_dir)?;
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("error: cannot create the data dir {}", dir.display()))?;
    let mut config = NodeConfig::new(args.hub, fingerprint, args.name, dir);
    config.bind = args.bind.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    config.relay = !args.no_relay;
    config.hop_timeout = args.hop_timeout;
    config.max_chains = args.max_chains;
    config.reconnect.max = args.reconnect_max;
    config.registration_token = registration_token(args.registration_token)?;
    let api = TcpListener::bind(args.api)
        .await
        .with_context(|| format!("error: cannot listen on {} (api)", args.api))?;
    say!("listening api {}", api.local_addr()?)?;
    tube_chain::node::run(api, config, shutdown)
        .await
        .map_err(|e: NodeError| anyhow::anyhow!("{e}"))
}
