//! One node connection: TLS 1.3 and the first message (`register` or `auth`) under one
//! deadline, then a reader (this task) and a writer fed by a bounded outbox.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tube_net::codec::{HandshakeConn, handshake_conn};
use tube_net::tokio_rustls::TlsAcceptor;
use tube_net::tokio_rustls::server::TlsStream;
use tube_proto::chain::{ChainErrorCode, ChainSecret, HubMessage, version_compatible};
use tube_proto::frame::Frame;
use tube_proto::ratelimit::source_key;

use super::state::{NodeEntry, Out, State};
use super::{OUTBOX, Shared};
use crate::accounts::Password;
use crate::{AccountError, AccountStore, Registered, Room};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Time to flush a last message (a refusal, `logout_result`) before closing.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

type Conn = HandshakeConn<TlsStream<TcpStream>>;

/// A logged-in session, ready to run.
struct LoggedIn {
    conn: Conn,
    name: String,
    session: u64,
    tx: mpsc::Sender<Out>,
    rx: mpsc::Receiver<Out>,
    kill: CancellationToken,
    /// The password this login handed out, until the node says it stored it.
    issued: Option<Password>,
}

/// How the reader ended.
enum End {
    /// The peer closed, the transport failed, or the session was taken over.
    Gone,
    /// The peer broke the protocol: answer `error` with this code and text, then close.
    Refuse(ChainErrorCode, String),
    /// `logout` was answered; the writer closes after it.
    Logout,
}

/// Serves one node connection to its end.
pub(crate) async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let session = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("node_session", %peer, session);
    // The login watches `shutdown` itself: it gives up while it waits for the node, but
    // not once its account step began (that step commits, and the node must get its result).
    let login = login(tcp, peer, &shared, &acceptor, session, &shutdown);
    let logged_in = tracing::Instrument::instrument(login, span.clone()).await;
    drop(permit);
    let Some(s) = logged_in else {
        return;
    };
    let span = tracing::info_span!("node_session", %peer, session, node = %s.name);
    tracing::Instrument::instrument(run(s, shared), span).await;
}

/// TLS and the first message, within `handshake_timeout` of the accept; given up at
/// `shutdown` until the first message has come.
async fn login(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    acceptor: &TlsAcceptor,
    session: u64,
    shutdown: &CancellationToken,
) -> Option<LoggedIn> {
    let deadline = Instant::now() + shared.config.handshake_timeout;
    tube_net::tune_tcp(&tcp);
    crate::hub_keepalive(&tcp);
    let accepted = tokio::select! {
        r = timeout_at(deadline, acceptor.accept(tcp)) => r,
        _ = shutdown.cancelled() => return None,
    };
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "tls handshake failed");
            return None;
        }
        Err(_) => {
            tracing::warn!("tls handshake timed out");
            return None;
        }
    };
    let mut conn = handshake_conn(tls);
    let first = tokio::select! {
        r = timeout_at(deadline, conn.next()) => r,
        _ = shutdown.cancelled() => {
            let m = HubMessage::error(ChainErrorCode::ShuttingDown, "the hub is shutting down");
            return refuse(conn, m, "login during shutdown").await;
        }
    };
    let first = match first {
        Err(_) => {
            let m = HubMessage::error(ChainErrorCode::Timeout, "log in within the deadline");
            return refuse(conn, m, "login timed out").await;
        }
        Ok(None) => return None,
        Ok(Some(frame)) => match decode(frame) {
            Ok(m) => m,
            Err(why) => {
                let m = HubMessage::error(ChainErrorCode::ProtocolError, why);
                return refuse(conn, m, "malformed first message").await;
            }
        },
    };
    let (name, relay, step, slot) = match first {
        HubMessage::Register {
            version,
            name,
            relay,
            invite,
        } => {
            let slot = match gate(shared, &version, &name, peer.ip(), true) {
                Ok(slot) => slot,
                Err(m) => return refuse(conn, *m, "register refused").await,
            };
            let step = register(shared, peer.ip(), &name, invite.as_ref()).await;
            (name, relay, step, slot)
        }
        HubMessage::Auth {
            version,
            name,
            password,
            relay,
        } => {
            let slot = match gate(shared, &version, &name, peer.ip(), false) {
                Ok(slot) => slot,
                Err(m) => return refuse(conn, *m, "auth refused").await,
            };
            let step = authenticate(shared, &name, password).await;
            (name, relay, step, slot)
        }
        other if other.is_from_node() => {
            let m = HubMessage::error(ChainErrorCode::NotAuthenticated, "log in first");
            return refuse(conn, m, "message before login").await;
        }
        _ => {
            let m = HubMessage::error(ChainErrorCode::ProtocolError, "wrong direction");
            return refuse(conn, m, "hub message from a node").await;
        }
    };
    let (result, issued) = match step {
        Ok(done) => done,
        Err((m, why)) => {
            // The place goes back before the node hears the answer (see `Slot`).
            drop(slot);
            return refuse(conn, *m, why).await;
        }
    };
    let (tx, rx) = mpsc::channel(OUTBOX);
    let kill = CancellationToken::new();
    // `Some(result)` when the hub began shutting down meanwhile.
    let too_late = {
        let mut st = shared.lock();
        if st.closing {
            Some(result)
        } else {
            if let Some(slot) = slot {
                slot.fill(&mut st);
            }
            st.login(
                &name,
                NodeEntry {
                    session,
                    ip: peer.ip().to_canonical(),
                    relay,
                    tx: tx.clone(),
                    kill: kill.clone(),
                    chains: Default::default(),
                },
            );
            // The channel is new and empty: the result is the first message the node gets.
            let _ = tx.try_send(Out::Msg(result));
            None
        }
    };
    if let Some(result) = too_late {
        // The account step is committed (a new account, or a rotated password): the node
        // gets its result, so it keeps the account and logs in with the password after the
        // restart, then the refusal.
        let _ = timeout(CLOSE_GRACE, conn.send(Frame::Control(result.to_bytes()))).await;
        let m = HubMessage::error(ChainErrorCode::ShuttingDown, "the hub is shutting down");
        return refuse(conn, m, "login during shutdown").await;
    }
    shared.changed.notify_one();
    tracing::info!(node = %name, relay, "node logged in");
    Some(LoggedIn {
        conn,
        name,
        session,
        tx,
        rx,
        kill,
        issued: Some(issued),
    })
}

