//! `tube hub` and `tube node`: the two services of chains (seed 000). Flags (and `TUBE_*`
//! variables) over the config file (`--config`, see examples/hub.toml and node.toml) over the
//! defaults become a [`tube_chain::hub::HubConfig`] or [`tube_chain::node::NodeConfig`]; this
//! file only adds the data dir, the listeners and the stdout contract lines.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tube_chain::hub::{Hub, HubConfig};
use tube_chain::node::{NodeConfig, NodeError};
use tube_chain::{AccountError, AccountStore, SqliteAccounts};
use tube_net::{Fingerprint, Identity};
use tube_proto::ratelimit::RateLimit;

use crate::config;
use crate::stdout::say;

/// The hub's default control address.
const DEFAULT_HUB_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 7838);

/// The file of node accounts in the hub's data dir.
const ACCOUNTS_FILE: &str = "chain-nodes.sqlite3";

/// Flags of `tube hub`. Each one overrides the config file.
#[derive(Debug, Default, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct HubArgs {
    #[command(subcommand)]
    command: Option<HubCommand>,
    /// Config file (TOML, see examples/hub.toml): the same settings as the flags.
    #[arg(long, env = "TUBE_CONFIG")]
    config: Option<PathBuf>,
    /// Address nodes connect to [default: 0.0.0.0:7838].
    #[arg(long, env = "TUBE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin HTTP address: /metrics, /healthz, /api/nodes, /api/chains.
    #[arg(long, env = "TUBE_ADMIN")]
    admin: Option<SocketAddr>,
    /// Data dir: certificate and the node account database (created on first start).
    #[arg(long, env = "TUBE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Intermediate nodes per chain (fewer when fewer online nodes relay) [default: 2].
    #[arg(long)]
    intermediates: Option<usize>,
    /// Time the endpoint's front has to approve a chain [default: 30s].
    #[arg(long, value_parser = crate::parse_duration)]
    approval_timeout: Option<Duration>,
    /// Time each node has to answer its make_tube [default: 10s].
    #[arg(long, value_parser = crate::parse_duration)]
    hop_timeout: Option<Duration>,
    /// Time from TCP accept to the node's first message (TLS included) [default: 10s].
    #[arg(long, value_parser = crate::parse_duration)]
    handshake_timeout: Option<Duration>,
    /// Chains one node may take part in at once [default: 16].
    #[arg(long)]
    max_chains_per_node: Option<usize>,
    /// Nodes logged in at once; more get 6008 [default: 1024].
    #[arg(long)]
    max_nodes: Option<usize>,
    /// Connections in the login phase (TLS and first message) at once; more are closed before
    /// TLS [default: 256].
    #[arg(long)]
    max_handshakes: Option<usize>,
    /// New accounts (`register`) per source address (IPv6: per /64) per hour; more get 6008
    /// [default: 10].
    #[arg(long)]
    registrations_per_hour: Option<u32>,
    /// Nodes logged in at once from one source address (IPv6: per /64); more get 6008
    /// [default: 64].
    #[arg(long)]
    max_nodes_per_source: Option<usize>,
    /// Accounts the hub keeps at most. At the limit a new node takes the place of the account
    /// unseen longest, if its node is not logged in and was last seen --evict-unseen-after
    /// ago or more; otherwise registering gets 6008 (the node retries later) [default: 100000].
    #[arg(long)]
    max_accounts: Option<usize>,
    /// How long an account's node must have been away (not logged in) before its account may
    /// give way to a new one at --max-accounts [default: 30days].
    #[arg(long, value_parser = crate::parse_duration)]
    evict_unseen_after: Option<Duration>,
    /// Register new nodes only when they bring this token (64 hex digits, e.g. from
    /// `openssl rand -hex 32`; give it to `tube node --registration-token`). Without it anyone
    /// who reaches the hub may register. Prefer the variable to the flag (ps shows flags).
    #[arg(long, env = "TUBE_REGISTRATION_TOKEN", hide_env_values = true)]
    registration_token: Option<String>,
}

