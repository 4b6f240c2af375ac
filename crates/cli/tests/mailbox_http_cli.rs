//! Mailboxes over HTTP on the real binaries (`docs/protocols/longpoll.md` section 7): `tube
//! peer --http`, `tube longpoll` in front of it, one client on TCP and one with `tube msg
//! --via`: messages both ways with `fetch`, `send` and `listen`, printed as over TCP.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tube_testkit::deadline;
use tube_testkit::proc::Proc;

const TUBE: &str = env!("CARGO_BIN_EXE_tube");
const LIMIT: Duration = Duration::from_secs(120);

/// Runs `tube msg ARGS --data-dir DIR`; returns (success, stdout, stderr).
async fn msg(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(TUBE)
        .arg("msg")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run tube msg");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn after<'a>(line: &'a str, prefix: &str) -> &'a str {
    line.strip_prefix(prefix)
        .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
}

#[tokio::test]
async fn a_tcp_client_and_an_http_client_talk_through_the_proxy() {
    deadline(LIMIT, async {
        let mut peer = Proc::spawn(
            TUBE,
            &["peer", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"],
            &[],
            Stdio::null(),
        );
        let p = after(&peer.line().await, "listening peer ").to_owned();
        let backend = format!("http://{}", after(&peer.line().await, "listening http "));
        let mut proxy = Proc::spawn(
            TUBE,
            &["longpoll", "--listen", "127.0.0.1:0", "--backend", &backend],
            &[],
            Stdio::null(),
        );
        let via = format!("http://{}", after(&proxy.line().await, "listening http "));

        // a is on TCP, b behind the proxy; both have the same peer in their address.
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for d in [&a, &b] {
            let (ok, _, err) = msg(d.path(), &["init"]).await;
            assert!(ok, "{err}");
        }
        let (_, addr_a, _) = msg(a.path(), &["id", "--peer", &p]).await;
        let (_, addr_b, _) = msg(b.path(), &["id", "--peer", &p]).await;
        let (addr_a, addr_b) = (addr_a.trim().to_owned(), addr_b.trim().to_owned());
        assert!(addr_b.ends_with(&format!("@{p}")), "{addr_b}");

        // Both register once (their peer learns their certificates): a over TCP, b over
        // HTTP; then a writes over TCP.
        assert!(msg(a.path(), &["fetch", "--peer", &p]).await.0);
        let (ok, out, err) = msg(b.path(), &["fetch", "--peer", &p, "--via", &via]).await;
        assert!(ok, "{err}");
        assert_eq!(out, "");
        for text in ["hello b", "over http"] {
            let (ok, _, err) = msg(a.path(), &["send", "--to", &addr_b, text]).await;
            assert!(ok, "send over TCP: {err}");
        }
        let (ok, out, err) = msg(b.path(), &["fetch", "--peer", &p, "--via", &via]).await;
        assert!(ok, "{err}");
        assert_eq!(out, format!("{addr_a} hello b\n{addr_a} over http\n"));
        // Fetched and acknowledged: nothing the second time.
        let (ok, out, err) = msg(b.path(), &["fetch", "--peer", &p, "--via", &via]).await;
        assert!(ok, "{err}");
        assert_eq!(out, "");

        // b answers through the proxy (its own peer is remembered), a reads over TCP.
        let (ok, _, err) = msg(b.path(), &["send", "--via", &via, "--to", &addr_a, "hi a"]).await;
        assert!(ok, "send over HTTP: {err}");
        let (ok, out, _) = msg(a.path(), &["fetch", "--peer", &p, "--json"]).await;
        assert!(ok);
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json line");
        assert_eq!(
            (v["from"].as_str(), v["text"].as_str()),
            (Some(addr_b.as_str()), Some("hi a"))
        );

        // listen over HTTP prints pushes as they come.
        let b_dir = b.path().to_str().unwrap().to_owned();
        let mut listen = Proc::spawn(
            TUBE,
            &[
                "msg",
                "listen",
                "--peer",
                &p,
                "--via",
                &via,
                "--keepalive",
                "2s",
                "--data-dir",
                &b_dir,
            ],
            &[],
            Stdio::null(),
        );
        listen
            .stderr_line("registered, listening")
            .await
            .expect("listen registered");
        for text in ["pushed one", "pushed two"] {
            let (ok, _, err) = msg(a.path(), &["send", "--to", &addr_b, text]).await;
            assert!(ok, "{err}");
            assert_eq!(listen.line().await, format!("{addr_a} {text}"));
        }
        // Both sides now know both nonces, and see the same code.
        assert!(
            msg(b.path(), &["send", "--via", &via, "--to", &addr_a, "ok"])
                .await
                .0
        );
        let (_, out, _) = msg(a.path(), &["fetch", "--peer", &p]).await;
        assert_eq!(out, format!("{addr_b} ok\n"));
        let (ok, code_a, err) = msg(a.path(), &["code", "--with", &addr_b]).await;
        assert!(ok, "{err}");
        let (_, code_b, _) = msg(b.path(), &["code", "--with", &addr_a]).await;
        assert_eq!(code_a, code_b);

        assert_eq!(listen.stop().await, Vec::<String>::new());
        proxy.stop().await;
        peer.stop().await;
        assert!(
            !peer.stderr_now().contains("panicked"),
            "{}",
            peer.stderr_now()
        );
    })
    .await;
}

#[test]
fn help_documents_the_http_flags() {
    let peer = std::process::Command::new(TUBE)
        .args(["peer", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&peer.stdout);
    assert!(
        text.contains("--http <HTTP>") && text.contains("--http-hold"),
        "{text}"
    );
    let msg = std::process::Command::new(TUBE)
        .args(["msg", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&msg.stdout);
    assert!(
        text.contains("--via <URL>") && text.contains("--via-timeout"),
        "{text}"
    );
}
