//! What several mailbox test binaries share: a real peer on 127.0.0.1 port 0.
// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tube_mailbox::peer::{Peer, PeerConfig, PeerState};

/// A running peer; dropping it stops the peer.
pub(crate) struct TestPeer {
    pub(crate) addr: SocketAddr,
    pub(crate) state: PeerState,
    pub(crate) shutdown: CancellationToken,
}

impl Drop for TestPeer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts a peer with `config` on 127.0.0.1 port 0.
pub(crate) async fn start_peer_with(config: PeerConfig) -> TestPeer {
    tube_testkit::init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let peer = Peer::new(config);
    let state = peer.state();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = peer.run(listener, stop).await;
    });
    TestPeer {
        addr,
        state,
        shutdown,
    }
}