/// `tube hub`'s subcommands (without one, it runs the hub).
#[derive(Debug, clap::Subcommand)]
enum HubCommand {
    /// The node accounts in a hub's data dir (the hub may be running meanwhile).
    Accounts {
        #[command(subcommand)]
        command: AccountsCommand,
        /// The hub's data dir.
        #[arg(long, global = true, env = "TUBE_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Subcommand)]
enum AccountsCommand {
    /// Print each account, by name: `NAME last_seen=TIME created=TIME` (UTC, RFC 3339).
    List,
    /// Remove the account NAME: its node can no longer log in (6001, after its open session,
    /// if any) and the name is free to register again.
    Remove {
        /// The node's name.
        name: String,
    },
}

/// `tube hub accounts ...` on the account database in `data_dir` (which must exist).
fn accounts(command: AccountsCommand, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = crate::data_dir(data_dir)?;
    let db = dir.join(ACCOUNTS_FILE);
    if !db.is_file() {
        anyhow::bail!(
            "error: no node accounts at {} (the hub's --data-dir?)",
            db.display()
        );
    }
    let store = SqliteAccounts::open(&db)
        .with_context(|| format!("error: opening the node accounts {}", db.display()))?;
    let time = |secs: Option<i64>| match secs.and_then(|s| u64::try_from(s).ok()) {
        Some(s) => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
                .to_string()
        }
        None => "-".into(),
    };
    match command {
        AccountsCommand::List => {
            let list = store
                .list()
                .map_err(|e| anyhow::anyhow!("error: listing the node accounts: {e}"))?;
            for a in list {
                say!(
                    "{} last_seen={} created={}",
                    a.name,
                    time(a.last_seen),
                    time(a.created_at)
                )?;
            }
        }
        AccountsCommand::Remove { name } => match store.remove(&name) {
            Ok(()) => say!("removed {name}")?,
            Err(AccountError::Refused) => anyhow::bail!("error: no account {name}"),
            Err(e) => anyhow::bail!("error: removing {name}: {e}"),
        },
    }
    Ok(())
}

/// `hub.toml`: the flags of `tube hub` without their dashes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HubFile {
    listen: Option<String>,
    admin: Option<String>,
    data_dir: Option<String>,
    intermediates: Option<usize>,
    approval_timeout: Option<String>,
    hop_timeout: Option<String>,
    handshake_timeout: Option<String>,
    max_chains_per_node: Option<usize>,
    max_nodes: Option<usize>,
    max_handshakes: Option<usize>,
    registrations_per_hour: Option<u32>,
    max_nodes_per_source: Option<usize>,
    max_accounts: Option<usize>,
    evict_unseen_after: Option<String>,
    registration_token: Option<String>,
}

/// `tube hub`'s settings: flags over the file over the defaults. `apply` sets what was given
/// on the hub's config (the rest keeps the hub's defaults).
pub(crate) struct HubSettings {
    listen: SocketAddr,
    admin: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    apply: Box<dyn FnOnce(&mut HubConfig) + Send>,
}

fn hub_settings(a: HubArgs, f: HubFile) -> anyhow::Result<HubSettings> {
    let dur = config::pick_duration;
    let approval_timeout = dur(a.approval_timeout, f.approval_timeout, "approval_timeout")?;
    let hop_timeout = dur(a.hop_timeout, f.hop_timeout, "hop_timeout")?;
    let handshake_timeout = dur(
        a.handshake_timeout,
        f.handshake_timeout,
        "handshake_timeout",
    )?;
    let evict_unseen_after = dur(
        a.evict_unseen_after,
        f.evict_unseen_after,
        "evict_unseen_after",
    )?;
    let token = registration_token(a.registration_token.or(f.registration_token))?;
    let intermediates = a.intermediates.or(f.intermediates);
    let max_chains_per_node = a.max_chains_per_node.or(f.max_chains_per_node);
    let max_nodes = a.max_nodes.or(f.max_nodes);
    let max_handshakes = a.max_handshakes.or(f.max_handshakes);
    let registrations_per_hour = a.registrations_per_hour.or(f.registrations_per_hour);
    let max_nodes_per_source = a.max_nodes_per_source.or(f.max_nodes_per_source);
    let max_accounts = a.max_accounts.or(f.max_accounts);
    let apply = move |c: &mut HubConfig| {
        if let Some(v) = intermediates {
            c.intermediates = v;
        }
        if let Some(v) = approval_timeout {
            c.approval_timeout = v;
        }
        if let Some(v) = hop_timeout {
            c.hop_timeout = v;
        }
        if let Some(v) = handshake_timeout {
            c.handshake_timeout = v;
        }
        if let Some(v) = max_chains_per_node {
            c.max_chains_per_node = v;
        }
        if let Some(v) = max_nodes {
            c.max_nodes = v.max(1);
        }
        if let Some(v) = max_handshakes {
            c.max_handshakes = v.max(1);
        }
        if let Some(v) = registrations_per_hour {
            c.register_limit = RateLimit::per_hour(v);
        }
        if let Some(v) = max_nodes_per_source {
            c.max_nodes_per_source = v.max(1);
        }
        if let Some(v) = max_accounts {
            c.max_accounts = v.max(1);
        }
        if let Some(v) = evict_unseen_after {
            c.evict_unseen_after = v;
        }
        c.registration_token = token;
    };
    Ok(HubSettings {
        listen: config::pick(a.listen, f.listen, "listen")?.unwrap_or(DEFAULT_HUB_LISTEN),
        admin: config::pick(a.admin, f.admin, "admin")?,
        data_dir: a.data_dir.or(f.data_dir.map(PathBuf::from)),
        apply: Box::new(apply),
    })
}

