//! Mailbox end to end, in one process: two real peers on 127.0.0.1 port 0 and three clients
//! with real identities (seed 003 and issue 5): push and fetch, offline delivery in order and
//! exactly once, one peer down, registration retries, queue limits, idle registrations giving
//! way at the client limit, a forged registration, a tampered and a replayed message, a peer
//! restart, rate limits, and TLS; and issue 8's integrity figure: 10,000 messages to
//! recipients that reconnect every 100.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tube_mailbox::client::{self, Address, ClientConfig, ClientError, Inbox, Opened, PeerAddr};
use tube_mailbox::contacts::Contacts;
use tube_mailbox::crypto::Identity;
use tube_mailbox::peer::{Peer, PeerConfig, PeerState};
use tube_proto::mailbox::{MailboxError, Packet, proof_message};
use tube_proto::ratelimit::RateLimit;
use tube_testkit::{deadline, init_tracing};

const LIMIT: Duration = Duration::from_secs(30);

struct TestPeer {
    addr: PeerAddr,
    state: PeerState,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestPeer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestPeer {
    async fn stop(mut self) -> SocketAddr {
        self.shutdown.cancel();
        let _ = (&mut self.task).await;
        self.addr.host.parse().expect("addr")
    }
}

async fn start_peer_on(listener: TcpListener, config: PeerConfig) -> TestPeer {
    init_tracing();
    let addr = listener.local_addr().expect("addr");
    let tls = config.tls.as_ref().map(|i| i.fingerprint());
    let peer = Peer::new(config);
    let state = peer.state();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        let _ = peer.run(listener, stop).await;
    });
    TestPeer {
        addr: PeerAddr {
            host: addr.to_string(),
            tls,
        },
        state,
        shutdown,
        task,
    }
}

async fn start_peer(config: PeerConfig) -> TestPeer {
    start_peer_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), config).await
}

/// A client: identity, contacts in a temp dir, and its address at `peer`.
struct TestClient {
    id: Identity,
    contacts: Contacts,
    address: Address,
    _dir: tempfile::TempDir,
}

fn client(peer: &TestPeer) -> TestClient {
    let dir = tempfile::tempdir().unwrap();
    let (id, _) = Identity::load_or_create(dir.path()).unwrap();
    let contacts = Contacts::load(dir.path()).unwrap();
    let address = Address {
        client: id.fingerprint(),
        peer: peer.addr.clone(),
    };
    TestClient {
        id,
        contacts,
        address,
        _dir: dir,
    }
}

