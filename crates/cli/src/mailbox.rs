//! `tube peer` and `tube msg ...`: the mailbox service and its client (seed 003). The logic
//! lives in `tube-mailbox`; this file merges the peer's flags over its config file (`--config`,
//! see examples/peer.toml), keeps the client's data dir (identity, contacts, the last peer
//! used) and prints the contract lines.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;
use tube_mailbox::client::{self, Address, ClientConfig, Inbox, Opened, PeerAddr, Received};
use tube_mailbox::contacts::Contacts;
use tube_mailbox::crypto::Identity;
use tube_mailbox::peer::{Peer, PeerConfig};
use tube_proto::mailbox::MailboxError;

use crate::config;
use crate::stdout::{StdoutError, say};

/// The peer's default address.
const DEFAULT_PEER_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 7839);

/// The file in a client's data dir that remembers its own peer.
const PEER_FILE: &str = "mailbox-peer";

/// Flags of `tube peer`. Each one overrides the config file.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct PeerArgs {
    /// Config file (TOML, see examples/peer.toml): the same settings as the flags.
    #[arg(long, env = "TUBE_CONFIG")]
    config: Option<PathBuf>,
    /// Address clients connect to [default: 0.0.0.0:7839].
    #[arg(long, env = "TUBE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Serve TLS 1.3 with a certificate from the data dir (created on first start); clients
    /// then put the printed fingerprint in the peer address (`host:port/<fingerprint>`).
    #[arg(long)]
    tls: bool,
    /// HTTP address serving the backend contract of `tube longpoll` (its --backend URL), so
    /// that clients limited to HTTP reach this peer through the proxy (`tube msg --via`).
    #[arg(long, env = "TUBE_HTTP")]
    http: Option<SocketAddr>,
    /// How long the HTTP backend holds an empty fetch open waiting for a message; keep it under
    /// the proxy's --backend-timeout (60 s by default) [default: 20s].
    #[arg(long, value_parser = crate::parse_duration)]
    http_hold: Option<Duration>,
    /// Admin HTTP address: /healthz, /metrics (counts only).
    #[arg(long, env = "TUBE_ADMIN")]
    admin: Option<SocketAddr>,
    /// Data dir for the TLS certificate (nothing else is ever written).
    #[arg(long, env = "TUBE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Messages queued per recipient at most [default: 1000].
    #[arg(long)]
    max_queue_messages: Option<usize>,
    /// Bytes queued per recipient at most [default: 8388608].
    #[arg(long)]
    max_queue_bytes: Option<usize>,
    /// Bytes queued for all recipients together at most [default: 268435456].
    #[arg(long)]
    max_total_bytes: Option<usize>,
    /// Clients registered at once; at the limit a new one takes the place of the one idle
    /// longest, if idle 10 minutes, else 7007 [default: 100000].
    #[arg(long)]
    max_clients: Option<usize>,
    /// Connections open at once (TCP); more are closed when accepted [default: 10000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Age after which an unfetched message is dropped [default: 7d].
    #[arg(long, value_parser = crate::parse_duration)]
    max_age: Option<Duration>,
    /// A connection silent this long is closed [default: 5m].
    #[arg(long, value_parser = crate::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Registrations per minute, per source address and per fingerprint [default: 30].
    #[arg(long)]
    registrations_per_minute: Option<u32>,
    /// Deliveries per minute, per source address and per recipient [default: 600].
    #[arg(long)]
    deliveries_per_minute: Option<u32>,
}

/// `peer.toml`: the flags of `tube peer` without their dashes.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PeerFile {
    listen: Option<String>,
    tls: Option<bool>,
    http: Option<String>,
    http_hold: Option<String>,
    admin: Option<String>,
    data_dir: Option<String>,
    max_queue_messages: Option<usize>,
    max_queue_bytes: Option<usize>,
    max_total_bytes: Option<usize>,
    max_clients: Option<usize>,
    max_connections: Option<usize>,
    max_age: Option<String>,
    idle_timeout: Option<String>,
    registrations_per_minute: Option<u32>,
    deliveries_per_minute: Option<u32>,
}

