//! Malformed input against one running peer (issue 8): a table of cases over the TCP packet
//! protocol of `docs/protocols/mailbox.md`, each on its own connection (from its own loopback
//! address, so per-address limits stay per case). Each case gets the ERROR code of section 8,
//! and its connection is closed (7001, 7002) or stays open and usable (7003 to 7007). A header
//! that claims `u32::MAX` bytes, and an unknown type byte on its own, are refused before any
//! payload is sent. A client registered and fetching before the table still receives after it.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{TestPeer, start_peer_with};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;
use tube_mailbox::crypto::{self, Identity};
use tube_mailbox::peer::PeerConfig;
use tube_mailbox::wire::{self, Conn, Stream};
use tube_proto::mailbox::{self as codec, Packet, proof_message};
use tube_proto::ratelimit::RateLimit;
use tube_testkit::{deadline, init_tracing};

const LIMIT: Duration = Duration::from_secs(60);

/// Longest wait for one answer or one close.
const STEP: Duration = Duration::from_secs(8);

/// Deliveries per minute per source address and per recipient on the test peer.
const DELIVERIES: u32 = 5;

/// A root packet with a correct length.
fn packet(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// A root header claiming `len` bytes, with no payload.
fn header(kind: u8, len: u32) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(&len.to_be_bytes());
    b
}

fn encoded(p: &Packet) -> Vec<u8> {
    codec::to_bytes(p).to_vec()
}

/// A DELIVER of a small opaque blob to `to`.
fn deliver(to: [u8; 32]) -> Vec<u8> {
    encoded(&Packet::Deliver {
        to,
        id: [7; 16],
        blob: Bytes::from_static(b"sealed elsewhere"),
    })
}

/// A fingerprint nobody registered.
fn stranger(n: u8) -> [u8; 32] {
    [n; 32]
}

enum Step {
    /// Write these bytes.
    Send(Vec<u8>),
    /// REGISTER this certificate and read the CHALLENGE.
    Register(Vec<u8>),
    /// PROOF for the registered certificate, signed by `signer` over the challenge (or over
    /// another nonce).
    Prove {
        signer: Arc<Identity>,
        nonce: Option<[u8; 32]>,
    },
    /// Read an ERROR with this code.
    Refused(u16),
    /// Read the KEEPALIVE echo.
    Echo,
}

struct MailCase {
    name: &'static str,
    steps: Vec<Step>,
    code: u16,
    /// Whether the peer closes the connection after the ERROR.
    closes: bool,
}

fn closes(name: &'static str, bytes: Vec<u8>, code: u16) -> MailCase {
    MailCase {
        name,
        steps: vec![Step::Send(bytes)],
        code,
        closes: true,
    }
}

fn stays(name: &'static str, steps: Vec<Step>, code: u16) -> MailCase {
    MailCase {
        name,
        steps,
        code,
        closes: false,
    }
}

fn proof(signer: &Arc<Identity>) -> Step {
    Step::Prove {
        signer: signer.clone(),
        nonce: None,
    }
}

