//! The peer's HTTP backend (`docs/protocols/longpoll.md` sections 2, 4 and 7) driven directly
//! with reqwest acting as the proxy, next to its TCP listener: registration with HTTP_PROOF
//! (good, bad, stale, replayed, with permissions), tokens, delivery between HTTP and TCP
//! clients both ways, the long-poll wake-up, FETCH rewinding, `Idempotency-Key`, takeovers
//! between TCP and HTTP, and the limits on bodies and malformed requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tube_mailbox::client::{self, ClientConfig, ClientError, Inbox, PeerAddr};
use tube_mailbox::crypto::{self, Identity};
use tube_mailbox::http;
use tube_mailbox::peer::{Peer, PeerConfig, PeerState};
use tube_proto::mailbox::{self as codec, MailboxError, Packet};
use tube_testkit::{deadline, init_tracing};

const LIMIT: Duration = Duration::from_secs(30);

/// A peer serving TCP and HTTP on 127.0.0.1 port 0.
struct TestPeer {
    tcp: PeerAddr,
    url: String,
    state: PeerState,
    http: reqwest::Client,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TestPeer {
    async fn start(config: PeerConfig) -> Self {
        init_tracing();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let web = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let url = format!("http://{}/", web.local_addr().unwrap());
        let peer = Peer::new(config);
        let state = peer.state();
        let shutdown = CancellationToken::new();
        let (s1, s2, st) = (shutdown.clone(), shutdown.clone(), state.clone());
        let tasks = vec![
            tokio::spawn(async move {
                peer.run(tcp, s1).await.expect("peer");
            }),
            tokio::spawn(async move {
                http::serve(web, st, s2).await.expect("http backend");
            }),
        ];
        Self {
            tcp: PeerAddr {
                host: tcp_addr.to_string(),
                tls: None,
            },
            url,
            state,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            shutdown,
            tasks,
        }
    }

    /// Stops both listeners and checks they end promptly (held fetches included).
    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("stops in time")
                .expect("no panic");
        }
    }

    /// `Type: Register` with `body` (and `Permissions`, when given).
    async fn register_raw(&self, body: Bytes, permissions: Option<&str>) -> reqwest::Response {
        let mut req = self.http.post(&self.url).header("Type", "Register");
        if let Some(p) = permissions {
            req = req.header("Permissions", p);
        }
        req.body(body).send().await.unwrap()
    }

    /// Registers `id` and returns its session.
    async fn register(&self, id: &Identity) -> Session {
        // Another time for each registration: the same time twice is the same signature, a
        // replay.
        static SKEW: AtomicU64 = AtomicU64::new(0);
        let time = now_ms() + SKEW.fetch_add(1, Ordering::Relaxed);
        let resp = self.register_raw(registration(id, time), None).await;
        assert_eq!(resp.status(), 200);
        let id = header(&resp, "client-id").expect("Client-Id");
        let token = resp.text().await.unwrap();
        Session { id, token }
    }

    /// `Type: Packet` as the proxy sends it.
    async fn post(
        &self,
        from: &str,
        token: Option<&str>,
        body: Bytes,
        extra: &[(&str, &str)],
    ) -> Reply {
        let mut req = self
            .http
            .post(&self.url)
            .header("Type", "Packet")
            .header("From", from);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let resp = req.body(body).send().await.unwrap();
        let status = resp.status().as_u16();
        let to = header(&resp, "to");
        let tag = header(&resp, http::REQUEST_TAG);
        let body = resp.bytes().await.unwrap();
        let packet = (!body.is_empty()).then(|| {
            let mut buf = BytesMut::from(&body[..]);
            let p = codec::decode(&mut buf).unwrap().expect("one whole packet");
            assert!(buf.is_empty(), "exactly one packet");
            p
        });
        Reply {
            status,
            to,
            tag,
            packet,
        }
    }
}

