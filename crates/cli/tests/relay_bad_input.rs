//! Bad input at the relay: each case gets its protocol error (or a closed connection where no
//! protocol is spoken yet) and never disturbs an agent that is already serving users.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tube_net::codec::{HandshakeConn, handshake_conn, recv_control, send_control};
use tube_net::tokio_rustls::{TlsConnector, client::TlsStream};
use tube_net::{Fingerprint, tls};
use tube_proto::control::{ClientInfo, ControlMessage, TunnelInfo};
use tube_proto::{ErrorCode, Frame};
use tube_testkit::*;

const LIMIT: Duration = Duration::from_secs(60);

type Conn = HandshakeConn<TlsStream<TcpStream>>;

/// A relay with an agent serving an echo service, to prove bad input elsewhere harms nothing.
struct Bystander {
    relay: TestRelay,
    agent: TestAgent,
    _svc: TestServer,
}

impl Bystander {
    async fn start_with(cfg: tube_relay::RelayConfig) -> Self {
        let relay = TestRelay::start_with(cfg).await;
        let svc = echo_server().await;
        let agent = TestAgent::start(relay.agent_config(&[svc.addr])).await;
        let b = Self {
            relay,
            agent,
            _svc: svc,
        };
        b.check().await;
        b
    }

    async fn start() -> Self {
        Self::start_with(relay_config()).await
    }

    async fn check(&self) {
        let mut u = TcpStream::connect(self.agent.public[0]).await.unwrap();
        assert_eq!(roundtrip(&mut u, b"still serving").await, b"still serving");
    }

    async fn stop(self) {
        self.check().await;
        self.agent.stop().await;
        self.relay.stop().await;
    }
}

async fn tls_connect(addr: SocketAddr, fp: Fingerprint) -> Conn {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let cfg = tls::pinned_client_config(fp).unwrap();
    let tls = TlsConnector::from(cfg)
        .connect(tls::server_name(), tcp)
        .await
        .unwrap();
    handshake_conn(tls)
}

/// TLS + greeting + auth with `token`; returns the connection after a successful auth.
async fn authed(addr: SocketAddr, fp: Fingerprint, token: &str) -> Conn {
    let mut c = tls_connect(addr, fp).await;
    assert!(matches!(
        recv_control(&mut c).await.unwrap(),
        ControlMessage::Hello { .. }
    ));
    send_control(&mut c, &auth_msg(token, "1.0")).await.unwrap();
    assert!(matches!(
        recv_control(&mut c).await.unwrap(),
        ControlMessage::AuthResponse { .. }
    ));
    c
}

fn auth_msg(token: &str, version: &str) -> ControlMessage {
    ControlMessage::Auth {
        token: token.into(),
        version: version.into(),
        client_info: ClientInfo::default(),
        window: None,
    }
}

