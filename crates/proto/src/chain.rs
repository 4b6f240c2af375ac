//! Wire formats of the chain service (seed 000): a hub that builds multi-hop TCP paths
//! `node0 -> n1 -> ... -> nodeN` and the node daemons it drives.
//!
//! Three codecs, all pure (no IO, no clock), specified byte by byte in
//! `docs/protocols/chain.md`:
//!
//! - [`HubMessage`]: node <-> hub control messages, one JSON object per CONTROL frame of
//!   [`crate::frame`] inside TLS 1.3. [`HubMessage::from_bytes`] checks the size, parses the JSON
//!   and then runs [`HubMessage::validate`], so a decoded message is always within bounds.
//! - [`FrontMessage`]: the node's loopback API for its local front end, newline-delimited JSON
//!   ([`encode_line`], [`decode_line`], and [`LineBuffer`] to cut a byte stream into lines).
//! - The hop preamble ([`encode_hop_hello`], [`decode_hop_hello`]): the first
//!   [`HOP_HELLO_LEN`] bytes a node sends when it dials the previous hop; raw bytes follow.
//!
//! Wire names keep the seed's word "tube" (`make_tube`, `request_tube`); in code a built path is
//! a chain. Choosing nodes, driving the build, accounts, timers and sockets live in `tube-chain`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of the chain protocol this build speaks, sent in `register` and `auth`.
pub const CHAIN_PROTOCOL_VERSION: &str = "1.0";

/// The major part of [`CHAIN_PROTOCOL_VERSION`]; peers must agree on it.
pub const CHAIN_PROTOCOL_MAJOR: u32 = 1;

/// Largest hub message (the JSON payload of one CONTROL frame).
pub const MAX_HUB_MESSAGE: usize = crate::frame::MAX_CONTROL_PAYLOAD as usize;

/// Largest front API line, in bytes, not counting its terminating `\n`.
pub const MAX_FRONT_LINE: usize = 64 * 1024;

/// Longest node name in bytes (names are `[A-Za-z0-9_.-]`, at least one byte).
pub const MAX_NAME_LEN: usize = 64;

/// Length of a password or hop secret: 32 random bytes as lowercase hex.
pub const SECRET_HEX_LEN: usize = 64;

/// Longest `local_id` in bytes (at least one byte, no control characters).
pub const MAX_LOCAL_ID_LEN: usize = 128;

/// Longest `host:port` in the front API (`forward`, `local`): a 253-byte host name, brackets
/// around an IPv6 address, a colon and five digits.
pub const MAX_ADDRESS_LEN: usize = 261;

/// Longest `reason` in bytes.
pub const MAX_REASON_LEN: usize = 256;

/// Longest `message` in bytes.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// Longest protocol version string in bytes.
pub const MAX_VERSION_LEN: usize = 16;

/// Largest request id: 2^53 - 1, so ids stay exact in every JSON implementation.
pub const MAX_REQUEST_ID: u64 = (1 << 53) - 1;

/// Most hop connections in one chain (intermediates + 1).
pub const MAX_HOPS: u8 = 16;

/// Most entries in one `tubes` answer.
pub const MAX_LIST_ITEMS: usize = 64;

/// Default number of intermediate nodes the hub puts in a chain (fewer when fewer are online).
pub const DEFAULT_INTERMEDIATES: u8 = 2;

/// Default limit of chains one node takes part in, in any role.
pub const DEFAULT_MAX_CHAINS_PER_NODE: usize = 16;

/// Default limit of `request_connection`s waiting for one endpoint's approval.
pub const DEFAULT_MAX_PENDING_APPROVALS: usize = 8;

/// Default time an endpoint's front has to approve a connection request.
pub const DEFAULT_APPROVAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Default time the hub waits for each `make_tube_result`.
pub const DEFAULT_HOP_BUILD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The 4 bytes that open a hop connection; the digit is the preamble's version.
pub const HOP_MAGIC: [u8; 4] = *b"TBH1";

/// Length of the hop preamble: magic, 16-byte tunnel id, 32-byte secret.
pub const HOP_HELLO_LEN: usize = 52;

/// Whether a peer's protocol version string is one this build speaks (same major number).
pub fn version_compatible(version: &str) -> bool {
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    major == Some(CHAIN_PROTOCOL_MAJOR)
}

/// A 256-bit secret written as 64 lowercase hex digits: a node password or a hop secret.
///
/// `Debug` prints a placeholder so messages can be logged at `debug` without leaking it.
/// Equality here is plain string equality, for tests; services compare secrets (or their
/// hashes) in constant time.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChainSecret(String);

impl ChainSecret {
    /// Wraps hex text as received or stored; [`HubMessage::validate`] checks its shape.
    pub fn new(hex: impl Into<String>) -> Self {
        Self(hex.into())
    }

    /// The secret for 32 random bytes (the caller supplies the randomness).
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(to_hex(bytes))
    }

    /// The 32 bytes, if the text is exactly 64 lowercase hex digits.
    pub fn to_bytes(&self) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        fill_from_hex(self.0.as_bytes(), &mut out)?;
        Some(out)
    }

    /// The hex text, for the wire, a hash or the password file. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ChainSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChainSecret(<redacted>)")
    }
}

/// Every message between a node and the hub (protocol 1.0).
///
/// Requests that expect an answer carry an `id` chosen by their sender (each side numbers its
/// own requests); the answer echoes it. Pushes that need no answer carry none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubMessage {
    /// Node to hub: create an account (seed: RegisterWithMainServer). Answered by
    /// `register_result`; success also logs this connection in.
    Register {
        /// Protocol version the node speaks.
        version: String,
        /// The node's name, 1..=64 bytes of `[A-Za-z0-9_.-]`.
        name: String,
        /// Whether the node is willing to be an intermediate hop of other nodes' chains.
        relay: bool,
        /// The hub's registration token, for a hub that takes new accounts only with it
        /// (`tube hub --registration-token`); absent otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        invite: Option<ChainSecret>,
    },
    /// Node to hub: log in with the current one-time password (seed: AuthWithMainServer).
    /// Answered by `auth_result`.
    Auth {
        /// Protocol version the node speaks.
        version: String,
        /// The node's name.
        name: String,
        /// The password from the last `register_result` or `auth_result`.
        password: ChainSecret,
        /// Whether the node is willing to be an intermediate hop.
        relay: bool,
    },
    /// Node to hub: end the session and every chain it takes part in (seed:
    /// LogoutFromMainServer). Answered by `logout_result`.
    Logout {},
    /// Node to hub: the password of this session's `register_result` or `auth_result` is
    /// stored; the hub voids the one it replaced. No answer.
    PasswordStored {},
    /// Node to hub: build a chain to `endpoint_name` (seed: RequestTube, from the local user).
    /// Answered by `request_tube_result`.
    RequestTube {
        /// The node's request id.
        id: u64,
        /// Name of the node at the far end.
        endpoint_name: String,
        /// The local user's label for this chain, passed back in `establish_connection`.
        local_id: String,
    },
    /// Node to hub: close a chain this node takes part in (seed: RequestCloseTube). No answer:
    /// the hub sends `close_tube` to every node of the chain.
    RequestCloseTube {
        /// The chain.
        tunnel_id: String,
    },
    /// Node to hub: answer to `make_tube` (seed: MakeTube's answer).
    MakeTubeResult {
        /// Id of the `make_tube` answered.
        id: u64,
        /// The chain.
        tunnel_id: String,
        /// Whether this node's part of the chain is in place.
        is_allowed: bool,
        /// The port this node listens on for the next hop; `null` on the last node and on
        /// refusal.
        port: Option<u16>,
        /// Why it was refused (empty on success).
        #[serde(default)]
        reason: String,
    },
    /// Node to hub: the endpoint's decision on `request_connection`.
    RequestConnectionResult {
        /// Id of the `request_connection` answered.
        id: u64,
        /// The chain.
        tunnel_id: String,
        /// Whether the endpoint's front accepted.
        is_allowed: bool,
        /// Why it was refused (empty on success).
        #[serde(default)]
        reason: String,
    },
    /// Hub to node: answer to `register`.
    RegisterResult {
        /// Whether the account was created.
        is_success: bool,
        /// Human-readable text.
        #[serde(default)]
        message: String,
        /// The first one-time password: present exactly when `is_success`.
        #[serde(default)]
        password: Option<ChainSecret>,
        /// On failure, the [`ChainErrorCode`] number (optional).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
    },
    /// Hub to node: answer to `auth`.
    AuthResult {
        /// Whether the node is logged in.
        is_success: bool,
        /// Human-readable text.
        #[serde(default)]
        message: String,
        /// The password for the next `auth`: present exactly when `is_success`.
        #[serde(default)]
        next_password: Option<ChainSecret>,
        /// On failure, the [`ChainErrorCode`] number (optional).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
    },
    /// Hub to node: answer to `logout`; the hub closes the connection after it.
    LogoutResult {
        /// Whether a session was ended.
        is_success: bool,
        /// Human-readable text.
        #[serde(default)]
        message: String,
    },
    /// Hub to node: answer to `request_tube`, sent once the endpoint approved and the chain is
    /// chosen, before the build starts (so the node knows the tunnel id before `make_tube`).
    RequestTubeResult {
        /// Id of the `request_tube` answered.
        id: u64,
        /// Whether the chain will be built.
        is_allowed: bool,
        /// Why it was refused (empty on success).
        #[serde(default)]
        reason: String,
        /// The chain's id: required when `is_allowed`.
        #[serde(default)]
        tunnel_id: Option<String>,
        /// Hop connections in the chain (intermediates + 1); 0 when refused.
        #[serde(default)]
        hops: u8,
        /// On refusal, the [`ChainErrorCode`] number (optional).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
    },
    /// Hub to node: put this node's part of a chain in place (seed: MakeTube(from, to,
    /// tunnel_id)). Answered by `make_tube_result`.
    MakeTube {
        /// The hub's request id.
        id: u64,
        /// The chain.
        tunnel_id: String,
        /// `ip:port` of the previous hop's listener, to dial; `null` on node 0.
        from: Option<String>,
        /// IP allowed to dial this node's listener (the next hop); `null` on the last node.
        to: Option<String>,
        /// Secret the next hop must present: present exactly when `to` is.
        secret_in: Option<ChainSecret>,
        /// Secret to present when dialing `from`: present exactly when `from` is.
        secret_out: Option<ChainSecret>,
    },
    /// Hub to node: the chain is gone; close its connections (seed: CloseTube). No answer.
    CloseTube {
        /// The chain.
        tunnel_id: String,
        /// Why, for the front and logs.
        #[serde(default)]
        reason: String,
        /// The [`ChainErrorCode`] number when the chain ends on a failure (optional).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
    },
    /// Hub to the endpoint node: a node asks for a chain to you; ask your front (seed:
    /// RequestConnection). Answered by `request_connection_result`.
    RequestConnection {
        /// The hub's request id.
        id: u64,
        /// Name of the requesting node.
        request_user: String,
        /// The chain's id.
        tunnel_id: String,
    },
    /// Hub to both end nodes: every hop is in place (seed: EstablishConnection). No answer;
    /// the node tells its front with `established`, adding the local port.
    EstablishConnection {
        /// The chain.
        tunnel_id: String,
        /// The requesting user's `local_id`.
        local_id: String,
        /// Name of the endpoint node.
        endpoint_user: String,
    },
    /// Either side: a failure that is not the answer to a request.
    Error {
        /// A [`ChainErrorCode`] number.
        code: u16,
        /// Human-readable text.
        #[serde(default)]
        message: String,
    },
}

impl HubMessage {
    /// Every `type` tag, in declaration order.
    pub const TYPES: [&'static str; 17] = [
        "register",
        "auth",
        "logout",
        "password_stored",
        "request_tube",
        "request_close_tube",
        "make_tube_result",
        "request_connection_result",
        "register_result",
        "auth_result",
        "logout_result",
        "request_tube_result",
        "make_tube",
        "close_tube",
        "request_connection",
        "establish_connection",
        "error",
    ];

    /// Serialises the message to the payload of a CONTROL frame.
    pub fn to_bytes(&self) -> Bytes {
        // Serialising these plain types cannot fail: no maps, no custom serialisers.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Parses and validates a CONTROL frame payload.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MessageError> {
        let msg: Self = decode_json(bytes, MAX_HUB_MESSAGE, &Self::TYPES)?;
        msg.validate()?;
        Ok(msg)
    }

