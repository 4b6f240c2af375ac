//! The long-poll proxy against real HTTP backends on 127.0.0.1: every row of seed 004's
//! tables, long-poll wake-up, `More`, `X-` passthrough, failover and recovery, the
//! acknowledgement extension, limits, expiry, debug servers, and 1000 concurrent clients.

mod support;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

#[tokio::test]
async fn auth_gives_a_token_and_packets_reach_the_backend_with_type_and_from() {
    let b = Backend::start("a").await;
    let p = Proxy::start(config(&[&b])).await;
    let got = post(&p.url("/auth"), &[], "alice:secret").await;
    assert_eq!(got.status, 200);
    let token = got.body.clone();
    assert_eq!(token, "a-alice-0", "the body is the backend's token, UTF-8");
    let auth = b.script.log.lock().unwrap()[0].clone();
    assert_eq!(auth.kind, "Auth");
    assert_eq!(&auth.body[..], b"alice:secret", "the body passes unchanged");

    let got = poll(&p, &token, &[], "hello").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "echo:hello", "the backend's answer comes back");
    assert_eq!(got.header("more").as_deref(), Some("0"));
    let seen = b.packets();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].from.as_deref(), Some("alice"));
    assert_eq!(&seen[0].body[..], b"hello");
    assert_eq!(
        seen[0].headers.get("authorization").unwrap(),
        &format!("Bearer {token}"),
        "extension: the backend gets the token it issued"
    );
}

#[tokio::test]
async fn register_is_passed_as_type_register_with_permissions() {
    let b = Backend::start("a").await;
    let p = Proxy::start(config(&[&b])).await;
    let got = post(
        &p.url("/register"),
        &[("Permissions", "read, write")],
        "bob:secret",
    )
    .await;
    assert_eq!(got.status, 200);
    let seen = b.script.log.lock().unwrap()[0].clone();
    assert_eq!(seen.kind, "Register");
    assert_eq!(seen.headers.get("permissions").unwrap(), "read, write");
    // Without Permissions the backend sees none.
    post(&p.url("/auth"), &[], "bob:secret").await;
    let seen = b.script.log.lock().unwrap()[1].clone();
    assert!(seen.headers.get("permissions").is_none());
}

#[tokio::test]
async fn auth_401_and_403_from_the_backend_are_passed_back() {
    let b = Backend::start("a").await;
    let p = Proxy::start(config(&[&b])).await;
    for path in ["/auth", "/register"] {
        let got = post(&p.url(path), &[], "alice:wrong").await;
        assert_eq!(got.status, 401, "{path}");
        let got = post(
            &p.url(path),
            &[("Permissions", "Accept-Debug")],
            "alice:secret",
        )
        .await;
        assert_eq!(got.status, 403, "{path}");
    }
    let got = post(&p.url("/auth"), &[("Permissions", "a b")], "alice:secret").await;
    assert_eq!(got.status, 400, "a malformed Permissions header");
}

#[tokio::test]
async fn a_backend_answer_outside_the_contract_is_502_and_no_backend_is_503() {
    let b = Backend::start("a").await;
    let p = Proxy::start(config(&[&b])).await;
    let got = post(&p.url("/auth"), &[], "noid:secret").await;
    assert_eq!(got.status, 502, "200 without Client-Id");
    let (_, _) = b.stop().await;
    let got = post(&p.url("/auth"), &[], "alice:secret").await;
    assert_eq!(got.status, 503);
    let retry: u64 = got.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
}

#[tokio::test]
async fn missing_malformed_unknown_tokens_get_401() {
    let b = Backend::start("a").await;
    let p = Proxy::start(config(&[&b])).await;
    let got = post(&p.url("/"), &[], "x").await;
    assert_eq!(got.status, 401, "no Authorization");
    let got = post(&p.url("/"), &[("Authorization", "Basic abc")], "x").await;
    assert_eq!(got.status, 401, "not Bearer");
    let got = poll(&p, "nope", &[], "x").await;
    assert_eq!(got.status, 401, "unknown token");
    assert!(
        b.packets().is_empty(),
        "nothing queued for an unknown token"
    );
}

