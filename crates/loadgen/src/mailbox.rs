//! The `mailbox` client: messages per second through one mailbox peer (`tube peer`) and the
//! delivery latency to online recipients.
//!
//! It registers `recipients` fresh identities with the peer (tube-mailbox's client: REGISTER,
//! signed challenge, FETCH), each keeping its connection open so the peer pushes to it, then
//! `senders` plain connections deliver `messages` messages of `size` bytes to recipients
//! chosen at random (each DELIVER waits for its STORED), as fast as they can or paced at a
//! fixed offered rate (so latency can be read below saturation). A message carries its index, the
//! time it was sent and its recipient, so the receiving side (same process, same clock)
//! measures send-to-push latency and checks that every message arrives exactly once, intact
//! and at the right recipient. Recipients acknowledge every message, as `tube msg listen`
//! does.
//!
//! The blobs are not sealed: the peer never opens them, and end-to-end encryption is the
//! clients' cost, not the peer's.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tube_mailbox::client::{self, ClientConfig, Inbox, PeerAddr};
use tube_mailbox::crypto::Identity;
use tube_proto::mailbox::{Fingerprint, MailboxError, Packet};

use crate::latency::{self, Latency};

/// Registrations in progress at once.
const REGISTER_CONCURRENCY: u32 = 64;

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Params {
    /// The peer.
    pub(crate) peer: PeerAddr,
    /// Online recipients.
    pub(crate) recipients: u32,
    /// Concurrent sending connections.
    pub(crate) senders: u32,
    /// Messages in all.
    pub(crate) messages: u32,
    /// Blob size in bytes (at least [`latency::HEADER`]).
    pub(crate) size: usize,
    /// Seed of the recipient choice.
    pub(crate) seed: u64,
    /// Messages per second offered over the whole run (0: each sender as fast as it can).
    pub(crate) rate: u32,
}

/// Result of a run.
#[derive(Debug)]
pub(crate) struct Run {
    /// Time to register all recipients (and fetch their empty backlogs).
    pub(crate) register_secs: f64,
    /// From the senders' start (their connects included) to the last push.
    pub(crate) secs: f64,
    /// Messages delivered and pushed per second over `secs`.
    pub(crate) msgs_per_sec: f64,
    /// Send-to-push latency.
    pub(crate) latency: Latency,
}

/// What the receivers share.
struct Arrivals {
    base: Instant,
    params: Params,
    /// Which messages arrived (a second arrival is an error).
    seen: Vec<AtomicBool>,
    received: AtomicU32,
    /// Stamp of the latest arrival.
    last: AtomicU64,
    /// Cancelled when every message arrived, or on the first failure.
    done: CancellationToken,
    failure: Mutex<Option<String>>,
}

impl Arrivals {
    fn fail(&self, why: String) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(why);
        self.done.cancel();
    }
}