/// A login's account step: the answer and the password it hands out, or a refusal and the
/// reason to log.
type Step = Result<(HubMessage, Password), (Box<HubMessage>, &'static str)>;

/// `register` past the node limits: the per-source rate, the registration token, then a new
/// account within the hub's room for accounts.
async fn register(
    shared: &Arc<Shared>,
    ip: std::net::IpAddr,
    name: &str,
    invite: Option<&ChainSecret>,
) -> Step {
    let refused = |message: String, code: ChainErrorCode| {
        Box::new(HubMessage::RegisterResult {
            is_success: false,
            message,
            password: None,
            code: Some(code as u16),
        })
    };
    let limited = shared
        .registrations
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .check(&source_key(ip), std::time::Instant::now());
    if let Err(wait) = limited {
        let message = format!(
            "too many registrations from this address, retry in {}s",
            wait.as_secs() + 1
        );
        return Err((
            refused(message, ChainErrorCode::Limit),
            "register rate limited",
        ));
    }
    if let Some(token) = &shared.config.registration_token
        && !invited(token, invite)
    {
        let message = "this hub registers new nodes only with its registration token".into();
        return Err((
            refused(message, ChainErrorCode::AuthFailed),
            "register without the registration token",
        ));
    }
    let n = name.to_owned();
    let hub = shared.clone();
    let registered = accounts(shared, move |a| {
        // A logged-in node's account never gives way, however long ago it logged in.
        let in_use = |account: &str| hub.lock().nodes.contains_key(account);
        let room = Room {
            max_accounts: hub.config.max_accounts,
            keep_unseen: hub.config.evict_unseen_after,
            in_use: &in_use,
        };
        a.register_in(&n, &room)
    });
    match registered.await {
        Ok(Registered { password, evicted }) => {
            if let Some(old) = evicted {
                shared.evicted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(account = %old, "account unseen longest removed to make room");
            }
            let answer = HubMessage::RegisterResult {
                is_success: true,
                message: "registered".into(),
                password: Some(ChainSecret::new(password.expose())),
                code: None,
            };
            Ok((answer, password))
        }
        Err(e) => {
            let (code, message) = match e {
                AccountError::NameTaken => {
                    (ChainErrorCode::NameTaken, format!("name {name} is taken"))
                }
                AccountError::InvalidName => (ChainErrorCode::ProtocolError, "invalid name".into()),
                AccountError::Full => {
                    tracing::warn!(
                        max_accounts = shared.config.max_accounts,
                        "the hub holds its most accounts and none may give way"
                    );
                    (
                        ChainErrorCode::Limit,
                        "the hub has no room for new accounts, retry later".into(),
                    )
                }
                other => {
                    tracing::error!(error = %other, "account store failed");
                    (
                        ChainErrorCode::Unavailable,
                        "hub error, try again later".into(),
                    )
                }
            };
            Err((refused(message, code), "register refused"))
        }
    }
}

/// `auth` past the node limits: the password, rotated.
async fn authenticate(shared: &Arc<Shared>, name: &str, password: ChainSecret) -> Step {
    let n = name.to_owned();
    match accounts(shared, move |a| a.authenticate(&n, password.expose())).await {
        Ok(next) => {
            let answer = HubMessage::AuthResult {
                is_success: true,
                message: "welcome".into(),
                next_password: Some(ChainSecret::new(next.expose())),
                code: None,
            };
            Ok((answer, next))
        }
        Err(e) => {
            let (code, message) = match e {
                AccountError::Store(other) => {
                    tracing::error!(error = %other, "account store failed");
                    (ChainErrorCode::Unavailable, "hub error, try again later")
                }
                // Unknown name and wrong password get the same answer.
                _ => (ChainErrorCode::AuthFailed, "authentication failed"),
            };
            let answer = HubMessage::AuthResult {
                is_success: false,
                message: message.into(),
                next_password: None,
                code: Some(code as u16),
            };
            Err((Box::new(answer), "auth refused"))
        }
    }
}

/// Checks before touching the accounts: version, shutdown, node limits (in all, and from the
/// source of `ip`). A login that passes holds a slot in both limits until it logs in or gives
/// up (the [`Slot`]), so logins in flight together cannot pass a limit; one that takes an
/// existing session over needs none.
fn gate(
    shared: &Arc<Shared>,
    version: &str,
    name: &str,
    ip: std::net::IpAddr,
    register: bool,
) -> Result<Option<Slot>, Box<HubMessage>> {
    if !version_compatible(version) {
        let message = format!("protocol version {version} is not supported");
        let code = Some(ChainErrorCode::UnsupportedVersion as u16);
        return Err(Box::new(if register {
            HubMessage::RegisterResult {
                is_success: false,
                message,
                password: None,
                code,
            }
        } else {
            HubMessage::AuthResult {
                is_success: false,
                message,
                next_password: None,
                code,
            }
        }));
    }
    let mut st = shared.lock();
    if st.closing {
        return Err(Box::new(HubMessage::error(
            ChainErrorCode::ShuttingDown,
            "the hub is shutting down",
        )));
    }
    if st.nodes.contains_key(name) {
        // A login that takes an existing session over holds no further slot.
        return Ok(None);
    }
    if st.nodes.len() + st.reserved_total >= shared.config.max_nodes {
        return Err(Box::new(HubMessage::error(
            ChainErrorCode::Limit,
            "too many nodes online",
        )));
    }
    let source = source_key(ip);
    let from_source = st
        .nodes
        .values()
        .filter(|n| source_key(n.ip) == source)
        .count()
        + st.reserved.get(&source).copied().unwrap_or(0);
    if from_source >= shared.config.max_nodes_per_source {
        return Err(Box::new(HubMessage::error(
            ChainErrorCode::Limit,
            "too many nodes online from this address",
        )));
    }
    st.reserved_total += 1;
    *st.reserved.entry(source).or_default() += 1;
    Ok(Some(Slot {
        shared: shared.clone(),
        source,
        held: true,
    }))
}

/// A node slot reserved by [`gate`]: given back when dropped (a refused login drops it before
/// it sends the refusal, so whoever hears the answer finds the slot free), or handed to the
/// logged-in node by [`Slot::fill`].
struct Slot {
    shared: Arc<Shared>,
    source: std::net::IpAddr,
    held: bool,
}

impl Slot {
    /// The node is in `st` now and counts itself: the reservation ends.
    fn fill(mut self, st: &mut State) {
        st.unreserve(self.source);
        self.held = false;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held {
            self.shared.lock().unreserve(self.source);
        }
    }
}

fn invited(token: &ChainSecret, invite: Option<&ChainSecret>) -> bool {
    use subtle::ConstantTimeEq;
    invite.is_some_and(|i| bool::from(i.expose().as_bytes().ct_eq(token.expose().as_bytes())))
}

/// Runs an account operation, off the async threads when the store blocks.
async fn accounts<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&dyn AccountStore) -> Result<T, AccountError> + Send + 'static,
) -> Result<T, AccountError> {
    let store = shared.config.accounts.clone();
    if store.blocks() {
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .unwrap_or_else(|e| Err(AccountError::Store(e.to_string())))
    } else {
        f(&*store)
    }
}