#[tokio::test]
async fn an_expired_token_gets_401() {
    let b = Backend::start("a").await;
    let mut c = config(&[&b]);
    c.token_ttl = Duration::from_millis(300);
    c.poll_timeout = Duration::from_millis(50);
    let p = Proxy::start(c).await;
    let token = login(&p, "alice", None).await;
    let issued = Instant::now();
    let mut last = 200;
    while last == 200 && issued.elapsed() < LIMIT {
        last = poll(&p, &token, &[], "").await.status;
    }
    assert_eq!(last, 401);
    assert!(
        issued.elapsed() >= Duration::from_millis(300),
        "not before the TTL"
    );
    // A new login works again.
    let token = login(&p, "alice", None).await;
    assert_eq!(poll(&p, &token, &[], "").await.status, 200);
}

#[tokio::test]
async fn idle_clients_are_forgotten_with_their_buffers() {
    let b = Backend::start("a").await;
    let mut c = config(&[&b]);
    c.idle_timeout = Duration::from_millis(300);
    c.poll_timeout = Duration::from_millis(50);
    let p = Proxy::start(c).await;
    let token = login(&p, "alice", None).await;
    assert_eq!(p.metric("tube_longpoll_clients").await, 1.0);
    let start = Instant::now();
    while p.metric("tube_longpoll_clients").await > 0.0 {
        assert!(start.elapsed() < LIMIT, "client never expired");
        tokio::task::yield_now().await;
    }
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert_eq!(p.metric("tube_longpoll_clients_expired_total").await, 1.0);
    assert_eq!(poll(&p, &token, &[], "").await.status, 401);
}

#[tokio::test]
async fn a_waiting_poll_wakes_when_a_packet_arrives() {
    let b = Backend::start("a").await;
    *b.script.fetch_hold.lock().unwrap() = Duration::from_secs(30);
    let mut c = config(&[&b]);
    c.poll_timeout = Duration::from_secs(30);
    c.backend_timeout = Duration::from_secs(40);
    let p = Proxy::start(c).await;
    let token = login(&p, "alice", None).await;
    let started = Instant::now();
    let waiting = tokio::spawn({
        let url = p.url("/");
        let token = token.clone();
        async move { post(&url, &[("Authorization", &format!("Bearer {token}"))], "").await }
    });
    // The proxy keeps a fetch open for the waiting client: wait for it, then answer it.
    tokio::time::timeout(LIMIT, async {
        while !b
            .script
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.kind == "Packet" && s.body.is_empty())
        {
            b.script.logged.notified().await;
        }
    })
    .await
    .unwrap();
    let mut h = HeaderMap::new();
    h.insert("x-note", HeaderValue::from_static("n1"));
    b.push("alice", "wake up", h);
    let got = waiting.await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "wake up");
    assert_eq!(got.header("x-note").as_deref(), Some("n1"));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answered on arrival, not at the 30 s timeout"
    );
}