/// `tube peer`'s settings: flags over the file over the defaults, checked.
pub(crate) struct PeerSettings {
    listen: SocketAddr,
    tls: bool,
    http: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    /// Everything but the TLS identity, which `run_peer` loads.
    config: PeerConfig,
}

fn peer_settings(a: PeerArgs, f: PeerFile) -> anyhow::Result<PeerSettings> {
    use tube_proto::ratelimit::RateLimit;
    let d = PeerConfig::default();
    let http_hold =
        config::pick_duration(a.http_hold, f.http_hold, "http_hold")?.unwrap_or(d.http_hold);
    if http_hold.is_zero() || http_hold >= Duration::from_secs(60) {
        anyhow::bail!(
            "error: --http-hold must be between 0 and 60 s (the proxy's backend timeout)"
        );
    }
    let per_minute = |flag: Option<u32>, file: Option<u32>, default: RateLimit| {
        flag.or(file).map(RateLimit::per_minute).unwrap_or(default)
    };
    let config = PeerConfig {
        max_queue_messages: a
            .max_queue_messages
            .or(f.max_queue_messages)
            .unwrap_or(d.max_queue_messages),
        max_queue_bytes: a
            .max_queue_bytes
            .or(f.max_queue_bytes)
            .unwrap_or(d.max_queue_bytes),
        max_total_bytes: a
            .max_total_bytes
            .or(f.max_total_bytes)
            .unwrap_or(d.max_total_bytes),
        max_clients: a
            .max_clients
            .or(f.max_clients)
            .unwrap_or(d.max_clients)
            .max(1),
        max_connections: a
            .max_connections
            .or(f.max_connections)
            .unwrap_or(d.max_connections)
            .max(1),
        max_age: config::pick_duration(a.max_age, f.max_age, "max_age")?.unwrap_or(d.max_age),
        idle_timeout: config::pick_duration(a.idle_timeout, f.idle_timeout, "idle_timeout")?
            .unwrap_or(d.idle_timeout),
        register_limit: per_minute(
            a.registrations_per_minute,
            f.registrations_per_minute,
            d.register_limit,
        ),
        deliver_limit: per_minute(
            a.deliveries_per_minute,
            f.deliveries_per_minute,
            d.deliver_limit,
        ),
        http_hold,
        ..d
    };
    Ok(PeerSettings {
        listen: config::pick(a.listen, f.listen, "listen")?.unwrap_or(DEFAULT_PEER_LISTEN),
        tls: a.tls || f.tls.unwrap_or(false),
        http: config::pick(a.http, f.http, "http")?,
        admin: config::pick(a.admin, f.admin, "admin")?,
        data_dir: a.data_dir.or(f.data_dir.map(PathBuf::from)),
        config,
    })
}

/// Settings from a config file alone (used to check the examples).
#[cfg(test)]
pub(crate) fn peer_from_file_only(file: PeerFile) -> anyhow::Result<()> {
    peer_settings(PeerArgs::default(), file).map(|_| ())
}

/// `tube msg`.
#[derive(Debug, clap::Args)]
pub(crate) struct MsgArgs {
    /// Data dir: the identity, contacts and the last peer used.
    #[arg(long, global = true, env = "TUBE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Deadline for each answer from a peer.
    #[arg(long, global = true, value_parser = crate::parse_duration, default_value = "5s")]
    timeout: Duration,
    /// Reach this client's own peer through the long-poll proxy at URL (`http://host:port`,
    /// a `tube longpoll` whose backend is the peer's --http) instead of TCP: listen, fetch,
    /// and send to clients of the same peer. --peer still names the peer, for the address.
    #[arg(long, global = true, env = "TUBE_VIA", value_name = "URL")]
    via: Option<String>,
    /// Limit of one HTTP request to the proxy with --via, held ones included; keep it above
    /// the proxy's --poll-timeout (25 s by default).
    #[arg(long, global = true, value_parser = crate::parse_duration, default_value = "30s")]
    via_timeout: Duration,
    #[command(subcommand)]
    command: MsgCommand,
}