/// Runs the benchmark against the peer in `p`; `step` bounds each wait.
pub(crate) async fn mailbox(p: Params, step: Duration) -> anyhow::Result<Run> {
    anyhow::ensure!(
        p.recipients > 0 && p.senders > 0,
        "no recipients or senders"
    );
    let cfg = ClientConfig {
        timeout: step,
        // One attempt: a registration that needs retries is a failure of the run.
        register_attempts: 1,
        ..ClientConfig::default()
    };
    let started = Instant::now();
    let inboxes = register_all(&p, &cfg).await?;
    let register_secs = started.elapsed().as_secs_f64();
    let fingerprints: Arc<[Fingerprint]> = inboxes.iter().map(|(fp, _)| *fp).collect();

    let arrivals = Arc::new(Arrivals {
        base: Instant::now(),
        seen: (0..p.messages).map(|_| AtomicBool::new(false)).collect(),
        received: AtomicU32::new(0),
        last: AtomicU64::new(0),
        done: CancellationToken::new(),
        failure: Mutex::new(None),
        params: p.clone(),
    });
    let mut receivers = JoinSet::new();
    for (r, (_, inbox)) in inboxes.into_iter().enumerate() {
        receivers.spawn(receive(inbox, r as u64, arrivals.clone()));
    }
    let mut senders = JoinSet::new();
    for s in 0..p.senders.min(p.messages.max(1)) {
        let (fps, arrivals) = (fingerprints.clone(), arrivals.clone());
        senders.spawn(async move {
            if let Err(e) = send(s, &fps, &arrivals, step).await {
                arrivals.fail(format!("sender {s}: {e:#}"));
            }
        });
    }
    while senders.join_next().await.is_some() {}
    // Every message is stored now; wait (bounded) for the last pushes.
    let all_in = tokio::time::timeout(step, arrivals.done.cancelled()).await;
    arrivals.done.cancel();
    let mut samples = Vec::with_capacity(p.messages as usize);
    while let Some(r) = receivers.join_next().await {
        samples.extend(r.context("a receiver panicked")?);
    }
    if let Some(why) = arrivals
        .failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        anyhow::bail!(why);
    }
    let received = arrivals.received.load(Ordering::Relaxed);
    if all_in.is_err() || received != p.messages {
        anyhow::bail!(
            "only {received} of {} stored messages were pushed within {}s",
            p.messages,
            step.as_secs()
        );
    }
    let secs = Duration::from_nanos(arrivals.last.load(Ordering::Relaxed)).as_secs_f64();
    Ok(Run {
        register_secs,
        secs,
        msgs_per_sec: f64::from(p.messages) / secs,
        latency: Latency::of(samples),
    })
}

/// The recipient of message `index`.
fn recipient_of(p: &Params, index: u64) -> u64 {
    latency::mix(p.seed ^ index) % u64::from(p.recipients)
}

/// Registers every recipient, [`REGISTER_CONCURRENCY`] at a time, each with a fresh identity
/// and its (empty) backlog fetched: from then on the peer pushes to it.
async fn register_all(p: &Params, cfg: &ClientConfig) -> anyhow::Result<Vec<(Fingerprint, Inbox)>> {
    let next = Arc::new(AtomicU32::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..REGISTER_CONCURRENCY.min(p.recipients) {
        let (next, peer, cfg, total) = (next.clone(), p.peer.clone(), cfg.clone(), p.recipients);
        workers.spawn(async move {
            let mut got = Vec::new();
            loop {
                let r = next.fetch_add(1, Ordering::Relaxed);
                if r >= total {
                    return Ok::<_, anyhow::Error>(got);
                }
                let inbox = register_one(&peer, &cfg)
                    .await
                    .with_context(|| format!("registering recipient {r}"))?;
                got.push((r, inbox));
            }
        });
    }
    let mut all = Vec::with_capacity(p.recipients as usize);
    while let Some(r) = workers.join_next().await {
        all.extend(r.context("a registration task panicked")??);
    }
    all.sort_unstable_by_key(|(r, _)| *r);
    Ok(all.into_iter().map(|(_, x)| x).collect())
}

async fn register_one(peer: &PeerAddr, cfg: &ClientConfig) -> anyhow::Result<(Fingerprint, Inbox)> {
    let id = Identity::generate().context("making an identity")?;
    let mut inbox = Inbox::open(peer, &id, cfg.clone())
        .await
        .map_err(|e| limit_hint(e.into(), "--registrations-per-minute"))?;
    inbox.fetch().await?;
    match tokio::time::timeout(cfg.timeout, inbox.next()).await {
        Ok(Ok(None)) => Ok((id.fingerprint(), inbox)),
        Ok(Ok(Some(_))) => anyhow::bail!("a new identity had queued messages"),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => anyhow::bail!("no end of the backlog within {}s", cfg.timeout.as_secs()),
    }
}

/// Sender `s`: one connection, messages `s`, `s + senders`, ... in turn, each DELIVER waiting
/// for its STORED.
async fn send(
    s: u32,
    fingerprints: &[Fingerprint],
    arrivals: &Arrivals,
    step: Duration,
) -> anyhow::Result<()> {
    let p = &arrivals.params;
    let mut conn = client::connect(&p.peer, step).await?;
    for index in (u64::from(s)..u64::from(p.messages)).step_by(p.senders as usize) {
        if arrivals.done.is_cancelled() {
            return Ok(());
        }
        latency::pace(arrivals.base, index, p.rate).await;
        let r = recipient_of(p, index);
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&index.to_be_bytes());
        let blob = latency::body(index, latency::stamp(arrivals.base), r, p.size);
        let deliver = Packet::Deliver {
            to: fingerprints[r as usize],
            id,
            blob: Bytes::from(blob),
        };
        crate::within(step, "sending a delivery", conn.send(deliver)).await?;
        match tokio::time::timeout(step, conn.next()).await {
            Err(_) => anyhow::bail!("no answer to message {index} within {}s", step.as_secs()),
            Ok(None) => anyhow::bail!("the peer closed the connection"),
            Ok(Some(got)) => match got? {
                Packet::Stored { id: got } if got == id => {}
                Packet::Error { code, message } => {
                    let e = anyhow::anyhow!("message {index} refused: error {code}: {message}");
                    return Err(if code == MailboxError::RateLimited as u16 {
                        e.context("raise the peer's --deliveries-per-minute")
                    } else {
                        e
                    });
                }
                other => anyhow::bail!("expected STORED, got packet type {}", other.kind()),
            },
        }
    }
    Ok(())
}