#[tokio::test]
async fn an_empty_poll_answers_200_empty_after_the_timeout() {
    let b = Backend::start("a").await;
    let mut c = config(&[&b]);
    c.poll_timeout = Duration::from_millis(200);
    let p = Proxy::start(c).await;
    let token = login(&p, "alice", None).await;
    let started = Instant::now();
    let got = poll(&p, &token, &[], "").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "");
    assert_eq!(got.header("more").as_deref(), Some("0"));
    assert!(got.header("seq").is_none());
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn more_counts_the_packets_still_waiting() {
    let b = Backend::start("a").await;
    let p = Proxy::start(config(&[&b])).await;
    let token = login(&p, "alice", None).await;
    // Three packets for alice while she is not asking: the proxy fetches them into her buffer
    // (she logged in within the poll timeout, so she counts as online).
    for i in 0..3 {
        b.push("alice", &format!("q{i}"), HeaderMap::new());
    }
    let start = Instant::now();
    while p
        .metric("tube_longpoll_buffered_packets{direction=\"to_client\"}")
        .await
        < 3.0
    {
        assert!(start.elapsed() < LIMIT, "the proxy did not fetch");
        tokio::task::yield_now().await;
    }
    let mut got = vec![];
    for _ in 0..3 {
        let g = poll(&p, &token, &[], "").await;
        got.push((g.body.clone(), g.header("more").unwrap()));
    }
    let want: Vec<(String, String)> = [("q0", "2"), ("q1", "1"), ("q2", "0")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn x_headers_pass_both_ways_and_no_others() {
    let b = Backend::start("a").await;
    let p = Proxy::start(config(&[&b])).await;
    let got = post(
        &p.url("/auth"),
        &[("X-Login", "l1"), ("Cookie", "c")],
        "alice:secret",
    )
    .await;
    assert_eq!(
        got.header("x-backend").as_deref(),
        Some("a"),
        "X- from the backend on auth"
    );
    assert!(
        got.header("set-cookie").is_none(),
        "no other header from the backend"
    );
    let auth = b.script.log.lock().unwrap()[0].clone();
    assert_eq!(auth.headers.get("x-login").unwrap(), "l1");
    assert!(auth.headers.get("cookie").is_none());
    let token = got.body;

    let got = poll(
        &p,
        &token,
        &[
            ("X-Trace", "t-1"),
            ("x-lower", "yes"),
            ("Cookie", "secret-cookie"),
            ("User-Agent", "agent-9"),
            ("Y-Other", "no"),
        ],
        "hi",
    )
    .await;
    assert_eq!(got.body, "echo:hi");
    assert_eq!(got.header("x-echo").as_deref(), Some("a"));
    assert!(got.header("set-cookie").is_none());
    assert!(got.header("server-thing").is_none());
    let seen = &b.packets()[0];
    assert_eq!(seen.headers.get("x-trace").unwrap(), "t-1");
    assert_eq!(seen.headers.get("x-lower").unwrap(), "yes");
    for absent in ["cookie", "y-other"] {
        assert!(seen.headers.get(absent).is_none(), "{absent} must not pass");
    }
    assert_ne!(
        seen.headers.get("user-agent").map(|v| v.as_bytes()),
        Some(&b"agent-9"[..]),
        "the client's User-Agent must not pass"
    );
    // The backend sees only contract headers, X- headers and HTTP framing.
    let allowed: HashSet<&str> = [
        "type",
        "from",
        "authorization",
        "idempotency-key",
        "x-trace",
        "x-lower",
        "content-length",
        "host",
        "accept",
        "user-agent",
    ]
    .into();
    for name in seen.headers.keys() {
        assert!(allowed.contains(name.as_str()), "unexpected header {name}");
    }
}

/// Sends `n` packets `m<k>` with `Seq: k`, continuing the count in `sent`.
async fn send_numbered(p: &Proxy, token: &str, sent: &mut u32, n: u32) {
    for _ in 0..n {
        *sent += 1;
        let seq = sent.to_string();
        let got = poll(p, token, &[("Seq", &seq)], &format!("m{sent}")).await;
        assert_eq!(got.status, 200);
    }
}

#[tokio::test]
async fn failover_to_another_backend_and_back_loses_and_duplicates_nothing() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let p = Proxy::start(config(&[&a, &b])).await;
    // The first login goes to backend a (round robin starts there): a is this client's home.
    let token = login(&p, "alice", None).await;
    assert!(token.starts_with("a-"));
    let mut sent = 0;
    send_numbered(&p, &token, &mut sent, 10).await;
    a.wait_packets(10).await;
    let (addr, script_a) = a.stop().await;
    send_numbered(&p, &token, &mut sent, 10).await;
    b.wait_packets(10).await;
    // a comes back on the same port: after its rest, the client's packets go home again.
    let a = Backend::start_on("a", TcpListener::bind(addr).await.unwrap(), script_a).await;
    let start = Instant::now();
    loop {
        sent += 1;
        poll(
            &p,
            &token,
            &[("Seq", &sent.to_string())],
            &format!("m{sent}"),
        )
        .await;
        if a.packets().len() > 10 {
            break;
        }
        assert!(start.elapsed() < LIMIT, "packets never went back to a");
    }
    let total = sent as usize;
    let start = Instant::now();
    while a.packets().len() + b.packets().len() < total {
        assert!(start.elapsed() < LIMIT);
        tokio::task::yield_now().await;
    }
    let mut all: Vec<(String, String)> = a
        .packets()
        .into_iter()
        .chain(b.packets())
        .map(|s| (s.key.unwrap(), String::from_utf8_lossy(&s.body).to_string()))
        .collect();
    assert_eq!(all.len(), total, "nothing lost, nothing duplicated");
    all.sort_by_key(|(_, body)| body[1..].parse::<u32>().unwrap());
    let bodies: Vec<String> = all.iter().map(|(_, b)| b.clone()).collect();
    let expected: Vec<String> = (1..=total).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected);
    // In order per backend too: each backend saw increasing numbers.
    for s in [a.packets(), b.packets()] {
        let n: Vec<u32> = s
            .iter()
            .map(|s| String::from_utf8_lossy(&s.body)[1..].parse().unwrap())
            .collect();
        assert!(n.windows(2).all(|w| w[0] < w[1]), "{n:?}");
    }
    let keys: HashSet<String> = all.into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), total, "one idempotency key per packet");
    assert!(p.metric("tube_longpoll_backend_failures_total").await >= 1.0);
}