#[derive(Debug, clap::Subcommand)]
enum MsgCommand {
    /// Create this client's identity (an Ed25519 key and a self-signed certificate).
    Init,
    /// Print this client's address for others: `<fingerprint>@<peer>`.
    Id {
        /// This client's peer, `host:port` or `host:port/<peer fingerprint>` for TLS.
        #[arg(long)]
        peer: String,
    },
    /// Register with the peer, print queued and pushed messages, acknowledge them.
    Listen {
        /// This client's peer.
        #[arg(long)]
        peer: String,
        /// One JSON object per message.
        #[arg(long)]
        json: bool,
        /// Keepalive interval.
        #[arg(long, value_parser = crate::parse_duration, default_value = "2m")]
        keepalive: Duration,
    },
    /// Print the queued messages, acknowledge them, exit.
    Fetch {
        /// This client's peer.
        #[arg(long)]
        peer: String,
        /// One JSON object per message.
        #[arg(long)]
        json: bool,
    },
    /// Send a message (TEXT, or standard input) to ADDRESS; exits 0 once its peer stored it.
    Send {
        /// The recipient's address.
        #[arg(long)]
        to: String,
        /// This client's own peer, for replies [default: the last one used].
        #[arg(long)]
        peer: Option<String>,
        /// The text; read from standard input when absent.
        text: Option<String>,
    },
    /// Show the 6-digit verification code with a correspondent.
    Code {
        /// The correspondent's address (or fingerprint).
        #[arg(long)]
        with: String,
    },
    /// List known correspondents.
    Contacts,
}

pub(crate) async fn run_peer(args: PeerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(p) => config::load::<PeerFile>(p)?,
        None => PeerFile::default(),
    };
    let PeerSettings {
        listen,
        tls,
        http,
        admin,
        data_dir,
        mut config,
    } = peer_settings(args, file)?;
    if tls {
        let dir = crate::data_dir(data_dir)?;
        let (identity, _) =
            tube_net::Identity::load_or_create(&dir, "peer").with_context(|| {
                format!("error: loading the peer certificate from {}", dir.display())
            })?;
        config.tls = Some(identity);
    }
    let fingerprint = config.tls.as_ref().map(|i| i.fingerprint());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("error: cannot listen on {listen}"))?;
    let http = match http {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("error: cannot listen on {a} (http)"))?,
        ),
        None => None,
    };
    let admin = match admin {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("error: cannot listen on {a} (admin)"))?,
        ),
        None => None,
    };
    say!("listening peer {}", listener.local_addr()?)?;
    if let Some(h) = &http {
        say!("listening http {}", h.local_addr()?)?;
    }
    if let Some(a) = &admin {
        say!("listening admin {}", a.local_addr()?)?;
    }
    if let Some(fp) = fingerprint {
        say!("fingerprint {fp}")?;
    }
    let peer = Peer::new(config);
    let admin_task = admin.map(|l| {
        tokio::spawn(tube_mailbox::admin::serve(
            l,
            peer.state(),
            shutdown.clone(),
        ))
    });
    let http_task =
        http.map(|l| tokio::spawn(tube_mailbox::http::serve(l, peer.state(), shutdown.clone())));
    peer.run(listener, shutdown).await?;
    for t in [admin_task, http_task].into_iter().flatten() {
        let _ = t.await;
    }
    Ok(())
}

fn identity(dir: &Path) -> anyhow::Result<Identity> {
    if !dir.join(tube_mailbox::crypto::KEY_FILE).exists() {
        anyhow::bail!(
            "error: no identity in {} (run `tube msg init --data-dir {}` first)",
            dir.display(),
            dir.display()
        );
    }
    let (id, _) = Identity::load_or_create(dir)
        .with_context(|| format!("error: loading the identity from {}", dir.display()))?;
    Ok(id)
}

fn peer_addr(s: &str) -> anyhow::Result<PeerAddr> {
    s.parse().map_err(|e| anyhow::anyhow!("error: --peer: {e}"))
}