#[rustfmt::skip]
fn cases(full: [u8; 32], ids: &[Arc<Identity>; 3]) -> Vec<MailCase> {
    let [a, b, c] = ids;
    let cert = |id: &Arc<Identity>| id.cert().to_vec();
    let register = |cert: &[u8]| {
        let mut p = (cert.len() as u16).to_be_bytes().to_vec();
        p.extend_from_slice(cert);
        p
    };
    let error = |code: u16, text: &[u8], claimed: u16| {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(&claimed.to_be_bytes());
        p.extend_from_slice(text);
        p
    };
    let deliver_payload = |blob: usize| {
        let mut p = vec![1; 48];
        p.extend(std::iter::repeat_n(0, blob));
        p
    };
    let mut rate = Vec::new();
    for n in 0..DELIVERIES as u8 {
        rate.push(Step::Send(deliver(stranger(100 + n))));
        rate.push(Step::Refused(7003));
    }
    rate.push(Step::Send(deliver(stranger(200))));
    vec![
        closes("type 0, its byte alone", vec![0], 7001),
        closes("type 14, its byte alone", vec![14], 7001),
        closes("type 17, its byte alone", vec![17], 7001),
        closes("type 255, its byte alone", vec![255], 7001),
        closes("DELIVER claiming u32::MAX bytes, header only", header(5, u32::MAX), 7001),
        closes("REGISTER claiming 131073 bytes, header only", header(2, 131_073), 7001),
        closes("FETCH with a payload of 131072 bytes", packet(7, &vec![0; 131_072]), 7001),
        closes("OK from a client", packet(1, b""), 7001),
        closes("OK with a payload", packet(1, b"x"), 7001),
        closes("FETCH with a payload", packet(7, b"x"), 7001),
        closes("KEEPALIVE with a payload", packet(10, b"x"), 7001),
        closes("REGISTER of one byte", packet(2, &[0]), 7001),
        closes("REGISTER certificate of 0 bytes", packet(2, &[0, 0]), 7001),
        closes("REGISTER certificate of 4097 bytes", packet(2, &register(&[0x30; 4097])), 7001),
        closes("REGISTER certificate length beyond the payload", packet(2, &[0, 10, 1, 2, 3]), 7001),
        closes("CHALLENGE from a client", packet(3, &[0; 32]), 7001),
        closes("CHALLENGE of 31 bytes", packet(3, &[0; 31]), 7001),
        closes("PROOF of 63 bytes", packet(4, &[0; 63]), 7001),
        closes("PROOF without REGISTER", packet(4, &[0; 64]), 7001),
        closes("DELIVER without a blob", packet(5, &deliver_payload(0)), 7001),
        closes("DELIVER blob of 98305 bytes", packet(5, &deliver_payload(98_305)), 7001),
        closes("DELIVER shorter than its recipient", packet(5, &[1; 20]), 7001),
        closes("STORED from a client", packet(6, &[0; 16]), 7001),
        closes("MESSAGE from a client", packet(8, &[0; 17]), 7001),
        closes("MESSAGE without a blob", packet(8, &[0; 16]), 7001),
        closes("ACK of 7 bytes", packet(9, &[0; 7]), 7001),
        closes("ACK of 9 bytes", packet(9, &[0; 9]), 7001),
        closes("QUEUE_END from a client", packet(11, &[0; 4]), 7001),
        closes("QUEUE_END of 3 bytes", packet(11, &[0; 3]), 7001),
        closes("CERT_REQUEST of 31 bytes", packet(12, &[0; 31]), 7001),
        closes("CERT from a client", packet(13, &register(&cert(a))), 7001),
        closes("ERROR text of 513 bytes", packet(15, &error(7001, &[b'e'; 513], 513)), 7001),
        closes("ERROR text not UTF-8", packet(15, &error(7001, &[0xff, 0xfe], 2)), 7001),
        closes("ERROR text length beyond the payload", packet(15, &error(7001, b"abc", 9)), 7001),
        closes("HTTP_PROOF over TCP", packet(16, &[0; 72]), 7001),
        closes("HTTP_PROOF of 71 bytes", packet(16, &[0; 71]), 7001),
        MailCase { name: "a good KEEPALIVE glued to type 0", steps: vec![Step::Send([packet(10, b""), vec![0]].concat()), Step::Echo], code: 7001, closes: true },
        MailCase { name: "REGISTER, then a PROOF of zeros", steps: vec![Step::Register(cert(a)), Step::Send(packet(4, &[0; 64]))], code: 7002, closes: true },
        MailCase { name: "REGISTER a certificate that is not DER, then a PROOF", steps: vec![Step::Register(vec![1, 2, 3]), proof(a)], code: 7002, closes: true },
        MailCase { name: "REGISTER someone else's certificate, PROOF by another key", steps: vec![Step::Register(cert(a)), proof(b)], code: 7002, closes: true },
        MailCase { name: "REGISTER, PROOF over another challenge", steps: vec![Step::Register(cert(a)), Step::Prove { signer: a.clone(), nonce: Some([9; 32]) }], code: 7002, closes: true },
        stays("FETCH before registering", vec![Step::Send(packet(7, b""))], 7006),
        stays("ACK before registering", vec![Step::Send(packet(9, &5u64.to_be_bytes()))], 7006),
        stays("DELIVER to a recipient never registered", vec![Step::Send(deliver(stranger(1)))], 7003),
        stays("CERT_REQUEST for a fingerprint never registered", vec![Step::Send(packet(12, &stranger(2)))], 7003),
        stays("DELIVER to a full queue", vec![Step::Send(deliver(full))], 7004),
        stays("DELIVER over the rate limit", rate, 7005),
        stays("REGISTER a new client while the peer is full", vec![Step::Register(cert(c)), proof(c)], 7007),
    ]
}