#[tokio::test]
async fn a_backend_failing_after_acting_is_retried_with_the_same_key_once() {
    let b = Backend::start("a").await;
    b.script.fail_after_acting.store(1, Ordering::SeqCst);
    b.script.fail_next.store(2, Ordering::SeqCst);
    let p = Proxy::start(config(&[&b])).await;
    let token = login(&p, "alice", None).await;
    let got = poll(&p, &token, &[], "once").await;
    assert_eq!(got.body, "echo:once", "delivered after the retries");
    let seen = b.packets();
    assert_eq!(seen.len(), 1, "acted on once: {seen:?}");
    assert!(p.metric("tube_longpoll_backend_failures_total").await >= 3.0);
}

#[tokio::test]
async fn a_retried_send_with_the_same_seq_is_stored_once() {
    let b = Backend::start("a").await;
    let mut c = config(&[&b]);
    c.poll_timeout = Duration::from_millis(100);
    let p = Proxy::start(c).await;
    let token = login(&p, "alice", None).await;
    poll(&p, &token, &[("Seq", "1")], "first").await;
    poll(&p, &token, &[("Seq", "1")], "first").await;
    poll(&p, &token, &[("Seq", "2")], "second").await;
    let seen = b.wait_packets(2).await;
    let bodies: Vec<&[u8]> = seen.iter().map(|s| &s.body[..]).collect();
    assert_eq!(bodies, vec![&b"first"[..], &b"second"[..]]);
    // Without Seq every send counts.
    poll(&p, &token, &[], "again").await;
    poll(&p, &token, &[], "again").await;
    assert_eq!(b.wait_packets(4).await.len(), 4);
}

#[tokio::test]
async fn with_ack_a_response_lost_on_the_way_is_delivered_again() {
    let b = Backend::start("a").await;
    let mut c = config(&[&b]);
    c.poll_timeout = Duration::from_millis(200);
    let p = Proxy::start(c).await;
    let token = login(&p, "alice", None).await;
    b.push("alice", "one", HeaderMap::new());
    b.push("alice", "two", HeaderMap::new());
    // A client asks with Ack: 0 over a raw connection and hangs up before the answer.
    let mut raw = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let req = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nAck: 0\r\nContent-Length: 0\r\n\r\n"
    );
    raw.write_all(req.as_bytes()).await.unwrap();
    // Wait until the proxy has both packets, then drop the connection.
    let start = Instant::now();
    while p
        .metric("tube_longpoll_buffered_packets{direction=\"to_client\"}")
        .await
        < 2.0
    {
        assert!(start.elapsed() < LIMIT);
        poll(&p, &token, &[("Ack", "0")], "").await;
    }
    drop(raw);
    // Whatever was answered on the way, nothing is lost until acknowledged.
    let got = poll(&p, &token, &[("Ack", "0")], "").await;
    assert_eq!(
        (got.body.as_str(), got.header("seq").as_deref()),
        ("one", Some("1"))
    );
    assert_eq!(got.header("more").as_deref(), Some("1"));
    let again = poll(&p, &token, &[("Ack", "0")], "").await;
    assert_eq!(again.body, "one", "not acknowledged: the same packet again");
    let got = poll(&p, &token, &[("Ack", "1")], "").await;
    assert_eq!(
        (got.body.as_str(), got.header("seq").as_deref()),
        ("two", Some("2"))
    );
    let got = poll(&p, &token, &[("Ack", "2")], "").await;
    assert_eq!(got.body, "", "all acknowledged");
    assert_eq!(
        p.metric("tube_longpoll_buffered_packets{direction=\"to_client\"}")
            .await,
        0.0
    );
    // Without Ack, a packet is handed out once (the seed's behaviour).
    b.push("alice", "three", HeaderMap::new());
    let got = poll(&p, &token, &[], "").await;
    let got = if got.body.is_empty() {
        poll(&p, &token, &[], "").await
    } else {
        got
    };
    assert_eq!(got.body, "three");
    assert_eq!(poll(&p, &token, &[], "").await.body, "");
}

