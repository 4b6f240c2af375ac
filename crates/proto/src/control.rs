//! The JSON control messages of the relay protocol (seed 001, sections 2 and 4) and its error
//! codes.
//!
//! Each message travels in one CONTROL frame as a UTF-8 JSON object tagged by `"type"`. Unknown
//! fields are ignored (so minor versions can add them); an unknown `type` is an error.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Every control message of protocol version 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// Relay to agent, first message after TLS: the greeting.
    Hello {
        /// Protocol version the relay speaks.
        version: String,
        /// Implementation details.
        server_info: ServerInfo,
        /// The relay's per-stream receive window in bytes (the agent's initial send credit).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<u32>,
    },
    /// Agent to relay: authentication with a JWT.
    Auth {
        /// The JWT.
        token: String,
        /// Protocol version the agent speaks.
        version: String,
        /// Implementation details.
        #[serde(default)]
        client_info: ClientInfo,
        /// The agent's per-stream receive window in bytes (the relay's initial send credit).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<u32>,
    },
    /// Relay to agent: authentication succeeded.
    AuthResponse {
        /// Always `"success"` (failures are `error` messages).
        status: String,
        /// Implementation details.
        server_info: ServerInfo,
    },
    /// Agent to relay: create a tunnel.
    Register {
        /// What to create.
        tunnel_info: TunnelInfo,
    },
    /// Relay to agent: the tunnel exists (its port is bound but not yet accepting).
    RegisterResponse {
        /// Always `"success"`.
        status: String,
        /// The new tunnel's id (UUID text).
        tunnel_id: String,
        /// Where users reach it.
        config: TunnelConfig,
        /// Single-use token to take this tunnel (id and port) back after a lost connection.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reconnect_token: Option<String>,
    },
    /// Agent to relay: start accepting users on the tunnel.
    RegisterConfirm {
        /// The tunnel being confirmed.
        tunnel_id: String,
    },
    /// Agent to relay: statistics and liveness.
    Heartbeat {
        /// Tunnel the stats are for.
        tunnel_id: String,
        /// Counters.
        stats: TunnelStats,
    },
    /// Relay to agent: heartbeat answer.
    HeartbeatResponse {
        /// Always `"ok"`.
        status: String,
        /// Relay clock, RFC 3339.
        server_time: String,
    },
    /// Either side: an orderly goodbye; the sender closes the connection after it.
    Disconnect {
        /// Optional reason for logs.
        #[serde(default)]
        reason: String,
    },
    /// Either side: a failure (seed 001 section 4.2).
    Error {
        /// Numeric code, see [`ErrorCode`].
        code: u16,
        /// Human-readable message.
        message: String,
        /// Machine-readable details.
        #[serde(default)]
        details: ErrorDetails,
    },
}

/// `server_info` of the greeting and auth response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Relay software version.
    pub version: String,
    /// Features this relay offers.
    #[serde(default)]
    pub features: Vec<String>,
}

/// `client_info` of the auth message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Operating system name.
    #[serde(default)]
    pub os: String,
    /// Agent software version.
    #[serde(default)]
    pub version: String,
}

/// `tunnel_info` of a register message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TunnelInfo {
    /// A label for the tunnel (at most 128 bytes).
    pub name: String,
    /// Only `"tcp"` in version 1.
    pub protocol: String,
    /// Requested public port: empty for "any free port in the relay's range", or exactly one.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Optional agent public key (base64): accepted and ignored in version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Optional source-address restriction (CIDR list) the agent asks for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<String>,
    /// When reconnecting: the id of the tunnel to take back (seed 001 section 6.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_id: Option<String>,
    /// When reconnecting: the single-use token the relay gave with that tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_token: Option<String>,
}

/// `config` of a register response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TunnelConfig {
    /// Public `host:port` users connect to.
    pub endpoint: String,
    /// The relay's certificate fingerprint (`sha256:<hex>`).
    #[serde(default)]
    pub public_key: String,
    /// Source addresses allowed to use the public port (empty: everyone).
    #[serde(default)]
    pub allowed_ips: Vec<String>,
}

/// `stats` of a heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TunnelStats {
    /// Bytes received from users.
    pub bytes_in: u64,
    /// Bytes sent to users.
    pub bytes_out: u64,
    /// RFC 3339 time the tunnel became active.
    pub connected_since: String,
}

