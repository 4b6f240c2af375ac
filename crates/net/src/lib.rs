//! The async edge shared by tube's services.
//!
//! - [`files`]: private and atomic writes of secrets in a data dir.
//! - [`tls`]: TLS 1.3 only (rustls + aws-lc-rs), self-signed identities kept in a data dir,
//!   and certificate pinning by SHA-256 fingerprint.
//! - [`codec`]: `tokio_util` adapters over the pure frame codec of `tube-proto`, and helpers to
//!   exchange control messages during a handshake.
//! - [`mux`]: the stream multiplexer driver (one reader and one writer task per connection,
//!   per-stream credit windows, bounded queues).
//! - [`proxy`]: moves bytes between a TCP socket and a mux stream, carrying half-close and
//!   resets.

pub mod codec;
pub mod files;
pub mod mux;
pub mod proxy;
pub mod tls;

pub use mux::{Incoming, Mux, MuxConfig, MuxError, MuxEvents, MuxStream, Role};
pub use tls::{Fingerprint, Identity, TlsError};
pub use tokio_rustls;

/// Sets `TCP_NODELAY` and, where asked, keepalive on an accepted or dialled socket.
pub fn tune_tcp(stream: &tokio::net::TcpStream) {
    // Failing to set an option only costs performance; the connection still works.
    let _ = stream.set_nodelay(true);
}

/// Closes a TCP socket with a reset (RST) instead of an orderly FIN, so the other end sees an
/// error rather than a clean end of stream.
pub fn abort_tcp(stream: tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(&stream);
    let _ = sock.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