/// Recipient `r`: takes pushed messages until the run is done, checking and timing each and
/// acknowledging it; returns the latencies it measured.
async fn receive(mut inbox: Inbox, r: u64, arrivals: Arc<Arrivals>) -> Vec<Duration> {
    let mut samples = Vec::new();
    loop {
        let got = tokio::select! {
            _ = arrivals.done.cancelled() => break,
            got = inbox.next() => got,
        };
        let (seq, blob) = match got {
            Ok(Some((seq, _, blob))) => (seq, blob),
            Ok(None) => continue,
            Err(e) => {
                arrivals.fail(format!("recipient {r}: {e}"));
                break;
            }
        };
        match accept(&arrivals, r, &blob) {
            Ok(d) => samples.push(d),
            Err(why) => {
                arrivals.fail(format!("recipient {r}: {why}"));
                break;
            }
        }
        if let Err(e) = inbox.ack(seq).await {
            arrivals.fail(format!("recipient {r}: acknowledging: {e}"));
            break;
        }
    }
    inbox.close().await;
    samples
}

/// Checks one arrival at recipient `r` and records it; its latency, or why it is wrong.
fn accept(arrivals: &Arrivals, r: u64, blob: &[u8]) -> Result<Duration, String> {
    let p = &arrivals.params;
    let (index, sent, to) =
        latency::parse(blob, p.size).ok_or("a message arrived corrupted or cut")?;
    if index >= u64::from(p.messages) || to != r || recipient_of(p, index) != r {
        return Err(format!("message {index} for recipient {to} arrived here"));
    }
    let took = latency::since(arrivals.base, sent).ok_or("a message from the future")?;
    if arrivals.seen[index as usize].swap(true, Ordering::Relaxed) {
        return Err(format!("message {index} arrived twice"));
    }
    arrivals
        .last
        .fetch_max(latency::stamp(arrivals.base), Ordering::Relaxed);
    if arrivals.received.fetch_add(1, Ordering::Relaxed) + 1 == p.messages {
        arrivals.done.cancel();
    }
    Ok(took)
}

