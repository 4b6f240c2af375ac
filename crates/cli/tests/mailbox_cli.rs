//! Mailbox on the real `tube` binary: two `tube peer`s (one plain, one TLS), `tube msg init`,
//! `id`, `send`, `fetch` and `code` between two clients, with the command-line contract lines;
//! and proof that the peer process writes nothing to disk while it serves traffic
//! (`/proc/PID/io` `write_bytes` stays 0 and it holds no regular file open); `tube msg
//! listen` printing pushes and coming back after its peer restarts; the peer's `/metrics`; a
//! peer run from a config file, with flags over the file.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tube_testkit::deadline;

const TUBE: &str = env!("CARGO_BIN_EXE_tube");
const LIMIT: Duration = Duration::from_secs(120);

/// Starts `tube peer` and returns it with its stdout lines until the listener line (and the
/// fingerprint line with `--tls`).
async fn peer(extra: &[&str]) -> (Child, Vec<String>) {
    peer_on("127.0.0.1:0", extra).await
}

/// Spawns `tube args...` (killed when dropped) and hands over its stdout, line by line.
fn spawn(args: &[&str]) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(TUBE)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tube");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, lines)
}

async fn peer_on(listen: &str, extra: &[&str]) -> (Child, Vec<String>) {
    let mut args = vec!["peer", "--listen", listen];
    args.extend_from_slice(extra);
    let (child, mut lines) = spawn(&args);
    let want = 1 + usize::from(extra.contains(&"--tls")) + usize::from(extra.contains(&"--admin"));
    let mut got = Vec::new();
    while got.len() < want {
        got.push(lines.next_line().await.expect("read").expect("a line"));
    }
    (child, got)
}

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

/// A new client (`tube msg init` in a fresh dir) on the peer at `addr`: its dir and address.
async fn client(addr: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    assert!(msg(dir.path(), &["init"]).await.0);
    let (ok, address, err) = msg(dir.path(), &["id", "--peer", addr]).await;
    assert!(ok, "{err}");
    (dir, address.trim().to_owned())
}

/// Starts `tube msg listen --peer addr --data-dir dir` plus `extra`, logging at info, with
/// stdout and stderr piped.
fn listen(addr: &str, dir: &std::path::Path, extra: &[&str]) -> Child {
    Command::new(TUBE)
        .args(["msg", "listen", "--peer", addr])
        .args(extra)
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn listen")
}

/// Runs `tube msg ARGS --data-dir DIR` with `input` on stdin; returns (success, stderr).
async fn msg_stdin(dir: &std::path::Path, args: &[&str], input: &[u8]) -> (bool, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new(TUBE)
        .arg("msg")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tube msg");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).await.expect("write stdin");
    drop(stdin);
    let out = child.wait_with_output().await.expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn io_field(pid: u32, name: &str) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
        .expect("field in /proc/PID/io")
}

/// Regular files the process holds open (sockets, pipes and /dev entries are not).
fn open_regular_files(pid: u32) -> Vec<String> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(e.path()) {
            let t = target.to_string_lossy().into_owned();
            if t.starts_with('/') && !t.starts_with("/dev/") {
                files.push(t);
            }
        }
    }
    files
}