fn ip(octet: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet))
}

async fn connect(from: IpAddr, peer: SocketAddr) -> Result<Conn, String> {
    let s = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    s.bind(SocketAddr::new(from, 0))
        .map_err(|e| e.to_string())?;
    let tcp = s.connect(peer).await.map_err(|e| e.to_string())?;
    Ok(wire::conn(Stream::Plain(tcp)))
}

async fn recv(conn: &mut Conn) -> Result<Packet, String> {
    match tokio::time::timeout(STEP, conn.next()).await {
        Err(_) => Err("no answer in time".into()),
        Ok(Some(Ok(p))) => Ok(p),
        Ok(other) => Err(format!("expected a packet, got {other:?}")),
    }
}

async fn send_raw(conn: &mut Conn, bytes: &[u8]) -> Result<(), String> {
    let io = conn.get_mut();
    io.write_all(bytes).await.map_err(|e| e.to_string())?;
    io.flush().await.map_err(|e| e.to_string())
}

async fn refused(conn: &mut Conn, want: u16) -> Result<(), String> {
    match recv(conn).await? {
        Packet::Error { code, .. } if code == want => Ok(()),
        other => Err(format!("expected ERROR {want}, got {other:?}")),
    }
}

async fn run_case(i: usize, case: &MailCase, peer: SocketAddr) -> Result<(), String> {
    let mut conn = connect(ip(20 + i as u8), peer).await?;
    let mut registered: Option<(Vec<u8>, [u8; 32])> = None;
    for step in &case.steps {
        match step {
            Step::Send(bytes) => send_raw(&mut conn, bytes).await?,
            Step::Register(cert) => {
                let p = Packet::Register {
                    cert: Bytes::copy_from_slice(cert),
                };
                send_raw(&mut conn, &encoded(&p)).await?;
                match recv(&mut conn).await? {
                    Packet::Challenge { nonce } => registered = Some((cert.clone(), nonce)),
                    other => return Err(format!("expected CHALLENGE, got {other:?}")),
                }
            }
            Step::Prove { signer, nonce } => {
                let (cert, challenge) = registered.as_ref().ok_or("PROOF before REGISTER")?;
                let over = nonce.unwrap_or(*challenge);
                let signature = signer.sign(&proof_message(&over, &crypto::fingerprint(cert)));
                send_raw(&mut conn, &encoded(&Packet::Proof { signature })).await?;
            }
            Step::Refused(code) => refused(&mut conn, *code).await?,
            Step::Echo => match recv(&mut conn).await? {
                Packet::Keepalive => {}
                other => return Err(format!("expected KEEPALIVE, got {other:?}")),
            },
        }
    }
    refused(&mut conn, case.code).await?;
    if case.closes {
        match tokio::time::timeout(STEP, conn.next()).await {
            Ok(None) | Ok(Some(Err(_))) => Ok(()),
            Ok(Some(Ok(p))) => Err(format!("expected the close, got {p:?}")),
            Err(_) => Err("the peer did not close the connection".into()),
        }
    } else {
        send_raw(&mut conn, &encoded(&Packet::Keepalive)).await?;
        match recv(&mut conn).await? {
            Packet::Keepalive => Ok(()),
            other => Err(format!("after the error, KEEPALIVE answered {other:?}")),
        }
    }
}

