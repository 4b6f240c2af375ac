//! Which public ports belong to which tunnel, across all agent sessions, and how a port is
//! chosen and bound.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Mutex;

use tokio::net::TcpListener;
use tube_proto::ErrorCode;

/// Binds tried before giving up on "any free port".
const MAX_BIND_ATTEMPTS: usize = 64;

/// Public ports in use by tunnels.
#[derive(Debug, Default)]
pub struct Registry {
    ports: Mutex<HashMap<u16, u64>>,
}

/// A refusal to allocate a port: the code and reason for the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocError {
    /// Protocol code.
    pub code: ErrorCode,
    /// Message for the agent.
    pub message: String,
    /// `details.reason`.
    pub reason: &'static str,
}

impl Registry {
    /// Binds a public listener for `session` on `ip`: the `requested` port, or any free port
    /// of `range`.
    pub fn allocate(
        &self,
        session: u64,
        ip: IpAddr,
        requested: Option<u16>,
        range: &RangeInclusive<u16>,
        seed: u64,
    ) -> Result<TcpListener, AllocError> {
        match requested {
            Some(port) => {
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
                let mut ports = self.lock();
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
                ports.insert(port, session);
                Ok(l)
            }
            None => {
                let span = (*range.end() as u64 - *range.start() as u64) + 1;
                let mut ports = self.lock();
                let mut attempts = 0;
                for i in 0..span {
                    let port = (*range.start() as u64 + (seed.wrapping_add(i) % span)) as u16;
                    if ports.contains_key(&port) {
                        continue;
                    }
                    attempts += 1;
                    if let Ok(l) = bind(ip, port) {
                        ports.insert(port, session);
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
        }
    }

    /// Gives back every port `session` holds.
    pub fn release_session(&self, session: u64) {
        self.lock().retain(|_, s| *s != session);
    }

    /// Number of ports in use.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no port is in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, u64>> {
        // The map stays consistent even if a holder panicked.
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn bind(ip: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let addr = SocketAddr::new(ip, port);
    let sock = match ip {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // No SO_REUSEADDR: a port still in TIME_WAIT from another program is not stolen, and two
    // tunnels can never share one.
    sock.bind(addr)?;
    sock.listen(1024)
}