#[tokio::test]
async fn two_clients_exchange_messages_and_the_peer_writes_nothing_to_disk() {
    deadline(LIMIT, async {
        let tls_dir = tempfile::tempdir().unwrap();
        let (plain, plain_lines) = peer(&[]).await;
        let tls_path = tls_dir.path().to_str().unwrap().to_owned();
        let (tls, tls_lines) = peer(&["--tls", "--data-dir", &tls_path]).await;
        let p1 = plain_lines[0]
            .strip_prefix("listening peer ")
            .expect("contract line")
            .to_owned();
        let p2_addr = tls_lines[0]
            .strip_prefix("listening peer ")
            .expect("contract line");
        let fp = tls_lines[1]
            .strip_prefix("fingerprint sha256:")
            .expect("fingerprint line");
        assert_eq!(fp.len(), 64);
        let p2 = format!("{p2_addr}/{fp}");
        let pid = tls.id().expect("pid");
        let written_before = io_field(pid, "write_bytes");

        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for d in [&a, &b] {
            let (ok, out, err) = msg(d.path(), &["init"]).await;
            assert!(ok, "{err}");
            assert!(out.starts_with("fingerprint "), "{out}");
        }
        let (ok, addr_a, _) = msg(a.path(), &["id", "--peer", &p1]).await;
        assert!(ok);
        let (ok, addr_b, _) = msg(b.path(), &["id", "--peer", &p2]).await;
        assert!(ok);
        let (addr_a, addr_b) = (addr_a.trim().to_owned(), addr_b.trim().to_owned());
        assert_eq!(addr_a.lines().count(), 1);
        assert!(addr_b.ends_with(&format!("@{p2}")), "{addr_b}");

        // The TLS peer dialled without its fingerprint: a hint, not a packet-type error.
        let (ok, _, err) = msg(b.path(), &["fetch", "--peer", p2_addr]).await;
        assert!(
            !ok && err.contains("the peer speaks TLS: put its fingerprint in the address"),
            "{err}"
        );
        // b registers once (its peer learns its certificate), then a writes while b is offline.
        assert!(msg(b.path(), &["fetch", "--peer", &p2]).await.0);
        for text in ["hello bob", "second line"] {
            let (ok, _, err) = msg(a.path(), &["send", "--to", &addr_b, text]).await;
            assert!(ok, "send failed: {err}");
        }
        // The text may come on stdin; control characters never reach the terminal.
        let (ok, err) =
            msg_stdin(a.path(), &["send", "--to", &addr_b], b"from stdin\x1b[2J\n").await;
        assert!(ok, "send from stdin failed: {err}");
        let (ok, out, _) = msg(b.path(), &["fetch", "--peer", &p2]).await;
        assert!(ok);
        assert_eq!(
            out,
            format!("{addr_a} hello bob\n{addr_a} second line\n{addr_a} from stdin [2J\n"),
            "one line per message, `<sender address> <text>`"
        );
        // b answers, a reads it and writes once more: both sides now have the same code.
        assert!(msg(a.path(), &["fetch", "--peer", &p1]).await.0);
        assert!(
            msg(b.path(), &["send", "--to", &addr_a, "hi alice"])
                .await
                .0
        );
        let (_, out, _) = msg(a.path(), &["fetch", "--peer", &p1, "--json"]).await;
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json line");
        assert_eq!(v["text"], "hi alice");
        assert_eq!(v["from"], addr_b.as_str());
        assert!(msg(a.path(), &["send", "--to", &addr_b, "code?"]).await.0);
        assert!(msg(b.path(), &["fetch", "--peer", &p2]).await.0);
        let (ok, code_a, err) = msg(a.path(), &["code", "--with", &addr_b]).await;
        assert!(ok, "{err}");
        let (ok, code_b, _) = msg(b.path(), &["code", "--with", &addr_a]).await;
        assert!(ok);
        assert_eq!(code_a, code_b);
        assert_eq!(code_a.trim().len(), 6);
        let (ok, contacts, _) = msg(a.path(), &["contacts"]).await;
        assert!(ok);
        assert_eq!(
            contacts,
            format!("{addr_b} {}", code_a),
            "one line per contact with its code"
        );

        // A failure is one line with the code.
        let unknown = format!("{}@{p1}", "ab".repeat(32));
        let (ok, _, err) = msg(a.path(), &["send", "--to", &unknown, "x"]).await;
        assert!(!ok);
        assert!(
            err.trim()
                .lines()
                .last()
                .unwrap_or("")
                .starts_with("error 7003 UNKNOWN_RECIPIENT"),
            "{err}"
        );

        // The TLS peer served all that without writing to disk or holding a file open.
        assert_eq!(
            io_field(pid, "write_bytes"),
            written_before,
            "bytes written to storage"
        );
        assert_eq!(open_regular_files(pid), Vec::<String>::new());
        drop((plain, tls));
    })
    .await;
}

/// `GET path` over HTTP/1.0; returns the body.
async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("admin");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn listen_prints_pushes_and_comes_back_after_its_peer_restarts() {
    deadline(LIMIT, async {
        let (mut p, lines) = peer(&["--admin", "127.0.0.1:0"]).await;
        let addr = lines[0].strip_prefix("listening peer ").unwrap().to_owned();
        let admin = lines[1]
            .strip_prefix("listening admin ")
            .expect("admin line")
            .to_owned();
        let (a, addr_a) = client(&addr).await;
        let (b, addr_b) = client(&addr).await;

        let mut listen = listen(&addr, b.path(), &["--keepalive", "1s"]);
        let mut out = BufReader::new(listen.stdout.take().unwrap()).lines();
        let mut err = BufReader::new(listen.stderr.take().unwrap()).lines();
        let registered =
            async |err: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>| {
                while let Some(l) = err.next_line().await.unwrap() {
                    if l.contains("registered, listening") {
                        return;
                    }
                }
                panic!("listen exited");
            };
        registered(&mut err).await;
        assert!(msg(a.path(), &["send", "--to", &addr_b, "one"]).await.0);
        assert_eq!(
            out.next_line().await.unwrap().unwrap(),
            format!("{addr_a} one")
        );
        let metrics = http_get(&admin, "/metrics").await;
        assert!(
            metrics.contains("tube_peer_messages_stored_total 1"),
            "{metrics}"
        );
        // (listen acknowledges after printing, so the queue gauge may still be 1 here.)
        assert!(metrics.contains("tube_peer_clients 1"), "{metrics}");

        // The peer restarts on the same address: listen registers again by itself. The old
        // one is reaped first (a drop only sends SIGKILL: its port could still be bound).
        p.kill().await.expect("kill the peer");
        let (_p2, _) = peer_on(&addr, &[]).await;
        registered(&mut err).await;
        assert!(msg(a.path(), &["send", "--to", &addr_b, "two"]).await.0);
        assert_eq!(
            out.next_line().await.unwrap().unwrap(),
            format!("{addr_a} two")
        );
    })
    .await;
}