/// Remembers our peer for `send` (client side; the peer itself writes nothing).
fn remember_peer(dir: &Path, peer: &PeerAddr) -> anyhow::Result<()> {
    tube_net::files::write_private_atomic(&dir.join(PEER_FILE), peer.to_string().as_bytes())
        .with_context(|| format!("error: writing {}", dir.join(PEER_FILE).display()))
}

/// Prints one message and flushes it; an error means it was not shown (fatal for `listen`,
/// which would otherwise take messages off the queue that nobody can see).
fn print(m: &Received, json: bool) -> Result<(), StdoutError> {
    let line = if json {
        serde_json::to_string(m).map_err(|e| StdoutError(e.into()))?
    } else {
        // One line per message, and nothing a sender could use to drive the terminal:
        // newlines and every other control character (escape sequences) become spaces.
        let text: String = m
            .text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        format!("{} {text}", m.from)
    };
    say!("{line}")
}

pub(crate) async fn run_msg(args: MsgArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dir = crate::data_dir(args.data_dir)?;
    if let Some(url) = &args.via
        && !url.starts_with("http://")
    {
        anyhow::bail!("error: --via: expected an http:// URL, got {url:?}");
    }
    let cfg = ClientConfig {
        timeout: args.timeout,
        via: args.via,
        via_timeout: args.via_timeout,
        ..ClientConfig::default()
    };
    match args.command {
        MsgCommand::Init => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("error: cannot create {}", dir.display()))?;
            let (id, created) = Identity::load_or_create(&dir)
                .with_context(|| format!("error: creating the identity in {}", dir.display()))?;
            if !created {
                eprintln!("identity already exists in {}", dir.display());
            }
            say!("fingerprint {}", hex::encode(id.fingerprint()))?;
            Ok(())
        }
        MsgCommand::Id { peer } => {
            let id = identity(&dir)?;
            let peer = peer_addr(&peer)?;
            remember_peer(&dir, &peer)?;
            let address = Address {
                client: id.fingerprint(),
                peer,
            };
            say!("{address}")?;
            Ok(())
        }
        MsgCommand::Fetch { peer, json } => {
            let id = identity(&dir)?;
            let peer = peer_addr(&peer)?;
            remember_peer(&dir, &peer)?;
            let mut contacts = Contacts::load(&dir)?;
            let mut inbox = Inbox::open(&peer, &id, cfg).await?;
            inbox.fetch().await?;
            while let Some((seq, received_ms, blob)) = inbox.next().await? {
                handle(&id, &mut contacts, received_ms, &blob, json)?;
                inbox.ack(seq).await?;
            }
            inbox.close().await;
            Ok(())
        }
        MsgCommand::Listen {
            peer,
            json,
            keepalive,
        } => {
            let id = identity(&dir)?;
            let peer = peer_addr(&peer)?;
            remember_peer(&dir, &peer)?;
            let mut contacts = Contacts::load(&dir)?;
            let cfg = ClientConfig { keepalive, ..cfg };
            listen(&peer, &id, &mut contacts, cfg, json, shutdown).await
        }
        MsgCommand::Send { to, peer, text } => {
            let id = identity(&dir)?;
            let own = match peer {
                Some(p) => peer_addr(&p)?,
                None => {
                    let saved = std::fs::read_to_string(dir.join(PEER_FILE)).map_err(|_| {
                        anyhow::anyhow!("error: pass --peer (this client's own peer, for replies)")
                    })?;
                    peer_addr(saved.trim())?
                }
            };
            let to: Address = to
                .parse()
                .map_err(|e| anyhow::anyhow!("error: --to: {e}"))?;
            let text = match text {
                Some(t) => t,
                None => {
                    let mut s = String::new();
                    tokio::io::stdin()
                        .take(64 * 1024 + 1)
                        .read_to_string(&mut s)
                        .await
                        .context("error: reading the message from standard input")?;
                    s.trim_end_matches('\n').to_owned()
                }
            };
            let me = Address {
                client: id.fingerprint(),
                peer: own,
            };
            let mut contacts = Contacts::load(&dir)?;
            client::send(&id, &me, &mut contacts, &to, &text, &cfg).await?;
            Ok(())
        }
        MsgCommand::Code { with } => {
            let id = identity(&dir)?;
            let contacts = Contacts::load(&dir)?;
            let fp = with.split('@').next().unwrap_or_default();
            let fp: [u8; 32] = hex::decode(fp)
                .ok()
                .and_then(|v| v.try_into().ok())
                .context("error: --with: expected an address or a fingerprint")?;
            let Some(contact) = contacts.get(&fp) else {
                anyhow::bail!("error: not a contact yet: send or receive a message first");
            };
            if contact.tampered {
                anyhow::bail!("error: the code exchange with this contact was tampered with");
            }
            match contacts.code(&id.fingerprint(), &fp) {
                Some(code) => {
                    say!("{code}")?;
                    Ok(())
                }
                None => anyhow::bail!(
                    "error: no code yet: it needs one message each way (then one more from whoever wrote first)"
                ),
            }
        }
        MsgCommand::Contacts => {
            let id = identity(&dir)?;
            let contacts = Contacts::load(&dir)?;
            for (fp, c) in contacts.iter() {
                let code = hex::decode(fp)
                    .ok()
                    .and_then(|v| <[u8; 32]>::try_from(v).ok())
                    .and_then(|fp| contacts.code(&id.fingerprint(), &fp))
                    .unwrap_or_else(|| "------".into());
                say!("{} {code}", c.address)?;
            }
            Ok(())
        }
    }
}

