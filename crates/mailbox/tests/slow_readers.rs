//! Clients that send but never read (audit: a connection's writer blocked for good). A raw
//! client registers, has a backlog larger than the socket buffers queued for itself, FETCHes it
//! and stops reading, so the peer's writer blocks on the socket; then it sends KEEPALIVEs whose
//! echoes fill the connection's outbox until the peer gives up on it. The peer must then close
//! the socket (the client's writes fail, its reads end), stop counting the connection only
//! once the socket is released, and never hold more sockets than `max_connections` (plus the
//! one its accept loop is refusing at that instant), however many such clients come.
//!
//! `/proc/net/tcp` shows what the peer cannot tell us: "held" sockets are the sockets on the
//! peer's port that still have a file descriptor (a non-zero inode; closed ones and ones not
//! yet accepted show 0), and the writer is stuck once the send queue of the peer's side of a
//! connection stops moving (sampled every 20 ms: the one wait here that polls). Without that
//! file, the count is skipped and the writer gets no head start; the other checks stand.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{TestPeer, start_peer_with};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tube_mailbox::crypto::Identity;
use tube_mailbox::peer::PeerConfig;
use tube_mailbox::wire::{self, Conn, Stream};
use tube_proto::mailbox::{self as codec, Packet, proof_message};
use tube_proto::ratelimit::RateLimit;
use tube_testkit::deadline;

/// Longest wait for one client to be given up on (its backlog, then the peer's flush time),
/// or for one answer.
const STEP: Duration = Duration::from_secs(30);

/// Blob of each backlog message.
const BLOB: usize = 90_000;

async fn start_peer(max_connections: usize) -> TestPeer {
    start_peer_with(PeerConfig {
        max_connections,
        max_queue_bytes: 64 << 20,
        max_total_bytes: 1 << 30,
        register_limit: RateLimit::per_minute(10_000),
        deliver_limit: RateLimit::per_minute(100_000),
        ..PeerConfig::default()
    })
    .await
}

/// Backlog messages: twice what the kernel may buffer towards one socket (at least 8 MB), so
/// the peer's writer blocks on a client that does not read.
fn backlog() -> usize {
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<usize>().ok())
        .unwrap_or(4 << 20);
    (2 * wmem_max).max(8 << 20) / BLOB + 1
}

async fn recv(conn: &mut Conn) -> Option<Packet> {
    match timeout(STEP, conn.next()).await {
        Ok(Some(Ok(p))) => Some(p),
        Ok(_) => None,
        Err(_) => panic!("no answer and no close within {STEP:?}"),
    }
}

/// A connection the peer accepted (it echoed a KEEPALIVE; `None` when the peer closed it at
/// once, over its connection limit), with a small receive buffer so the peer's writes back up
/// soon once we stop reading.
async fn accepted(addr: SocketAddr) -> Option<Conn> {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = sock.connect(addr).await.expect("connect");
    let mut conn = wire::conn(Stream::Plain(tcp));
    conn.send(Packet::Keepalive).await.ok()?;
    match recv(&mut conn).await? {
        Packet::Keepalive => Some(conn),
        other => panic!("expected the KEEPALIVE echo, got {other:?}"),
    }
}