#[tokio::test]
async fn listen_whose_stdout_is_gone_exits_and_leaves_the_message_for_the_next_fetch() {
    deadline(LIMIT, async {
        let (_p, lines) = peer(&[]).await;
        let addr = lines[0].strip_prefix("listening peer ").unwrap().to_owned();
        let (a, addr_a) = client(&addr).await;
        let (b, addr_b) = client(&addr).await;
        // b registers once (its peer learns its certificate), then a writes.
        assert!(msg(b.path(), &["fetch", "--peer", &addr]).await.0);
        let (ok, _, err) = msg(a.path(), &["send", "--to", &addr_b, "kept"]).await;
        assert!(ok, "send failed: {err}");

        // Nobody reads listen's stdout: printing the queued message fails (EPIPE).
        let mut listen = listen(&addr, b.path(), &[]);
        drop(listen.stdout.take());
        let out = listen.wait_with_output().await.expect("listen exits");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "listen went on without stdout: {err}"
        );
        assert!(err.contains("writing to stdout"), "no clear error: {err}");
        assert!(!err.contains("panicked"), "{err}");

        // Not acknowledged and not marked seen: the next fetch shows it.
        let (ok, fetched, err) = msg(b.path(), &["fetch", "--peer", &addr]).await;
        assert!(ok, "{err}");
        assert_eq!(fetched, format!("{addr_a} kept\n"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn a_peer_takes_its_settings_from_a_config_file_and_flags_win() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let file = dir.path().join("peer.toml");
        // TLS and an admin listener from the file; its http_hold is out of range (60 s or
        // more is refused at start), so the peer starts only if the flag's value wins.
        std::fs::write(
            &file,
            format!(
                "listen = \"127.0.0.1:0\"\ntls = true\nadmin = \"127.0.0.1:0\"\n\
                 data_dir = \"{}\"\nhttp_hold = \"90s\"\n",
                data.display()
            ),
        )
        .unwrap();
        let file = file.to_str().unwrap();
        let refused = Command::new(TUBE)
            .args(["peer", "--config", file])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run tube peer");
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{err}");
        assert!(err.contains("--http-hold must be between"), "{err}");

        let (_child, mut lines) = spawn(&["peer", "--config", file, "--http-hold", "5s"]);
        let mut next = async || lines.next_line().await.expect("read").expect("a line");
        let peer = next().await;
        assert!(peer.starts_with("listening peer 127.0.0.1:"), "{peer}");
        let admin = next().await;
        let admin = admin
            .strip_prefix("listening admin ")
            .expect(&admin)
            .to_owned();
        let fingerprint = next().await;
        assert!(
            fingerprint.starts_with("fingerprint sha256:"),
            "{fingerprint}"
        );
        assert!(
            data.read_dir().expect("the file's data_dir").count() > 0,
            "the certificate is kept in the file's data_dir"
        );
        assert!(http_get(&admin, "/healthz").await.contains("ok"));
    })
    .await;
}

#[tokio::test]
async fn peer_max_connections_closes_connections_over_the_limit() {
    deadline(LIMIT, async {
        let mut peer = tube_testkit::proc::Proc::spawn(
            TUBE,
            &["peer", "--listen", "127.0.0.1:0", "--max-connections", "1"],
            &[],
            Stdio::null(),
        );
        let addr = peer.line().await;
        let addr = addr
            .strip_prefix("listening peer ")
            .expect(&addr)
            .to_owned();
        let _first = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut second = tokio::net::TcpStream::connect(&addr).await.unwrap();
        assert!(
            tube_testkit::ended(&mut second, LIMIT).await.is_some(),
            "the second connection is closed"
        );
        peer.stderr_line("connection limit reached")
            .await
            .expect("the peer says why");
    })
    .await;
}