/// Sends `msg`, closes the connection, and gives up the login.
async fn refuse(mut conn: Conn, msg: HubMessage, why: &'static str) -> Option<LoggedIn> {
    tracing::warn!(kind = msg.kind(), why, "login refused");
    let _ = timeout(CLOSE_GRACE, conn.send(Frame::Control(msg.to_bytes()))).await;
    let _ = timeout(CLOSE_GRACE, SinkExt::close(&mut conn)).await;
    None
}

/// One frame as a hub message from a node, or the reason it is a protocol error.
fn decode(frame: Result<Frame, tube_net::codec::CodecError>) -> Result<HubMessage, String> {
    match frame {
        Ok(Frame::Control(bytes)) => {
            HubMessage::from_bytes(&bytes).map_err(|e| format!("malformed message: {e}"))
        }
        Ok(_) => Err("only CONTROL frames are allowed".into()),
        Err(e) => Err(format!("bad frame: {e}")),
    }
}

/// The logged-in session: reader here, writer alongside, until either ends.
async fn run(s: LoggedIn, shared: Arc<Shared>) {
    let LoggedIn {
        conn,
        name,
        session,
        tx,
        mut rx,
        kill,
        mut issued,
    } = s;
    let (mut sink, mut stream) = conn.split();
    let writer_kill = kill.clone();
    let writer = async move {
        let work = async {
            while let Some(out) = rx.recv().await {
                match out {
                    Out::Msg(m) => {
                        if sink.send(Frame::Control(m.to_bytes())).await.is_err() {
                            return;
                        }
                    }
                    Out::Close => break,
                }
            }
            let _ = SinkExt::close(&mut sink).await;
        };
        tokio::select! {
            _ = writer_kill.cancelled() => {}
            _ = work => {}
        }
    };
    tokio::pin!(writer);
    let reader = read_loop(&mut stream, &shared, &name, session, &tx, &mut issued);
    let mut written = false;
    let end = tokio::select! {
        _ = &mut writer => {
            written = true;
            None
        }
        _ = kill.cancelled() => None,
        end = reader => Some(end),
    };
    match end {
        Some(End::Refuse(code, why)) => {
            tracing::warn!(code = code as u16, reason = %why, "protocol error, closing");
            if tx.try_send(Out::Msg(HubMessage::error(code, why))).is_err()
                || tx.try_send(Out::Close).is_err()
            {
                kill.cancel();
            }
        }
        Some(End::Logout) => tracing::info!("node logged out"),
        Some(End::Gone) | None => {}
    }
    shared.lock().leave(&name, Some(session));
    shared.changed.notify_one();
    drop(tx);
    // The state no longer holds a sender: the writer ends after what is queued (unless it
    // ended already: a finished future must not be polled again).
    if !written {
        let _ = timeout(CLOSE_GRACE, &mut writer).await;
    }
    kill.cancel();
    // Seen until now: the account counts as unseen from here on (`Room`), not from its login.
    // Not when the hub is shutting down: a write (and fsync) for every session would hold the
    // shutdown up, and the node's login after the restart records it anyway.
    let closing = shared.lock().closing;
    let n = name.clone();
    if !closing && let Err(e) = accounts(&shared, move |a| a.seen(&n)).await {
        tracing::warn!(error = %e, "account store failed");
    }
    tracing::info!("node session ended");
}