/// `details` of an error message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetails {
    /// Short machine-readable reason (`invalid_token`, `port_in_use`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds to wait before trying again, where that helps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// Why a control payload could not be read.
#[derive(Debug, thiserror::Error)]
#[error("malformed control message: {0}")]
pub struct ControlDecodeError(#[from] serde_json::Error);

impl ControlMessage {
    /// Serialises the message to the payload of a CONTROL frame.
    pub fn to_bytes(&self) -> Bytes {
        // Serialising these plain structs cannot fail: no maps with non-string keys, no
        // custom serialisers.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Parses a CONTROL frame payload.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ControlDecodeError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// An `error` message for `code` with a message, a reason and a retry delay in seconds.
    pub fn error_retry(
        code: ErrorCode,
        message: impl Into<String>,
        reason: &str,
        retry_after: u64,
    ) -> Self {
        ControlMessage::Error {
            code: code as u16,
            message: message.into(),
            details: ErrorDetails {
                reason: Some(reason.into()),
                retry_after: Some(retry_after),
            },
        }
    }

    /// An `error` message for `code` with a message and a reason.
    pub fn error(code: ErrorCode, message: impl Into<String>, reason: Option<&str>) -> Self {
        ControlMessage::Error {
            code: code as u16,
            message: message.into(),
            details: ErrorDetails {
                reason: reason.map(str::to_owned),
                retry_after: None,
            },
        }
    }

    /// The `type` tag, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ControlMessage::Hello { .. } => "hello",
            ControlMessage::Auth { .. } => "auth",
            ControlMessage::AuthResponse { .. } => "auth_response",
            ControlMessage::Register { .. } => "register",
            ControlMessage::RegisterResponse { .. } => "register_response",
            ControlMessage::RegisterConfirm { .. } => "register_confirm",
            ControlMessage::Heartbeat { .. } => "heartbeat",
            ControlMessage::HeartbeatResponse { .. } => "heartbeat_response",
            ControlMessage::Disconnect { .. } => "disconnect",
            ControlMessage::Error { .. } => "error",
        }
    }
}

/// The protocol's error codes: seed 001's, plus the ones tube adds (documented in
/// `docs/protocols/relay.md`). Also used as RESET codes on streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Authentication failed for a reason not covered below (e.g. missing token).
    AuthFailed = 1001,
    /// The token is not a valid JWT for this relay.
    InvalidToken = 1002,
    /// The token's `exp` has passed.
    TokenExpired = 1003,
    /// The peer speaks a protocol major version this build does not.
    UnsupportedVersion = 1004,
    /// The requested public port is held by another tunnel.
    TunnelExists = 2001,
    /// The tunnel request is not acceptable (bad protocol, port outside the range, ...).
    InvalidConfig = 2002,
    /// No public port could be bound (range exhausted, port used by another program).
    PortUnavailable = 2003,
    /// A reconnect token was not accepted (wrong, used, or another owner's); register anew.
    ReconnectRefused = 2004,
    /// A rate limit was hit; see `retry_after`.
    RateLimit = 3001,
    /// The peer broke the framing or message rules.
    ProtocolError = 4001,
    /// A stream sent more than its window allowed.
    FlowControlError = 4002,
    /// Too many concurrent streams on one connection.
    TooManyStreams = 4003,
    /// The handshake did not finish within the deadline.
    HandshakeTimeout = 4004,
    /// The agent could not connect to its local service (stream reset code).
    ConnectFailed = 4005,
    /// The stream was aborted by one end (stream reset code).
    StreamAborted = 4006,
    /// No heartbeat arrived within the allowed number of intervals.
    HeartbeatTimeout = 4007,
    /// Unexpected failure inside the relay.
    ServerError = 5000,
    /// The relay is shutting down.
    ShuttingDown = 5001,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 18] = [
        Self::AuthFailed,
        Self::InvalidToken,
        Self::TokenExpired,
        Self::UnsupportedVersion,
        Self::TunnelExists,
        Self::InvalidConfig,
        Self::PortUnavailable,
        Self::ReconnectRefused,
        Self::RateLimit,
        Self::ProtocolError,
        Self::FlowControlError,
        Self::TooManyStreams,
        Self::HandshakeTimeout,
        Self::ConnectFailed,
        Self::StreamAborted,
        Self::HeartbeatTimeout,
        Self::ServerError,
        Self::ShuttingDown,
    ];

    /// The code for a number, if known.
    pub fn from_u16(n: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as u16 == n)
    }

    /// The seed's upper-case name (`INVALID_TOKEN`).
    pub fn name(self) -> &'static str {
        match self {
            Self::AuthFailed => "AUTH_FAILED",
            Self::InvalidToken => "INVALID_TOKEN",
            Self::TokenExpired => "TOKEN_EXPIRED",
            Self::UnsupportedVersion => "UNSUPPORTED_VERSION",
            Self::TunnelExists => "TUNNEL_EXISTS",
            Self::InvalidConfig => "INVALID_CONFIG",
            Self::PortUnavailable => "PORT_UNAVAILABLE",
            Self::ReconnectRefused => "RECONNECT_REFUSED",
            Self::RateLimit => "RATE_LIMIT",
            Self::ProtocolError => "PROTOCOL_ERROR",
            Self::FlowControlError => "FLOW_CONTROL_ERROR",
            Self::TooManyStreams => "TOO_MANY_STREAMS",
            Self::HandshakeTimeout => "HANDSHAKE_TIMEOUT",
            Self::ConnectFailed => "CONNECT_FAILED",
            Self::StreamAborted => "STREAM_ABORTED",
            Self::HeartbeatTimeout => "HEARTBEAT_TIMEOUT",
            Self::ServerError => "SERVER_ERROR",
            Self::ShuttingDown => "SHUTTING_DOWN",
        }
    }

    /// Whether an agent should stop instead of reconnecting after this error.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::AuthFailed
                | Self::InvalidToken
                | Self::TokenExpired
                | Self::UnsupportedVersion
                | Self::TunnelExists
                | Self::InvalidConfig
        )
    }
}