/// Reads until the relay's `error` message; returns its code, then expects the close.
async fn expect_error(c: &mut Conn) -> u16 {
    loop {
        match c.next().await {
            Some(Ok(Frame::Control(b))) => {
                if let Ok(ControlMessage::Error { code, .. }) = ControlMessage::from_bytes(&b) {
                    // After the error the relay closes the connection.
                    loop {
                        match c.next().await {
                            None | Some(Err(_)) => return code,
                            Some(Ok(_)) => {}
                        }
                    }
                }
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => panic!("connection closed without an error message"),
        }
    }
}

async fn agent_error(
    b: &Bystander,
    edit: impl FnOnce(&mut tube_agent::AgentConfig),
) -> tube_agent::AgentError {
    let svc = echo_server().await;
    let mut cfg = b.relay.agent_config(&[svc.addr]);
    edit(&mut cfg);
    TestAgent::try_start(cfg)
        .await
        .err()
        .expect("agent must be refused")
}

#[tokio::test]
async fn bad_expired_and_missing_tokens_get_their_codes() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        let other = tube_relay::JwtSecret::generate().unwrap();
        let e = agent_error(&b, |c| {
            c.token = other.mint("mallory", Duration::from_secs(60))
        })
        .await;
        assert_eq!(e.code(), Some(ErrorCode::InvalidToken), "{e}");
        assert_eq!(e.to_string(), "error 1002 INVALID_TOKEN: invalid token");
        let e = agent_error(&b, |c| c.token = "garbage".into()).await;
        assert_eq!(e.code(), Some(ErrorCode::InvalidToken), "{e}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let expired = b.relay.jwt.mint_at("alice", now - 120, now - 60);
        let e = agent_error(&b, |c| c.token = expired).await;
        assert_eq!(e.code(), Some(ErrorCode::TokenExpired), "{e}");
        assert_eq!(e.to_string(), "error 1003 TOKEN_EXPIRED: token expired");
        let e = agent_error(&b, |c| c.token = String::new()).await;
        assert_eq!(e.code(), Some(ErrorCode::AuthFailed), "{e}");
        // The secret never appears in what the agent is told.
        assert!(!e.to_string().contains(&b.relay.token("x")[..20]));
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn wrong_fingerprint_is_refused_by_the_agent() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        let wrong: Fingerprint = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let e = agent_error(&b, |c| c.fingerprint = wrong).await;
        assert!(
            matches!(e, tube_agent::AgentError::FingerprintMismatch(_)),
            "{e}"
        );
        assert!(e.to_string().contains("fingerprint does not match"), "{e}");
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unsupported_protocol_version_is_refused() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        let e = agent_error(&b, |c| c.protocol_version = "2.0".into()).await;
        assert_eq!(e.code(), Some(ErrorCode::UnsupportedVersion), "{e}");
        assert!(
            e.to_string()
                .starts_with("error 1004 UNSUPPORTED_VERSION: "),
            "{e}"
        );
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn garbage_instead_of_tls_closes_only_that_connection() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        let mut raw = TcpStream::connect(b.relay.addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        raw.write_all(&[0xff; 4096]).await.unwrap();
        let mut buf = Vec::new();
        // The relay answers with at most a TLS alert, then closes.
        let _ = raw.read_to_end(&mut buf).await;
        assert!(buf.len() < 64, "no application data for a non-TLS client");
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn garbage_frames_after_tls_get_protocol_error() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        let (addr, fp) = (b.relay.addr, b.relay.fingerprint);
        // Before auth: an unknown frame type.
        let mut c = tls_connect(addr, fp).await;
        let _hello = recv_control(&mut c).await.unwrap();
        c.get_mut()
            .write_all(&[0x7f, 0, 0, 0, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        assert_eq!(expect_error(&mut c).await, ErrorCode::ProtocolError as u16);
        // Before auth: valid frame, wrong message.
        let mut c = tls_connect(addr, fp).await;
        let _hello = recv_control(&mut c).await.unwrap();
        let reg = ControlMessage::Register {
            tunnel_info: TunnelInfo::default(),
        };
        send_control(&mut c, &reg).await.unwrap();
        assert_eq!(expect_error(&mut c).await, ErrorCode::ProtocolError as u16);
        // Before auth: JSON that is not a message.
        let mut c = tls_connect(addr, fp).await;
        let _hello = recv_control(&mut c).await.unwrap();
        c.send(Frame::Control(bytes::Bytes::from_static(
            b"{\"type\":\"teleport\"}",
        )))
        .await
        .unwrap();
        assert_eq!(expect_error(&mut c).await, ErrorCode::ProtocolError as u16);
        // After auth: a length of u32::MAX is refused from the header.
        let mut c = authed(addr, fp, &b.relay.token("x")).await;
        c.get_mut()
            .write_all(&[0x02, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        assert_eq!(expect_error(&mut c).await, ErrorCode::ProtocolError as u16);
        // After auth: an agent may not open streams.
        let mut c = authed(addr, fp, &b.relay.token("x")).await;
        c.send(Frame::Open {
            stream: 1,
            tunnel: [0; 16],
            peer: "x".into(),
        })
        .await
        .unwrap();
        assert_eq!(expect_error(&mut c).await, ErrorCode::ProtocolError as u16);
        // After auth: a second auth is a protocol error.
        let mut c = authed(addr, fp, &b.relay.token("x")).await;
        send_control(&mut c, &auth_msg("x", "1.0")).await.unwrap();
        assert_eq!(expect_error(&mut c).await, ErrorCode::ProtocolError as u16);
        b.stop().await;
    })
    .await;
}

// A stream sending beyond its window (4002 FLOW_CONTROL_ERROR) is tested on the mux itself
// (`crates/net/src/mux.rs`), where the test owns the consumer: through a relay, the user's
// kernel buffers return credit at a pace the test cannot control.

#[tokio::test]
async fn silent_clients_are_cut_at_the_handshake_deadline() {
    init_tracing();
    deadline(LIMIT, async {
        let mut cfg = relay_config();
        cfg.handshake_timeout = Duration::from_millis(300);
        let b = Bystander::start_with(cfg).await;
        // TLS done, greeting read, but no auth: error 4004, then close.
        let mut c = tls_connect(b.relay.addr, b.relay.fingerprint).await;
        let _hello = recv_control(&mut c).await.unwrap();
        assert_eq!(
            expect_error(&mut c).await,
            ErrorCode::HandshakeTimeout as u16
        );
        // No TLS at all: closed.
        let mut raw = TcpStream::connect(b.relay.addr).await.unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(raw.read(&mut buf).await, Ok(0) | Err(_)));
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn pending_handshakes_are_capped() {
    init_tracing();
    deadline(LIMIT, async {
        let mut cfg = relay_config();
        cfg.max_handshakes = 2;
        cfg.handshake_timeout = Duration::from_secs(30);
        let relay = TestRelay::start_with(cfg).await;
        // Two silent connections hold both handshake slots.
        let idle1 = TcpStream::connect(relay.addr).await.unwrap();
        let idle2 = TcpStream::connect(relay.addr).await.unwrap();
        // The third is closed at once. (Retry: the relay may not have accepted the first two
        // yet, in which case the third took a slot and a later one is refused.)
        let mut refused = false;
        let mut extra = Vec::new();
        for _ in 0..10 {
            let mut s = TcpStream::connect(relay.addr).await.unwrap();
            let mut b = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    refused = true;
                    break;
                }
                _ => extra.push(s),
            }
        }
        assert!(
            refused,
            "a connection beyond the cap must be closed at once"
        );
        // Once the silent ones go away, agents are served again.
        drop((idle1, idle2, extra));
        let svc = echo_server().await;
        let agent = loop {
            match TestAgent::try_start(relay.agent_config(&[svc.addr])).await {
                Ok(a) => break a,
                Err(_) => tokio::task::yield_now().await,
            }
        };
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn invalid_tunnel_requests_are_refused_without_closing_the_connection() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        let mut c = authed(b.relay.addr, b.relay.fingerprint, &b.relay.token("x")).await;
        let bad = [
            TunnelInfo {
                name: "udp".into(),
                protocol: "udp".into(),
                ..Default::default()
            },
            TunnelInfo {
                name: "two".into(),
                protocol: "tcp".into(),
                ports: vec![1, 2],
                ..Default::default()
            },
            TunnelInfo {
                name: "n".repeat(200),
                protocol: "tcp".into(),
                ..Default::default()
            },
        ];
        for info in bad {
            send_control(&mut c, &ControlMessage::Register { tunnel_info: info })
                .await
                .unwrap();
            match recv_control(&mut c).await.unwrap() {
                ControlMessage::Error { code, .. } => {
                    assert_eq!(code, ErrorCode::InvalidConfig as u16)
                }
                other => panic!("expected error, got {other:?}"),
            }
        }
        // The same connection can still register a valid tunnel.
        let ok = TunnelInfo {
            name: "ok".into(),
            protocol: "tcp".into(),
            ..Default::default()
        };
        send_control(&mut c, &ControlMessage::Register { tunnel_info: ok })
            .await
            .unwrap();
        assert!(matches!(
            recv_control(&mut c).await.unwrap(),
            ControlMessage::RegisterResponse { .. }
        ));
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_tls_1_2_client_is_refused() {
    init_tracing();
    deadline(LIMIT, async {
        let b = Bystander::start().await;
        // A stock provider: tube's own offers TLS 1.3 suites only.
        let stock = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(stock)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let tcp = TcpStream::connect(b.relay.addr).await.unwrap();
        let res = TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(tls::server_name(), tcp)
            .await;
        let Err(err) = res else {
            panic!("TLS 1.2 must be refused")
        };
        assert!(
            err.to_string().to_lowercase().contains("protocolversion"),
            "{err}"
        );
        b.stop().await;
    })
    .await;
}