async fn read_loop(
    stream: &mut futures_util::stream::SplitStream<Conn>,
    shared: &Shared,
    name: &str,
    session: u64,
    tx: &mpsc::Sender<Out>,
    issued: &mut Option<Password>,
) -> End {
    loop {
        let Some(frame) = stream.next().await else {
            return End::Gone;
        };
        if let Err(tube_net::codec::CodecError::Io(e)) = &frame {
            tracing::debug!(error = %e, "connection failed");
            return End::Gone;
        }
        let msg = match decode(frame) {
            Ok(m) => m,
            Err(why) => return End::Refuse(ChainErrorCode::ProtocolError, why),
        };
        if !msg.is_from_node() {
            return End::Refuse(
                ChainErrorCode::ProtocolError,
                format!("{} is sent by the hub", msg.kind()),
            );
        }
        tracing::debug!(kind = msg.kind(), "message");
        let now = Instant::now().into_std();
        match msg {
            HubMessage::Register { .. } | HubMessage::Auth { .. } => {
                return End::Refuse(ChainErrorCode::ProtocolError, "already logged in".into());
            }
            HubMessage::PasswordStored {} => {
                // Once per login; a repeat has nothing left to confirm and changes nothing.
                if let Some(p) = issued.take() {
                    let n = name.to_owned();
                    match accounts(shared, move |a| a.confirm_stored(&n, &p)).await {
                        Ok(()) => {
                            tracing::debug!("node stored its password; the previous one is void")
                        }
                        Err(e) => tracing::error!(error = %e, "cannot void the previous password"),
                    }
                }
            }
            HubMessage::Logout {} => {
                let mut st = shared.lock();
                if !st.holds(name, session) {
                    return End::Gone;
                }
                st.leave(name, Some(session));
                let bye = HubMessage::LogoutResult {
                    is_success: true,
                    message: "bye".into(),
                };
                let _ = tx.try_send(Out::Msg(bye));
                let _ = tx.try_send(Out::Close);
                return End::Logout;
            }
            HubMessage::RequestTube {
                id,
                endpoint_name,
                local_id,
            } => {
                let answer =
                    request_tube(shared, name, session, id, &endpoint_name, &local_id, now).await;
                if let Some(answer) = answer
                    && tx.try_send(Out::Msg(answer)).is_err()
                {
                    return End::Gone;
                }
            }
            HubMessage::RequestCloseTube { tunnel_id } => {
                let mut st = shared.lock();
                if !st.holds(name, session) {
                    return End::Gone;
                }
                st.request_close(name, &tunnel_id);
            }
            HubMessage::MakeTubeResult { .. } => {
                let mut st = shared.lock();
                if !st.holds(name, session) {
                    return End::Gone;
                }
                st.make_tube_result(name, &msg, now);
            }
            HubMessage::RequestConnectionResult { .. } => {
                let mut st = shared.lock();
                if !st.holds(name, session) {
                    return End::Gone;
                }
                st.approval(&shared.config, name, &msg, now);
            }
            HubMessage::Error { code, message } => {
                tracing::warn!(code, message = %message, "node reported an error");
            }
            _ => {}
        }
        shared.changed.notify_one();
    }
}

