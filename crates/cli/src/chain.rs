//! `tube chain ...`: a command-line front end on the node's local API (`docs/protocols/chain.md`
//! section 8), so a person can use a chain without writing code.
//!
//! - `connect ENDPOINT`: one chain, piped to stdin and stdout (like `nc`; an ssh ProxyCommand).
//! - `listen ENDPOINT --local ADDR`: a local port (loopback only); each connection gets its own
//!   chain (`ssh -L`). The node listens and carries the connections itself (`forward_listen`);
//!   this process keeps the listener open and logs. A broken chain resets the user's
//!   connection (and, for `accept`, the service's), never a clean end of stream.
//! - `accept --forward ADDR [--allow NAME]...`: the endpoint side; approves requests (the allow
//!   list, or a yes/no prompt on a terminal) with `forward`, so the node connects accepted
//!   chains to the service itself.
//! - `list`, `close ID`.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tube_chain::front::FrontClient;
use tube_proto::chain::{ChainErrorCode, FrontMessage};

use crate::stdout::say;

/// The node API address `tube node` uses by default.
pub(crate) const DEFAULT_API: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7837);

/// How long the node may take to connect to a port we listen on for it.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `tube chain`.
#[derive(Debug, clap::Args)]
pub(crate) struct ChainArgs {
    /// The node's local API.
    #[arg(long, global = true, default_value_t = DEFAULT_API, env = "TUBE_NODE_API")]
    api: SocketAddr,
    #[command(subcommand)]
    command: ChainCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ChainCommand {
    /// Open a chain to ENDPOINT and pipe it to stdin/stdout.
    Connect {
        /// The endpoint node's name.
        endpoint: String,
    },
    /// Listen on a local port; every connection gets a new chain to ENDPOINT.
    Listen {
        /// The endpoint node's name.
        endpoint: String,
        /// Local address to listen on.
        #[arg(long)]
        local: SocketAddr,
    },
    /// Accept chains to this node and connect them to a local service.
    Accept {
        /// The local service (host:port).
        #[arg(long)]
        forward: String,
        /// Requesting node allowed without asking (repeatable). Without any, ask on the
        /// terminal, or refuse when there is none.
        #[arg(long)]
        allow: Vec<String>,
        /// Ask on standard input (one y/N answer per line) for every request not allowed by
        /// `--allow`, even when standard input is not a terminal.
        #[arg(long)]
        ask: bool,
    },
    /// List this node's chains.
    List,
    /// Close a chain.
    Close {
        /// The chain's tunnel id, as `tube chain list` shows it.
        id: String,
    },
}

pub(crate) async fn run(args: ChainArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    match args.command {
        ChainCommand::Connect { endpoint } => connect_stdio(args.api, &endpoint, shutdown).await,
        ChainCommand::Listen { endpoint, local } => {
            listen(args.api, &endpoint, local, shutdown).await
        }
        ChainCommand::Accept {
            forward,
            allow,
            ask,
        } => accept(args.api, &forward, allow, ask, shutdown).await,
        ChainCommand::List => list(args.api).await,
        ChainCommand::Close { id } => close(args.api, id).await,
    }
}

/// One connection to the node's API, with the CLI's error texts.
struct Front(FrontClient);

impl Front {
    async fn connect(api: SocketAddr) -> anyhow::Result<Self> {
        FrontClient::connect(api).await.map(Front).with_context(|| {
            format!("error: cannot reach the node API at {api} (is `tube node` running?)")
        })
    }

    async fn send(&mut self, m: &FrontMessage) -> anyhow::Result<()> {
        self.0
            .send(m)
            .await
            .context("error: node API connection lost")
    }