#[tokio::test]
async fn over_the_limits_the_client_gets_413_429_and_503() {
    let b = Backend::start("a").await;
    let mut c = config(&[&b]);
    c.max_body = 1000;
    c.max_client_packets = 3;
    c.poll_timeout = Duration::from_millis(20);
    let p = Proxy::start(c).await;
    let token = login(&p, "alice", None).await;
    let big = "x".repeat(1001);
    assert_eq!(poll(&p, &token, &[], &big).await.status, 413);
    // The backend goes away: packets wait in the client's buffer until it is full.
    let (addr, script) = b.stop().await;
    let mut statuses = vec![];
    for i in 0..5 {
        let got = poll(&p, &token, &[], &format!("w{i}")).await;
        if got.status == 429 {
            assert_eq!(got.header("retry-after").as_deref(), Some("1"));
        }
        statuses.push(got.status);
    }
    // One packet may be in flight (taken from the buffer only once a backend took it).
    assert_eq!(statuses, vec![200, 200, 200, 429, 429]);
    // The backend returns: the buffered packets arrive in order, none lost.
    let b = Backend::start_on("a", TcpListener::bind(addr).await.unwrap(), script).await;
    let seen = b.wait_packets(3).await;
    let bodies: Vec<&[u8]> = seen.iter().map(|s| &s.body[..]).collect();
    assert_eq!(bodies, vec![&b"w0"[..], &b"w1"[..], &b"w2"[..]]);

    // The total byte budget: 503 with Retry-After.
    let mut c = config(&[&b]);
    c.max_total_bytes = 500;
    let p = Proxy::start(c).await;
    let token = login(&p, "bob", None).await;
    let got = poll(&p, &token, &[], &"y".repeat(600)).await;
    assert_eq!(got.status, 503);
    assert_eq!(got.header("retry-after").as_deref(), Some("5"));
}

#[tokio::test]
async fn refused_and_oversized_backend_answers_drop_that_packet_only() {
    let b = Backend::start("a").await;
    let mut c = config(&[&b]);
    c.max_body = 1000;
    c.poll_timeout = Duration::from_millis(200);
    let p = Proxy::start(c).await;
    let token = login(&p, "alice", None).await;
    assert_eq!(poll(&p, &token, &[], "refuse me").await.body, "");
    assert_eq!(poll(&p, &token, &[], "big answer").await.body, "");
    let got = poll(&p, &token, &[], "fine").await;
    assert_eq!(
        got.body, "echo:fine",
        "the client's later packets still flow"
    );
    assert_eq!(p.metric("tube_longpoll_packets_refused_total").await, 2.0);
    assert_eq!(p.metric("tube_longpoll_backend_failures_total").await, 0.0);
}

