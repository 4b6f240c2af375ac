//! The relay's validated configuration. The CLI builds it from flags and files; tests build it
//! directly.

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use tube_net::{Identity, MuxConfig};

use crate::auth::JwtSecret;

/// Everything `run` needs besides the bound control listener.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The TLS identity presented to agents.
    pub identity: Identity,
    /// The secret agent tokens are checked against.
    pub jwt: JwtSecret,
    /// Host name or address put in tunnel endpoints; `None`: the address the agent reached.
    pub public_host: Option<String>,
    /// Address public tunnel ports bind on; `None`: the control listener's address.
    pub public_bind: Option<IpAddr>,
    /// Ports the relay may give to tunnels.
    pub port_range: RangeInclusive<u16>,
    /// Deadline for TCP accept to authenticated (TLS + greeting + auth).
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; more connections are closed at once.
    pub max_handshakes: usize,
    /// Tunnels one agent connection may hold.
    pub max_tunnels_per_agent: usize,
    /// Multiplexer limits per agent connection.
    pub mux: MuxConfig,
    /// How long shutdown waits for sessions to finish.
    pub shutdown_grace: Duration,
}

impl RelayConfig {
    /// Defaults around an identity and a secret.
    pub fn new(identity: Identity, jwt: JwtSecret) -> Self {
        Self {
            identity,
            jwt,
            public_host: None,
            public_bind: None,
            port_range: DEFAULT_PORT_RANGE,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            max_tunnels_per_agent: 64,
            mux: MuxConfig::default(),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// The default range public ports are taken from: below Linux's default ephemeral range
/// (32768-60999), so outgoing connections on the relay host never compete for these ports and
/// a user cannot self-connect to a freed tunnel port.
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 20000..=29999;