/// Names the peer flag to raise when `e` is its rate limit.
fn limit_hint(e: anyhow::Error, flag: &str) -> anyhow::Error {
    let limited = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<client::ClientError>(),
            Some(client::ClientError::Refused { code, .. }) if *code == MailboxError::RateLimited as u16
        )
    });
    if limited {
        e.context(format!("the peer rate-limited us: raise its {flag}"))
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;
    use tube_mailbox::peer::{Peer, PeerConfig};
    use tube_proto::ratelimit::RateLimit;
    use tube_testkit::deadline;

    use super::*;

    /// A peer on 127.0.0.1:0 with `config`; stops with `stop`.
    async fn start_peer(config: PeerConfig, stop: &CancellationToken) -> PeerAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = Peer::new(config).run(listener, stop).await;
        });
        PeerAddr { host, tls: None }
    }

    fn params(peer: PeerAddr, recipients: u32, messages: u32, rate: u32) -> Params {
        Params {
            peer,
            recipients,
            senders: 3,
            messages,
            size: 64,
            seed: 7,
            rate,
        }
    }

    #[test]
    fn a_second_arrival_and_a_misrouted_message_are_errors() {
        let p = params("127.0.0.1:1".parse().expect("addr"), 5, 10, 0);
        let arrivals = Arrivals {
            base: Instant::now(),
            seen: (0..10).map(|_| AtomicBool::new(false)).collect(),
            received: AtomicU32::new(0),
            last: AtomicU64::new(0),
            done: CancellationToken::new(),
            failure: Mutex::new(None),
            params: p.clone(),
        };
        let r = recipient_of(&p, 3);
        let blob = latency::body(3, latency::stamp(arrivals.base), r, p.size);
        assert!(accept(&arrivals, r, &blob).is_ok());
        let twice = accept(&arrivals, r, &blob).expect_err("a duplicate");
        assert!(twice.contains("twice"), "{twice}");
        let elsewhere = accept(&arrivals, (r + 1) % 5, &blob).expect_err("misrouted");
        assert!(elsewhere.contains("arrived here"), "{elsewhere}");
        assert_eq!(arrivals.received.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn every_message_is_pushed_to_its_recipient() {
        deadline(Duration::from_secs(30), async {
            let stop = CancellationToken::new();
            let config = PeerConfig {
                deliver_limit: RateLimit::per_minute(100_000),
                ..PeerConfig::default()
            };
            let peer = start_peer(config, &stop).await;
            // `mailbox` fails unless each of the 100 messages arrives once, intact, at the
            // recipient it was sent to.
            let r = mailbox(params(peer, 10, 100, 0), Duration::from_secs(10))
                .await
                .expect("run");
            assert!(r.secs > 0.0 && r.msgs_per_sec > 0.0);
            assert!(r.latency.p50_us > 0.0 && r.latency.p50_us <= r.latency.p99_us);
            stop.cancel();
        })
        .await;
    }

    #[tokio::test]
    async fn a_paced_run_takes_as_long_as_its_rate_says() {
        deadline(Duration::from_secs(30), async {
            let stop = CancellationToken::new();
            let peer = start_peer(PeerConfig::default(), &stop).await;
            // 20 messages at 40 per second: the last is due 19/40 s = 475 ms after the start.
            let r = mailbox(params(peer, 4, 20, 40), Duration::from_secs(10))
                .await
                .expect("run");
            assert!(r.secs >= 0.475, "a paced run took {} s", r.secs);
            stop.cancel();
        })
        .await;
    }

    #[tokio::test]
    async fn the_peers_registration_limit_is_named_when_it_refuses() {
        deadline(Duration::from_secs(30), async {
            let stop = CancellationToken::new();
            let config = PeerConfig {
                register_limit: RateLimit::per_minute(5),
                ..PeerConfig::default()
            };
            let peer = start_peer(config, &stop).await;
            let e = mailbox(params(peer, 8, 8, 0), Duration::from_secs(10))
                .await
                .expect_err("8 registrations against a limit of 5");
            let text = format!("{e:#}");
            assert!(text.contains("--registrations-per-minute"), "{text}");
            stop.cancel();
        })
        .await;
    }
}
