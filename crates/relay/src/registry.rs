//! Public port reservations: choosing a port for a new tunnel and binding listeners.
//!
//! A port is reserved for a tunnel from registration until the tunnel is removed, including
//! while its agent is reconnecting (the port is then reserved but not bound, so users are
//! refused at once).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use tokio::net::TcpListener;
use tube_proto::ErrorCode;
use uuid::Uuid;

/// Binds tried before giving up on "any free port".
const MAX_BIND_ATTEMPTS: usize = 64;

/// A refusal: the code and reason for the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocError {
    /// Protocol code.
    pub code: ErrorCode,
    /// Message for the agent.
    pub message: String,
    /// `details.reason`.
    pub reason: &'static str,
}

/// Reserves and binds the `requested` port, or any free port of `range`, for `tunnel`.
pub(crate) fn allocate(
    ports: &mut HashMap<u16, Uuid>,
    tunnel: Uuid,
    ip: IpAddr,
    requested: Option<u16>,
    range: &RangeInclusive<u16>,
    seed: u64,
) -> Result<TcpListener, AllocError> {
    if let Some(port) = requested {
        if !range.contains(&port) {
            return Err(AllocError {
                code: ErrorCode::InvalidConfig,
                message: format!(
                    "port {port} is outside the relay's range {}-{}",
                    range.start(),
                    range.end()
                ),
                reason: "port_out_of_range",
            });
        }
        if ports.contains_key(&port) {
            return Err(AllocError {
                code: ErrorCode::TunnelExists,
                message: format!("port {port} is already used by another tunnel"),
                reason: "port_taken",
            });
        }
        let l = bind(ip, port).map_err(|_| AllocError {
            code: ErrorCode::PortUnavailable,
            message: format!("port {port} cannot be bound"),
            reason: "port_in_use",
        })?;
        ports.insert(port, tunnel);
        return Ok(l);
    }
    let span = (*range.end() as u64 - *range.start() as u64) + 1;
    let mut attempts = 0;
    for i in 0..span {
        let port = (*range.start() as u64 + (seed.wrapping_add(i) % span)) as u16;
        if ports.contains_key(&port) {
            continue;
        }
        attempts += 1;
        if let Ok(l) = bind(ip, port) {
            ports.insert(port, tunnel);
            return Ok(l);
        }
        if attempts >= MAX_BIND_ATTEMPTS {
            break;
        }
    }
    Err(AllocError {
        code: ErrorCode::PortUnavailable,
        message: "no free port in the relay's range".into(),
        reason: "range_exhausted",
    })
}

/// Binds a listener on `ip:port`.
///
/// TCP_NODELAY is set on the listener, for the connections it accepts to inherit
/// ([`tube_net::tune_accepted`]). SO_REUSEADDR is set on Unix: there it only lets a listener
/// bind over connections still in TIME_WAIT (after a relay restart with users connected, a
/// tunnel's port would otherwise stay unavailable for a minute); two live listeners can still
/// never share a port (that would take SO_REUSEPORT). Windows gives SO_REUSEADDR a different,
/// unsafe meaning, so it is not set there.
pub(crate) fn bind(ip: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let addr = SocketAddr::new(ip, port);
    let sock = match ip {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    #[cfg(unix)]
    sock.set_reuseaddr(true)?;
    tube_net::nodelay_listener(&sock);
    sock.bind(addr)?;
    sock.listen(1024)
}

#[cfg(test)]
mod tests {
    /// The relay's users get no `TCP_NODELAY` call of their own on Linux: this checks the
    /// kernel still hands it down from the listener.
    #[tokio::test]
    async fn a_connection_accepted_from_a_relay_listener_has_nodelay() {
        let listener = super::bind([127, 0, 0, 1].into(), 0).expect("bind");
        let addr = listener.local_addr().expect("address");
        let (user, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let _user = user.expect("connect");
        let (accepted, _) = accepted.expect("accept");
        tube_net::tune_accepted(&accepted);
        assert!(accepted.nodelay().expect("read TCP_NODELAY"));
    }
}