#[tokio::test]
async fn a_debug_server_gets_packets_addressed_to_it_and_answers() {
    let b = Backend::start("a").await;
    let mut c = config(&[&b]);
    // Every send also waits for a packet for the sender: keep that short.
    c.poll_timeout = Duration::from_millis(200);
    let p = Proxy::start(c).await;
    let debug = login(&p, "debug1", Some("Accept-Debug")).await;
    let alice = login(&p, "alice", None).await;
    let carol = login(&p, "carol", None).await;
    let got = poll(&p, &alice, &[("To", "debug1"), ("X-Case", "7")], "to debug").await;
    assert_eq!(got.status, 200);
    let got = poll(&p, &debug, &[], "").await;
    assert_eq!(got.body, "to debug");
    assert_eq!(got.header("from").as_deref(), Some("alice"));
    assert_eq!(got.header("x-case").as_deref(), Some("7"));
    // The seed's prose names the header Debug: the same.
    poll(&p, &carol, &[("Debug", "debug1")], "via Debug").await;
    let got = poll(&p, &debug, &[], "").await;
    assert_eq!(
        (got.body.as_str(), got.header("from").as_deref()),
        ("via Debug", Some("carol"))
    );
    // The debug server answers alice.
    poll(&p, &debug, &[("To", "alice")], "answer").await;
    let got = poll(&p, &alice, &[], "").await;
    assert_eq!(
        (got.body.as_str(), got.header("from").as_deref()),
        ("answer", Some("debug1"))
    );
    // Nothing of this reached the backend.
    assert!(b.packets().is_empty());
    // A backend that grants less than was asked decides: no Accept-Debug, no debug server.
    login(&p, "debugnarrow", Some("Accept-Debug")).await;
    assert_eq!(
        poll(&p, &alice, &[("To", "debugnarrow")], "x").await.status,
        403
    );
    // Clients cannot address each other, nor nobody.
    assert_eq!(poll(&p, &alice, &[("To", "carol")], "x").await.status, 403);
    assert_eq!(poll(&p, &alice, &[("To", "nobody")], "x").await.status, 404);
    assert_eq!(poll(&p, &alice, &[("To", "a,b")], "x").await.status, 400);
}

#[tokio::test]
async fn a_newer_request_answers_the_older_waiting_one() {
    let b = Backend::start("a").await;
    let mut c = config(&[&b]);
    c.poll_timeout = Duration::from_secs(30);
    c.backend_timeout = Duration::from_secs(40);
    let p = Proxy::start(c).await;
    let token = login(&p, "alice", None).await;
    let first = tokio::spawn({
        let url = p.url("/");
        let token = token.clone();
        async move { post(&url, &[("Authorization", &format!("Bearer {token}"))], "").await }
    });
    let start = Instant::now();
    while p.metric("tube_longpoll_waiting_requests").await < 1.0 {
        assert!(start.elapsed() < LIMIT);
        tokio::task::yield_now().await;
    }
    let second = tokio::spawn({
        let url = p.url("/");
        async move { post(&url, &[("Authorization", &format!("Bearer {token}"))], "").await }
    });
    let got = tokio::time::timeout(LIMIT, first).await.unwrap().unwrap();
    assert_eq!((got.status, got.body.as_str()), (200, ""));
    assert!(start.elapsed() < Duration::from_secs(25));
    b.push("alice", "for the second", HeaderMap::new());
    let got = tokio::time::timeout(LIMIT, second).await.unwrap().unwrap();
    assert_eq!(got.body, "for the second");
}

#[tokio::test]
async fn admin_serves_healthz_and_metrics() {
    let b = Backend::start("a").await;
    let p = Proxy::start(config(&[&b])).await;
    let token = login(&p, "alice", None).await;
    poll(&p, &token, &[], "m").await;
    let health = http()
        .get(format!("http://{}/healthz", p.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let text = p.metrics().await;
    for name in [
        "tube_longpoll_clients 1",
        "tube_longpoll_packets_total{direction=\"to_backend\"} 1",
        "tube_longpoll_buffered_bytes{direction=\"to_client\"}",
        "tube_longpoll_backend_failures_total 0",
        "tube_longpoll_poll_seconds_count",
        "# TYPE tube_longpoll_poll_seconds histogram",
    ] {
        assert!(text.contains(name), "{name} missing in\n{text}");
    }
    assert!(!text.contains("alice"), "no client ids in metrics");
    assert!(!text.contains(&token), "no tokens in metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_long_poll_at_once() {
    let b = Backend::start("a").await;
    let mut c = config(&[&b]);
    c.poll_timeout = Duration::from_secs(15);
    let p = Proxy::start(c).await;
    let p = std::sync::Arc::new(p);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let p = p.clone();
        tasks.spawn(async move {
            let user = format!("u{i}");
            let token = login(&p, &user, None).await;
            let got = poll(&p, &token, &[("Seq", "1")], &format!("from {user}")).await;
            assert_eq!(got.status, 200);
            assert_eq!(got.body, format!("echo:from {user}"));
        });
    }
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    })
    .await
    .expect("1000 clients within the deadline");
    assert_eq!(b.packets().len(), 1000);
    assert_eq!(p.metric("tube_longpoll_clients").await, 1000.0);
}