    /// Checks every field against the limits of `docs/protocols/chain.md`.
    pub fn validate(&self) -> Result<(), FieldError> {
        match self {
            Self::Register {
                version,
                name,
                relay: _,
                invite,
            } => {
                check_version("version", version)?;
                check_name("name", name)?;
                match invite {
                    Some(token) => check_secret("invite", token),
                    None => Ok(()),
                }
            }
            Self::Auth {
                version,
                name,
                password,
                relay: _,
            } => {
                check_version("version", version)?;
                check_name("name", name)?;
                check_secret("password", password)
            }
            Self::Logout {} | Self::PasswordStored {} => Ok(()),
            Self::RequestTube {
                id,
                endpoint_name,
                local_id,
            } => {
                check_id("id", *id)?;
                check_name("endpoint_name", endpoint_name)?;
                check_local_id("local_id", local_id)
            }
            Self::RequestCloseTube { tunnel_id } => check_tunnel_id("tunnel_id", tunnel_id),
            Self::MakeTubeResult {
                id,
                tunnel_id,
                is_allowed,
                port,
                reason,
            } => {
                check_id("id", *id)?;
                check_tunnel_id("tunnel_id", tunnel_id)?;
                match (is_allowed, port) {
                    (true, Some(p)) => check_port("port", *p)?,
                    (false, Some(_)) => {
                        return Err(FieldError::new("port", FieldProblem::Unexpected));
                    }
                    (_, None) => {}
                }
                check_max("reason", reason, MAX_REASON_LEN)
            }
            Self::RequestConnectionResult {
                id,
                tunnel_id,
                is_allowed: _,
                reason,
            } => {
                check_id("id", *id)?;
                check_tunnel_id("tunnel_id", tunnel_id)?;
                check_max("reason", reason, MAX_REASON_LEN)
            }
            Self::RegisterResult {
                is_success,
                message,
                password,
                code: _,
            } => {
                check_max("message", message, MAX_MESSAGE_LEN)?;
                check_secret_when("password", password.as_ref(), *is_success)
            }
            Self::AuthResult {
                is_success,
                message,
                next_password,
                code: _,
            } => {
                check_max("message", message, MAX_MESSAGE_LEN)?;
                check_secret_when("next_password", next_password.as_ref(), *is_success)
            }
            Self::LogoutResult {
                is_success: _,
                message,
            } => check_max("message", message, MAX_MESSAGE_LEN),
            Self::RequestTubeResult {
                id,
                is_allowed,
                reason,
                tunnel_id,
                hops,
                code: _,
            } => {
                check_id("id", *id)?;
                check_max("reason", reason, MAX_REASON_LEN)?;
                match tunnel_id {
                    Some(t) => check_tunnel_id("tunnel_id", t)?,
                    None if *is_allowed => {
                        return Err(FieldError::new("tunnel_id", FieldProblem::Missing));
                    }
                    None => {}
                }
                let min = if *is_allowed { 1 } else { 0 };
                check_range("hops", u64::from(*hops), min, u64::from(MAX_HOPS))
            }
            Self::MakeTube {
                id,
                tunnel_id,
                from,
                to,
                secret_in,
                secret_out,
            } => {
                check_id("id", *id)?;
                check_tunnel_id("tunnel_id", tunnel_id)?;
                if from.is_none() && to.is_none() {
                    return Err(FieldError::new("from", FieldProblem::Missing));
                }
                if let Some(from) = from {
                    check_socket_addr("from", from)?;
                }
                if let Some(to) = to {
                    check_ip("to", to)?;
                }
                check_secret_when("secret_in", secret_in.as_ref(), to.is_some())?;
                check_secret_when("secret_out", secret_out.as_ref(), from.is_some())
            }
            Self::CloseTube {
                tunnel_id,
                reason,
                code: _,
            } => {
                check_tunnel_id("tunnel_id", tunnel_id)?;
                check_max("reason", reason, MAX_REASON_LEN)
            }
            Self::RequestConnection {
                id,
                request_user,
                tunnel_id,
            } => {
                check_id("id", *id)?;
                check_name("request_user", request_user)?;
                check_tunnel_id("tunnel_id", tunnel_id)
            }
            Self::EstablishConnection {
                tunnel_id,
                local_id,
                endpoint_user,
            } => {
                check_tunnel_id("tunnel_id", tunnel_id)?;
                check_local_id("local_id", local_id)?;
                check_name("endpoint_user", endpoint_user)
            }
            Self::Error { code: _, message } => check_max("message", message, MAX_MESSAGE_LEN),
        }
    }

    /// An `error` message.
    pub fn error(code: ChainErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code: code as u16,
            message: message.into(),
        }
    }

    /// The `type` tag, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Register { .. } => "register",
            Self::Auth { .. } => "auth",
            Self::Logout {} => "logout",
            Self::PasswordStored {} => "password_stored",
            Self::RequestTube { .. } => "request_tube",
            Self::RequestCloseTube { .. } => "request_close_tube",
            Self::MakeTubeResult { .. } => "make_tube_result",
            Self::RequestConnectionResult { .. } => "request_connection_result",
            Self::RegisterResult { .. } => "register_result",
            Self::AuthResult { .. } => "auth_result",
            Self::LogoutResult { .. } => "logout_result",
            Self::RequestTubeResult { .. } => "request_tube_result",
            Self::MakeTube { .. } => "make_tube",
            Self::CloseTube { .. } => "close_tube",
            Self::RequestConnection { .. } => "request_connection",
            Self::EstablishConnection { .. } => "establish_connection",
            Self::Error { .. } => "error",
        }
    }

    /// Whether a node may send this message (the hub answers anything else with 6009).
    pub fn is_from_node(&self) -> bool {
        matches!(
            self,
            Self::Register { .. }
                | Self::Auth { .. }
                | Self::Logout {}
                | Self::PasswordStored {}
                | Self::RequestTube { .. }
                | Self::RequestCloseTube { .. }
                | Self::MakeTubeResult { .. }
                | Self::RequestConnectionResult { .. }
                | Self::Error { .. }
        )
    }

    /// Whether the hub may send this message.
    pub fn is_from_hub(&self) -> bool {
        matches!(self, Self::Error { .. }) || !self.is_from_node()
    }

    /// The request id of a request or an answer, for matching.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            Self::RequestTube { id, .. }
            | Self::MakeTubeResult { id, .. }
            | Self::RequestConnectionResult { id, .. }
            | Self::RequestTubeResult { id, .. }
            | Self::MakeTube { id, .. }
            | Self::RequestConnection { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// The chain the message is about, for logs and routing.
    pub fn tunnel_id(&self) -> Option<&str> {
        match self {
            Self::RequestCloseTube { tunnel_id }
            | Self::MakeTubeResult { tunnel_id, .. }
            | Self::RequestConnectionResult { tunnel_id, .. }
            | Self::MakeTube { tunnel_id, .. }
            | Self::CloseTube { tunnel_id, .. }
            | Self::RequestConnection { tunnel_id, .. }
            | Self::EstablishConnection { tunnel_id, .. } => Some(tunnel_id),
            Self::RequestTubeResult { tunnel_id, .. } => tunnel_id.as_deref(),
            _ => None,
        }
    }
}

/// Every message of the node's loopback front API, one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FrontMessage {
    /// Front to node: build a chain to `endpoint_name`. Answered by `tube_result`.
    RequestTube {
        /// Name of the node at the far end.
        endpoint_name: String,
        /// The front's label for this chain, unique among the node's open chains.
        local_id: String,
    },
    /// Front to node: close a chain, named by exactly one of `local_id` (the requester's label)
    /// or `tunnel_id`. No answer beyond the `closed` push.
    RequestCloseTube {
        /// The requester's label.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        local_id: Option<String>,
        /// The chain's id (the only handle an endpoint or intermediate has).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tunnel_id: Option<String>,
    },
    /// Front to node: the answer to `connection_request`.
    Approve {
        /// The chain asked about.
        tunnel_id: String,
        /// Whether the front accepts it.
        is_allowed: bool,
        /// Why not (empty when accepted).
        #[serde(default)]
        reason: String,
        /// When accepted, a service (`host:port`) the endpoint node connects the chain to
        /// itself, instead of opening a loopback port for the front (optional).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        forward: Option<String>,
    },
    /// Front to node: the answer to `listen`: the front listens on this loopback port and
    /// node 0 connects to it.
    Listening {
        /// The chain.
        tunnel_id: String,
        /// The front's port on the API's loopback address.
        port: u16,
    },
    /// Front to node: list the node's chains. Answered by `tubes`.
    List {},
    /// Front to node: send this connection the pushes (`connection_request`, `established`,
    /// `closed`) of chains it did not request itself. Answered by `tubes`.
    Subscribe {},
    /// Node to front: the hub's answer to `request_tube` (accepted means "being built").
    TubeResult {
        /// The front's label.
        local_id: String,
        /// Whether the hub accepted the request.
        is_allowed: bool,
        /// Why not (empty when accepted).
        #[serde(default)]
        reason: String,
        /// The chain's id: required when `is_allowed`.
        #[serde(default)]
        tunnel_id: Option<String>,
        /// On refusal, the [`ChainErrorCode`] number (optional).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
        /// When accepted, the hub's `hops` (intermediates + 1); optional, since 1.0 fronts
        /// ignore it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hops: Option<u8>,
    },
    /// Node to front: a node asks for a chain to this one; answer with `approve`.
    ConnectionRequest {
        /// The chain's id.
        tunnel_id: String,
        /// Name of the requesting node.
        request_user: String,
    },
    /// Node to front (node 0 only): listen on a loopback port and answer `listening`.
    Listen {
        /// The chain.
        tunnel_id: String,
    },
    /// Node to front (both ends): the chain is complete. On node 0, `port` is the front's own
    /// listening port (node 0 is connected to it); on the endpoint, it is the node's loopback
    /// port the front must connect to.
    Established {
        /// The chain.
        tunnel_id: String,
        /// The requesting user's label.
        local_id: String,
        /// Name of the endpoint node.
        endpoint_user: String,
        /// The local port of this end of the chain.
        port: u16,
    },
    /// Node to front: the chain is gone.
    Closed {
        /// The chain.
        tunnel_id: String,
        /// Why.
        #[serde(default)]
        reason: String,
        /// The [`ChainErrorCode`] number when the chain ended on a failure (optional).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
    },
    /// Node to front: the answer to `list` or `subscribe`.
    Tubes {
        /// The node's chains, at most [`MAX_LIST_ITEMS`].
        items: Vec<TubeInfo>,
    },
    /// Node to front: a failure that is not the answer to `request_tube`.
    Error {
        /// A [`ChainErrorCode`] number.
        code: u16,
        /// Human-readable text.
        #[serde(default)]
        message: String,
    },
    /// Front to node: listen on `local` (a loopback `ip:port`; port 0 for any free one) and
    /// give every connection accepted there a chain of its own to `endpoint_name`, with the
    /// connection itself as node 0's near end (no `listen`). Answered by `forward_listening`;
    /// each connection's chain is then reported like a `request_tube` of this front
    /// (`tube_result` with a `local_id` the node chose, `established`, `closed`). The listener
    /// closes with the API connection.
    ForwardListen {
        /// Name of the node at the far end.
        endpoint_name: String,
        /// Where to listen: a loopback `ip:port`.
        local: String,
    },
    /// Node to front: the answer to `forward_listen`: the node listens on `local`.
    ForwardListening {
        /// The endpoint the listener's chains go to.
        endpoint_name: String,
        /// The address the node listens on (the real port).
        local: String,
    },
}

/// One chain in a `tubes` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TubeInfo {
    /// The chain's id.
    pub tunnel_id: String,
    /// This node's place in the chain.
    pub role: ChainRole,
    /// Whether every hop is in place.
    pub state: ChainState,
    /// The requester's label (node 0 and the endpoint know it once established).
    #[serde(default)]
    pub local_id: Option<String>,
    /// The node at the other end: the endpoint for node 0, the requester for the endpoint,
    /// `null` for an intermediate.
    #[serde(default)]
    pub peer: Option<String>,
    /// This end's local port (see `established`), once known.
    #[serde(default)]
    pub port: Option<u16>,
}

/// A node's place in a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainRole {
    /// Node 0, which asked for the chain.
    Requester,
    /// A node in the middle, forwarding bytes.
    Intermediate,
    /// The last node, whose front accepted the chain.
    Endpoint,
}

/// Where a chain is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainState {
    /// Hops are still being put in place.
    Building,
    /// The hub sent `establish_connection` (or, on an intermediate, both hops are connected).
    Established,
}