/// Formats a code number with its name where known: `1002 INVALID_TOKEN`.
pub fn describe_code(code: u16) -> String {
    match ErrorCode::from_u16(code) {
        Some(c) => format!("{code} {}", c.name()),
        None => format!("{code} UNKNOWN"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_error_format_is_kept() {
        let msg = ControlMessage::Error {
            code: 1001,
            message: "Authentication failed".into(),
            details: ErrorDetails {
                reason: Some("invalid_token".into()),
                retry_after: Some(60),
            },
        };
        let v: serde_json::Value = serde_json::from_slice(&msg.to_bytes()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"error","code":1001,"message":"Authentication failed",
                "details":{"reason":"invalid_token","retry_after":60}})
        );
    }

    #[test]
    fn seed_messages_parse() {
        let auth = br#"{"type":"auth","token":"jwt_token","version":"1.0",
            "client_info":{"os":"windows","version":"1.0.0"}}"#;
        assert!(matches!(
            ControlMessage::from_bytes(auth).unwrap(),
            ControlMessage::Auth { ref token, .. } if token == "jwt_token"
        ));
        let reg = br#"{"type":"register","tunnel_info":{"name":"server_name","protocol":"tcp",
            "ports":[3389,22],"public_key":"base64_public_key"}}"#;
        let ControlMessage::Register { tunnel_info } = ControlMessage::from_bytes(reg).unwrap()
        else {
            panic!("not a register")
        };
        assert_eq!(tunnel_info.ports, vec![3389, 22]);
        let hb = br#"{"type":"heartbeat","tunnel_id":"uuid","stats":{"bytes_in":1024,
            "bytes_out":2048,"connected_since":"timestamp"}}"#;
        assert!(matches!(
            ControlMessage::from_bytes(hb).unwrap(),
            ControlMessage::Heartbeat { .. }
        ));
    }

    #[test]
    fn unknown_type_and_garbage_are_errors() {
        assert!(ControlMessage::from_bytes(br#"{"type":"teleport"}"#).is_err());
        assert!(ControlMessage::from_bytes(b"\xff\xfe").is_err());
        assert!(ControlMessage::from_bytes(br#"{"token":"x"}"#).is_err());
    }

    #[test]
    fn codes_roundtrip_and_names_are_unique() {
        let mut names = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(c as u16), Some(c));
            assert!(names.insert(c.name()));
        }
        assert_eq!(describe_code(1002), "1002 INVALID_TOKEN");
        assert_eq!(describe_code(9), "9 UNKNOWN");
    }
}