/// Settings from a config file alone (used to check the examples).
#[cfg(test)]
pub(crate) fn hub_from_file_only(file: HubFile) -> anyhow::Result<()> {
    hub_settings(HubArgs::default(), file).map(|_| ())
}

/// Settings from a config file alone (used to check the examples).
#[cfg(test)]
pub(crate) fn node_from_file_only(file: NodeFile) -> anyhow::Result<()> {
    node_settings(NodeArgs::default(), file).map(|_| ())
}

/// Flags of `tube node`. Each one overrides the config file.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct NodeArgs {
    /// Config file (TOML, see examples/node.toml): the same settings as the flags.
    #[arg(long, env = "TUBE_CONFIG")]
    config: Option<PathBuf>,
    /// The hub, HOST:PORT (required, here or in the file).
    #[arg(long, env = "TUBE_HUB")]
    hub: Option<String>,
    /// The hub certificate's fingerprint, `sha256:<hex>`, as `tube hub` printed it (required,
    /// here or in the file).
    #[arg(long, env = "TUBE_HUB_FINGERPRINT")]
    hub_fingerprint: Option<String>,
    /// This node's account name, 1 to 64 of A-Z a-z 0-9 _ . - (required, here or in the file).
    #[arg(long, env = "TUBE_NODE_NAME")]
    name: Option<String>,
    /// Address for the hub connection, hop listeners and hop dials [default: any].
    #[arg(long)]
    bind: Option<IpAddr>,
    /// The local front API (a loopback address: it has no authentication)
    /// [default: 127.0.0.1:7837].
    #[arg(long, env = "TUBE_NODE_API")]
    api: Option<SocketAddr>,
    /// Data dir: the node's one-time password file.
    #[arg(long, env = "TUBE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Refuse to be an intermediate of other nodes' chains.
    #[arg(long)]
    no_relay: bool,
    /// Build timeout for this node's hops (dials and reads get half of it) [default: 10s].
    #[arg(long, value_parser = crate::parse_duration)]
    hop_timeout: Option<Duration>,
    /// Chains this node takes part in at once [default: 16].
    #[arg(long)]
    max_chains: Option<usize>,
    /// Longest delay between reconnect attempts to the hub [default: 60s].
    #[arg(long, value_parser = crate::parse_duration)]
    reconnect_max: Option<Duration>,
    /// The hub's registration token, for a hub run with --registration-token (sent only to
    /// register, when the node has no password yet).
    #[arg(long, env = "TUBE_REGISTRATION_TOKEN", hide_env_values = true)]
    registration_token: Option<String>,
}

/// `node.toml`: the flags of `tube node` without their dashes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NodeFile {
    hub: Option<String>,
    hub_fingerprint: Option<String>,
    name: Option<String>,
    bind: Option<String>,
    api: Option<String>,
    data_dir: Option<String>,
    no_relay: Option<bool>,
    hop_timeout: Option<String>,
    max_chains: Option<usize>,
    reconnect_max: Option<String>,
    registration_token: Option<String>,
}