impl FrontMessage {
    /// Every `type` tag, in declaration order.
    pub const TYPES: [&'static str; 15] = [
        "request_tube",
        "request_close_tube",
        "approve",
        "listening",
        "list",
        "subscribe",
        "tube_result",
        "connection_request",
        "listen",
        "established",
        "closed",
        "tubes",
        "error",
        "forward_listen",
        "forward_listening",
    ];

    /// Checks every field against the limits of `docs/protocols/chain.md`.
    pub fn validate(&self) -> Result<(), FieldError> {
        match self {
            Self::RequestTube {
                endpoint_name,
                local_id,
            } => {
                check_name("endpoint_name", endpoint_name)?;
                check_local_id("local_id", local_id)
            }
            Self::RequestCloseTube {
                local_id,
                tunnel_id,
            } => match (local_id, tunnel_id) {
                (Some(l), None) => check_local_id("local_id", l),
                (None, Some(t)) => check_tunnel_id("tunnel_id", t),
                (None, None) => Err(FieldError::new("local_id", FieldProblem::Missing)),
                (Some(_), Some(_)) => Err(FieldError::new("tunnel_id", FieldProblem::Unexpected)),
            },
            Self::Approve {
                tunnel_id,
                is_allowed: _,
                reason,
                forward,
            } => {
                check_tunnel_id("tunnel_id", tunnel_id)?;
                check_max("reason", reason, MAX_REASON_LEN)?;
                match forward {
                    Some(f) => check_address("forward", f),
                    None => Ok(()),
                }
            }
            Self::Listening { tunnel_id, port } => {
                check_tunnel_id("tunnel_id", tunnel_id)?;
                check_port("port", *port)
            }
            Self::List {} | Self::Subscribe {} => Ok(()),
            Self::TubeResult {
                local_id,
                is_allowed,
                reason,
                tunnel_id,
                code: _,
                hops,
            } => {
                check_local_id("local_id", local_id)?;
                check_max("reason", reason, MAX_REASON_LEN)?;
                if let Some(h) = hops {
                    check_range("hops", u64::from(*h), 1, u64::from(MAX_HOPS))?;
                }
                match tunnel_id {
                    Some(t) => check_tunnel_id("tunnel_id", t),
                    None if *is_allowed => Err(FieldError::new("tunnel_id", FieldProblem::Missing)),
                    None => Ok(()),
                }
            }
            Self::ConnectionRequest {
                tunnel_id,
                request_user,
            } => {
                check_tunnel_id("tunnel_id", tunnel_id)?;
                check_name("request_user", request_user)
            }
            Self::Listen { tunnel_id } => check_tunnel_id("tunnel_id", tunnel_id),
            Self::Established {
                tunnel_id,
                local_id,
                endpoint_user,
                port,
            } => {
                check_tunnel_id("tunnel_id", tunnel_id)?;
                check_local_id("local_id", local_id)?;
                check_name("endpoint_user", endpoint_user)?;
                check_port("port", *port)
            }
            Self::Closed {
                tunnel_id,
                reason,
                code: _,
            } => {
                check_tunnel_id("tunnel_id", tunnel_id)?;
                check_max("reason", reason, MAX_REASON_LEN)
            }
            Self::Tubes { items } => {
                check_len("items", items.len(), 0, MAX_LIST_ITEMS)?;
                items.iter().try_for_each(TubeInfo::validate)
            }
            Self::Error { code: _, message } => check_max("message", message, MAX_MESSAGE_LEN),
            Self::ForwardListen {
                endpoint_name,
                local,
            }
            | Self::ForwardListening {
                endpoint_name,
                local,
            } => {
                check_name("endpoint_name", endpoint_name)?;
                check_address("local", local)
            }
        }
    }

    /// An `error` message.
    pub fn error(code: ChainErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code: code as u16,
            message: message.into(),
        }
    }

    /// The `type` tag, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RequestTube { .. } => "request_tube",
            Self::RequestCloseTube { .. } => "request_close_tube",
            Self::Approve { .. } => "approve",
            Self::Listening { .. } => "listening",
            Self::List {} => "list",
            Self::Subscribe {} => "subscribe",
            Self::TubeResult { .. } => "tube_result",
            Self::ConnectionRequest { .. } => "connection_request",
            Self::Listen { .. } => "listen",
            Self::Established { .. } => "established",
            Self::Closed { .. } => "closed",
            Self::Tubes { .. } => "tubes",
            Self::Error { .. } => "error",
            Self::ForwardListen { .. } => "forward_listen",
            Self::ForwardListening { .. } => "forward_listening",
        }
    }

    /// Whether a front may send this message (the node answers anything else with 6009).
    pub fn is_from_front(&self) -> bool {
        matches!(
            self,
            Self::RequestTube { .. }
                | Self::RequestCloseTube { .. }
                | Self::Approve { .. }
                | Self::Listening { .. }
                | Self::List {}
                | Self::Subscribe {}
                | Self::ForwardListen { .. }
        )
    }
}

impl TubeInfo {
    /// Checks every field (names are prefixed `items.`).
    pub fn validate(&self) -> Result<(), FieldError> {
        check_tunnel_id("items.tunnel_id", &self.tunnel_id)?;
        if let Some(l) = &self.local_id {
            check_local_id("items.local_id", l)?;
        }
        if let Some(p) = &self.peer {
            check_name("items.peer", p)?;
        }
        if let Some(p) = self.port {
            check_port("items.port", p)?;
        }
        Ok(())
    }
}

/// Encodes one front API line: the JSON object and `\n`.
///
/// A message that passes [`FrontMessage::validate`] always fits in [`MAX_FRONT_LINE`].
pub fn encode_line(msg: &FrontMessage) -> Vec<u8> {
    // Serialising these plain types cannot fail: no maps, no custom serialisers.
    let mut line = serde_json::to_vec(msg).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Parses and validates one front API line, with or without its trailing `\n`.
pub fn decode_line(line: &[u8]) -> Result<FrontMessage, MessageError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let msg: FrontMessage = decode_json(line, MAX_FRONT_LINE, &FrontMessage::TYPES)?;
    msg.validate()?;
    Ok(msg)
}

/// Cuts a byte stream into `\n`-terminated lines of at most `max_line` bytes.
///
/// Only the unfinished line is kept, never more than `max_line` bytes of it. A line found to be
/// longer is refused at once with [`LineError::TooLong`]; its remaining bytes, up to and
/// including the next `\n`, are then skipped, so the stream can go on with the next line.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    max_line: usize,
    discarding: bool,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self::new(MAX_FRONT_LINE)
    }
}

impl LineBuffer {
    /// A buffer for lines of at most `max_line` bytes (without the `\n`).
    pub fn new(max_line: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_line,
            discarding: false,
        }
    }

    /// Takes the next complete line (without its `\n`) from `input` and what was buffered.
    ///
    /// Consumes `input` up to and including the line's `\n`. `Ok(None)`: `input` is used up and
    /// no line is complete yet. Call again while `input` is not empty.
    pub fn poll_line(&mut self, input: &mut &[u8]) -> Result<Option<Vec<u8>>, LineError> {
        loop {
            let data = *input;
            if data.is_empty() {
                return Ok(None);
            }
            match data.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    *input = data.get(end + 1..).unwrap_or_default();
                    if self.discarding {
                        self.discarding = false;
                        continue;
                    }
                    let part = data.get(..end).unwrap_or_default();
                    if self.buf.len() + part.len() > self.max_line {
                        self.buf = Vec::new();
                        return Err(LineError::TooLong {
                            limit: self.max_line,
                        });
                    }
                    if self.buf.is_empty() {
                        return Ok(Some(part.to_vec()));
                    }
                    self.reserve_capped(part.len());
                    self.buf.extend_from_slice(part);
                    return Ok(Some(std::mem::take(&mut self.buf)));
                }
                None => {
                    *input = &[];
                    if self.discarding {
                        return Ok(None);
                    }
                    if self.buf.len() + data.len() > self.max_line {
                        self.buf = Vec::new();
                        self.discarding = true;
                        return Err(LineError::TooLong {
                            limit: self.max_line,
                        });
                    }
                    self.reserve_capped(data.len());
                    self.buf.extend_from_slice(data);
                    return Ok(None);
                }
            }
        }
    }

    /// Bytes of the unfinished line held now (at most `max_line`).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Grows the buffer for `extra` more bytes without its capacity passing `max_line`
    /// (callers have checked that `len + extra <= max_line`).
    fn reserve_capped(&mut self, extra: usize) {
        let need = self.buf.len() + extra;
        if need > self.buf.capacity() {
            let target = need
                .max(self.buf.capacity().saturating_mul(2))
                .min(self.max_line);
            self.buf.reserve_exact(target - self.buf.len());
        }
    }
}

/// A decoded hop preamble: `(tunnel id, secret)`.
pub type HopHello = ([u8; 16], [u8; 32]);

/// The hop preamble for a chain and the secret the hub gave the dialing node (`secret_out`).
pub fn encode_hop_hello(tunnel: [u8; 16], secret: [u8; 32]) -> [u8; HOP_HELLO_LEN] {
    let mut out = [0u8; HOP_HELLO_LEN];
    out[..4].copy_from_slice(&HOP_MAGIC);
    out[4..20].copy_from_slice(&tunnel);
    out[20..].copy_from_slice(&secret);
    out
}

/// Reads the hop preamble at the start of `buf`: `(tunnel id, secret)`.
///
/// `Ok(None)`: fewer than [`HOP_HELLO_LEN`] bytes so far. Bytes after the preamble are tunnel
/// data, which the caller forwards. The magic is checked as soon as its first byte arrives, so
/// a wrong peer is refused early. Checking the tunnel id, the secret (in constant time) and the
/// source IP is the caller's job.
pub fn decode_hop_hello(buf: &[u8]) -> Result<Option<HopHello>, HopError> {
    let seen = buf.len().min(HOP_MAGIC.len());
    if buf.get(..seen) != HOP_MAGIC.get(..seen) {
        return Err(HopError::BadMagic);
    }
    let (Some(tunnel), Some(secret)) = (buf.get(4..20), buf.get(20..HOP_HELLO_LEN)) else {
        return Ok(None);
    };
    let mut t = [0u8; 16];
    let mut s = [0u8; 32];
    t.copy_from_slice(tunnel);
    s.copy_from_slice(secret);
    Ok(Some((t, s)))
}

/// Why a hop preamble was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HopError {
    /// The connection does not start with [`HOP_MAGIC`].
    #[error("hop connection does not start with TBH1")]
    BadMagic,
}

/// Why a line could not be taken from the front API stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line is longer than the limit; it is skipped up to its `\n`.
    #[error("line longer than {limit} bytes")]
    TooLong {
        /// The limit in force.
        limit: usize,
    },
}

/// Why a hub message or a front line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// More bytes than the codec allows.
    #[error("message of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Bytes received.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Not UTF-8 JSON (or trailing bytes after the object).
    #[error("not JSON: {0}")]
    Syntax(String),
    /// JSON, but not an object.
    #[error("not a JSON object")]
    NotObject,
    /// An object without a string `type`.
    #[error("missing or non-string \"type\"")]
    MissingType,
    /// A `type` this codec does not know (at most its first 64 characters).
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A known type with a field missing or of the wrong JSON type.
    #[error("malformed {kind} message: {detail}")]
    Shape {
        /// The message type.
        kind: &'static str,
        /// The parser's description.
        detail: String,
    },
    /// A field out of bounds.
    #[error(transparent)]
    Invalid(#[from] FieldError),
}

/// A field whose value is out of bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {problem}")]
pub struct FieldError {
    /// The field's JSON name (nested ones as `items.port`).
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: FieldProblem,
}

impl FieldError {
    /// An error for `field`.
    pub fn new(field: &'static str, problem: FieldProblem) -> Self {
        Self { field, problem }
    }
}