/// Like [`accepted`], retrying while the peer is at its connection limit.
async fn accepted_eventually(addr: SocketAddr) -> Conn {
    loop {
        if let Some(conn) = accepted(addr).await {
            return conn;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Registers a new identity on `conn` and queues [`backlog`] messages for it.
async fn register_with_backlog(conn: &mut Conn) {
    let me = Identity::generate().expect("identity");
    conn.send(Packet::Register {
        cert: Bytes::copy_from_slice(me.cert()),
    })
    .await
    .expect("send");
    let Some(Packet::Challenge { nonce }) = recv(conn).await else {
        panic!("expected CHALLENGE");
    };
    let signature = me.sign(&proof_message(&nonce, &me.fingerprint()));
    conn.send(Packet::Proof { signature }).await.expect("send");
    assert_eq!(recv(conn).await, Some(Packet::Ok));
    let blob = Bytes::from(vec![7u8; BLOB]);
    for i in 0..backlog() {
        let id = (i as u128).to_be_bytes();
        let deliver = Packet::Deliver {
            to: me.fingerprint(),
            id,
            blob: blob.clone(),
        };
        conn.send(deliver).await.expect("send");
        assert_eq!(recv(conn).await, Some(Packet::Stored { id }));
    }
}

/// FETCHes the backlog and never reads it; once the peer's writer is stuck on it, sends
/// KEEPALIVEs (never reading their echoes either) until a write fails: the peer has closed the
/// socket. Panics if the peer keeps the connection open (our writes then block for good).
async fn stop_reading_until_closed(mut conn: Conn, peer: SocketAddr) {
    conn.send(Packet::Fetch).await.expect("send");
    let Stream::Plain(s) = conn.get_mut() else {
        unreachable!("plain TCP");
    };
    let me = s.local_addr().expect("addr");
    deadline(STEP, writer_stuck(peer.port(), me.port())).await;
    let batch = codec::to_bytes(&Packet::Keepalive).repeat(256);
    let flood = async { while s.write_all(&batch).await.is_ok() {} };
    if timeout(STEP, flood).await.is_err() {
        panic!("the peer kept a client that does not read open for {STEP:?}");
    }
    // What is left to read (what nobody read) ends in EOF or a reset.
    let mut buf = vec![0u8; 64 * 1024];
    let drained = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    timeout(STEP, drained)
        .await
        .expect("reads end once the peer closed");
}

/// One client that does not read, from connecting (retrying while the peer is full) to being
/// closed by the peer.
async fn non_reader(addr: SocketAddr) {
    let mut conn = accepted_eventually(addr).await;
    register_with_backlog(&mut conn).await;
    stop_reading_until_closed(conn, addr).await;
}

/// One line of `/proc/net/tcp`.
struct TcpRow {
    local_port: u16,
    remote_port: u16,
    /// Hex, as the kernel prints it: `0A` is LISTEN.
    state: String,
    /// Bytes in the send queue.
    send_queue: u64,
    /// 0 for a socket nobody has a file descriptor for.
    inode: u64,
}

/// The IPv4 TCP sockets of this network namespace; empty without `/proc/net/tcp`.
fn tcp_table() -> Vec<TcpRow> {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return Vec::new();
    };
    let port = |a: &str| {
        a.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let send_queue = f.get(4)?.split(':').next()?;
            Some(TcpRow {
                local_port: port(f.get(1)?)?,
                remote_port: port(f.get(2)?)?,
                state: (*f.get(3)?).to_owned(),
                send_queue: u64::from_str_radix(send_queue, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Waits until the peer's side of our connection (`peer_port` to `client_port`) has data in
/// its send queue that stops moving for a few samples: the peer's writer is blocked on us.
/// Returns at once without `/proc/net/tcp`.
async fn writer_stuck(peer_port: u16, client_port: u16) {
    let mut last = None;
    let mut still = 0;
    loop {
        let table = tcp_table();
        if table.is_empty() {
            return;
        }
        let queued = table
            .iter()
            .find(|t| t.local_port == peer_port && t.remote_port == client_port)
            .map(|t| t.send_queue);
        if queued.is_some_and(|q| q > 0) && queued == last {
            still += 1;
            if still == 3 {
                return;
            }
        } else {
            still = 0;
        }
        last = queued;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sockets on the peer's `port` that still have a file descriptor, or `None` without
/// `/proc/net/tcp`.
fn held(port: u16) -> Option<usize> {
    let table = tcp_table();
    if table.is_empty() {
        return None;
    }
    let n = table
        .iter()
        .filter(|t| t.local_port == port && t.state != "0A" && t.inode != 0)
        .count();
    Some(n)
}

/// A well-behaved client gets in (retrying while the slot is being released) and is answered.
async fn a_new_client_is_served(peer: &TestPeer) -> Conn {
    let mut conn = deadline(STEP, accepted_eventually(peer.addr)).await;
    conn.send(Packet::Keepalive).await.expect("send");
    assert_eq!(recv(&mut conn).await, Some(Packet::Keepalive));
    conn
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_and_stops_counting_once_closed() {
    let peer = start_peer(1).await;
    let mut conn = accepted(peer.addr)
        .await
        .expect("the first client is accepted");
    assert_eq!(peer.state.connections(), 1);
    assert!(
        accepted(peer.addr).await.is_none(),
        "a second one is over the limit"
    );
    register_with_backlog(&mut conn).await;
    stop_reading_until_closed(conn, peer.addr).await;
    // The peer closed the socket before our writes could fail: it holds no descriptor for it.
    if let Some(n) = held(peer.addr.port()) {
        assert_eq!(n, 0, "the peer still holds the socket it closed");
    }
    // The slot is free again (the count goes down right after the socket is released).
    let _next = a_new_client_is_served(&peer).await;
    assert_eq!(peer.state.connections(), 1);
    // Its messages stay queued until acknowledged.
    assert_eq!(peer.state.queued().0, backlog());
}

#[tokio::test]
async fn clients_that_never_read_cannot_make_the_peer_hold_more_than_max_connections() {
    const MAX: usize = 2;
    const CLIENTS: usize = 5;
    let peer = start_peer(MAX).await;
    let port = peer.addr.port();
    let mut clients = JoinSet::new();
    for _ in 0..CLIENTS {
        clients.spawn(non_reader(peer.addr));
    }
    // Sampled until every client has been accepted in turn and given up on: the peer may hold
    // one more than its limit only while its accept loop refuses it.
    let all_done = async {
        while let Some(r) = clients.join_next().await {
            r.expect("client task");
        }
    };
    tokio::pin!(all_done);
    let mut most = 0;
    let over = deadline(STEP * CLIENTS as u32, async {
        loop {
            tokio::select! {
                _ = &mut all_done => return None,
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
            if let Some(n) = held(port) {
                most = most.max(n);
                if n > MAX + 1 {
                    return Some(n);
                }
            }
        }
    })
    .await;
    if let Some(n) = over {
        panic!("the peer held {n} sockets with max_connections {MAX}");
    }
    assert!(
        most >= 1,
        "the sampling saw the clients (held {most} at most)"
    );
    if let Some(n) = held(port) {
        assert_eq!(n, 0, "every client was closed");
    }
    let _next = a_new_client_is_served(&peer).await;
    assert_eq!(peer.state.connections(), 1);
}