/// `request_tube`: the refusal to answer at once, or `None` when the endpoint was asked.
async fn request_tube(
    shared: &Shared,
    name: &str,
    session: u64,
    id: u64,
    endpoint: &str,
    local_id: &str,
    now: std::time::Instant,
) -> Option<HubMessage> {
    let refusal = |code: ChainErrorCode, reason: String| HubMessage::RequestTubeResult {
        id,
        is_allowed: false,
        reason,
        tunnel_id: None,
        hops: 0,
        code: Some(code as u16),
    };
    if endpoint == name {
        return Some(refusal(
            ChainErrorCode::Denied,
            "a chain needs another node".into(),
        ));
    }
    {
        let mut st = shared.lock();
        if !st.holds(name, session) {
            return None;
        }
        if st.nodes.contains_key(endpoint) {
            return st.request_tube(&shared.config, name, id, endpoint, local_id, now);
        }
    }
    let ep = endpoint.to_owned();
    match accounts(shared, move |a| a.exists(&ep)).await {
        Ok(false) => Some(refusal(
            ChainErrorCode::UnknownNode,
            format!("no node named {endpoint}"),
        )),
        Ok(true) => Some(refusal(
            ChainErrorCode::EndpointOffline,
            format!("{endpoint} is offline"),
        )),
        Err(e) => {
            tracing::error!(error = %e, "account store failed");
            Some(refusal(
                ChainErrorCode::Unavailable,
                "hub error, try again later".into(),
            ))
        }
    }
}