/// What is wrong with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FieldProblem {
    /// Byte length (or item count) outside `min..=max`.
    #[error("length {len} outside {min}..={max}")]
    Length {
        /// Found.
        len: usize,
        /// Smallest allowed.
        min: usize,
        /// Largest allowed.
        max: usize,
    },
    /// A character outside the field's alphabet.
    #[error("character not allowed")]
    Charset,
    /// Not a valid value of its kind (`"tunnel id"`, `"ip:port"`, `"ip address"`).
    #[error("not a valid {0}")]
    Format(&'static str),
    /// A number outside `min..=max`.
    #[error("value {value} outside {min}..={max}")]
    Range {
        /// Found.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// Absent (or `null`) where the other fields require it.
    #[error("required here")]
    Missing,
    /// Present where the other fields forbid it.
    #[error("not allowed here")]
    Unexpected,
}

/// The chain protocol's error codes, in `error.code` and the optional `code` of results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ChainErrorCode {
    /// `auth` with an unknown name or a password that is neither the current nor the previous.
    AuthFailed = 6001,
    /// `register` with a name that already has an account.
    NameTaken = 6002,
    /// `request_tube` names an endpoint without an account.
    UnknownNode = 6003,
    /// The endpoint has an account but no session.
    EndpointOffline = 6004,
    /// The endpoint's front refused, no front was there to ask, or the endpoint is the
    /// requester itself.
    Denied = 6005,
    /// A node refused or failed its `make_tube`, or a hop failed during the build.
    BuildFailed = 6006,
    /// An approval, a build step or the login did not happen in time.
    Timeout = 6007,
    /// A count limit was hit (chains per node, pending approvals).
    Limit = 6008,
    /// A message broke the rules: malformed, wrong direction, wrong phase.
    ProtocolError = 6009,
    /// A request before `register`/`auth` succeeded; on the front API: the node has no hub
    /// session.
    NotAuthenticated = 6010,
    /// The peer speaks another major protocol version.
    UnsupportedVersion = 6011,
    /// A `local_id` or `tunnel_id` the node does not know (front API).
    UnknownTunnel = 6012,
    /// The hub is stopping.
    ShuttingDown = 6013,
    /// The hub could not serve the login now (its account store failed); try again later.
    Unavailable = 6014,
}

impl ChainErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ChainErrorCode; 14] = [
        Self::AuthFailed,
        Self::NameTaken,
        Self::UnknownNode,
        Self::EndpointOffline,
        Self::Denied,
        Self::BuildFailed,
        Self::Timeout,
        Self::Limit,
        Self::ProtocolError,
        Self::NotAuthenticated,
        Self::UnsupportedVersion,
        Self::UnknownTunnel,
        Self::ShuttingDown,
        Self::Unavailable,
    ];

    /// The code for a number, if known.
    pub fn from_u16(n: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as u16 == n)
    }

    /// The upper-case name (`AUTH_FAILED`).
    pub fn name(self) -> &'static str {
        match self {
            Self::AuthFailed => "AUTH_FAILED",
            Self::NameTaken => "NAME_TAKEN",
            Self::UnknownNode => "UNKNOWN_NODE",
            Self::EndpointOffline => "ENDPOINT_OFFLINE",
            Self::Denied => "DENIED",
            Self::BuildFailed => "BUILD_FAILED",
            Self::Timeout => "TIMEOUT",
            Self::Limit => "LIMIT",
            Self::ProtocolError => "PROTOCOL_ERROR",
            Self::NotAuthenticated => "NOT_AUTHENTICATED",
            Self::UnsupportedVersion => "UNSUPPORTED_VERSION",
            Self::UnknownTunnel => "UNKNOWN_TUNNEL",
            Self::ShuttingDown => "SHUTTING_DOWN",
            Self::Unavailable => "UNAVAILABLE",
        }
    }

    /// Formats a code number with its name where known: `6001 AUTH_FAILED`.
    pub fn describe(code: u16) -> String {
        match Self::from_u16(code) {
            Some(c) => format!("{code} {}", c.name()),
            None => format!("{code} UNKNOWN"),
        }
    }
}

/// The canonical text of a tunnel id: lowercase hyphenated UUID (8-4-4-4-12).
pub fn format_tunnel_id(id: &[u8; 16]) -> String {
    let hex = to_hex(id);
    let mut out = String::with_capacity(36);
    for (i, c) in hex.chars().enumerate() {
        if matches!(i, 8 | 12 | 16 | 20) {
            out.push('-');
        }
        out.push(c);
    }
    out
}

/// The 16 bytes of a tunnel id in canonical text; `None` for anything else (upper case, no
/// hyphens, braces, ...).
pub fn parse_tunnel_id(text: &str) -> Option<[u8; 16]> {
    let b = text.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut hex = [0u8; 32];
    let mut n = 0;
    for (i, &c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
        } else {
            *hex.get_mut(n)? = c;
            n += 1;
        }
    }
    let mut out = [0u8; 16];
    fill_from_hex(&hex, &mut out)?;
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Fills `out` from exactly `2 * out.len()` lowercase hex digits.
fn fill_from_hex(hex: &[u8], out: &mut [u8]) -> Option<()> {
    if hex.len() != out.len() * 2 {
        return None;
    }
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let [hi, lo] = pair else { return None };
        *byte = (hex_digit(*hi)? << 4) | hex_digit(*lo)?;
    }
    Some(())
}

/// Size cap, JSON, object with a known `type`, then the typed parse.
fn decode_json<T: DeserializeOwned>(
    bytes: &[u8],
    limit: usize,
    types: &[&'static str],
) -> Result<T, MessageError> {
    if bytes.len() > limit {
        return Err(MessageError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| MessageError::Syntax(e.to_string()))?;
    let obj = value.as_object().ok_or(MessageError::NotObject)?;
    let tag = obj
        .get("type")
        .and_then(serde_json::Value::as_str)
        .ok_or(MessageError::MissingType)?;
    let kind = types
        .iter()
        .copied()
        .find(|t| *t == tag)
        .ok_or_else(|| MessageError::UnknownType(tag.chars().take(64).collect()))?;
    serde_json::from_value(value).map_err(|e| MessageError::Shape {
        kind,
        detail: e.to_string(),
    })
}

fn check_len(field: &'static str, len: usize, min: usize, max: usize) -> Result<(), FieldError> {
    if (min..=max).contains(&len) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            FieldProblem::Length { len, min, max },
        ))
    }
}

fn check_range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), FieldError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            FieldProblem::Range { value, min, max },
        ))
    }
}

fn check_max(field: &'static str, text: &str, max: usize) -> Result<(), FieldError> {
    check_len(field, text.len(), 0, max)
}

fn check_name(field: &'static str, name: &str) -> Result<(), FieldError> {
    check_len(field, name.len(), 1, MAX_NAME_LEN)?;
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        Ok(())
    } else {
        Err(FieldError::new(field, FieldProblem::Charset))
    }
}

/// A `host:port` (or `ip:port`): printable ASCII without spaces, at most [`MAX_ADDRESS_LEN`].
fn check_address(field: &'static str, addr: &str) -> Result<(), FieldError> {
    check_len(field, addr.len(), 1, MAX_ADDRESS_LEN)?;
    if addr.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(FieldError::new(field, FieldProblem::Charset))
    }
}

fn check_local_id(field: &'static str, id: &str) -> Result<(), FieldError> {
    check_len(field, id.len(), 1, MAX_LOCAL_ID_LEN)?;
    if id.chars().any(char::is_control) {
        Err(FieldError::new(field, FieldProblem::Charset))
    } else {
        Ok(())
    }
}

fn check_version(field: &'static str, version: &str) -> Result<(), FieldError> {
    check_len(field, version.len(), 1, MAX_VERSION_LEN)?;
    if version.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(FieldError::new(field, FieldProblem::Charset))
    }
}

fn check_secret(field: &'static str, secret: &ChainSecret) -> Result<(), FieldError> {
    let text = secret.expose();
    check_len(field, text.len(), SECRET_HEX_LEN, SECRET_HEX_LEN)?;
    if text.bytes().all(|b| hex_digit(b).is_some()) {
        Ok(())
    } else {
        Err(FieldError::new(field, FieldProblem::Charset))
    }
}

/// A secret that must be present exactly when `required`.
fn check_secret_when(
    field: &'static str,
    secret: Option<&ChainSecret>,
    required: bool,
) -> Result<(), FieldError> {
    match (secret, required) {
        (Some(s), true) => check_secret(field, s),
        (None, true) => Err(FieldError::new(field, FieldProblem::Missing)),
        (Some(_), false) => Err(FieldError::new(field, FieldProblem::Unexpected)),
        (None, false) => Ok(()),
    }
}

fn check_tunnel_id(field: &'static str, id: &str) -> Result<(), FieldError> {
    match parse_tunnel_id(id) {
        Some(_) => Ok(()),
        None => Err(FieldError::new(field, FieldProblem::Format("tunnel id"))),
    }
}

fn check_id(field: &'static str, id: u64) -> Result<(), FieldError> {
    check_range(field, id, 0, MAX_REQUEST_ID)
}

fn check_port(field: &'static str, port: u16) -> Result<(), FieldError> {
    check_range(field, u64::from(port), 1, u64::from(u16::MAX))
}

fn check_socket_addr(field: &'static str, addr: &str) -> Result<(), FieldError> {
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|_| FieldError::new(field, FieldProblem::Format("ip:port")))?;
    check_port(field, parsed.port())
}