struct Session {
    /// The client id: `<fingerprint hex>.<session hex>`.
    id: String,
    token: String,
}

impl Session {
    async fn send(&self, peer: &TestPeer, p: &Packet) -> Reply {
        self.send_with(peer, p, &[]).await
    }

    async fn send_with(&self, peer: &TestPeer, p: &Packet, extra: &[(&str, &str)]) -> Reply {
        let r = peer
            .post(&self.id, Some(&self.token), codec::to_bytes(p), extra)
            .await;
        assert_eq!(r.status, 200);
        r
    }

    /// An empty `Type: Packet`: the next message, or `None` after the hold.
    async fn fetch(&self, peer: &TestPeer) -> Option<Packet> {
        let r = peer
            .post(&self.id, Some(&self.token), Bytes::new(), &[])
            .await;
        assert_eq!(r.status, 200);
        match &r.packet {
            Some(_) => assert_eq!(r.to.as_deref(), Some(self.id.as_str())),
            None => assert_eq!(r.to, None, "no To on an empty answer"),
        }
        r.packet
    }
}

struct Reply {
    status: u16,
    to: Option<String>,
    tag: Option<String>,
    packet: Option<Packet>,
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// REGISTER then HTTP_PROOF for `id` at `time_ms`.
fn registration(id: &Identity, time_ms: u64) -> Bytes {
    let mut b = BytesMut::new();
    codec::encode(
        &Packet::Register {
            cert: Bytes::copy_from_slice(id.cert()),
        },
        &mut b,
    );
    codec::encode(
        &Packet::HttpProof {
            time_ms,
            signature: crypto::sign_http_proof(id, time_ms),
        },
        &mut b,
    );
    b.freeze()
}

fn deliver(to: &Identity, id: u8, blob: &'static [u8]) -> Packet {
    Packet::Deliver {
        to: to.fingerprint(),
        id: [id; 16],
        blob: Bytes::from_static(blob),
    }
}

fn cfg() -> ClientConfig {
    ClientConfig {
        timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    }
}

/// Delivers over a plain TCP connection, as `tube msg send` does.
async fn tcp_deliver(peer: &TestPeer, p: Packet) -> Packet {
    let mut conn = client::connect(&peer.tcp, LIMIT).await.unwrap();
    conn.send(p).await.unwrap();
    conn.next().await.unwrap().unwrap()
}

#[tokio::test]
async fn registration_answers_the_fingerprint_and_a_random_token() {
    deadline(LIMIT, async {
        let peer = TestPeer::start(PeerConfig::default()).await;
        let id = Identity::generate().unwrap();
        let s = peer.register(&id).await;
        // One session per registration: the fingerprint, a dot, 16 hex digits.
        let (fp, session) = s.id.split_once('.').expect("<fingerprint>.<session>");
        assert_eq!(fp, hex::encode(id.fingerprint()));
        assert_eq!(session.len(), 16);
        assert_eq!(s.token.len(), 64);
        assert!(s.token.bytes().all(|b| b.is_ascii_hexdigit()));
        // `Auth` is the same for mailboxes; each registration gets another token.
        let resp = peer
            .http
            .post(&peer.url)
            .header("Type", "Auth")
            .body(registration(&id, now_ms() + 1))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_ne!(header(&resp, "client-id").unwrap(), s.id);
        assert_ne!(resp.text().await.unwrap(), s.token);
        assert_eq!((peer.state.clients(), peer.state.http_tokens()), (1, 2));
        // Both tokens work.
        let r = s.send(&peer, &Packet::Keepalive).await;
        assert_eq!(r.packet, Some(Packet::Keepalive));
        peer.stop().await;
    })
    .await;
}

#[tokio::test]
async fn bad_stale_and_replayed_proofs_and_permissions_are_refused() {
    deadline(LIMIT, async {
        let peer = TestPeer::start(PeerConfig::default()).await;
        let (alice, mallory) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let now = now_ms();
        // Mallory's signature over Alice's certificate.
        let mut forged = BytesMut::new();
        codec::encode(
            &Packet::Register {
                cert: Bytes::copy_from_slice(alice.cert()),
            },
            &mut forged,
        );
        codec::encode(
            &Packet::HttpProof {
                time_ms: now,
                signature: crypto::sign_http_proof(&mallory, now),
            },
            &mut forged,
        );
        let stale = registration(&alice, now - 3 * 60 * 1000);
        let future = registration(&alice, now + 3 * 60 * 1000);
        let mut trailing = BytesMut::from(&registration(&alice, now)[..]);
        trailing.extend_from_slice(b"x");
        for (body, why) in [
            (forged.freeze(), "forged"),
            (stale, "stale"),
            (future, "from the future"),
            (trailing.freeze(), "trailing bytes"),
            (Bytes::from_static(b"garbage"), "garbage"),
            (Bytes::new(), "empty"),
        ] {
            let r = peer.register_raw(body, None).await;
            assert_eq!(r.status(), 401, "{why}");
            assert_eq!(header(&r, "client-id"), None);
        }
        // A good proof once; the same bytes again are a replay.
        let body = registration(&alice, now);
        assert_eq!(peer.register_raw(body.clone(), None).await.status(), 200);
        assert_eq!(peer.register_raw(body, None).await.status(), 401);
        // Mailboxes grant no permissions; an empty header asks for none.
        let r = peer
            .register_raw(registration(&alice, now + 1), Some("Accept-Debug"))
            .await;
        assert_eq!(r.status(), 403);
        let r = peer
            .register_raw(registration(&alice, now + 2), Some(" "))
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(peer.state.clients(), 1);
        peer.stop().await;
    })
    .await;
}

#[tokio::test]
async fn packets_need_a_live_token_of_their_sender() {
    deadline(LIMIT, async {
        let peer = TestPeer::start(PeerConfig::default()).await;
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let (sa, sb) = (peer.register(&a).await, peer.register(&b).await);
        let ka = codec::to_bytes(&Packet::Keepalive);
        let wrong = "00".repeat(32);
        let cases = [
            (sa.id.as_str(), None, "no token"),
            (sa.id.as_str(), Some(wrong.as_str()), "wrong token"),
            (
                sa.id.as_str(),
                Some(sb.token.as_str()),
                "another client's token",
            ),
            (sa.id.as_str(), Some("not-hex"), "malformed token"),
            ("", Some(sa.token.as_str()), "no From"),
            (&wrong, Some(sa.token.as_str()), "unknown From"),
        ];
        for (from, token, why) in cases {
            let r = peer.post(from, token, ka.clone(), &[]).await;
            assert_eq!(r.status, 401, "{why}");
            // An empty fetch is no different.
            let r = peer.post(from, token, Bytes::new(), &[]).await;
            assert_eq!(r.status, 401, "{why}, fetching");
        }
        let r = sa.send(&peer, &Packet::Keepalive).await;
        assert_eq!(
            (r.to.as_deref(), r.packet),
            (Some(sa.id.as_str()), Some(Packet::Keepalive))
        );
        peer.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_delivery_over_http_reaches_a_tcp_client_and_back() {
    deadline(LIMIT, async {
        let peer = TestPeer::start(PeerConfig::default()).await;
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        // B listens over TCP; A is on HTTP.
        let mut inbox = Inbox::open(&peer.tcp, &b, cfg()).await.unwrap();
        inbox.fetch().await.unwrap();
        assert!(inbox.next().await.unwrap().is_none(), "empty backlog");
        let sa = peer.register(&a).await;
        let r = sa
            .send(
                &peer,
                &Packet::CertRequest {
                    fingerprint: b.fingerprint(),
                },
            )
            .await;
        assert_eq!(
            r.packet,
            Some(Packet::Cert {
                cert: Bytes::copy_from_slice(b.cert())
            })
        );
        let r = sa
            .send(
                &peer,
                &Packet::CertRequest {
                    fingerprint: [9; 32],
                },
            )
            .await;
        assert!(matches!(r.packet, Some(Packet::Error { code: 7003, .. })));
        // The request's tag comes back on the answer.
        let r = sa
            .send_with(
                &peer,
                &deliver(&b, 1, b"sealed for b"),
                &[(http::REQUEST_TAG, "t1")],
            )
            .await;
        assert_eq!(r.packet, Some(Packet::Stored { id: [1; 16] }));
        assert_eq!(r.tag.as_deref(), Some("t1"));
        let (seq, _, blob) = inbox.next().await.unwrap().expect("a push");
        assert_eq!(&blob[..], b"sealed for b");
        inbox.ack(seq).await.unwrap();
        inbox.ping().await.unwrap();
        assert_eq!(peer.state.queued(), (0, 0));
        // And back: B delivers over TCP to A on HTTP (registered, so known).
        let stored = tcp_deliver(&peer, deliver(&a, 2, b"sealed for a")).await;
        assert_eq!(stored, Packet::Stored { id: [2; 16] });
        let r = sa.send(&peer, &Packet::Fetch).await;
        assert_eq!(r.packet, Some(Packet::QueueEnd { count: 1 }));
        let Some(Packet::Message { blob, .. }) = sa.fetch(&peer).await else {
            panic!("a message");
        };
        assert_eq!(&blob[..], b"sealed for a");
        inbox.close().await;
        peer.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_held_fetch_is_answered_as_soon_as_a_message_is_stored() {
    deadline(LIMIT, async {
        let hold = Duration::from_secs(10);
        let peer = TestPeer::start(PeerConfig {
            http_hold: hold,
            ..PeerConfig::default()
        })
        .await;
        let b = Identity::generate().unwrap();
        let sb = peer.register(&b).await;
        assert_eq!(
            sb.send(&peer, &Packet::Fetch).await.packet,
            Some(Packet::QueueEnd { count: 0 })
        );
        let started = tokio::time::Instant::now();
        let (fetch, ()) = tokio::join!(sb.fetch(&peer), async {
            // Deliver once the fetch is held open (a state query, not a sleep).
            while peer.state.http_held() == 0 {
                tokio::task::yield_now().await;
            }
            let stored = tcp_deliver(&peer, deliver(&b, 3, b"wake up")).await;
            assert_eq!(stored, Packet::Stored { id: [3; 16] });
        });
        let Some(Packet::Message { seq: 1, blob, .. }) = fetch else {
            panic!("the held fetch got the message: {fetch:?}");
        };
        assert_eq!(&blob[..], b"wake up");
        assert!(started.elapsed() < hold / 2, "woken, not timed out");
        assert_eq!(peer.state.http_held(), 0);
        // A fetch held when the peer stops ends at once.
        let pending = tokio::spawn({
            let (url, fp, token) = (peer.url.clone(), sb.id.clone(), sb.token.clone());
            async move {
                reqwest::Client::new()
                    .post(url)
                    .header("Type", "Packet")
                    .header("From", fp)
                    .header("Authorization", format!("Bearer {token}"))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }
        });
        while peer.state.http_held() == 0 {
            tokio::task::yield_now().await;
        }
        let started = tokio::time::Instant::now();
        peer.stop().await;
        assert!(started.elapsed() < hold / 2);
        assert_eq!(pending.await.unwrap().unwrap(), 200);
    })
    .await;
}

#[tokio::test]
async fn fetch_rewinds_to_the_oldest_unacknowledged_message() {
    deadline(LIMIT, async {
        let peer = TestPeer::start(PeerConfig {
            http_hold: Duration::from_millis(200),
            ..PeerConfig::default()
        })
        .await;
        let b = Identity::generate().unwrap();
        let sb = peer.register(&b).await;
        // Before any FETCH, an empty fetch gets nothing (as a TCP connection gets no pushes).
        tcp_deliver(&peer, deliver(&b, 1, b"one")).await;
        tcp_deliver(&peer, deliver(&b, 2, b"two")).await;
        assert_eq!(sb.fetch(&peer).await, None);
        let seqs = async || {
            let mut out = Vec::new();
            while let Some(p) = sb.fetch(&peer).await {
                let Packet::Message { seq, .. } = p else {
                    panic!("a message: {p:?}");
                };
                out.push(seq);
            }
            out
        };
        let fetch = Packet::Fetch;
        assert_eq!(
            sb.send(&peer, &fetch).await.packet,
            Some(Packet::QueueEnd { count: 2 })
        );
        assert_eq!(seqs().await, vec![1, 2]);
        // Nothing acknowledged: a new FETCH starts from the first again.
        assert_eq!(
            sb.send(&peer, &fetch).await.packet,
            Some(Packet::QueueEnd { count: 2 })
        );
        assert_eq!(seqs().await, vec![1, 2]);
        // ACK is echoed (so the proxy's client request returns at once), and forgets.
        let r = sb.send(&peer, &Packet::Ack { seq: 1 }).await;
        assert_eq!(r.packet, Some(Packet::Ack { seq: 1 }));
        assert_eq!(
            sb.send(&peer, &fetch).await.packet,
            Some(Packet::QueueEnd { count: 1 })
        );
        assert_eq!(seqs().await, vec![2]);
        sb.send(&peer, &Packet::Ack { seq: 2 }).await;
        assert_eq!(peer.state.queued(), (0, 0));
        peer.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_is_stored_once() {
    deadline(LIMIT, async {
        let peer = TestPeer::start(PeerConfig::default()).await;
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let (sa, _sb) = (peer.register(&a).await, peer.register(&b).await);
        let d = deliver(&b, 4, b"once");
        for _ in 0..3 {
            let r = sa.send_with(&peer, &d, &[("Idempotency-Key", "k-1")]).await;
            assert_eq!(r.packet, Some(Packet::Stored { id: [4; 16] }));
        }
        assert_eq!(peer.state.queued().0, 1);
        assert_eq!(peer.state.counters().0, 1);
        // Another key is another delivery; no key is always one.
        sa.send_with(&peer, &d, &[("Idempotency-Key", "k-2")]).await;
        sa.send(&peer, &d).await;
        assert_eq!(peer.state.queued().0, 3);
        peer.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_newest_receiver_takes_over_between_tcp_and_http() {
    deadline(LIMIT, async {
        let peer = TestPeer::start(PeerConfig::default()).await;
        let b = Identity::generate().unwrap();
        let mut inbox = Inbox::open(&peer.tcp, &b, cfg()).await.unwrap();
        inbox.fetch().await.unwrap();
        assert!(inbox.next().await.unwrap().is_none());
        // Registering over HTTP alone (to send) leaves the TCP connection alone...
        let sb = peer.register(&b).await;
        inbox.ping().await.unwrap();
        // ...a FETCH over HTTP closes it.
        sb.send(&peer, &Packet::Fetch).await;
        let err = inbox.next().await.expect_err("closed");
        assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
        // A TCP registration takes back over: the next HTTP fetch says so (7006).
        let _inbox = Inbox::open(&peer.tcp, &b, cfg()).await.unwrap();
        let Some(Packet::Error { code, .. }) = sb.fetch(&peer).await else {
            panic!("a takeover notice");
        };
        assert_eq!(code, MailboxError::NotRegistered as u16);
        peer.stop().await;
    })
    .await;
}

#[tokio::test]
async fn only_the_session_that_fetched_receives() {
    deadline(LIMIT, async {
        let peer = TestPeer::start(PeerConfig {
            http_hold: Duration::from_millis(200),
            ..PeerConfig::default()
        })
        .await;
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let sa = peer.register(&a).await;
        // Two processes of b: one listens, one sends; each is its own client at the proxy.
        let (listener, sender) = (peer.register(&b).await, peer.register(&b).await);
        listener.send(&peer, &Packet::Fetch).await;
        sa.send(&peer, &deliver(&b, 5, b"for the listener")).await;
        let r = sender
            .send(&peer, &deliver(&a, 6, b"from the sender"))
            .await;
        assert_eq!(r.to.as_deref(), Some(sender.id.as_str()));
        assert_eq!(
            sender.fetch(&peer).await,
            None,
            "the sender gets no messages"
        );
        let Some(Packet::Message { blob, .. }) = listener.fetch(&peer).await else {
            panic!("the listener gets the message");
        };
        assert_eq!(&blob[..], b"for the listener");
        // A FETCH of the other session takes over; the first is told on its next fetch.
        let r = sender.send(&peer, &Packet::Fetch).await;
        assert_eq!(r.packet, Some(Packet::QueueEnd { count: 1 }));
        assert!(matches!(
            listener.fetch(&peer).await,
            Some(Packet::Error { code: 7006, .. })
        ));
        assert_eq!(listener.fetch(&peer).await, None);
        assert!(matches!(
            sender.fetch(&peer).await,
            Some(Packet::Message { seq: 1, .. })
        ));
        peer.stop().await;
    })
    .await;
}

#[tokio::test]
async fn oversized_and_malformed_requests_are_refused() {
    deadline(LIMIT, async {
        let peer = TestPeer::start(PeerConfig::default()).await;
        let a = Identity::generate().unwrap();
        let sa = peer.register(&a).await;
        let big = Bytes::from(vec![0u8; http::MAX_BODY + 1]);
        let r = peer.post(&sa.id, Some(&sa.token), big.clone(), &[]).await;
        assert_eq!(r.status, 413);
        assert_eq!(peer.register_raw(big, None).await.status(), 413);
        // Not a packet, two packets, a packet clients never send: ERROR 7001, not a 4xx (the
        // proxy would drop a 4xx answer to a packet silently).
        let mut two = BytesMut::from(&codec::to_bytes(&Packet::Keepalive)[..]);
        two.extend_from_slice(&codec::to_bytes(&Packet::Keepalive));
        for body in [
            Bytes::from_static(b"\x0a\x00"),
            Bytes::from_static(b"\xff"),
            two.freeze(),
            codec::to_bytes(&Packet::Ok),
            registration(&a, now_ms()),
        ] {
            let r = peer.post(&sa.id, Some(&sa.token), body, &[]).await;
            assert_eq!(r.status, 200);
            assert!(
                matches!(r.packet, Some(Packet::Error { code: 7001, .. })),
                "{:?}",
                r.packet
            );
        }
        // Only POST, and only with a Type the contract knows.
        let r = peer.http.get(&peer.url).send().await.unwrap();
        assert_eq!(r.status(), 405);
        let r = peer.http.post(&peer.url).send().await.unwrap();
        assert_eq!(r.status(), 400);
        let r = peer
            .http
            .post(&peer.url)
            .header("Type", "packet")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        // Still serving.
        assert_eq!(
            sa.send(&peer, &Packet::Keepalive).await.packet,
            Some(Packet::Keepalive)
        );
        peer.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_client_refuses_to_use_a_proxy_that_is_not_there() {
    deadline(LIMIT, async {
        init_tracing();
        let dead = tube_testkit::dead_addr().await;
        let id = Identity::generate().unwrap();
        let cfg = ClientConfig {
            via: Some(format!("http://{dead}")),
            timeout: Duration::from_secs(1),
            ..ClientConfig::default()
        };
        let peer = PeerAddr {
            host: dead.to_string(),
            tls: None,
        };
        let err = Inbox::open(&peer, &id, cfg).await.expect_err("no proxy");
        assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
    })
    .await;
}
