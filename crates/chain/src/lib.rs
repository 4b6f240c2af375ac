//! Multi-hop chains: a hub (`tube hub`, the seed's "main server") builds a TCP chain from one
//! user's node through a few other nodes to another user's node; each user runs a node
//! (`tube node`) that registers with the hub, logs in with rotating one-time passwords and
//! carries its hops of the chains the hub asks for.
//!
//! The pieces (the first four without any network):
//!
//! - [`plan`]: which nodes a new chain goes through (pure; randomness comes from the caller).
//! - [`build`]: the hub's state machine that builds one chain node by node, node 0 first, and
//!   tears it down (pure: results, timeouts and departures in, messages to send out).
//! - [`accounts`]: the hub's node accounts and their rotating passwords, behind the
//!   [`AccountStore`] trait (SQLite on disk, or in memory).
//! - [`password_file`]: the node's copy of its next password, written privately and atomically.
//! - [`front`]: a client of a node's front API (what `tube chain` and the tests use).
//! - [`hub`]: the hub service (`tube hub`): node sessions over TLS, logins, approvals, and
//!   driving [`build`] for each chain.
//! - [`node`]: the node daemon (`tube node`): its hub session and rotating password, the
//!   loopback front API, and the hops it carries (dial, checked listen, splice).
//!

pub mod accounts;
pub mod build;
pub mod front;
pub mod hub;
pub mod node;
pub mod password_file;
pub mod plan;

pub use accounts::{
    AccountError, AccountInfo, AccountStore, InvalidPassword, MemoryAccounts, Password, Registered,
    Room, SqliteAccounts,
};
/// TCP keepalive on the hub connection, at both ends (chain.md section 2): a peer that vanished
/// without a FIN is noticed within about 30 s.
pub(crate) fn hub_keepalive(tcp: &tokio::net::TcpStream) {
    use std::time::Duration;
    tube_net::keepalive(tcp, Duration::from_secs(15), Duration::from_secs(5), 3);
}

pub use plan::{Candidate, Plan, PlanError, PlanRequest};