/// One client of the integrity test: sends `count` numbered packets with `Seq`, acknowledges
/// what it receives with `Ack`, and returns the bodies it received, in order.
async fn numbered_client(p: &Proxy, user: &str, count: u64) -> Vec<String> {
    let token = login(p, user, None).await;
    let mut received = Vec::new();
    let mut acked = 0u64;
    let mut sent = 0u64;
    while received.len() < count as usize {
        let body = if sent < count {
            sent += 1;
            format!("{user}-{sent}")
        } else {
            String::new()
        };
        let seq = sent.to_string();
        let ack = acked.to_string();
        let mut h = vec![("Ack", ack.as_str())];
        if !body.is_empty() {
            h.push(("Seq", seq.as_str()));
        }
        let got = poll(p, &token, &h, &body).await;
        assert_eq!(got.status, 200, "{user}: {got:?}");
        if let Some(s) = got.header("seq") {
            let s: u64 = s.parse().unwrap();
            assert_eq!(s, acked + 1, "{user}: packets arrive in order");
            acked = s;
            received.push(got.body);
        }
    }
    // Acknowledge the last one so the proxy's buffer drains.
    let ack = acked.to_string();
    poll(p, &token, &[("Ack", ack.as_str())], "").await;
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_packets_survive_a_backend_stopped_twice() {
    const CLIENTS: u64 = 10;
    const EACH: u64 = 1000;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut c = config(&[&a, &b]);
    c.poll_timeout = Duration::from_millis(200);
    let p = std::sync::Arc::new(Proxy::start(c).await);
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let p = p.clone();
        clients.spawn(async move { (i, numbered_client(&p, &format!("c{i}"), EACH).await) });
    }
    // Stop backend a twice while the traffic flows, each time until b has taken over some.
    let script_b = b.script.clone();
    let mut a = a;
    let mut threshold = 1000;
    for _ in 0..2 {
        wait_packets(&a.script, threshold).await;
        let (addr, script) = a.stop().await;
        let seen_b = packets(&script_b).len();
        wait_packets(&script_b, seen_b + 300).await;
        threshold = packets(&script).len() + 500;
        a = Backend::start_on("a", TcpListener::bind(addr).await.unwrap(), script).await;
    }
    let mut results = vec![];
    tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(r) = clients.join_next().await {
            results.push(r.unwrap());
        }
    })
    .await
    .expect("all clients done");
    for (i, received) in results {
        let want: Vec<String> = (1..=EACH).map(|n| format!("echo:c{i}-{n}")).collect();
        assert_eq!(received, want, "client c{i}: every answer once, in order");
    }
    // Each backend saw each client's packets in order, and together every packet exactly once.
    let mut all: Vec<String> = vec![];
    for seen in [a.packets(), b.packets()] {
        let mut last: std::collections::HashMap<String, u64> = Default::default();
        for s in seen {
            let body = String::from_utf8_lossy(&s.body).to_string();
            let (user, n) = body.split_once('-').unwrap();
            let n: u64 = n.parse().unwrap();
            let prev = last.insert(user.to_string(), n).unwrap_or(0);
            assert!(n > prev, "{user}: {n} after {prev}");
            all.push(body);
        }
    }
    assert_eq!(
        all.len() as u64,
        CLIENTS * EACH,
        "none lost, none duplicated"
    );
    let failed_over = b
        .packets()
        .iter()
        .filter(|s| {
            s.headers["authorization"]
                .as_bytes()
                .starts_with(b"Bearer a-")
        })
        .count();
    assert!(failed_over > 0, "clients of a went to b while a was down");
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len());
}
