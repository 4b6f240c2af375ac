//! Wire formats and pure protocol logic for tube.
//!
//! Nothing here does IO, reads a clock or spawns a task: codecs work on byte buffers and state
//! machines take their inputs as arguments. That keeps every decoder fuzzable and every rule
//! testable without a runtime. The async edge lives in `tube-net` and the services.
//!
//! - [`frame`]: the relay's framing layer (control frames and multiplexed stream frames).
//! - [`frame_parser`]: frames from runs of bytes that stay in place (DATA as ranges, no copy).
//! - [`control`]: the JSON control messages of seed 001 and the error codes.
//! - [`flow`]: credit-based flow-control windows for multiplexed streams.
//! - [`lifecycle`]: the agent lifecycle state machine (seed 001, section 3.1).
//! - [`heartbeat`]: heartbeat scheduling and liveness deadlines.
//! - [`backoff`]: exponential reconnect backoff with jitter (seed 001, section 6.1).
//! - [`ratelimit`]: keyed token-bucket rate limits (seed 001, section 5.2).
//! - [`cidr`]: address ranges for tunnel allow-lists.
//! - [`chain`]: the chain service's codecs (seed 000): hub messages, front API, hop preamble.
//! - [`mailbox`]: the mailbox root packets (seed 003).
//! - [`longpoll`]: the long-poll proxy's headers (seed 004).
//! - [`time`]: RFC 3339 timestamps.
//! - [`tls13`]: the framing of TLS 1.3 records (headers, padding, post-handshake messages).

pub mod backoff;
pub mod chain;
pub mod cidr;
pub mod control;
pub mod flow;
pub mod frame;
pub mod frame_parser;
pub mod heartbeat;
pub mod lifecycle;
pub mod longpoll;
pub mod mailbox;
pub mod ratelimit;
pub mod time;
pub mod tls13;

pub use control::{ControlMessage, ErrorCode, ErrorDetails};
pub use flow::{FlowError, RecvWindow};
pub use frame::{DecodeError, Frame, FrameKind, FrameLimits};

/// Version of the relay protocol this build speaks, as sent in the greeting and in `auth`.
///
/// Peers must agree on the major number; minor versions only add optional fields.
pub const RELAY_PROTOCOL_VERSION: &str = "1.0";

/// The major part of [`RELAY_PROTOCOL_VERSION`].
pub const RELAY_PROTOCOL_MAJOR: u32 = 1;

/// Whether a peer's protocol version string is one this build can speak (same major number).
pub fn relay_version_compatible(version: &str) -> bool {
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    major == Some(RELAY_PROTOCOL_MAJOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_compatibility_checks_the_major_number() {
        assert!(relay_version_compatible("1.0"));
        assert!(relay_version_compatible("1.7"));
        assert!(relay_version_compatible("1"));
        assert!(!relay_version_compatible("2.0"));
        assert!(!relay_version_compatible("0.9"));
        assert!(!relay_version_compatible(""));
        assert!(!relay_version_compatible("x.1"));
    }
}
