//! A node that cannot store the password a login returned (chain.md section 4.2) closes that
//! session and logs in again later with the password it still has; it does not stop.
//!
//! Alone in its test binary on purpose: the write fails because a directory stands where
//! `tube_net::files::write_private_atomic` puts its temporary file, whose name holds the
//! process id and a counter of the process's atomic writes, so no other test may write files
//! in this process.

mod common;

use std::time::Duration;

use common::*;

/// A directory where the process's atomic write number `n` of the node `p`'s password file
/// puts its temporary file, so that write fails.
fn block_write(dir: &std::path::Path, n: u64) -> std::path::PathBuf {
    let blocker = dir.join(format!(".node-p.password.{}.{n}.tmp", std::process::id()));
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("keep"), b"").unwrap();
    blocker
}

/// Waits until the node is logged in; fails at once if it stopped instead.
async fn online_or_stopped(node: &mut TestNode) {
    let mut sessions = node.stats.sessions();
    tokio::select! {
        r = sessions.wait_for(|s| s.online) => { r.expect("node stats"); }
        r = &mut node.task => panic!("the node stopped: {r:?}"),
    }
}

#[tokio::test]
async fn a_node_that_cannot_store_its_next_password_logs_in_again_with_it() {
    tube_testkit::deadline(LIMIT, async {
        let hub = start_hub(0).await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = node_config(&hub, "p", 2, dir.path());
        config.reconnect.initial = Duration::from_millis(10);
        config.reconnect.max = Duration::from_millis(50);

        // The password `register` returns cannot be stored (write 0). Registering again
        // would get 6002 and stop the node for good; it logs in with the password it kept in
        // memory instead, gets the next one and stores that (write 1).
        let first = block_write(dir.path(), 0);
        let mut node = spawn_node(config.clone()).await;
        online_or_stopped(&mut node).await;
        assert_eq!(
            node.stats.sessions().borrow().logins,
            1,
            "one session got through"
        );
        let p2 = read_password(&config);
        node.stop().await.expect("clean stop");

        // Later the password of an `auth` cannot be stored (write 2): the node logs in with
        // it (or could with the one on disk, which the hub still accepts) and stores the next
        // one (write 3).
        let second = block_write(dir.path(), 2);
        let mut node = spawn_node(config.clone()).await;
        online_or_stopped(&mut node).await;
        let p4 = read_password(&config);
        assert_ne!(p2, p4, "the file holds a newer password");
        node.stop().await.expect("clean stop");
        assert!(
            first.is_dir() && second.is_dir(),
            "the failed writes met their obstacles"
        );

        // The stored password logs in.
        spawn_node(config.clone()).await.online_then_stop().await;
    })
    .await;
}
