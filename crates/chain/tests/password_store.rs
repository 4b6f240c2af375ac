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

#[tokio::test]
async fn a_node_that_cannot_store_its_next_password_logs_in_again_with_the_one_it_has() {
    tube_testkit::deadline(LIMIT, async {
        let hub = start_hub(0).await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = node_config(&hub, "p", 2, dir.path());
        config.reconnect.initial = Duration::from_millis(10);
        config.reconnect.max = Duration::from_millis(50);

        // Registering stores password 1: this process's atomic write number 0.
        spawn_node(config.clone()).await.online_then_stop().await;
        let p1 = read_password(&config);
        // Write number 1, of password 2 after the next login, will fail.
        let blocker = dir
            .path()
            .join(format!(".node-p.password.{}.1.tmp", std::process::id()));
        std::fs::create_dir(&blocker).unwrap();
        std::fs::write(blocker.join("keep"), b"").unwrap();

        // The login with 1 gets 2 and cannot store it; the node logs in again with 1 (the hub
        // keeps it until a successor is stored), gets 3 and stores it (write number 2).
        let mut node = spawn_node(config.clone()).await;
        let mut sessions = node.stats.sessions();
        tokio::select! {
            r = sessions.wait_for(|s| s.online) => { r.expect("node stats"); }
            r = &mut node.task => panic!("the node stopped: {r:?}"),
        }
        assert_eq!(
            node.stats.sessions().borrow().logins,
            1,
            "one session got through"
        );
        let p3 = read_password(&config);
        assert_ne!(p1, p3, "the file holds a newer password");
        node.stop().await.expect("clean stop");
        assert!(blocker.is_dir(), "the failed write left its obstacle alone");

        // The stored password logs in.
        spawn_node(config.clone()).await.online_then_stop().await;
    })
    .await;
}
