//! Mailbox (seed 003, "you send to my peer, I send to yours"): peers (`tube peer`) that keep
//! messages for their registered clients in RAM only and push them over live connections, and
//! the client (`tube msg`) whose messages are end-to-end encrypted and authenticated.
//!
//! - [`crypto`]: client identities (an Ed25519 key and a self-signed certificate, known by the
//!   SHA-256 of the certificate), sealing and opening messages, the 6-digit verification code.
//! - [`wire`]: the packet codec adapter and the plain-or-TLS transport.
//! - [`peer`]: the peer service over TCP; `registry` holds its state (registrations, RAM
//!   queues, limits) and the operations TCP and HTTP share.
//! - [`http`]: the peer's HTTP backend for the long-poll proxy (`tube peer --http`).
//! - [`admin`]: the peer's `/healthz` and `/metrics`.
//! - [`client`]: registering, sending, fetching and listening; addresses.
//! - [`via`]: the client side of the long-poll proxy (`tube msg --via URL`).
//! - [`contacts`]: the client's correspondents, replay detection and the code exchange.
//!
//! The wire format is `tube_proto::mailbox`, specified in `docs/protocols/mailbox.md`; over
//! HTTP, `docs/protocols/longpoll.md` section 7.

pub mod admin;
pub mod client;
pub mod contacts;
pub mod crypto;
pub mod http;
mod link;
pub mod peer;
mod registry;
pub mod via;
pub mod wire;
