//! Multi-hop chains: a hub (`tube hub`, the seed's "main server") builds a TCP chain from one
//! user's node through a few other nodes to another user's node; each user runs a node
//! (`tube node`) that registers with the hub, logs in with rotating one-time passwords and
//! carries its hops of the chains the hub asks for.
//!
//! This first part holds the pieces with no network in them:
//!
//! - [`plan`]: which nodes a new chain goes through (pure; randomness comes from the caller).
//! - [`build`]: the hub's state machine that builds one chain node by node, node 0 first, and
//!   tears it down (pure: results, timeouts and departures in, messages to send out).
//! - [`accounts`]: the hub's node accounts and their rotating passwords, behind the
//!   [`AccountStore`] trait (SQLite on disk, or in memory).
//! - [`password_file`]: the node's copy of its next password, written privately and atomically.
//!
//! The hub and node services, their wire protocol and the local front API come later.

pub mod accounts;
pub mod build;
pub mod password_file;
pub mod plan;

pub use accounts::{
    AccountError, AccountStore, InvalidPassword, MemoryAccounts, Password, SqliteAccounts,
};
pub use plan::{Candidate, Plan, PlanError, PlanRequest};
