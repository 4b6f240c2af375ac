//! The relay's validated configuration. The CLI builds it from flags and files; tests build it
//! directly.

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use tube_net::{Identity, MuxConfig};
use tube_proto::cidr::Cidr;
use tube_proto::ratelimit::RateLimit;

use crate::auth::JwtSecret;

/// Everything `run` needs besides the bound control listener.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The TLS identity presented to agents.
    pub identity: Identity,
    /// The secret agent tokens are checked against.
    pub jwt: JwtSecret,
    /// Where the lease database lives; `None`: leases are kept in memory only.
    pub data_dir: Option<PathBuf>,
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
    /// Handshakes in progress at once from one source (an IPv4 address, or an IPv6 /64);
    /// more connections from that source are closed at once, others are unaffected.
    pub max_handshakes_per_ip: usize,
    /// Tunnels one agent connection may hold.
    pub max_tunnels_per_agent: usize,
    /// Heartbeat interval agents are expected to keep.
    pub heartbeat_interval: Duration,
    /// Intervals of silence after which an agent is dropped.
    pub heartbeat_misses: u32,
    /// Heartbeats for one tunnel closer together than this are refused with RATE_LIMIT.
    pub heartbeat_min_interval: Duration,
    /// Authentication attempts per source IP.
    pub auth_limit_per_ip: RateLimit,
    /// Authentication attempts per subject (counted once the token is fully verified).
    pub auth_limit_per_subject: RateLimit,
    /// New tunnels per subject (taking a tunnel back with a reconnect token is not counted).
    pub tunnel_limit_per_subject: RateLimit,
    /// New tunnels per source (an IPv4 address or an IPv6 /64), counted like the per-subject
    /// limit: one token bucket per source, shared by every identity connecting from it.
    pub tunnel_limit_per_ip: RateLimit,
    /// Every failed authentication is answered this long after the auth message arrived, so
    /// failures take the same time whichever check failed.
    pub auth_failure_delay: Duration,
    /// How long a tunnel's id and port stay reserved after its agent's connection is lost.
    pub lease_grace: Duration,
    /// Ranges tunnels may allow; a tunnel asking for none gets these. Empty: no restriction.
    pub allowed_ips_policy: Vec<Cidr>,
    /// Most entries in one tunnel's allow-list.
    pub max_allowed_ips: usize,
    /// Multiplexer limits per agent connection.
    pub mux: MuxConfig,
    /// How long a stopping relay lets open user connections finish (its ports already
    /// closed) before it resets them and closes the agents' connections. Zero: at once.
    pub shutdown_grace: Duration,
    /// Threads that serve agent connections, each a single-threaded runtime holding whole
    /// connections (an agent's session, its tunnels' listeners and users, see
    /// `tube_net::shards`). Zero: everything runs on the runtime [`crate::Relay::run`] is
    /// called from (tests, embedding); `tube relay` uses one per core.
    pub threads: usize,
}

impl RelayConfig {
    /// Defaults around an identity and a secret.
    pub fn new(identity: Identity, jwt: JwtSecret) -> Self {
        Self {
            identity,
            jwt,
            data_dir: None,
            public_host: None,
            public_bind: None,
            port_range: DEFAULT_PORT_RANGE,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            max_handshakes_per_ip: DEFAULT_MAX_HANDSHAKES_PER_IP,
            max_tunnels_per_agent: 64,
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_misses: 3,
            heartbeat_min_interval: Duration::from_secs(15),
            auth_limit_per_ip: RateLimit::per_minute(5),
            auth_limit_per_subject: RateLimit::per_minute(5),
            tunnel_limit_per_subject: RateLimit::per_hour(10),
            tunnel_limit_per_ip: RateLimit::per_hour(10),
            auth_failure_delay: Duration::from_millis(100),
            lease_grace: Duration::from_secs(300),
            allowed_ips_policy: Vec::new(),
            max_allowed_ips: 64,
            mux: MuxConfig::default(),
            shutdown_grace: Duration::from_secs(5),
            threads: 0,
        }
    }
}

/// Default of [`RelayConfig::max_handshakes_per_ip`]: one eighth of the global 256, so one
/// source cannot take more than that share of the handshake slots, while far above what one
/// honest source needs (handshakes take milliseconds, and the default auth limit lets one
/// address authenticate only 5 times a minute).
pub const DEFAULT_MAX_HANDSHAKES_PER_IP: usize = 32;

/// The default range public ports are taken from: below Linux's default ephemeral range
/// (32768-60999), so outgoing connections on the relay host never compete for these ports and
/// a user cannot self-connect to a freed tunnel port.
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 20000..=29999;
