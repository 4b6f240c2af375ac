//! The async edge shared by tube's services.
//!
//! - [`files`]: private and atomic writes of secrets in a data dir.
//! - [`http`]: serving an axum router with header and idle timeouts and a connection cap.
//! - [`tls`]: TLS 1.3 only (rustls + aws-lc-rs), self-signed identities kept in a data dir,
//!   and certificate pinning by SHA-256 fingerprint.
//! - [`codec`]: `tokio_util` adapters over the pure frame codec of `tube-proto`, and helpers to
//!   exchange control messages during a handshake.
//! - [`mux`]: the stream multiplexer driver (one reader and one writer task per connection,
//!   per-stream credit windows, bounded queues).
//! - [`pool`]: read buffers shared by every stream, reused instead of allocated per read.
//! - [`proxy`]: moves bytes between a TCP socket and a mux stream, carrying half-close and
//!   resets.
//! - [`record`]: TLS 1.3 record protection (pure), and [`secure`]: the stream built on it
//!   after a rustls handshake, for the relay's agent connections.
//! - [`shards`]: connections served on a few single-threaded runtimes, one thread each.
//! - [`timer`]: timers on a clock thread of their own, for runtimes without a time driver.
//! - [`source`]: the mux reader's input as runs of plaintext that stay in place (a TLS record
//!   opened where it lies), so DATA is written to sockets without a copy.

pub mod codec;
pub mod files;
pub mod http;
pub mod mux;
pub mod pool;
pub mod proxy;
pub mod record;
pub mod secure;
pub mod shards;
pub mod source;
pub mod splice;
#[cfg(test)]
mod test_util;
pub mod timer;
pub mod tls;

pub use mux::{Incoming, Mux, MuxConfig, MuxError, MuxEvents, MuxStream, Role, Transport};
pub use secure::SecureStream;
pub use tls::{Fingerprint, Identity, TlsError};
pub use tokio_rustls;

/// Sets `TCP_NODELAY` and, where asked, keepalive on an accepted or dialled socket.
pub fn tune_tcp(stream: &tokio::net::TcpStream) {
    // Failing to set an option only costs performance; the connection still works.
    let _ = stream.set_nodelay(true);
}

/// Sets `TCP_NODELAY` on a socket about to listen, so that the connections it accepts start
/// with it: Linux copies the option into every accepted socket, which then needs no
/// [`tune_tcp`] of its own (see [`tune_accepted`]).
pub fn nodelay_listener(sock: &tokio::net::TcpSocket) {
    let _ = sock.set_nodelay(true);
}

/// [`tune_tcp`] for a connection accepted from a listener set up with [`nodelay_listener`]:
/// nothing on Linux, where it inherited `TCP_NODELAY` (one system call less per connection),
/// the option set elsewhere.
pub fn tune_accepted(stream: &tokio::net::TcpStream) {
    #[cfg(not(target_os = "linux"))]
    tune_tcp(stream);
    #[cfg(target_os = "linux")]
    let _ = stream;
}

/// Turns on TCP keepalive: the first probe after `idle` without traffic, then every
/// `interval`, and the connection fails after `retries` unanswered probes (where the OS lets
/// the count be set). A peer that vanished without a FIN is then noticed within about
/// `idle + interval * retries`.
pub fn keepalive(
    stream: &tokio::net::TcpStream,
    idle: std::time::Duration,
    interval: std::time::Duration,
    retries: u32,
) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval);
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    let ka = ka.with_retries(retries);
    #[cfg(not(any(target_os = "linux", target_os = "macos", target_os = "freebsd")))]
    let _ = retries;
    // Without keepalive a dead peer is still found by the next write; not fatal.
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
}

/// Accepts the next connection on `listener`, or `None` once `stop` is cancelled. Accept
/// errors (typically running out of file descriptors) are retried after 50 ms, so a listener
/// survives them without spinning; they are logged with `what` at most once a second, with
/// the count since the last line.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    stop: &tokio_util::sync::CancellationToken,
    what: &str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    let mut failures = 0u64;
    let mut logged: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return None,
            r = listener.accept() => r,
        };
        match accepted {
            Ok(x) => return Some(x),
            Err(e) => {
                failures += 1;
                if logged.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)) {
                    tracing::warn!(error = %e, listener = what, failures, "accept failed");
                    logged = Some(tokio::time::Instant::now());
                    failures = 0;
                }
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = timer::sleep(std::time::Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

/// Closes a TCP socket with a reset (RST) instead of an orderly FIN, so the other end sees an
/// error rather than a clean end of stream.
pub fn abort_tcp(stream: tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(&stream);
    let _ = sock.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
