//! `tube expose`: the agent.

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tube_agent::{AgentConfig, AgentEvent, TunnelSpec};
use tube_net::Fingerprint;

/// Flags of `tube expose`.
#[derive(Debug, clap::Args)]
pub(crate) struct ExposeArgs {
    /// Local services to expose (host:port), one tunnel each.
    #[arg(required = true)]
    local: Vec<String>,
    /// The relay's control address (host:port).
    #[arg(long, env = "TUBE_RELAY")]
    relay: String,
    /// JWT from `tube token` (prefer the TUBE_TOKEN variable over the command line).
    #[arg(long, env = "TUBE_TOKEN", hide_env_values = true)]
    token: String,
    /// The relay certificate's fingerprint, sha256:<hex>, as `tube relay` printed it.
    #[arg(long, env = "TUBE_FINGERPRINT")]
    fingerprint: String,
    /// Public port to ask for; repeat once per local address, in order.
    #[arg(long)]
    remote_port: Vec<u16>,
}

pub(crate) async fn run(args: ExposeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let fingerprint: Fingerprint = args
        .fingerprint
        .parse()
        .context("error: --fingerprint must be sha256:<64 hex digits>")?;
    if args.remote_port.len() > args.local.len() {
        anyhow::bail!("error: more --remote-port values than local addresses");
    }
    let tunnels = args
        .local
        .iter()
        .enumerate()
        .map(|(i, local)| TunnelSpec {
            local: local.clone(),
            remote_port: args.remote_port.get(i).copied(),
            name: local.clone(),
        })
        .collect();
    let config = AgentConfig::new(args.relay, args.token, fingerprint, tunnels);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let printer = tokio::spawn(async move {
        while let Some(AgentEvent::TunnelUp { public, local, .. }) = rx.recv().await {
            println!("tunnel {public} {local}");
        }
    });
    let result = tube_agent::run(config, tx, shutdown).await;
    let _ = printer.await;
    result.map_err(|e| match e {
        tube_agent::AgentError::Relay { .. } => anyhow::anyhow!("{e}"),
        other => anyhow::anyhow!("error: {other}"),
    })
}