/// Registers `id` on a new connection from `from` and fetches its (empty) queue.
async fn registered_client(peer: SocketAddr, from: IpAddr, id: &Identity) -> Conn {
    let mut conn = connect(from, peer).await.expect("connect");
    conn.send(Packet::Register {
        cert: Bytes::copy_from_slice(id.cert()),
    })
    .await
    .expect("send");
    let nonce = match recv(&mut conn).await {
        Ok(Packet::Challenge { nonce }) => nonce,
        other => panic!("expected CHALLENGE, got {other:?}"),
    };
    let signature = id.sign(&proof_message(&nonce, &id.fingerprint()));
    conn.send(Packet::Proof { signature }).await.expect("send");
    assert!(matches!(recv(&mut conn).await, Ok(Packet::Ok)));
    conn.send(Packet::Fetch).await.expect("send");
    assert!(matches!(
        recv(&mut conn).await,
        Ok(Packet::QueueEnd { count: 0 })
    ));
    conn
}

/// A peer with small limits: 2 clients, 2 messages per queue, [`DELIVERIES`] per minute.
async fn start_peer() -> TestPeer {
    start_peer_with(PeerConfig {
        max_clients: 2,
        max_queue_messages: 2,
        deliver_limit: RateLimit::per_minute(DELIVERIES),
        ..PeerConfig::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packet_table_gets_its_code_and_closes_only_its_own_connection() {
    init_tracing();
    deadline(LIMIT, async {
        let peer = start_peer().await;
        // Before the table: a listening client, and a second one whose queue is full.
        let listener_id = Identity::generate().unwrap();
        let mut listening = registered_client(peer.addr, ip(2), &listener_id).await;
        let full_id = Identity::generate().unwrap();
        let _full = registered_client(peer.addr, ip(3), &full_id).await;
        let mut sender = connect(ip(4), peer.addr).await.unwrap();
        for _ in 0..2 {
            send_raw(&mut sender, &deliver(full_id.fingerprint()))
                .await
                .unwrap();
            assert!(matches!(recv(&mut sender).await, Ok(Packet::Stored { .. })));
        }
        // The two messages are pushed to the full client's connection, which never acks.

        let ids = [(); 3].map(|_| Arc::new(Identity::generate().unwrap()));
        let table = cases(full_id.fingerprint(), &ids);
        assert!(table.len() >= 40, "only {} cases", table.len());
        assert!(table.len() < 230, "one loopback address per case");
        let started = Instant::now();
        let results: Vec<_> = futures_util::stream::iter(table.iter().enumerate())
            .map(|(i, c)| async move {
                run_case(i, c, peer.addr)
                    .await
                    .map_err(|e| format!("{}: {e}", c.name))
            })
            .buffer_unordered(8)
            .collect()
            .await;
        println!(
            "mailbox malformed cases: {} in {:?}",
            table.len(),
            started.elapsed()
        );
        let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
        assert!(
            failed.is_empty(),
            "{} of {} cases failed:\n{}",
            failed.len(),
            table.len(),
            failed.join("\n")
        );

        // Only the offending connections closed: the listening client still gets a message
        // pushed on the connection it opened before the table.
        send_raw(&mut sender, &deliver(listener_id.fingerprint()))
            .await
            .unwrap();
        assert!(matches!(recv(&mut sender).await, Ok(Packet::Stored { .. })));
        match recv(&mut listening).await {
            Ok(Packet::Message { seq: 1, blob, .. }) => assert_eq!(&blob[..], b"sealed elsewhere"),
            other => panic!("expected the pushed message, got {other:?}"),
        }
        assert_eq!(peer.state.clients(), 2, "no case registered a client");
        assert_eq!(peer.state.queued().0, 3, "the full queue kept its messages");
    })
    .await;
}