fn check_ip(field: &'static str, ip: &str) -> Result<(), FieldError> {
    ip.parse::<IpAddr>()
        .map(|_| ())
        .map_err(|_| FieldError::new(field, FieldProblem::Format("ip address")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TID: &str = "8fb889f4-a766-48f0-8e58-1c5ebdb9d088";
    const PW0: &str = "24fc191f0e38e892b446cad39f992f060cc5ba386c9f98a477a826c5031734f2";
    const PW1: &str = "aed81e35bf41dba7b3682f2b36d5a81a24b5f3076b329e8080ad902fe74a1060";
    const S0: &str = "1f890c0fe070e03e42178de6814adc0760a559019f01794fe54a9995d44f57ec";
    const S1: &str = "67f7c8a4e5568d0f46939cf1bedb0bee4a2d8758ccbc65f4e3f59ab5c631ecc3";

    fn secret(s: &str) -> ChainSecret {
        ChainSecret::new(s)
    }

    /// One message of every hub type.
    fn hub_samples() -> Vec<HubMessage> {
        vec![
            HubMessage::Register {
                version: "1.0".into(),
                name: "node0".into(),
                relay: true,
                invite: None,
            },
            HubMessage::Auth {
                version: "1.0".into(),
                name: "node0".into(),
                password: secret(PW0),
                relay: false,
            },
            HubMessage::Logout {},
            HubMessage::RequestTube {
                id: 1,
                endpoint_name: "node3".into(),
                local_id: "web".into(),
            },
            HubMessage::RequestCloseTube {
                tunnel_id: TID.into(),
            },
            HubMessage::MakeTubeResult {
                id: 8,
                tunnel_id: TID.into(),
                is_allowed: true,
                port: Some(41001),
                reason: String::new(),
            },
            HubMessage::RequestConnectionResult {
                id: 7,
                tunnel_id: TID.into(),
                is_allowed: false,
                reason: "not now".into(),
            },
            HubMessage::RegisterResult {
                is_success: true,
                message: "registered".into(),
                password: Some(secret(PW0)),
                code: None,
            },
            HubMessage::AuthResult {
                is_success: false,
                message: "authentication failed".into(),
                next_password: None,
                code: Some(6001),
            },
            HubMessage::LogoutResult {
                is_success: true,
                message: "bye".into(),
            },
            HubMessage::RequestTubeResult {
                id: 1,
                is_allowed: true,
                reason: String::new(),
                tunnel_id: Some(TID.into()),
                hops: 3,
                code: None,
            },
            HubMessage::MakeTube {
                id: 9,
                tunnel_id: TID.into(),
                from: Some("203.0.113.10:41001".into()),
                to: Some("198.51.100.12".into()),
                secret_in: Some(secret(S1)),
                secret_out: Some(secret(S0)),
            },
            HubMessage::CloseTube {
                tunnel_id: TID.into(),
                reason: "node n1 disconnected".into(),
                code: Some(6006),
            },
            HubMessage::RequestConnection {
                id: 7,
                request_user: "node0".into(),
                tunnel_id: TID.into(),
            },
            HubMessage::EstablishConnection {
                tunnel_id: TID.into(),
                local_id: "web".into(),
                endpoint_user: "node3".into(),
            },
            HubMessage::error(ChainErrorCode::ProtocolError, "unexpected make_tube"),
            HubMessage::PasswordStored {},
            HubMessage::Register {
                version: "1.0".into(),
                name: "node1".into(),
                relay: false,
                invite: Some(secret(PW0)),
            },
        ]
    }

    /// One message of every front type.
    fn front_samples() -> Vec<FrontMessage> {
        vec![
            FrontMessage::RequestTube {
                endpoint_name: "node3".into(),
                local_id: "web".into(),
            },
            FrontMessage::RequestCloseTube {
                local_id: Some("web".into()),
                tunnel_id: None,
            },
            FrontMessage::Approve {
                tunnel_id: TID.into(),
                is_allowed: true,
                reason: String::new(),
                forward: Some("127.0.0.1:22".into()),
            },
            FrontMessage::Listening {
                tunnel_id: TID.into(),
                port: 53000,
            },
            FrontMessage::List {},
            FrontMessage::Subscribe {},
            FrontMessage::TubeResult {
                local_id: "web".into(),
                is_allowed: true,
                reason: String::new(),
                tunnel_id: Some(TID.into()),
                code: None,
                hops: None,
            },
            FrontMessage::ConnectionRequest {
                tunnel_id: TID.into(),
                request_user: "node0".into(),
            },
            FrontMessage::Listen {
                tunnel_id: TID.into(),
            },
            FrontMessage::Established {
                tunnel_id: TID.into(),
                local_id: "web".into(),
                endpoint_user: "node3".into(),
                port: 53100,
            },
            FrontMessage::Closed {
                tunnel_id: TID.into(),
                reason: "closed by node0".into(),
                code: None,
            },
            FrontMessage::Tubes {
                items: vec![TubeInfo {
                    tunnel_id: TID.into(),
                    role: ChainRole::Requester,
                    state: ChainState::Established,
                    local_id: Some("web".into()),
                    peer: Some("node3".into()),
                    port: Some(53000),
                }],
            },
            FrontMessage::error(ChainErrorCode::UnknownTunnel, "no chain with local_id web"),
            FrontMessage::TubeResult {
                local_id: "web".into(),
                is_allowed: true,
                reason: "only 1 intermediate online (2 wanted)".into(),
                tunnel_id: Some(TID.into()),
                code: None,
                hops: Some(2),
            },
            FrontMessage::ForwardListen {
                endpoint_name: "node3".into(),
                local: "127.0.0.1:2222".into(),
            },
            FrontMessage::ForwardListening {
                endpoint_name: "node3".into(),
                local: "127.0.0.1:2222".into(),
            },
        ]
    }

    #[test]
    fn every_hub_message_roundtrips_and_types_are_listed() {
        let samples = hub_samples();
        let mut kinds: Vec<&str> = samples.iter().map(HubMessage::kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let mut listed = HubMessage::TYPES.to_vec();
        listed.sort_unstable();
        assert_eq!(kinds, listed, "one sample per type, TYPES complete");
        for m in samples {
            assert_eq!(m.validate(), Ok(()), "{m:?}");
            let bytes = m.to_bytes();
            assert_eq!(HubMessage::from_bytes(&bytes).as_ref(), Ok(&m));
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["type"], m.kind());
            assert!(m.is_from_node() || m.is_from_hub());
            assert_eq!(
                m.is_from_node() && m.is_from_hub(),
                m.kind() == "error",
                "only error goes both ways"
            );
        }
    }

    #[test]
    fn every_front_message_roundtrips_and_types_are_listed() {
        let samples = front_samples();
        let mut kinds: Vec<&str> = samples.iter().map(FrontMessage::kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let mut listed = FrontMessage::TYPES.to_vec();
        listed.sort_unstable();
        assert_eq!(kinds, listed);
        for m in samples {
            let line = encode_line(&m);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(
                line.iter().filter(|&&b| b == b'\n').count(),
                1,
                "one line per message"
            );
            assert_eq!(decode_line(&line).as_ref(), Ok(&m));
            assert_eq!(decode_line(&line[..line.len() - 1]).as_ref(), Ok(&m));
        }
    }

    /// The registration token of chain.md's `register` example.
    const INVITE: &str = "5f0c2e7d9a8b4c1e6f3a2d0b9c8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e";

    #[test]
    fn hub_byte_literals_match_the_spec() {
        let cases: Vec<(HubMessage, String)> = vec![
            (
                hub_samples().remove(0),
                r#"{"type":"register","version":"1.0","name":"node0","relay":true}"#.into(),
            ),
            (
                HubMessage::RegisterResult {
                    is_success: true,
                    message: "registered".into(),
                    password: Some(secret(PW0)),
                    code: None,
                },
                format!(
                    r#"{{"type":"register_result","is_success":true,"message":"registered","password":"{PW0}"}}"#
                ),
            ),
            (
                HubMessage::Auth {
                    version: "1.0".into(),
                    name: "node0".into(),
                    password: secret(PW0),
                    relay: true,
                },
                format!(
                    r#"{{"type":"auth","version":"1.0","name":"node0","password":"{PW0}","relay":true}}"#
                ),
            ),
            (
                HubMessage::AuthResult {
                    is_success: true,
                    message: "welcome".into(),
                    next_password: Some(secret(PW1)),
                    code: None,
                },
                format!(
                    r#"{{"type":"auth_result","is_success":true,"message":"welcome","next_password":"{PW1}"}}"#
                ),
            ),
            (
                HubMessage::AuthResult {
                    is_success: false,
                    message: "authentication failed".into(),
                    next_password: None,
                    code: Some(6001),
                },
                r#"{"type":"auth_result","is_success":false,"message":"authentication failed","next_password":null,"code":6001}"#.into(),
            ),
            (
                HubMessage::MakeTube {
                    id: 8,
                    tunnel_id: TID.into(),
                    from: None,
                    to: Some("198.51.100.11".into()),
                    secret_in: Some(secret(S0)),
                    secret_out: None,
                },
                format!(
                    r#"{{"type":"make_tube","id":8,"tunnel_id":"{TID}","from":null,"to":"198.51.100.11","secret_in":"{S0}","secret_out":null}}"#
                ),
            ),
            (
                HubMessage::MakeTubeResult {
                    id: 8,
                    tunnel_id: TID.into(),
                    is_allowed: true,
                    port: Some(41001),
                    reason: String::new(),
                },
                format!(
                    r#"{{"type":"make_tube_result","id":8,"tunnel_id":"{TID}","is_allowed":true,"port":41001,"reason":""}}"#
                ),
            ),
            (
                HubMessage::RequestTubeResult {
                    id: 1,
                    is_allowed: false,
                    reason: "node3 is offline".into(),
                    tunnel_id: None,
                    hops: 0,
                    code: Some(6004),
                },
                r#"{"type":"request_tube_result","id":1,"is_allowed":false,"reason":"node3 is offline","tunnel_id":null,"hops":0,"code":6004}"#.into(),
            ),
            (
                HubMessage::Logout {},
                r#"{"type":"logout"}"#.into(),
            ),
            (
                hub_samples().remove(12),
                format!(
                    r#"{{"type":"close_tube","tunnel_id":"{TID}","reason":"node n1 disconnected","code":6006}}"#
                ),
            ),
            (
                HubMessage::error(ChainErrorCode::NotAuthenticated, "log in first"),
                r#"{"type":"error","code":6010,"message":"log in first"}"#.into(),
            ),
            (
                HubMessage::Register {
                    version: "1.0".into(),
                    name: "node1".into(),
                    relay: false,
                    invite: Some(secret(INVITE)),
                },
                format!(
                    r#"{{"type":"register","version":"1.0","name":"node1","relay":false,"invite":"{INVITE}"}}"#
                ),
            ),
        ];
        for (msg, json) in cases {
            assert_eq!(std::str::from_utf8(&msg.to_bytes()).unwrap(), json);
            assert_eq!(HubMessage::from_bytes(json.as_bytes()), Ok(msg));
        }
    }

    #[test]
    fn front_byte_literals_match_the_spec() {
        let cases: Vec<(FrontMessage, String)> = vec![
            (
                front_samples().remove(0),
                "{\"type\":\"request_tube\",\"endpoint_name\":\"node3\",\"local_id\":\"web\"}\n"
                    .into(),
            ),
            (
                FrontMessage::Listen {
                    tunnel_id: TID.into(),
                },
                format!("{{\"type\":\"listen\",\"tunnel_id\":\"{TID}\"}}\n"),
            ),
            (
                FrontMessage::Listening {
                    tunnel_id: TID.into(),
                    port: 53000,
                },
                format!("{{\"type\":\"listening\",\"tunnel_id\":\"{TID}\",\"port\":53000}}\n"),
            ),
            (
                front_samples().remove(9),
                format!(
                    "{{\"type\":\"established\",\"tunnel_id\":\"{TID}\",\"local_id\":\"web\",\"endpoint_user\":\"node3\",\"port\":53100}}\n"
                ),
            ),
            (
                FrontMessage::RequestCloseTube {
                    local_id: Some("web".into()),
                    tunnel_id: None,
                },
                "{\"type\":\"request_close_tube\",\"local_id\":\"web\"}\n".into(),
            ),
            (
                front_samples().remove(11),
                format!(
                    "{{\"type\":\"tubes\",\"items\":[{{\"tunnel_id\":\"{TID}\",\"role\":\"requester\",\"state\":\"established\",\"local_id\":\"web\",\"peer\":\"node3\",\"port\":53000}}]}}\n"
                ),
            ),
        ];
        let cases = cases.into_iter().chain([
            (
                front_samples().remove(10),
                format!(
                    "{{\"type\":\"closed\",\"tunnel_id\":\"{TID}\",\"reason\":\"closed by node0\"}}\n"
                ),
            ),
            (
                front_samples().remove(2),
                format!(
                    "{{\"type\":\"approve\",\"tunnel_id\":\"{TID}\",\"is_allowed\":true,\"reason\":\"\",\"forward\":\"127.0.0.1:22\"}}\n"
                ),
            ),
            (
                FrontMessage::ForwardListen {
                    endpoint_name: "node3".into(),
                    local: "127.0.0.1:2222".into(),
                },
                "{\"type\":\"forward_listen\",\"endpoint_name\":\"node3\",\"local\":\"127.0.0.1:2222\"}\n"
                    .into(),
            ),
        ]);
        for (msg, line) in cases {
            assert_eq!(std::str::from_utf8(&encode_line(&msg)).unwrap(), line);
            assert_eq!(decode_line(line.as_bytes()), Ok(msg));
        }
        // CRLF from a terminal: the `\r` is JSON whitespace.
        assert_eq!(
            decode_line(b"{\"type\":\"list\"}\r\n"),
            Ok(FrontMessage::List {})
        );
    }

    #[test]
    fn every_example_in_the_spec_decodes_and_encodes_back() {
        let spec = include_str!("../../../docs/protocols/chain.md");
        let mut seen = 0;
        for line in spec.lines().filter(|l| l.starts_with("{\"type\":")) {
            let as_hub = HubMessage::from_bytes(line.as_bytes()).map(|m| m.to_bytes().to_vec());
            let as_front = decode_line(line.as_bytes()).map(|m| encode_line(&m));
            let mut front_line = line.as_bytes().to_vec();
            front_line.push(b'\n');
            assert!(
                as_hub.as_deref() == Ok(line.as_bytes())
                    || as_front.as_deref() == Ok(&front_line[..]),
                "{line}: hub {as_hub:?}, front {as_front:?}"
            );
            seen += 1;
        }
        assert!(seen >= 30, "only {seen} examples found");
    }

    #[test]
    fn hop_hello_bytes_match_the_spec() {
        let tunnel = parse_tunnel_id(TID).unwrap();
        let mut secret = [0u8; 32];
        for (i, b) in secret.iter_mut().enumerate() {
            *b = i as u8;
        }
        let hello = encode_hop_hello(tunnel, secret);
        let want: [u8; 52] = [
            0x54, 0x42, 0x48, 0x31, // "TBH1"
            0x8f, 0xb8, 0x89, 0xf4, 0xa7, 0x66, 0x48, 0xf0, // tunnel id
            0x8e, 0x58, 0x1c, 0x5e, 0xbd, 0xb9, 0xd0, 0x88, //
            0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, // secret
            0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, //
            0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, //
            0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
        ];
        assert_eq!(hello, want);
        assert_eq!(decode_hop_hello(&hello), Ok(Some((tunnel, secret))));
        // Bytes after the preamble are tunnel data, left to the caller.
        let mut more = hello.to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(decode_hop_hello(&more), Ok(Some((tunnel, secret))));
        assert_eq!(
            ChainSecret::from_bytes(&secret).expose(),
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        );
    }

    fn field(field: &'static str, problem: FieldProblem) -> MessageError {
        MessageError::Invalid(FieldError::new(field, problem))
    }

    fn len(len: usize, min: usize, max: usize) -> FieldProblem {
        FieldProblem::Length { len, min, max }
    }

    fn range(value: u64, min: u64, max: u64) -> FieldProblem {
        FieldProblem::Range { value, min, max }
    }

    /// What a malformed input must produce; `Shape` and `Syntax` texts come from serde_json,
    /// so those match on the message kind or a fragment of the text.
    enum Want {
        Exactly(MessageError),
        Syntax,
        Shape(&'static str, &'static str),
    }

    fn check(got: Result<impl fmt::Debug, MessageError>, want: &Want, name: &str) {
        let err = match got {
            Ok(v) => panic!("{name}: decoded {v:?}"),
            Err(e) => e,
        };
        match want {
            Want::Exactly(w) => assert_eq!(&err, w, "{name}"),
            Want::Syntax => assert!(matches!(err, MessageError::Syntax(_)), "{name}: {err:?}"),
            Want::Shape(kind, fragment) => match &err {
                MessageError::Shape { kind: k, detail } => {
                    assert_eq!(k, kind, "{name}");
                    assert!(detail.contains(fragment), "{name}: {detail}");
                }
                other => panic!("{name}: {other:?}"),
            },
        }
    }

    #[test]
    fn malformed_hub_messages_are_refused_with_the_specific_error() {
        use FieldProblem::*;
        use Want::*;
        let reg = |name: &str| {
            format!(r#"{{"type":"register","version":"1.0","name":"{name}","relay":true}}"#)
        };
        let auth = |pw: &str| {
            format!(
                r#"{{"type":"auth","version":"1.0","name":"n","password":"{pw}","relay":true}}"#
            )
        };
        let req = |id: &str, local: &str| {
            format!(
                r#"{{"type":"request_tube","id":{id},"endpoint_name":"b","local_id":"{local}"}}"#
            )
        };
        let mtr = |allowed: bool, port: &str| {
            format!(
                r#"{{"type":"make_tube_result","id":1,"tunnel_id":"{TID}","is_allowed":{allowed},"port":{port},"reason":""}}"#
            )
        };
        let mt = |from: &str, to: &str, sin: &str, sout: &str| {
            format!(
                r#"{{"type":"make_tube","id":1,"tunnel_id":"{TID}","from":{from},"to":{to},"secret_in":{sin},"secret_out":{sout}}}"#
            )
        };
        let q = |s: &str| format!("\"{s}\"");
        let rtr = |allowed: bool, tid: &str, hops: &str| {
            format!(
                r#"{{"type":"request_tube_result","id":1,"is_allowed":{allowed},"reason":"","tunnel_id":{tid},"hops":{hops}}}"#
            )
        };
        let long = |n: usize| "x".repeat(n);
        let cases: Vec<(&str, Vec<u8>, Want)> = vec![
            ("empty", b"".to_vec(), Syntax),
            ("not utf-8", b"\xff\xfe".to_vec(), Syntax),
            ("truncated", br#"{"type":"logout""#.to_vec(), Syntax),
            ("trailing bytes", br#"{"type":"logout"} x"#.to_vec(), Syntax),
            ("two objects", br#"{"type":"logout"}{"type":"logout"}"#.to_vec(), Syntax),
            ("array", b"[1,2]".to_vec(), Exactly(MessageError::NotObject)),
            ("string", br#""register""#.to_vec(), Exactly(MessageError::NotObject)),
            ("no type", b"{}".to_vec(), Exactly(MessageError::MissingType)),
            ("numeric type", br#"{"type":7}"#.to_vec(), Exactly(MessageError::MissingType)),
            (
                "unknown type",
                br#"{"type":"teleport"}"#.to_vec(),
                Exactly(MessageError::UnknownType("teleport".into())),
            ),
            (
                "type is case-sensitive",
                br#"{"type":"Register"}"#.to_vec(),
                Exactly(MessageError::UnknownType("Register".into())),
            ),
            (
                "front type on the hub",
                br#"{"type":"listen"}"#.to_vec(),
                Exactly(MessageError::UnknownType("listen".into())),
            ),
            (
                "empty type",
                br#"{"type":""}"#.to_vec(),
                Exactly(MessageError::UnknownType(String::new())),
            ),
            (
                "missing name",
                br#"{"type":"register","version":"1.0","relay":true}"#.to_vec(),
                Shape("register", "missing field `name`"),
            ),
            (
                "relay not a bool",
                br#"{"type":"register","version":"1.0","name":"a","relay":"yes"}"#.to_vec(),
                Shape("register", "invalid type"),
            ),
            (
                "missing version",
                br#"{"type":"register","name":"a","relay":true}"#.to_vec(),
                Shape("register", "missing field `version`"),
            ),
            ("empty name", reg("").into(), Exactly(field("name", len(0, 1, 64)))),
            ("long name", reg(&long(65)).into(), Exactly(field("name", len(65, 1, 64)))),
            ("space in name", reg("bad name").into(), Exactly(field("name", Charset))),
            ("non-ascii name", reg("é").into(), Exactly(field("name", Charset))),
            ("slash in name", reg("a/b").into(), Exactly(field("name", Charset))),
            (
                "empty version",
                br#"{"type":"register","version":"","name":"a","relay":true}"#.to_vec(),
                Exactly(field("version", len(0, 1, 16))),
            ),
            (
                "short password",
                auth(&PW0[1..]).into(),
                Exactly(field("password", len(63, 64, 64))),
            ),
            (
                "upper-case password",
                auth(&PW0.to_uppercase()).into(),
                Exactly(field("password", Charset)),
            ),
            (
                "non-hex password",
                auth(&format!("g{}", &PW0[1..])).into(),
                Exactly(field("password", Charset)),
            ),
            (
                "id beyond 2^53-1",
                req("9007199254740992", "web").into(),
                Exactly(field("id", range(1 << 53, 0, MAX_REQUEST_ID))),
            ),
            ("negative id", req("-1", "web").into(), Shape("request_tube", "invalid value")),
            ("float id", req("1.5", "web").into(), Shape("request_tube", "invalid type")),
            ("empty local_id", req("1", "").into(), Exactly(field("local_id", len(0, 1, 128)))),
            (
                "long local_id",
                req("1", &long(129)).into(),
                Exactly(field("local_id", len(129, 1, 128))),
            ),
            (
                "control char in local_id",
                req("1", "a\\nb").into(),
                Exactly(field("local_id", Charset)),
            ),
            (
                "upper-case tunnel id",
                format!(r#"{{"type":"request_close_tube","tunnel_id":"{}"}}"#, TID.to_uppercase())
                    .into(),
                Exactly(field("tunnel_id", Format("tunnel id"))),
            ),
            (
                "tunnel id without hyphens",
                format!(r#"{{"type":"request_close_tube","tunnel_id":"{}"}}"#, TID.replace('-', ""))
                    .into(),
                Exactly(field("tunnel_id", Format("tunnel id"))),
            ),
            (
                "tunnel id with braces",
                format!(r#"{{"type":"request_close_tube","tunnel_id":"{{{TID}}}"}}"#).into(),
                Exactly(field("tunnel_id", Format("tunnel id"))),
            ),
            ("port 0", mtr(true, "0").into(), Exactly(field("port", range(0, 1, 65535)))),
            ("port above u16", mtr(true, "70000").into(), Shape("make_tube_result", "invalid value")),
            ("port on refusal", mtr(false, "41001").into(), Exactly(field("port", Unexpected))),
            (
                "from without port",
                mt(&q("1.2.3.4"), "null", "null", &q(S0)).into(),
                Exactly(field("from", Format("ip:port"))),
            ),
            (
                "from with a host name",
                mt(&q("hub.example:80"), "null", "null", &q(S0)).into(),
                Exactly(field("from", Format("ip:port"))),
            ),
            (
                "from port 0",
                mt(&q("1.2.3.4:0"), "null", "null", &q(S0)).into(),
                Exactly(field("from", range(0, 1, 65535))),
            ),
            (
                "to with a port",
                mt("null", &q("1.2.3.4:5"), &q(S0), "null").into(),
                Exactly(field("to", Format("ip address"))),
            ),
            (
                "from without secret_out",
                mt(&q("1.2.3.4:5"), "null", "null", "null").into(),
                Exactly(field("secret_out", Missing)),
            ),
            (
                "secret_in without to",
                mt(&q("1.2.3.4:5"), "null", &q(S1), &q(S0)).into(),
                Exactly(field("secret_in", Unexpected)),
            ),
            (
                "neither from nor to",
                mt("null", "null", "null", "null").into(),
                Exactly(field("from", Missing)),
            ),
            (
                "register success without password",
                br#"{"type":"register_result","is_success":true,"message":"","password":null}"#
                    .to_vec(),
                Exactly(field("password", Missing)),
            ),
            (
                "register failure with password",
                format!(
                    r#"{{"type":"register_result","is_success":false,"message":"","password":"{PW0}"}}"#
                )
                .into(),
                Exactly(field("password", Unexpected)),
            ),
            (
                "auth success without next_password",
                br#"{"type":"auth_result","is_success":true,"message":""}"#.to_vec(),
                Exactly(field("next_password", Missing)),
            ),
            (
                "accepted tube without tunnel id",
                rtr(true, "null", "3").into(),
                Exactly(field("tunnel_id", Missing)),
            ),
            (
                "accepted tube with 0 hops",
                rtr(true, &q(TID), "0").into(),
                Exactly(field("hops", range(0, 1, 16))),
            ),
            (
                "17 hops",
                rtr(true, &q(TID), "17").into(),
                Exactly(field("hops", range(17, 1, 16))),
            ),
            ("hops above u8", rtr(true, &q(TID), "300").into(), Shape("request_tube_result", "invalid value")),
            (
                "long error message",
                format!(r#"{{"type":"error","code":6009,"message":"{}"}}"#, long(1025)).into(),
                Exactly(field("message", len(1025, 0, 1024))),
            ),
            (
                "long close reason",
                format!(r#"{{"type":"close_tube","tunnel_id":"{TID}","reason":"{}"}}"#, long(257))
                    .into(),
                Exactly(field("reason", len(257, 0, 256))),
            ),
            (
                "bad request_user",
                format!(r#"{{"type":"request_connection","id":1,"request_user":"a b","tunnel_id":"{TID}"}}"#)
                    .into(),
                Exactly(field("request_user", Charset)),
            ),
            (
                "over 64 KiB",
                {
                    let mut v = br#"{"type":"logout","pad":""#.to_vec();
                    v.resize(MAX_HUB_MESSAGE - 1, b'a');
                    v.extend_from_slice(b"\"}");
                    v
                },
                Exactly(MessageError::TooLarge {
                    len: MAX_HUB_MESSAGE + 1,
                    limit: MAX_HUB_MESSAGE,
                }),
            ),
        ];
        assert!(cases.len() >= 40, "{} cases", cases.len());
        for (name, bytes, want) in &cases {
            check(HubMessage::from_bytes(bytes), want, name);
        }
    }

    #[test]
    fn malformed_front_lines_are_refused_with_the_specific_error() {
        use FieldProblem::*;
        use Want::*;
        let items = |n: usize| {
            let item = format!(r#"{{"tunnel_id":"{TID}","role":"endpoint","state":"building"}}"#);
            format!(
                r#"{{"type":"tubes","items":[{}]}}"#,
                vec![item; n].join(",")
            )
        };
        let cases: Vec<(&str, Vec<u8>, Want)> = vec![
            ("empty", b"".to_vec(), Syntax),
            ("blank line", b"\n".to_vec(), Syntax),
            ("text", b"hello\n".to_vec(), Syntax),
            ("invalid utf-8", b"\"\xc3\x28\"\n".to_vec(), Syntax),
            ("array", b"[]\n".to_vec(), Exactly(MessageError::NotObject)),
            ("no type", br#"{"kind":"list"}"#.to_vec(), Exactly(MessageError::MissingType)),
            (
                "hub type on the front",
                br#"{"type":"make_tube"}"#.to_vec(),
                Exactly(MessageError::UnknownType("make_tube".into())),
            ),
            (
                "missing local_id",
                br#"{"type":"request_tube","endpoint_name":"b"}"#.to_vec(),
                Shape("request_tube", "missing field `local_id`"),
            ),
            (
                "bad endpoint_name",
                br#"{"type":"request_tube","endpoint_name":"a b","local_id":"x"}"#.to_vec(),
                Exactly(field("endpoint_name", Charset)),
            ),
            (
                "close names nothing",
                br#"{"type":"request_close_tube"}"#.to_vec(),
                Exactly(field("local_id", Missing)),
            ),
            (
                "close names both",
                format!(r#"{{"type":"request_close_tube","local_id":"web","tunnel_id":"{TID}"}}"#)
                    .into(),
                Exactly(field("tunnel_id", Unexpected)),
            ),
            (
                "approve a bad tunnel id",
                br#"{"type":"approve","tunnel_id":"42","is_allowed":true}"#.to_vec(),
                Exactly(field("tunnel_id", Format("tunnel id"))),
            ),
            (
                "approve without is_allowed",
                format!(r#"{{"type":"approve","tunnel_id":"{TID}"}}"#).into(),
                Shape("approve", "missing field `is_allowed`"),
            ),
            (
                "long approve reason",
                format!(r#"{{"type":"approve","tunnel_id":"{TID}","is_allowed":false,"reason":"{}"}}"#, "r".repeat(257))
                    .into(),
                Exactly(field("reason", len(257, 0, 256))),
            ),
            (
                "listening on port 0",
                format!(r#"{{"type":"listening","tunnel_id":"{TID}","port":0}}"#).into(),
                Exactly(field("port", range(0, 1, 65535))),
            ),
            (
                "listening on a negative port",
                format!(r#"{{"type":"listening","tunnel_id":"{TID}","port":-1}}"#).into(),
                Shape("listening", "invalid value"),
            ),
            (
                "established on port 0",
                format!(r#"{{"type":"established","tunnel_id":"{TID}","local_id":"w","endpoint_user":"b","port":0}}"#)
                    .into(),
                Exactly(field("port", range(0, 1, 65535))),
            ),
            (
                "accepted tube without tunnel id",
                br#"{"type":"tube_result","local_id":"w","is_allowed":true,"reason":""}"#.to_vec(),
                Exactly(field("tunnel_id", Missing)),
            ),
            (
                "65 items",
                items(65).into(),
                Exactly(field("items", len(65, 0, 64))),
            ),
            (
                "unknown role",
                format!(r#"{{"type":"tubes","items":[{{"tunnel_id":"{TID}","role":"boss","state":"building"}}]}}"#)
                    .into(),
                Shape("tubes", "unknown variant `boss`"),
            ),
            (
                "bad item tunnel id",
                br#"{"type":"tubes","items":[{"tunnel_id":"x","role":"endpoint","state":"building"}]}"#
                    .to_vec(),
                Exactly(field("items.tunnel_id", Format("tunnel id"))),
            ),
            (
                "bad item peer",
                format!(r#"{{"type":"tubes","items":[{{"tunnel_id":"{TID}","role":"endpoint","state":"building","peer":""}}]}}"#)
                    .into(),
                Exactly(field("items.peer", len(0, 1, 64))),
            ),
            (
                "line over 64 KiB",
                {
                    let mut v = br#"{"type":"list","pad":""#.to_vec();
                    v.resize(MAX_FRONT_LINE - 1, b'a');
                    v.extend_from_slice(b"\"}\n");
                    v
                },
                Exactly(MessageError::TooLarge {
                    len: MAX_FRONT_LINE + 1,
                    limit: MAX_FRONT_LINE,
                }),
            ),
        ];
        for (name, bytes, want) in &cases {
            check(decode_line(bytes), want, name);
        }
        // 64 items still fit in a line.
        let full = items(64);
        assert!(full.len() < MAX_FRONT_LINE);
        assert!(decode_line(full.as_bytes()).is_ok());
    }

    #[test]
    fn malformed_hop_hellos_are_refused() {
        let good = encode_hop_hello([7; 16], [9; 32]);
        let mut wrong_version = good;
        wrong_version[3] = b'2';
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("wrong version digit", wrong_version.to_vec()),
            ("lower-case magic", b"tbh1".to_vec()),
            ("first byte wrong", b"X".to_vec()),
            ("third byte wrong", b"TBX".to_vec()),
            ("all zero", vec![0; HOP_HELLO_LEN]),
            (
                "an HTTP request",
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            ),
            ("a TLS client hello", vec![0x16, 0x03, 0x01, 0x02, 0x00]),
        ];
        for (name, bytes) in cases {
            assert_eq!(decode_hop_hello(&bytes), Err(HopError::BadMagic), "{name}");
        }
        assert_eq!(decode_hop_hello(b""), Ok(None));
        assert_eq!(decode_hop_hello(&good[..51]), Ok(None));
    }

    #[test]
    fn line_buffer_splits_and_joins_lines() {
        let mut lb = LineBuffer::new(16);
        let mut input: &[u8] = b"ab";
        assert_eq!(lb.poll_line(&mut input), Ok(None));
        let mut input: &[u8] = b"c\n\nde\nf";
        assert_eq!(lb.poll_line(&mut input), Ok(Some(b"abc".to_vec())));
        assert_eq!(lb.poll_line(&mut input), Ok(Some(Vec::new())));
        assert_eq!(lb.poll_line(&mut input), Ok(Some(b"de".to_vec())));
        assert_eq!(lb.poll_line(&mut input), Ok(None));
        assert!(input.is_empty());
        assert_eq!(lb.buffered(), 1);
        // Exactly the limit is fine; one more byte is refused at once, before its newline.
        let mut input: &[u8] = b"123456789012345\n";
        assert_eq!(
            lb.poll_line(&mut input),
            Ok(Some(b"f123456789012345".to_vec()))
        );
        let mut input: &[u8] = b"12345678901234567";
        assert_eq!(
            lb.poll_line(&mut input),
            Err(LineError::TooLong { limit: 16 })
        );
        assert_eq!(lb.buffered(), 0);
        // The rest of that line is skipped; the next one comes through.
        let mut input: &[u8] = b"more of it\nok\n";
        assert_eq!(lb.poll_line(&mut input), Ok(Some(b"ok".to_vec())));
        // A complete over-long line in one chunk is refused without skipping the next.
        let mut input: &[u8] = b"12345678901234567\nok\n";
        assert_eq!(
            lb.poll_line(&mut input),
            Err(LineError::TooLong { limit: 16 })
        );
        assert_eq!(lb.poll_line(&mut input), Ok(Some(b"ok".to_vec())));
        assert_eq!(LineBuffer::default().max_line, MAX_FRONT_LINE);
    }

    #[test]
    fn tunnel_ids_and_secrets_convert() {
        let bytes = parse_tunnel_id(TID).unwrap();
        assert_eq!(bytes[0], 0x8f);
        assert_eq!(bytes[15], 0x88);
        assert_eq!(format_tunnel_id(&bytes), TID);
        for bad in [
            "",
            "8fb889f4a76648f08e581c5ebdb9d088",
            "8fb889f4-a766-48f0-8e58-1c5ebdb9d08",
            "8fb889f4-a766-48f0-8e58-1c5ebdb9d0888",
            "8fb889f4_a766-48f0-8e58-1c5ebdb9d088",
            "8fb889f4-a766-48f0-8e58-1c5ebdb9d08g",
            "8FB889F4-A766-48F0-8E58-1C5EBDB9D088",
            "8fb889f4-a766-48f0-8e581-c5ebdb9d088",
        ] {
            assert_eq!(parse_tunnel_id(bad), None, "{bad}");
        }
        assert_eq!(
            secret(S0).to_bytes().map(|b| ChainSecret::from_bytes(&b)),
            Some(secret(S0))
        );
        assert_eq!(secret(&S0.to_uppercase()).to_bytes(), None);
        assert_eq!(secret("abc").to_bytes(), None);
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        for m in hub_samples() {
            let text = format!("{m:?}");
            for s in [PW0, PW1, S0, S1] {
                assert!(!text.contains(s), "{text}");
            }
        }
        assert_eq!(format!("{:?}", secret(S0)), "ChainSecret(<redacted>)");
    }

    #[test]
    fn unknown_fields_are_ignored_and_defaults_apply() {
        let m = HubMessage::from_bytes(
            br#"{"type":"close_tube","tunnel_id":"8fb889f4-a766-48f0-8e58-1c5ebdb9d088","hint":1}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            HubMessage::CloseTube {
                tunnel_id: TID.into(),
                reason: String::new(),
                code: None,
            }
        );
        assert_eq!(m.tunnel_id(), Some(TID));
        assert_eq!(m.request_id(), None);
        let m = HubMessage::from_bytes(br#"{"type":"logout","reason":"x"}"#).unwrap();
        assert_eq!(m, HubMessage::Logout {});
        // Optional fields may be omitted as well as `null`.
        let json = format!(
            r#"{{"type":"make_tube","id":3,"tunnel_id":"{TID}","to":"::1","secret_in":"{S0}"}}"#
        );
        assert_eq!(
            HubMessage::from_bytes(json.as_bytes()),
            Ok(HubMessage::MakeTube {
                id: 3,
                tunnel_id: TID.into(),
                from: None,
                to: Some("::1".into()),
                secret_in: Some(secret(S0)),
                secret_out: None,
            })
        );
        assert_eq!(
            decode_line(br#"{"type":"tube_result","local_id":"w","is_allowed":false}"#),
            Ok(FrontMessage::TubeResult {
                local_id: "w".into(),
                is_allowed: false,
                reason: String::new(),
                tunnel_id: None,
                code: None,
                hops: None,
            })
        );
    }

    #[test]
    fn codes_roundtrip_and_names_are_unique() {
        let mut names = std::collections::HashSet::new();
        for (i, c) in ChainErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(c as u16, 6001 + i as u16, "codes are consecutive");
            assert_eq!(ChainErrorCode::from_u16(c as u16), Some(c));
            assert!(names.insert(c.name()));
        }
        assert_eq!(ChainErrorCode::describe(6001), "6001 AUTH_FAILED");
        assert_eq!(ChainErrorCode::describe(6000), "6000 UNKNOWN");
    }

    #[test]
    fn version_compatibility_checks_the_major_number() {
        assert!(version_compatible(CHAIN_PROTOCOL_VERSION));
        assert!(version_compatible("1.9"));
        assert!(!version_compatible("2.0"));
        assert!(!version_compatible(""));
    }

    // Strategies producing valid fields and messages.

    fn arb_name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_.-]{1,64}"
    }

    fn arb_secret() -> impl Strategy<Value = ChainSecret> {
        any::<[u8; 32]>().prop_map(|b| ChainSecret::from_bytes(&b))
    }

    fn arb_tid() -> impl Strategy<Value = String> {
        any::<[u8; 16]>().prop_map(|b| format_tunnel_id(&b))
    }

    fn arb_local_id() -> impl Strategy<Value = String> {
        "[^\\p{Cc}]{1,32}"
    }

    fn arb_address() -> impl Strategy<Value = String> {
        "[!-~]{1,261}"
    }

    fn arb_text() -> impl Strategy<Value = String> {
        "(?s).{0,40}"
    }

    fn arb_id() -> impl Strategy<Value = u64> {
        0..=MAX_REQUEST_ID
    }

    fn arb_addr() -> impl Strategy<Value = String> {
        (any::<IpAddr>(), 1u16..).prop_map(|(ip, port)| SocketAddr::new(ip, port).to_string())
    }

    fn arb_code() -> impl Strategy<Value = Option<u16>> {
        proptest::option::of(any::<u16>())
    }

    fn arb_hub() -> impl Strategy<Value = HubMessage> {
        prop_oneof![
            (
                "[!-~]{1,16}",
                arb_name(),
                any::<bool>(),
                proptest::option::of(arb_secret())
            )
                .prop_map(|(version, name, relay, invite)| HubMessage::Register {
                    version,
                    name,
                    relay,
                    invite,
                }),
            ("[!-~]{1,16}", arb_name(), arb_secret(), any::<bool>()).prop_map(
                |(version, name, password, relay)| HubMessage::Auth {
                    version,
                    name,
                    password,
                    relay
                }
            ),
            Just(HubMessage::Logout {}),
            Just(HubMessage::PasswordStored {}),
            (arb_id(), arb_name(), arb_local_id()).prop_map(|(id, endpoint_name, local_id)| {
                HubMessage::RequestTube {
                    id,
                    endpoint_name,
                    local_id,
                }
            }),
            arb_tid().prop_map(|tunnel_id| HubMessage::RequestCloseTube { tunnel_id }),
            (
                arb_id(),
                arb_tid(),
                any::<bool>(),
                proptest::option::of(1u16..),
                arb_text()
            )
                .prop_map(|(id, tunnel_id, is_allowed, port, reason)| {
                    HubMessage::MakeTubeResult {
                        id,
                        tunnel_id,
                        is_allowed,
                        port: port.filter(|_| is_allowed),
                        reason,
                    }
                }),
            (arb_id(), arb_tid(), any::<bool>(), arb_text()).prop_map(
                |(id, tunnel_id, is_allowed, reason)| HubMessage::RequestConnectionResult {
                    id,
                    tunnel_id,
                    is_allowed,
                    reason
                }
            ),
            (any::<bool>(), arb_text(), arb_secret(), arb_code()).prop_map(
                |(is_success, message, pw, code)| HubMessage::RegisterResult {
                    is_success,
                    message,
                    password: Some(pw).filter(|_| is_success),
                    code,
                }
            ),
            (any::<bool>(), arb_text(), arb_secret(), arb_code()).prop_map(
                |(is_success, message, pw, code)| HubMessage::AuthResult {
                    is_success,
                    message,
                    next_password: Some(pw).filter(|_| is_success),
                    code,
                }
            ),
            (any::<bool>(), arb_text()).prop_map(|(is_success, message)| {
                HubMessage::LogoutResult {
                    is_success,
                    message,
                }
            }),
            (
                arb_id(),
                any::<bool>(),
                arb_text(),
                proptest::option::of(arb_tid()),
                1..=MAX_HOPS,
                arb_code()
            )
                .prop_map(|(id, is_allowed, reason, tid, hops, code)| {
                    HubMessage::RequestTubeResult {
                        id,
                        is_allowed,
                        reason,
                        tunnel_id: if is_allowed {
                            Some(tid.unwrap_or_else(|| TID.into()))
                        } else {
                            tid
                        },
                        hops: if is_allowed { hops } else { 0 },
                        code,
                    }
                }),
            (
                arb_id(),
                arb_tid(),
                proptest::option::of((arb_addr(), arb_secret())),
                proptest::option::of((any::<IpAddr>(), arb_secret()))
            )
                .prop_filter("node 0 or later", |(_, _, from, to)| from.is_some()
                    || to.is_some())
                .prop_map(|(id, tunnel_id, from, to)| {
                    let (from, secret_out) = from.unzip();
                    let (to, secret_in) = to.unzip();
                    HubMessage::MakeTube {
                        id,
                        tunnel_id,
                        from,
                        to: to.map(|ip| ip.to_string()),
                        secret_in,
                        secret_out,
                    }
                }),
            (arb_tid(), arb_text(), arb_code()).prop_map(|(tunnel_id, reason, code)| {
                HubMessage::CloseTube {
                    tunnel_id,
                    reason,
                    code,
                }
            }),
            (arb_id(), arb_name(), arb_tid()).prop_map(|(id, request_user, tunnel_id)| {
                HubMessage::RequestConnection {
                    id,
                    request_user,
                    tunnel_id,
                }
            }),
            (arb_tid(), arb_local_id(), arb_name()).prop_map(
                |(tunnel_id, local_id, endpoint_user)| HubMessage::EstablishConnection {
                    tunnel_id,
                    local_id,
                    endpoint_user
                }
            ),
            (any::<u16>(), arb_text())
                .prop_map(|(code, message)| HubMessage::Error { code, message }),
        ]
    }

    fn arb_tube_info() -> impl Strategy<Value = TubeInfo> {
        (
            arb_tid(),
            prop_oneof![
                Just(ChainRole::Requester),
                Just(ChainRole::Intermediate),
                Just(ChainRole::Endpoint)
            ],
            prop_oneof![Just(ChainState::Building), Just(ChainState::Established)],
            proptest::option::of(arb_local_id()),
            proptest::option::of(arb_name()),
            proptest::option::of(1u16..),
        )
            .prop_map(|(tunnel_id, role, state, local_id, peer, port)| TubeInfo {
                tunnel_id,
                role,
                state,
                local_id,
                peer,
                port,
            })
    }

    fn arb_front() -> impl Strategy<Value = FrontMessage> {
        prop_oneof![
            (arb_name(), arb_local_id()).prop_map(|(endpoint_name, local_id)| {
                FrontMessage::RequestTube {
                    endpoint_name,
                    local_id,
                }
            }),
            prop_oneof![
                arb_local_id().prop_map(|l| (Some(l), None)),
                arb_tid().prop_map(|t| (None, Some(t))),
            ]
            .prop_map(|(local_id, tunnel_id)| FrontMessage::RequestCloseTube {
                local_id,
                tunnel_id
            }),
            (
                arb_tid(),
                any::<bool>(),
                arb_text(),
                proptest::option::of(arb_address())
            )
                .prop_map(|(tunnel_id, is_allowed, reason, forward)| {
                    FrontMessage::Approve {
                        tunnel_id,
                        is_allowed,
                        reason,
                        forward,
                    }
                }),
            (arb_tid(), 1u16..)
                .prop_map(|(tunnel_id, port)| FrontMessage::Listening { tunnel_id, port }),
            Just(FrontMessage::List {}),
            Just(FrontMessage::Subscribe {}),
            (
                arb_local_id(),
                any::<bool>(),
                arb_text(),
                arb_tid(),
                arb_code(),
                proptest::option::of(1u8..=MAX_HOPS)
            )
                .prop_map(|(local_id, is_allowed, reason, tid, code, hops)| {
                    FrontMessage::TubeResult {
                        local_id,
                        is_allowed,
                        reason,
                        tunnel_id: Some(tid).filter(|_| is_allowed),
                        code,
                        hops,
                    }
                }),
            (arb_tid(), arb_name()).prop_map(|(tunnel_id, request_user)| {
                FrontMessage::ConnectionRequest {
                    tunnel_id,
                    request_user,
                }
            }),
            arb_tid().prop_map(|tunnel_id| FrontMessage::Listen { tunnel_id }),
            (arb_tid(), arb_local_id(), arb_name(), 1u16..).prop_map(
                |(tunnel_id, local_id, endpoint_user, port)| FrontMessage::Established {
                    tunnel_id,
                    local_id,
                    endpoint_user,
                    port,
                }
            ),
            (arb_tid(), arb_text(), arb_code()).prop_map(|(tunnel_id, reason, code)| {
                FrontMessage::Closed {
                    tunnel_id,
                    reason,
                    code,
                }
            }),
            proptest::collection::vec(arb_tube_info(), 0..8)
                .prop_map(|items| FrontMessage::Tubes { items }),
            (any::<u16>(), arb_text())
                .prop_map(|(code, message)| FrontMessage::Error { code, message }),
            (arb_name(), arb_address(), any::<bool>()).prop_map(|(endpoint_name, local, ask)| {
                if ask {
                    FrontMessage::ForwardListen {
                        endpoint_name,
                        local,
                    }
                } else {
                    FrontMessage::ForwardListening {
                        endpoint_name,
                        local,
                    }
                }
            }),
        ]
    }

    /// JSON objects with a known `type` and random fields, to reach `validate` and serde's
    /// error paths.
    fn arb_object() -> impl Strategy<Value = Vec<u8>> {
        let keys: Vec<&'static str> = vec![
            "version",
            "name",
            "relay",
            "password",
            "id",
            "endpoint_name",
            "local_id",
            "tunnel_id",
            "is_allowed",
            "port",
            "reason",
            "is_success",
            "message",
            "next_password",
            "hops",
            "from",
            "to",
            "secret_in",
            "secret_out",
            "request_user",
            "endpoint_user",
            "code",
            "items",
        ];
        let types: Vec<&'static str> = HubMessage::TYPES
            .iter()
            .chain(FrontMessage::TYPES.iter())
            .copied()
            .collect();
        let value = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (0u16..=2000).prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
            arb_name().prop_map(serde_json::Value::from),
            arb_tid().prop_map(serde_json::Value::from),
            arb_secret().prop_map(|s| serde_json::Value::from(s.expose())),
            arb_addr().prop_map(serde_json::Value::from),
            proptest::collection::vec(arb_tube_info(), 0..3)
                .prop_map(|v| serde_json::to_value(v).unwrap()),
        ];
        (
            proptest::sample::select(types),
            proptest::collection::btree_map(proptest::sample::select(keys), value, 0..10),
        )
            .prop_map(|(tag, fields)| {
                let mut obj: serde_json::Map<String, serde_json::Value> =
                    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                obj.insert("type".into(), tag.into());
                serde_json::to_vec(&obj).unwrap()
            })
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = HubMessage::from_bytes(&bytes);
            let _ = decode_line(&bytes);
            let _ = decode_hop_hello(&bytes);
            let mut lb = LineBuffer::new(64);
            let mut input: &[u8] = &bytes;
            while !input.is_empty() {
                let _ = lb.poll_line(&mut input);
                prop_assert!(lb.buffered() <= 64);
            }
        }

        #[test]
        fn random_objects_never_panic(json in arb_object()) {
            if let Ok(m) = HubMessage::from_bytes(&json) {
                prop_assert_eq!(HubMessage::from_bytes(&m.to_bytes()), Ok(m));
            }
            if let Ok(m) = decode_line(&json) {
                prop_assert_eq!(decode_line(&encode_line(&m)), Ok(m));
            }
        }

        #[test]
        fn hub_encode_then_decode_is_identity(m in arb_hub()) {
            prop_assert_eq!(m.validate(), Ok(()));
            prop_assert_eq!(HubMessage::from_bytes(&m.to_bytes()), Ok(m));
        }

        #[test]
        fn front_encode_then_decode_is_identity(m in arb_front()) {
            let line = encode_line(&m);
            prop_assert!(line.len() <= MAX_FRONT_LINE + 1);
            let mut lb = LineBuffer::default();
            let mut input: &[u8] = &line;
            let got = lb.poll_line(&mut input).unwrap().unwrap();
            prop_assert!(input.is_empty());
            prop_assert_eq!(decode_line(&got), Ok(m));
        }

        #[test]
        fn hop_encode_then_decode_is_identity(t in any::<[u8; 16]>(), s in any::<[u8; 32]>()) {
            prop_assert_eq!(decode_hop_hello(&encode_hop_hello(t, s)), Ok(Some((t, s))));
        }

        #[test]
        fn every_prefix_of_a_hop_hello_is_incomplete(t in any::<[u8; 16]>(), s in any::<[u8; 32]>()) {
            let hello = encode_hop_hello(t, s);
            for cut in 0..HOP_HELLO_LEN {
                prop_assert_eq!(decode_hop_hello(&hello[..cut]), Ok(None));
            }
        }

        #[test]
        fn every_prefix_of_a_front_line_is_incomplete(m in arb_front()) {
            let line = encode_line(&m);
            for cut in 0..line.len() {
                let mut lb = LineBuffer::default();
                let mut input: &[u8] = &line[..cut];
                prop_assert_eq!(lb.poll_line(&mut input), Ok(None));
                prop_assert_eq!(lb.buffered(), cut);
            }
        }

        #[test]
        fn any_chunking_gives_the_same_lines(
            msgs in proptest::collection::vec(arb_front(), 1..6),
            chunk in 1usize..64,
        ) {
            let stream: Vec<u8> = msgs.iter().flat_map(encode_line).collect();
            let mut lb = LineBuffer::default();
            let mut got = Vec::new();
            for mut input in stream.chunks(chunk) {
                while let Some(line) = lb.poll_line(&mut input).unwrap() {
                    got.push(decode_line(&line).unwrap());
                }
            }
            prop_assert_eq!(got, msgs);
            prop_assert_eq!(lb.buffered(), 0);
        }

        #[test]
        fn an_overlong_line_is_refused_without_growing_past_the_cap(
            cap in 1usize..200,
            extra in 1usize..600,
            chunk in 1usize..97,
        ) {
            let mut stream = vec![b'x'; cap + extra];
            stream.extend_from_slice(b"\n{\"type\":\"list\"}\n");
            let mut lb = LineBuffer::new(cap);
            let mut errors = 0;
            let mut lines = Vec::new();
            for mut input in stream.chunks(chunk) {
                while !input.is_empty() {
                    match lb.poll_line(&mut input) {
                        Ok(Some(line)) => lines.push(line),
                        Ok(None) => {}
                        Err(e) => {
                            prop_assert_eq!(e, LineError::TooLong { limit: cap });
                            errors += 1;
                        }
                    }
                    prop_assert!(lb.buffered() <= cap);
                    prop_assert!(lb.buf.capacity() <= cap, "capacity {}", lb.buf.capacity());
                }
            }
            // `{"type":"list"}` is 15 bytes: over a smaller cap it is refused too.
            if cap >= 15 {
                prop_assert_eq!(errors, 1);
                prop_assert_eq!(lines.len(), 1);
                prop_assert_eq!(decode_line(&lines[0]), Ok(FrontMessage::List {}));
            } else {
                prop_assert_eq!(errors, 2);
                prop_assert!(lines.is_empty());
            }
        }
    }
}