fn cfg() -> ClientConfig {
    ClientConfig {
        timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

impl TestClient {
    async fn inbox(&self) -> Inbox {
        Inbox::open(&self.address.peer, &self.id, cfg())
            .await
            .expect("register")
    }

    async fn send(&mut self, to: &Address, text: &str) -> Result<(), ClientError> {
        client::send(
            &self.id,
            &self.address,
            &mut self.contacts,
            to,
            text,
            &cfg(),
        )
        .await
    }

    /// Fetches the backlog, opens and acknowledges it; returns the texts.
    async fn fetch(&mut self) -> Vec<String> {
        let mut inbox = self.inbox().await;
        inbox.fetch().await.unwrap();
        let mut texts = Vec::new();
        while let Some((seq, ms, blob)) = inbox.next().await.unwrap() {
            texts.push(self.open(ms, &blob));
            inbox.ack(seq).await.unwrap();
        }
        inbox.ping().await.unwrap(); // the acks are processed before the next request
        inbox.close().await;
        texts
    }

    fn open(&mut self, ms: u64, blob: &[u8]) -> String {
        match client::open(&self.id, &mut self.contacts, ms, blob).unwrap() {
            Opened::New(m) => {
                m.record(&mut self.contacts).unwrap();
                m.message.text
            }
            other => panic!("expected a new message, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn offline_recipients_get_their_messages_in_order_exactly_once() {
    deadline(LIMIT, async {
        let (p1, p2) = (
            start_peer(PeerConfig::default()).await,
            start_peer(PeerConfig::default()).await,
        );
        let mut a = client(&p1);
        let mut b = client(&p2);
        let mut c = client(&p2);
        // b registers once so its peer knows it, then goes offline.
        assert!(b.fetch().await.is_empty());
        for i in 0..20 {
            a.send(&b.address, &format!("a{i}")).await.expect("stored");
        }
        c.send(&b.address, "from c").await.expect("stored");
        assert_eq!(p2.state.queued().0, 21);
        let got = b.fetch().await;
        let mut want: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
        want.push("from c".into());
        assert_eq!(got, want, "in order");
        assert_eq!(
            p2.state.queued(),
            (0, 0),
            "acknowledged messages are forgotten"
        );
        assert!(b.fetch().await.is_empty(), "exactly once");
    })
    .await;
}

#[tokio::test]
async fn a_listening_client_gets_pushes_without_asking() {
    deadline(LIMIT, async {
        let p = start_peer(PeerConfig::default()).await;
        let mut a = client(&p);
        let mut b = client(&p);
        let mut inbox = b.inbox().await;
        inbox.fetch().await.unwrap();
        assert!(inbox.next().await.unwrap().is_none(), "empty backlog");
        a.send(&b.address, "pushed").await.unwrap();
        let (seq, ms, blob) = inbox.next().await.unwrap().expect("a push");
        assert_eq!(b.open(ms, &blob), "pushed");
        inbox.ack(seq).await.unwrap();
        inbox.ping().await.unwrap();
        assert_eq!(p.state.queued().0, 0);
    })
    .await;
}

#[tokio::test]
async fn with_one_peer_down_you_can_still_send_but_not_receive() {
    deadline(LIMIT, async {
        let (p1, p2) = (
            start_peer(PeerConfig::default()).await,
            start_peer(PeerConfig::default()).await,
        );
        let mut a = client(&p1);
        let mut b = client(&p2);
        assert!(a.fetch().await.is_empty());
        assert!(b.fetch().await.is_empty());
        // a's peer goes down: a can still send to b (b's peer is up) ...
        p1.stop().await;
        a.send(&b.address, "still here")
            .await
            .expect("b's peer is up");
        assert_eq!(b.fetch().await, vec!["still here".to_string()]);
        // ... but cannot receive, and b cannot send to a.
        let err = Inbox::open(&a.address.peer, &a.id, cfg())
            .await
            .expect_err("own peer down");
        assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
        assert!(err.to_string().starts_with("peer unavailable"));
        let err = b
            .send(&a.address, "lost?")
            .await
            .expect_err("a's peer down");
        assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
    })
    .await;
}

#[tokio::test]
async fn registration_is_retried_then_the_peer_is_unavailable() {
    deadline(LIMIT, async {
        // Accepts connections and never answers.
        let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = PeerAddr {
            host: mute.local_addr().unwrap().to_string(),
            tls: None,
        };
        let counter = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = mute.accept().await {
                held.push(s);
                if held.len() == 3 {
                    return held.len();
                }
            }
            held.len()
        });
        let id = Identity::generate().unwrap();
        let cfg = ClientConfig {
            timeout: Duration::from_millis(300),
            register_attempts: 3,
            ..ClientConfig::default()
        };
        let err = client::register(&peer, &id, &cfg)
            .await
            .expect_err("no answer");
        assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
        assert_eq!(counter.await.unwrap(), 3, "three attempts");
    })
    .await;
}

#[tokio::test]
async fn at_the_client_limit_a_new_client_takes_the_place_of_one_nothing_holds() {
    deadline(LIMIT, async {
        let p = start_peer_for_two().await;
        let mut a = client(&p);
        let (b, c, d) = (client(&p), client(&p), client(&p));
        let _a_listens = a.inbox().await;
        // b registers and goes: once the peer has closed b's connection (its end of the
        // session), nothing holds b's registration.
        let mut conn = client::register(&b.address.peer, &b.id, &cfg())
            .await
            .unwrap();
        conn.close().await.unwrap();
        if let Some(Ok(p)) = conn.next().await {
            panic!("expected the peer to close, got {p:?}");
        }
        let _c_listens = c.inbox().await;
        assert_eq!((p.state.clients(), p.state.forgotten()), (2, 1));
        // b is unknown now (it registers again when it comes back), and with a and c both
        // connected nobody gives way to d.
        let err = a.send(&b.address, "to b").await.expect_err("forgotten");
        assert!(
            matches!(err, ClientError::Refused { code, .. } if code == MailboxError::UnknownRecipient as u16),
            "{err}"
        );
        let err = Inbox::open(&d.address.peer, &d.id, cfg()).await.expect_err("full");
        assert!(
            matches!(err, ClientError::Refused { code, .. } if code == MailboxError::Busy as u16),
            "{err}"
        );
    })
    .await;
}

/// A peer with places for two clients, where a registration nothing holds gives way at once.
async fn start_peer_for_two() -> TestPeer {
    start_peer(PeerConfig {
        max_clients: 2,
        evict_after_idle: Duration::ZERO,
        ..PeerConfig::default()
    })
    .await
}

/// Registers `id`'s certificate on `conn` (REGISTER, CHALLENGE, PROOF), proving it with
/// `signer`'s key; the peer's answer.
async fn register_on(
    conn: &mut tube_mailbox::wire::Conn,
    id: &Identity,
    signer: &Identity,
) -> Packet {
    conn.send(Packet::Register {
        cert: Bytes::copy_from_slice(id.cert()),
    })
    .await
    .unwrap();
    let Some(Ok(Packet::Challenge { nonce })) = conn.next().await else {
        panic!("expected a challenge");
    };
    let signature = signer.sign(&proof_message(&nonce, &id.fingerprint()));
    conn.send(Packet::Proof { signature }).await.unwrap();
    conn.next().await.unwrap().unwrap()
}

#[tokio::test]
async fn a_connection_that_registers_another_client_lets_the_first_one_go() {
    deadline(LIMIT, async {
        let p = start_peer_for_two().await;
        let (first, second) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let mut conn = client::connect(&p.addr, LIMIT).await.unwrap();
        assert_eq!(register_on(&mut conn, &first, &first).await, Packet::Ok);
        assert_eq!(register_on(&mut conn, &second, &second).await, Packet::Ok);
        // The connection stays open for `second`; nothing holds `first` any more, so a new
        // client at the limit takes its place.
        let third = client(&p);
        let _listens = third.inbox().await;
        assert_eq!((p.state.clients(), p.state.forgotten()), (2, 1));
        let err = Inbox::open(&p.addr, &first, cfg()).await.expect_err("full");
        assert!(
            matches!(err, ClientError::Refused { code, .. } if code == MailboxError::Busy as u16),
            "{err}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_full_queue_refuses_with_a_clear_error() {
    deadline(LIMIT, async {
        let p = start_peer(PeerConfig {
            max_queue_messages: 3,
            ..PeerConfig::default()
        })
        .await;
        let mut a = client(&p);
        let mut b = client(&p);
        assert!(b.fetch().await.is_empty());
        for i in 0..3 {
            a.send(&b.address, &format!("m{i}")).await.unwrap();
        }
        let err = a.send(&b.address, "one too many").await.expect_err("full");
        assert!(
            matches!(err, ClientError::Refused { code, .. } if code == MailboxError::QueueFull as u16),
            "{err}"
        );
        assert!(err.to_string().starts_with("error 7004 QUEUE_FULL"));
        assert_eq!(p.state.counters().1, 1, "counted");
        // Nothing was dropped: the three are there, and the queue takes more once read.
        assert_eq!(b.fetch().await, vec!["m0", "m1", "m2"]);
        a.send(&b.address, "room again").await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn registering_someone_elses_certificate_is_refused() {
    deadline(LIMIT, async {
        let p = start_peer(PeerConfig::default()).await;
        let victim = Identity::generate().unwrap();
        let thief = Identity::generate().unwrap();
        let mut conn = client::connect(&p.addr, LIMIT).await.unwrap();
        // The thief signs with its own key: the proof does not verify.
        match register_on(&mut conn, &victim, &thief).await {
            Packet::Error { code, .. } => assert_eq!(code, MailboxError::BadProof as u16),
            other => panic!("expected BAD_PROOF, got {other:?}"),
        }
        assert!(conn.next().await.is_none(), "connection closed");
        assert_eq!(p.state.clients(), 0, "nobody registered");
    })
    .await;
}

/// Delivers a raw blob for `to` and returns the peer's answer.
async fn deliver_raw(peer: &PeerAddr, to: [u8; 32], id: [u8; 16], blob: Bytes) -> Packet {
    let mut conn = client::connect(peer, LIMIT).await.unwrap();
    conn.send(Packet::Deliver { to, id, blob }).await.unwrap();
    conn.next().await.unwrap().unwrap()
}

#[tokio::test]
async fn a_backlog_above_1024_messages_is_fetched_whole_over_tcp() {
    deadline(LIMIT, async {
        const N: u64 = 1500;
        let p = start_peer(PeerConfig {
            max_queue_messages: N as usize,
            deliver_limit: RateLimit::per_minute(10_000),
            ..PeerConfig::default()
        })
        .await;
        let b = client(&p);
        b.inbox().await.close().await;
        let mut conn = client::connect(&p.addr, LIMIT).await.unwrap();
        for i in 0..N {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&i.to_be_bytes());
            let blob = Bytes::copy_from_slice(&i.to_be_bytes());
            conn.send(Packet::Deliver {
                to: b.address.client,
                id,
                blob,
            })
            .await
            .unwrap();
        }
        for i in 0..N {
            let stored = conn.next().await.unwrap().unwrap();
            assert!(matches!(stored, Packet::Stored { .. }), "{i}: {stored:?}");
        }
        // The whole backlog comes in one FETCH, in order (before, the peer's 1024-packet
        // outbox overflowed and closed the connection on every FETCH).
        let mut inbox = b.inbox().await;
        inbox.fetch().await.unwrap();
        let mut seqs = Vec::new();
        while let Some((seq, _ms, blob)) = inbox.next().await.unwrap() {
            assert_eq!(blob[..], (seqs.len() as u64).to_be_bytes());
            seqs.push(seq);
        }
        assert_eq!(seqs.len() as u64, N);
        inbox.ack(N).await.unwrap();
        inbox.ping().await.unwrap();
        assert_eq!(p.state.queued().0, 0);
    })
    .await;
}

#[tokio::test]
async fn tampered_and_replayed_messages_are_dropped() {
    deadline(LIMIT, async {
        let p = start_peer(PeerConfig::default()).await;
        let mut a = client(&p);
        let mut b = client(&p);
        let mut inbox = b.inbox().await;
        inbox.fetch().await.unwrap();
        assert!(inbox.next().await.unwrap().is_none());
        a.send(&b.address, "original").await.unwrap();
        let (seq, ms, blob) = inbox.next().await.unwrap().unwrap();
        // Opened but never shown (not recorded): the same blob is still new next time, so a
        // client that dies before showing a message gets it again instead of losing it.
        assert!(matches!(
            client::open(&b.id, &mut b.contacts, ms, &blob).unwrap(),
            Opened::New(_)
        ));
        assert_eq!(b.open(ms, &blob), "original");
        inbox.ack(seq).await.unwrap();

        // The peer (or anyone) replays the same blob: opened fine, but known.
        let answer = deliver_raw(&p.addr, b.address.client, [9; 16], blob.clone()).await;
        assert!(matches!(answer, Packet::Stored { .. }));
        let (seq, ms, replay) = inbox.next().await.unwrap().unwrap();
        assert!(matches!(
            client::open(&b.id, &mut b.contacts, ms, &replay).unwrap(),
            Opened::Replay
        ));
        inbox.ack(seq).await.unwrap();

        // A flipped bit anywhere in the sealed part: refused.
        for pos in [blob.len() - 1, blob.len() - 40, blob.len() / 2] {
            let mut bad = blob.to_vec();
            bad[pos] ^= 0x01;
            deliver_raw(&p.addr, b.address.client, [8; 16], Bytes::from(bad)).await;
            let (seq, ms, got) = inbox.next().await.unwrap().unwrap();
            assert!(
                matches!(
                    client::open(&b.id, &mut b.contacts, ms, &got).unwrap(),
                    Opened::Invalid(_)
                ),
                "flip at {pos}"
            );
            inbox.ack(seq).await.unwrap();
        }
    })
    .await;
}

#[tokio::test]
async fn a_restarted_peer_forgets_everything_and_clients_register_again() {
    deadline(LIMIT, async {
        let p = start_peer(PeerConfig::default()).await;
        let mut a = client(&p);
        let mut b = client(&p);
        assert!(b.fetch().await.is_empty());
        a.send(&b.address, "lost in the restart").await.unwrap();
        let addr = p.stop().await;
        let p = start_peer_on(TcpListener::bind(addr).await.unwrap(), PeerConfig::default()).await;
        assert_eq!(p.state.clients(), 0);
        // b is unknown until it registers again ...
        let err = a.send(&b.address, "too early").await.expect_err("unknown");
        assert!(
            matches!(err, ClientError::Refused { code, .. } if code == MailboxError::UnknownRecipient as u16),
            "{err}"
        );
        // ... and then gets only what came after.
        assert!(b.fetch().await.is_empty(), "the queue did not survive");
        a.send(&b.address, "after").await.unwrap();
        assert_eq!(b.fetch().await, vec!["after"]);
    })
    .await;
}

#[tokio::test]
async fn registrations_and_deliveries_are_rate_limited() {
    deadline(LIMIT, async {
        let p = start_peer(PeerConfig {
            register_limit: tube_proto::ratelimit::RateLimit::per_minute(2),
            deliver_limit: tube_proto::ratelimit::RateLimit::per_minute(3),
            ..PeerConfig::default()
        })
        .await;
        let mut a = client(&p);
        let b = client(&p);
        b.inbox().await.close().await;
        a.inbox().await.close().await;
        // The third registration from this address within the minute.
        let err = Inbox::open(&b.address.peer, &b.id, cfg()).await.expect_err("limited");
        assert!(
            matches!(err, ClientError::Refused { code, .. } if code == MailboxError::RateLimited as u16),
            "{err}"
        );
        for i in 0..3 {
            a.send(&b.address, &format!("{i}")).await.unwrap();
        }
        let err = a.send(&b.address, "fourth").await.expect_err("limited");
        assert!(err.to_string().starts_with("error 7005 RATE_LIMITED"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn over_tls_with_a_pinned_peer_and_matching_codes() {
    deadline(LIMIT, async {
        let tls = tube_net::Identity::generate(&["localhost"]).unwrap();
        let p = start_peer(PeerConfig {
            tls: Some(tls),
            ..PeerConfig::default()
        })
        .await;
        let mut a = client(&p);
        let mut b = client(&p);
        assert!(a.fetch().await.is_empty());
        assert!(b.fetch().await.is_empty());
        // a writes first (commits), b answers (reveals), a writes again (reveals).
        a.send(&b.address, "hello").await.unwrap();
        assert_eq!(b.fetch().await, vec!["hello"]);
        b.send(&a.address, "hi").await.unwrap();
        assert_eq!(a.fetch().await, vec!["hi"]);
        a.send(&b.address, "code?").await.unwrap();
        assert_eq!(b.fetch().await, vec!["code?"]);
        let code_a = a
            .contacts
            .code(&a.id.fingerprint(), &b.id.fingerprint())
            .expect("a's code");
        let code_b = b
            .contacts
            .code(&b.id.fingerprint(), &a.id.fingerprint())
            .expect("b's code");
        assert_eq!(code_a, code_b);
        assert_eq!(code_a.len(), 6);
        assert!(code_a.bytes().all(|c| c.is_ascii_digit()));

        // A wrong pin is refused.
        let mut wrong = p.addr.clone();
        wrong.tls = Some(tube_net::Identity::generate(&["x"]).unwrap().fingerprint());
        let err = client::connect(&wrong, LIMIT).await.expect_err("pin");
        assert!(matches!(err, ClientError::Unavailable(_)));
    })
    .await;
}

#[tokio::test]
async fn byte_limits_per_recipient_and_overall_refuse_too() {
    deadline(LIMIT, async {
        for per_recipient in [true, false] {
            let config = if per_recipient {
                PeerConfig {
                    max_queue_bytes: 3000,
                    ..PeerConfig::default()
                }
            } else {
                PeerConfig {
                    max_total_bytes: 3000,
                    ..PeerConfig::default()
                }
            };
            let p = start_peer(config).await;
            let mut a = client(&p);
            let (mut b, mut c) = (client(&p), client(&p));
            assert!(b.fetch().await.is_empty());
            assert!(c.fetch().await.is_empty());
            let mut stored = 0;
            let err = loop {
                match a.send(&b.address, "a message of some length").await {
                    Ok(()) => stored += 1,
                    Err(e) => break e,
                }
                assert!(stored < 100, "the byte limit never applied");
            };
            assert!(stored >= 1);
            assert!(
                err.to_string().starts_with("error 7004 QUEUE_FULL"),
                "{err}"
            );
            assert!(p.state.queued().1 <= 3000);
            // Per recipient, c still has room; overall, c is refused as well.
            let to_c = a.send(&c.address, "for c").await;
            assert_eq!(to_c.is_ok(), per_recipient, "{to_c:?}");
            // Nothing stored was lost.
            assert_eq!(b.fetch().await.len(), stored);
        }
    })
    .await;
}

#[tokio::test]
async fn a_waiting_inbox_sends_keepalives() {
    deadline(LIMIT, async {
        init_tracing();
        // A scripted peer: registration, an empty backlog, then it expects keepalives.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = PeerAddr {
            host: l.local_addr().unwrap().to_string(),
            tls: None,
        };
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let mut conn = tube_mailbox::wire::conn(tube_mailbox::wire::Stream::Plain(tcp));
            let expect = |p: Option<Result<Packet, _>>, kind: u8| match p {
                Some(Ok(p)) if p.kind() == kind => {}
                other => panic!("expected packet type {kind}, got {other:?}"),
            };
            expect(conn.next().await, 2);
            conn.send(Packet::Challenge { nonce: [1; 32] })
                .await
                .unwrap();
            expect(conn.next().await, 4);
            conn.send(Packet::Ok).await.unwrap();
            expect(conn.next().await, 7);
            conn.send(Packet::QueueEnd { count: 0 }).await.unwrap();
            for _ in 0..2 {
                expect(conn.next().await, 10);
                conn.send(Packet::Keepalive).await.unwrap();
            }
        });
        let id = Identity::generate().unwrap();
        let cfg = ClientConfig {
            keepalive: Duration::from_millis(50),
            ..cfg()
        };
        let mut inbox = Inbox::open(&peer, &id, cfg).await.unwrap();
        inbox.fetch().await.unwrap();
        assert!(inbox.next().await.unwrap().is_none());
        // Waiting for messages, the inbox keeps the connection alive until the peer leaves.
        let err = inbox.next().await.expect_err("the scripted peer hung up");
        assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
        server.await.expect("two keepalives, answered");
    })
    .await;
}

/// Messages in the integrity test, recipients, and new messages per listening connection.
const MESSAGES: u64 = 10_000;
const RECIPIENTS: u64 = 4;
const PER_CONNECTION: usize = 100;

/// The blob of message `i`: its number, then bytes derived from it.
fn numbered_blob(i: u64) -> Bytes {
    let mut b = i.to_be_bytes().to_vec();
    b.extend((0..56u64).map(|k| (i.wrapping_mul(31).wrapping_add(k * 7) % 251) as u8));
    Bytes::from(b)
}

/// What one recipient of the integrity test saw.
#[derive(Debug)]
struct Received {
    /// Numbers of the messages received for the first time, in arrival order.
    numbers: Vec<u64>,
    /// Messages delivered again after a reconnect (recognised by their sequence number).
    redelivered: usize,
    /// Connections dropped with the last message unacknowledged.
    abrupt: usize,
    /// Listening connections opened.
    connections: usize,
}

/// A recipient that listens until it has `want` new messages, dropping its connection after
/// every [`PER_CONNECTION`] and registering again: every other time cleanly (all acknowledged,
/// then closed), every other time abruptly (the last message unacknowledged, the connection
/// dropped). Each new message must carry the next sequence number and a valid numbered blob.
async fn reconnecting_recipient(
    peer: PeerAddr,
    id: Identity,
    want: usize,
    progress: Arc<watch::Sender<u64>>,
) -> Received {
    let cfg = ClientConfig {
        timeout: Duration::from_secs(10),
        ..ClientConfig::default()
    };
    let mut seen = Received {
        numbers: Vec::with_capacity(want),
        redelivered: 0,
        abrupt: 0,
        connections: 0,
    };
    let mut last_seq = 0;
    while seen.numbers.len() < want {
        let mut inbox = Inbox::open(&peer, &id, cfg.clone())
            .await
            .expect("register");
        seen.connections += 1;
        inbox.fetch().await.expect("fetch");
        let mut here = 0;
        loop {
            // `None` ends the backlog; pushed messages follow on the same connection.
            let Some((seq, _, blob)) = inbox.next().await.expect("next message") else {
                continue;
            };
            if seq <= last_seq {
                assert_eq!(seq, last_seq, "only the unacknowledged message comes again");
                seen.redelivered += 1;
                inbox.ack(seq).await.expect("ack");
                continue;
            }
            assert_eq!(seq, last_seq + 1, "no gap in the peer's sequence numbers");
            last_seq = seq;
            let n = u64::from_be_bytes(blob[..8].try_into().expect("numbered blob"));
            assert_eq!(blob, numbered_blob(n), "message {n} intact");
            seen.numbers.push(n);
            progress.send_modify(|total| *total += 1);
            here += 1;
            let done = seen.numbers.len() == want;
            if here == PER_CONNECTION && !done && seen.connections.is_multiple_of(2) {
                // Abrupt: the acknowledgements so far are processed (the ping's answer comes
                // after them), this last message is not acknowledged; then the connection goes.
                inbox.ping().await.expect("ping");
                drop(inbox);
                seen.abrupt += 1;
                break;
            }
            inbox.ack(seq).await.expect("ack");
            if here == PER_CONNECTION || done {
                inbox.ping().await.expect("ping");
                inbox.close().await;
                break;
            }
        }
    }
    seen
}

/// Issue 8: 10,000 messages from one sender to four recipients that each drop their listening
/// connection every 100 messages and register again, while the sender keeps sending. Every
/// recipient gets exactly its messages, once each, in the order sent, with no gap in the peer's
/// sequence numbers; the only message delivered twice is the one left unacknowledged at each
/// abrupt disconnect (exactly one per such disconnect), so nothing acknowledged ever comes
/// again. A delivery refused with QUEUE_FULL (a recipient 1000 behind) is retried once the
/// recipients made progress; a refused one was not stored, so the retry is no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_to_recipients_reconnecting_every_100_arrive_once_in_order() {
    deadline(Duration::from_secs(120), async {
        let generous = RateLimit::per_minute(1_000_000);
        let p = start_peer(PeerConfig {
            register_limit: generous,
            deliver_limit: generous,
            ..PeerConfig::default()
        })
        .await;
        let ids: Vec<Identity> = (0..RECIPIENTS)
            .map(|_| Identity::generate().expect("identity"))
            .collect();
        // Known to the peer before the first delivery.
        for id in &ids {
            Inbox::open(&p.addr, id, cfg())
                .await
                .expect("register")
                .close()
                .await;
        }
        let fps: Vec<[u8; 32]> = ids.iter().map(|id| id.fingerprint()).collect();
        let (progress, mut progressed) = watch::channel(0u64);
        let progress = Arc::new(progress);
        let mut recipients = Vec::new();
        for (r, id) in ids.into_iter().enumerate() {
            let want = (r as u64..MESSAGES).step_by(RECIPIENTS as usize).count();
            let task = reconnecting_recipient(p.addr.clone(), id, want, progress.clone());
            recipients.push(tokio::spawn(task));
        }

        let mut sender = client::connect(&p.addr, LIMIT).await.expect("sender");
        let mut queue_full = 0;
        for i in 0..MESSAGES {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&i.to_be_bytes());
            let to = fps[(i % RECIPIENTS) as usize];
            loop {
                progressed.borrow_and_update();
                let deliver = Packet::Deliver {
                    to,
                    id,
                    blob: numbered_blob(i),
                };
                sender.send(deliver).await.expect("deliver");
                match sender.next().await.expect("answer").expect("packet") {
                    Packet::Stored { id: got } if got == id => break,
                    Packet::Error { code, .. } if code == MailboxError::QueueFull as u16 => {
                        queue_full += 1;
                        progressed
                            .changed()
                            .await
                            .expect("recipients still running");
                    }
                    other => panic!("message {i}: expected stored, got {other:?}"),
                }
            }
        }

        let mut redelivered = 0;
        for (r, task) in recipients.into_iter().enumerate() {
            let seen = task.await.expect("recipient");
            let want: Vec<u64> = (r as u64..MESSAGES).step_by(RECIPIENTS as usize).collect();
            assert_eq!(seen.numbers.len(), want.len(), "recipient {r}: count");
            let first_wrong = seen.numbers.iter().zip(&want).position(|(a, b)| a != b);
            assert_eq!(first_wrong, None, "recipient {r}: each once, in order");
            assert_eq!(
                seen.redelivered, seen.abrupt,
                "recipient {r}: one redelivery per abrupt disconnect, nothing acknowledged again"
            );
            let connections = want.len().div_ceil(PER_CONNECTION);
            assert_eq!(seen.connections, connections, "recipient {r}: connections");
            // Every connection but the last ended after 100; every second one abruptly.
            assert_eq!(
                seen.abrupt,
                (connections - 1) / 2,
                "recipient {r}: abrupt ends"
            );
            redelivered += seen.redelivered;
        }
        assert_eq!(*progressed.borrow(), MESSAGES);
        assert_eq!(
            p.state.queued(),
            (0, 0),
            "everything acknowledged is forgotten"
        );
        tracing::info!(queue_full, redelivered, "integrity run done");
    })
    .await;
}
