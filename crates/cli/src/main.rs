//! `tube`: the one binary. Parses the command line, sets up logging and signals, resolves the
//! data dir, and runs one service. Every service lives in its own library crate; this crate
//! only wires them to the outside world (stdout contract lines, stderr logs, exit codes).

mod chain;
mod config;
mod expose;
mod hub;
mod logging;
mod longpoll;
mod mailbox;
mod relay;
mod stdout;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// tube carries traffic between parties that cannot reach each other directly.
#[derive(Debug, Parser)]
#[command(name = "tube", version, about, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "TUBE_LOG_FORMAT"
    )]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a relay: agents connect here and get public ports for their local services.
    Relay(relay::RelayArgs),
    /// Mint a JWT for an agent, signed with the relay's secret.
    Token(relay::TokenArgs),
    /// Expose local services through a relay (the agent).
    Expose(expose::ExposeArgs),
    /// Run a chain hub: nodes log in here and it builds chains through them.
    Hub(hub::HubArgs),
    /// Run a chain node: the per-user daemon with its local front API.
    Node(hub::NodeArgs),
    /// Run a mailbox peer: keeps messages for its clients in RAM and pushes them.
    Peer(mailbox::PeerArgs),
    /// The mailbox client: init, id, listen, fetch, send, code, contacts.
    Msg(mailbox::MsgArgs),
    /// Use a chain through a node's local API: connect, listen, accept, list, close.
    Chain(chain::ChainArgs),
    /// Run the HTTP long-poll proxy: clients that only speak HTTP reach packet backends.
    Longpoll(longpoll::LongpollArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    // Two rustls providers are compiled in (tls::provider takes its AEAD from ring): make
    // tube's the process default, so nothing that builds a rustls config without naming a
    // provider can panic at run time for lack of one. Ours always name it.
    let _ = (*tube_net::tls::provider()).clone().install_default();
    // Servers run on tokio's multi-threaded runtime: their connections spread over the cores.
    // Client commands (the agent, `msg`) hold one connection whose frames one task reads and
    // whose writes take one lock, so a second thread would only add the scheduler's
    // cross-thread bookkeeping to every wake-up: they run on this thread alone. So does the
    // relay's own loop (accepting agents, the admin API): the agents' connections it accepts
    // are served on its `--threads`, one single-threaded runtime each (tube_net::shards).
    let built = match cli.command {
        // The relay's own blocking work (removing expired leases, joining its shards) is one
        // call at a time, yet tokio's pool starts a new thread whenever a call comes before the
        // last one's thread has gone idle: bound it as its shards do.
        Command::Relay(_) => tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(tube_net::shards::BLOCKING_THREADS)
            .enable_all()
            .build(),
        // The agent's runtime has no time driver: its timers are on tube_net::timer's clock
        // thread (the driver's work on every park was an eighth of a round trip's
        // instructions). It keeps tokio's default blocking pool: it resolves a local
        // service's host name (`localhost:3000`) there for every user connection, and a slow
        // resolver must not hold the others back.
        Command::Expose(_) => tube_net::timer::borrow_clock().and_then(|()| {
            tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
        }),
        Command::Msg(_) | Command::Token(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Command::Hub(_)
        | Command::Node(_)
        | Command::Peer(_)
        | Command::Chain(_)
        | Command::Longpoll(_) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone());
        // The command runs as a task: on the multi-threaded runtime that puts it on the
        // workers, not on this thread, so a loop the workers wake and the tasks it spawns cost
        // no wake-up of another thread.
        let command = tokio::spawn(async move {
            match cli.command {
                Command::Relay(args) => relay::run(args, shutdown).await,
                Command::Token(args) => relay::token(args),
                Command::Expose(args) => expose::run(args, shutdown).await,
                Command::Hub(args) => hub::run_hub(args, shutdown).await,
                Command::Node(args) => hub::run_node(args, shutdown).await,
                Command::Peer(args) => mailbox::run_peer(args, shutdown).await,
                Command::Msg(args) => mailbox::run_msg(args, shutdown).await,
                Command::Chain(args) => chain::run(args, shutdown).await,
                Command::Longpoll(args) => longpoll::run(args, shutdown).await,
            }
        });
        match command.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(anyhow::anyhow!("the command's task ended early: {e}")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Cancels `token` on Ctrl-C or SIGTERM.
fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("signal received, shutting down");
        token.cancel();
    });
}

/// The data dir: `--data-dir`, else `$TUBE_DATA_DIR` (clap's env fallback), else
/// `$XDG_DATA_HOME/tube`, else `~/.local/share/tube`.
pub(crate) fn data_dir(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(d) = flag {
        return Ok(d);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("tube"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/share/tube")),
        None => anyhow::bail!("error: no data dir: pass --data-dir or set TUBE_DATA_DIR"),
    }
}

/// Parses durations such as `30d`, `12h`, `90s`.
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}