/// Opens one message and prints it; replays and forgeries are reported on stderr only.
fn handle(
    id: &Identity,
    contacts: &mut Contacts,
    received_ms: u64,
    blob: &[u8],
    json: bool,
) -> anyhow::Result<()> {
    match client::open(id, contacts, received_ms, blob)? {
        // Shown first, recorded as seen after: never marked seen without being shown.
        Opened::New(m) => {
            print(&m.message, json)?;
            m.record(contacts)?;
        }
        Opened::Replay => tracing::warn!("a message was received twice (replay), dropped"),
        Opened::Invalid(why) => tracing::warn!(reason = %why, "an invalid message was dropped"),
    }
    Ok(())
}

/// One registered session of `listen`; returns only with an error.
async fn listen_once(
    peer: &PeerAddr,
    id: &Identity,
    contacts: &mut Contacts,
    cfg: &ClientConfig,
    json: bool,
) -> anyhow::Result<()> {
    let mut inbox = Inbox::open(peer, id, cfg.clone()).await?;
    tracing::info!(peer = %peer, "registered, listening");
    inbox.fetch().await?;
    loop {
        if let Some((seq, received_ms, blob)) = inbox.next().await? {
            handle(id, contacts, received_ms, &blob, json)?;
            inbox.ack(seq).await?;
        }
    }
}

/// Registers, prints the backlog and pushes, acknowledging each; on a lost connection it
/// registers again with backoff (1 s doubling to 30 s).
async fn listen(
    peer: &PeerAddr,
    id: &Identity,
    contacts: &mut Contacts,
    cfg: ClientConfig,
    json: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut delay = Duration::from_secs(1);
    loop {
        let r = tokio::select! {
            r = listen_once(peer, id, contacts, &cfg, json) => r,
            _ = shutdown.cancelled() => return Ok(()),
        };
        if let Err(e) = r {
            if e.is::<StdoutError>() {
                return Err(e);
            }
            // A refusal is final unless it is about load (rate limit, busy, restarting).
            if let Some(client::ClientError::Refused { code, .. }) = e.downcast_ref()
                && ![
                    MailboxError::RateLimited,
                    MailboxError::Busy,
                    MailboxError::ShuttingDown,
                ]
                .iter()
                .any(|m| *m as u16 == *code)
            {
                return Err(e);
            }
            tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "peer connection lost");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