    /// The next message from the node; an error when the node closes the connection.
    async fn recv(&mut self) -> anyhow::Result<FrontMessage> {
        self.0
            .recv()
            .await
            .map_err(|e| anyhow::anyhow!("error: {e}"))
    }
}

fn refusal(code: Option<u16>, reason: &str) -> anyhow::Error {
    match code {
        Some(c) => anyhow::anyhow!("error {}: {reason}", ChainErrorCode::describe(c)),
        None => anyhow::anyhow!("error: {reason}"),
    }
}

/// Requests a chain to `endpoint`; returns the API connection (which owns the chain: keep it
/// open) and the chain's near end.
async fn open_chain(api: SocketAddr, endpoint: &str) -> anyhow::Result<(Front, TcpStream, String)> {
    let mut f = Front::connect(api).await?;
    let local_id = random_id();
    f.send(&FrontMessage::RequestTube {
        endpoint_name: endpoint.into(),
        local_id: local_id.clone(),
    })
    .await?;
    // The node asks us to listen (seed 000, section 2: the front listens, node 0 connects).
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("error: cannot listen on 127.0.0.1")?;
    let mut near: Option<TcpStream> = None;
    loop {
        match f.recv().await? {
            FrontMessage::TubeResult {
                is_allowed: false,
                reason,
                code,
                ..
            } => return Err(refusal(code, &reason)),
            FrontMessage::TubeResult {
                tunnel_id,
                hops,
                reason,
                ..
            } => {
                let intermediates = hops.map(|h| h.saturating_sub(1));
                if reason.is_empty() {
                    tracing::info!(?tunnel_id, ?intermediates, %endpoint, "chain accepted, building");
                } else {
                    // The hub found fewer relaying nodes than it wanted: say so.
                    tracing::warn!(?tunnel_id, ?intermediates, %endpoint, "{reason}");
                }
            }
            FrontMessage::Listen { tunnel_id } => {
                let port = listener.local_addr()?.port();
                f.send(&FrontMessage::Listening { tunnel_id, port }).await?;
                let (s, _) = tokio::time::timeout(NODE_CONNECT_TIMEOUT, listener.accept())
                    .await
                    .context("error: the node did not connect to the chain's near end")??;
                let _ = s.set_nodelay(true);
                near = Some(s);
            }
            FrontMessage::Established { tunnel_id, .. } => {
                let s = near
                    .take()
                    .context("error: chain established before the node connected")?;
                return Ok((f, s, tunnel_id));
            }
            FrontMessage::Closed { reason, code, .. } => return Err(refusal(code, &reason)),
            FrontMessage::Error { code, message } => return Err(refusal(Some(code), &message)),
            _ => {}
        }
    }
}

async fn connect_stdio(
    api: SocketAddr,
    endpoint: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (mut f, chain, tunnel_id) = open_chain(api, endpoint).await?;
    tracing::info!(%tunnel_id, %endpoint, "chain established");
    let (mut rd, mut wr) = chain.into_split();
    let up = async {
        let mut stdin = tokio::io::stdin();
        let _ = tokio::io::copy(&mut stdin, &mut wr).await;
        let _ = wr.shutdown().await;
        // Keep waiting for the other direction.
        std::future::pending::<()>().await;
    };
    let down = async {
        let mut stdout = tokio::io::stdout();
        let r = tokio::io::copy(&mut rd, &mut stdout).await;
        let _ = stdout.flush().await;
        r
    };
    tokio::pin!(up, down);
    // The node's `closed` can arrive before the last bytes: the chain's end of stream decides,
    // and `closed` only explains a chain that broke.
    let mut closed: Option<anyhow::Error> = None;
    loop {
        tokio::select! {
            r = &mut down => {
                return match r {
                    Ok(_) => Ok(()),
                    Err(e) => Err(closed.unwrap_or_else(|| {
                        anyhow::anyhow!("error: chain connection failed: {e}")
                    })),
                };
            }
            _ = &mut up => {}
            m = f.recv(), if closed.is_none() => match m {
                Ok(FrontMessage::Closed { reason, code, .. }) => closed = Some(refusal(code, &reason)),
                Ok(_) => {}
                Err(e) => closed = Some(e),
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// `listen`: the node itself listens on `local` (`forward_listen`) and carries every
/// connection there as node 0's near end, so the bytes pass through no process but the nodes';
/// this process holds the API connection that keeps the listener open and logs each chain.
async fn listen(
    api: SocketAddr,
    endpoint: &str,
    local: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if !local.ip().is_loopback() {
        anyhow::bail!(
            "error: --local {local} is not a loopback address (whoever reaches it gets chains as \
             this node's user, with no authentication)"
        );
    }
    let mut f = Front::connect(api).await?;
    f.send(&FrontMessage::ForwardListen {
        endpoint_name: endpoint.into(),
        local: local.to_string(),
    })
    .await?;
    loop {
        match f.recv().await? {
            FrontMessage::ForwardListening { local, .. } => {
                say!("listening local {local}")?;
                break;
            }
            FrontMessage::Error { code, message } => return Err(refusal(Some(code), &message)),
            _ => {}
        }
    }
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = f.recv() => m?,
        };
        match msg {
            FrontMessage::TubeResult {
                is_allowed: false,
                reason,
                code,
                ..
            } => {
                let why = refusal(code, &reason);
                tracing::warn!(%endpoint, error = %why, "no chain for a connection");
            }
            FrontMessage::TubeResult {
                tunnel_id,
                hops,
                reason,
                ..
            } if !reason.is_empty() => {
                // The hub found fewer relaying nodes than it wanted: say so.
                let intermediates = hops.map(|h| h.saturating_sub(1));
                tracing::warn!(?tunnel_id, ?intermediates, %endpoint, "{reason}");
            }
            FrontMessage::Established { tunnel_id, .. } => {
                tracing::info!(%tunnel_id, %endpoint, "chain established");
            }
            FrontMessage::Closed {
                tunnel_id, reason, ..
            } => tracing::info!(%tunnel_id, %reason, "chain closed"),
            FrontMessage::Error { code, message } => {
                tracing::warn!(error = %refusal(Some(code), &message), "node API error");
            }
            _ => {}
        }
    }
}

/// `accept`: approves chains (the allow list, or a question on the terminal) with `forward`,
/// so the endpoint node connects each accepted chain to the service itself.
async fn accept(
    api: SocketAddr,
    forward: &str,
    allow: Vec<String>,
    ask: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut f = Front::connect(api).await?;
    f.send(&FrontMessage::Subscribe {}).await?;
    // The node answers a subscription with its chains: from then on requests reach us.
    loop {
        match f.recv().await? {
            FrontMessage::Tubes { .. } => break,
            FrontMessage::Error { code, message } => return Err(refusal(Some(code), &message)),
            _ => {}
        }
    }
    tracing::info!(%api, %forward, "accepting chains");
    let allow: HashSet<String> = allow.into_iter().collect();
    let interactive = ask || (allow.is_empty() && std::io::stdin().is_terminal());
    let mut approved: HashSet<String> = HashSet::new();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = f.recv() => m?,
        };
        match msg {
            FrontMessage::ConnectionRequest {
                tunnel_id,
                request_user,
            } => {
                let yes = if allow.contains(&request_user) {
                    true
                } else if interactive {
                    eprintln!("allow a chain from {request_user}? [y/N]");
                    matches!(stdin.next_line().await, Ok(Some(a)) if a.trim().eq_ignore_ascii_case("y"))
                } else {
                    false
                };
                let reason = if yes {
                    String::new()
                } else {
                    format!("{request_user} is not allowed")
                };
                tracing::info!(%tunnel_id, %request_user, allowed = yes, "connection request");
                if yes {
                    approved.insert(tunnel_id.clone());
                }
                f.send(&FrontMessage::Approve {
                    tunnel_id,
                    is_allowed: yes,
                    reason,
                    forward: yes.then(|| forward.to_string()),
                })
                .await?;
            }
            FrontMessage::Established { tunnel_id, .. } if approved.remove(&tunnel_id) => {
                say!("chain {tunnel_id} {forward}")?;
            }
            FrontMessage::Closed {
                tunnel_id, reason, ..
            } => {
                approved.remove(&tunnel_id);
                tracing::info!(%tunnel_id, %reason, "chain closed");
            }
            _ => {}
        }
    }
}

async fn list(api: SocketAddr) -> anyhow::Result<()> {
    let mut f = Front::connect(api).await?;
    f.send(&FrontMessage::List {}).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), f.recv())
            .await
            .context("error: the node did not answer")??
        {
            FrontMessage::Tubes { items } => {
                for t in items {
                    let role = serde_json::to_value(t.role)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    let state = serde_json::to_value(t.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    say!(
                        "{} {role} {state} {} {}",
                        t.tunnel_id,
                        t.peer.as_deref().unwrap_or("-"),
                        t.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
                    )?;
                }
                return Ok(());
            }
            FrontMessage::Error { code, message } => return Err(refusal(Some(code), &message)),
            _ => {}
        }
    }
}

async fn close(api: SocketAddr, id: String) -> anyhow::Result<()> {
    let mut f = Front::connect(api).await?;
    // `closed` goes to a chain's owner and to subscribers: subscribe first to hear it.
    f.send(&FrontMessage::Subscribe {}).await?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), f.recv())
            .await
            .context("error: the node did not answer")??;
        if let FrontMessage::Tubes { .. } = m {
            break;
        }
    }
    f.send(&FrontMessage::RequestCloseTube {
        local_id: None,
        tunnel_id: Some(id.clone()),
    })
    .await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), f.recv())
            .await
            .context("error: the node did not answer")??
        {
            FrontMessage::Closed { tunnel_id, .. } if tunnel_id == id => return Ok(()),
            FrontMessage::Error { code, message } => return Err(refusal(Some(code), &message)),
            _ => {}
        }
    }
}

fn random_id() -> String {
    let mut b = [0u8; 8];
    // Only needs to be unique among this node's open chains; zeros are still a valid id.
    let _ = getrandom::fill(&mut b);
    format!("cli-{}", hex::encode(b))
}