/// `tube node`'s settings: flags over the file over the defaults, checked. `apply` sets the
/// optional ones on the node's config.
pub(crate) struct NodeSettings {
    hub: String,
    fingerprint: Fingerprint,
    name: String,
    api: SocketAddr,
    data_dir: Option<PathBuf>,
    apply: Box<dyn FnOnce(&mut NodeConfig) + Send>,
}

fn node_settings(a: NodeArgs, f: NodeFile) -> anyhow::Result<NodeSettings> {
    let needed = |v: Option<String>, flag: &str| {
        v.ok_or_else(|| anyhow::anyhow!("error: --{flag} is needed (a flag or the config file)"))
    };
    let hub = needed(a.hub.or(f.hub), "hub")?;
    let fingerprint = needed(a.hub_fingerprint.or(f.hub_fingerprint), "hub-fingerprint")?
        .parse()
        .context("error: --hub-fingerprint must be sha256:<64 hex digits>")?;
    let name = needed(a.name.or(f.name), "name")?;
    if !tube_chain::accounts::is_valid_name(&name) {
        anyhow::bail!("error: --name must be 1 to 64 of A-Z a-z 0-9 _ . -");
    }
    let api = config::pick(a.api, f.api, "api")?.unwrap_or(crate::chain::DEFAULT_API);
    if !api.ip().is_loopback() {
        anyhow::bail!(
            "error: --api {api} is not a loopback address (the API has no authentication)"
        );
    }
    let bind = config::pick(a.bind, f.bind, "bind")?;
    let no_relay = a.no_relay || f.no_relay.unwrap_or(false);
    let hop_timeout = config::pick_duration(a.hop_timeout, f.hop_timeout, "hop_timeout")?;
    let max_chains = a.max_chains.or(f.max_chains);
    let reconnect_max = config::pick_duration(a.reconnect_max, f.reconnect_max, "reconnect_max")?;
    let token = registration_token(a.registration_token.or(f.registration_token))?;
    let apply = move |c: &mut NodeConfig| {
        if let Some(v) = bind {
            c.bind = v;
        }
        c.relay = !no_relay;
        if let Some(v) = hop_timeout {
            c.hop_timeout = v;
        }
        if let Some(v) = max_chains {
            c.max_chains = v;
        }
        if let Some(v) = reconnect_max {
            c.reconnect.max = v;
        }
        c.registration_token = token;
    };
    Ok(NodeSettings {
        hub,
        fingerprint,
        name,
        api,
        data_dir: a.data_dir.or(f.data_dir.map(PathBuf::from)),
        apply: Box::new(apply),
    })
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

pub(crate) async fn run_hub(mut args: HubArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(HubCommand::Accounts { command, data_dir }) = args.command.take() {
        return accounts(command, data_dir);
    }
    let file = match &args.config {
        Some(p) => config::load::<HubFile>(p)?,
        None => HubFile::default(),
    };
    let settings = hub_settings(args, file)?;
    let dir = crate::data_dir(settings.data_dir)?;
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
    let (listen, admin) = (settings.listen, settings.admin);
    (settings.apply)(&mut config);
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("error: cannot listen on {listen}"))?;
    let admin = match admin {
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
    let file = match &args.config {
        Some(p) => config::load::<NodeFile>(p)?,
        None => NodeFile::default(),
    };
    let s = node_settings(args, file)?;
    let dir = crate::data_dir(s.data_dir)?;
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("error: cannot create the data dir {}", dir.display()))?;
    let mut config = NodeConfig::new(s.hub, s.fingerprint, s.name, dir);
    (s.apply)(&mut config);
    let api_addr = s.api;
    let api = TcpListener::bind(api_addr)
        .await
        .with_context(|| format!("error: cannot listen on {api_addr} (api)"))?;
    say!("listening api {}", api.local_addr()?)?;
    let password = config.password_path();
    tube_chain::node::run(api, config, shutdown)
        .await
        .map_err(|e: NodeError| match e {
            // Refused with a stored password: the account is gone, or the password is void.
            NodeError::Hub { code: 6001, .. } if password.is_file() => anyhow::anyhow!(
                "{e} (if the hub's operator removed this node's account, delete {} to register \
                 the name again)",
                password.display()
            ),
            e => anyhow::anyhow!("{e}"),
        })
}
