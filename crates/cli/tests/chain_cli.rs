//! Chains on the real `tube` binary: a `tube hub`, four `tube node`s on distinct loopback
//! addresses, `tube chain accept` on the endpoint and `tube chain connect` on the requester
//! piping bytes byte-exact through two intermediates to an echo server; the stdout contract
//! lines of hub and nodes; the one-line refusals of `connect` (unknown node, no front); a
//! node refusing a front API that is not on loopback; `tube chain listen` resetting its
//! user (never a clean end of stream) when the chain's middle node dies; a hub at
//! `--max-accounts` making room for a new node once an account's node is away; hub and nodes
//! run from config files, with flags over the file; and `tube hub accounts list` / `remove`.
//!
//! Every test runs under a deadline and synchronises on events (stdout contract lines, log
//! lines on stderr, process exits). Processes are killed when their handle drops.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tube_testkit::proc::{Hub, LINE_LIMIT, Node, Proc, field};
use tube_testkit::*;

const TUBE: &str = env!("CARGO_BIN_EXE_tube");

/// Deadline of every test body (generous: a 2-core machine may be compiling meanwhile).
const LIMIT: Duration = Duration::from_secs(120);

/// Bytes piped through the chain.
const PAYLOAD: usize = 4 << 20;

/// Starts `tube args...` with `RUST_LOG=level` and `stdin`.
fn tube(args: &[&str], stdin: Stdio, level: &str) -> Proc {
    Proc::spawn(TUBE, args, &[("RUST_LOG", level)], stdin)
}

/// Checks `line` is one of the hub's and node's stdout contract lines: `listening control
/// <addr>`, `listening api <addr>` (a real port) or `fingerprint sha256:<64 hex>`.
fn assert_contract_line(line: &str) {
    if let Some(addr) = line
        .strip_prefix("listening control ")
        .or_else(|| line.strip_prefix("listening api "))
    {
        let a: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("not an address ({e}) in {line:?}"));
        assert_ne!(a.port(), 0, "the real port, not 0: {line:?}");
    } else if let Some(hex) = line.strip_prefix("fingerprint sha256:") {
        assert!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "64 hex digits: {line:?}"
        );
    } else {
        panic!("not a contract line on stdout: {line:?}");
    }
}

/// A canonical tunnel id: lowercase hyphenated UUID (8-4-4-4-12).
fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| {
            g.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// The last non-empty line of `text`.
fn last_line(text: &str) -> &str {
    text.trim_end().lines().last().unwrap_or_default()
}

/// Starts a `tube hub` in `dir` logging at `level`, and checks its stdout lines.
async fn hub(dir: &Path, level: &str) -> Hub {
    let hub = Hub::start(TUBE, dir, &[], &[("RUST_LOG", level)]).await;
    for line in &hub.lines {
        assert_contract_line(line);
    }
    assert!(hub.control.starts_with("127.0.0.1:"), "{}", hub.control);
    hub
}

/// Starts `tube node --name name --bind bind` on `hub` (its own data dir) logging at `level`,
/// and checks its `listening api` line.
async fn node(hub: &Hub, name: &str, bind: &str, level: &str) -> Node {
    let node = hub
        .node(TUBE, name, bind, None, &[("RUST_LOG", level)])
        .await;
    assert_contract_line(&node.line);
    assert!(node.api.starts_with("127.0.0.1:"), "{name}: {}", node.api);
    node
}

/// Starts the hub's nodes `names[i]` bound to `binds[i]` and waits until all are logged in.
async fn nodes(hub: &Hub, names: &[&str], binds: &[&str]) -> Vec<Node> {
    let mut ns = Vec::new();
    for (name, bind) in names.iter().zip(binds) {
        ns.push(node(hub, name, bind, "info").await);
    }
    for n in &mut ns {
        n.logged_in().await;
    }
    ns
}

/// Runs `tube chain --api api args...` with stdin from /dev/null to its end.
async fn chain(api: &str, args: &[&str]) -> std::process::Output {
    let run = Command::new(TUBE)
        .args(["chain", "--api", api])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(LINE_LIMIT, run).await {
        Ok(out) => out.expect("run tube chain"),
        Err(_) => panic!("tube chain {args:?} did not finish within {LINE_LIMIT:?}"),
    }
}

/// `tube chain --api api list`: its stdout lines.
async fn list(api: &str) -> Vec<String> {
    let out = chain(api, &["list"]).await;
    assert!(
        out.status.success(),
        "tube chain list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8 list")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Stops `proc` with SIGTERM and checks every stdout line it printed after the ones already
/// read is a contract line too.
async fn stop_checking_contract(proc: &mut Proc) {
    for line in proc.stop().await {
        assert_contract_line(&line);
    }
}

#[tokio::test]
async fn chain_cli_connect_echoes_bytes_through_two_intermediates() {
    deadline(LIMIT, async {
        let hub_dir = tempfile::tempdir().expect("hub data dir");
        let mut hub = hub(hub_dir.path(), "info").await;
        let mut ns = nodes(
            &hub,
            &["n2", "n3", "n4", "n5"],
            &["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"],
        )
        .await;
        let apis: Vec<String> = ns.iter().map(|n| n.api.clone()).collect();

        let svc = echo_server().await;
        // The chain is open (and held open by the still-open stdin) once `connect` logs
        // `chain established`.
        let forward = svc.addr.to_string();
        let mut accept = accept_to(&apis[3], &svc).await;
        let mut conn = tube(
            &["chain", "--api", &apis[0], "connect", "n5"],
            Stdio::piped(),
            "info",
        );
        if let Err(err) = conn.stderr_line("chain established").await {
            panic!("connect failed:\n{err}");
        }

        let line = accept.line().await;
        let parts: Vec<&str> = line.split(' ').collect();
        assert!(
            parts.len() == 3 && parts[0] == "chain" && is_uuid(parts[1]) && parts[2] == forward,
            "expected `chain <uuid> {forward}`, got {line:?}"
        );
        let id = parts[1].to_string();

        // The chain goes through both other nodes: each node lists it with its role.
        for (api, role) in
            apis.iter()
                .zip(["requester", "intermediate", "intermediate", "endpoint"])
        {
            let lines = list(api).await;
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with(&format!("{id} {role} "))),
                "the node at {api} lists {id} as {role}: {lines:?}"
            );
        }

        let mut stdin = conn.child.stdin.take().expect("connect's stdin");
        let write = async move {
            let h = write_pattern(&mut stdin, PAYLOAD, 0x7b0e_c4a1).await;
            // Closing stdin ends the upstream direction; the echo server then ends its side.
            drop(stdin);
            h
        };
        let read = read_hash(conn.out.get_mut());
        let (sent, (n, got)) = tokio::join!(write, read);
        assert_eq!(n, PAYLOAD, "every byte came back");
        assert_eq!(got, sent, "the echoed bytes are byte-exact (sha256)");
        let (status, err) = conn.wait_exit().await;
        assert!(
            status.success(),
            "connect exits 0 at the chain's end: {status}\n{err}"
        );

        // Nothing but contract lines on the servers' stdout, up to their exit.
        drop(accept);
        for n in &mut ns {
            stop_checking_contract(&mut n.proc).await;
        }
        stop_checking_contract(&mut hub.proc).await;
    })
    .await;
}

#[tokio::test]
async fn chain_cli_refusals_print_one_error_line() {
    deadline(LIMIT, async {
        let hub_dir = tempfile::tempdir().expect("hub data dir");
        let mut hub = hub(hub_dir.path(), "info").await;
        let mut ns = nodes(&hub, &["n2", "n3"], &["127.0.0.2", "127.0.0.3"]).await;
        let api = ns[0].api.clone();

        for (endpoint, want) in [
            ("nobody", "error 6003 UNKNOWN_NODE"),
            // Online, but nothing runs `tube chain accept` there.
            ("n3", "error 6005 DENIED"),
        ] {
            let out = chain(&api, &["connect", endpoint]).await;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "connect {endpoint} fails: {}\n{err}",
                out.status
            );
            assert!(out.stdout.is_empty(), "nothing on stdout: {:?}", out.stdout);
            let last = last_line(&err);
            assert!(
                last.starts_with(want),
                "connect {endpoint}: {want}...: {err}"
            );
            let errors = err.lines().filter(|l| l.starts_with("error")).count();
            assert_eq!(errors, 1, "one error line: {err}");
        }

        for n in &mut ns {
            stop_checking_contract(&mut n.proc).await;
        }
        stop_checking_contract(&mut hub.proc).await;
    })
    .await;
}

#[tokio::test]
async fn chain_cli_accept_asks_and_follows_the_answers() {
    deadline(LIMIT, async {
        let hub_dir = tempfile::tempdir().expect("hub data dir");
        let mut hub = hub(hub_dir.path(), "info").await;
        let mut ns = nodes(&hub, &["n2", "n3"], &["127.0.0.2", "127.0.0.3"]).await;
        let svc = echo_server().await;
        let forward = svc.addr.to_string();
        // Not in any --allow list: each request is asked on stdin, one answer per line.
        let mut accept = tube(
            &[
                "chain",
                "--api",
                &ns[1].api,
                "accept",
                "--forward",
                &forward,
                "--ask",
            ],
            Stdio::piped(),
            "info",
        );
        {
            use tokio::io::AsyncWriteExt;
            let mut stdin = accept.child.stdin.take().expect("accept's stdin");
            stdin.write_all(b"y\nn\n").await.expect("answers");
        }
        accept
            .stderr_line("accepting chains")
            .await
            .expect("accept subscribed");

        // Yes: the chain carries bytes (no relay is online: the hub says the chain is direct).
        let mut conn = tube(
            &["chain", "--api", &ns[0].api, "connect", "n3"],
            Stdio::piped(),
            "info",
        );
        conn.stderr_line("chain established")
            .await
            .expect("first: yes");
        let warned = conn
            .stderr_line("intermediate(s) available")
            .await
            .expect("said so");
        assert!(warned.contains("only 0"), "{warned}");
        {
            use tokio::io::AsyncWriteExt;
            let mut stdin = conn.child.stdin.take().expect("connect's stdin");
            stdin.write_all(b"ping\n").await.expect("write");
        }
        assert_eq!(conn.line().await, "ping");
        accept
            .stderr_line("allow a chain from n2?")
            .await
            .expect("asked");
        drop(conn);

        // No: refused with the front's words.
        let out = chain(&ns[0].api, &["connect", "n3"]).await;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(last_line(&err).starts_with("error 6005 DENIED"), "{err}");
        assert!(last_line(&err).contains("n2 is not allowed"), "{err}");

        drop(accept);
        for n in &mut ns {
            stop_checking_contract(&mut n.proc).await;
        }
        stop_checking_contract(&mut hub.proc).await;
    })
    .await;
}

#[tokio::test]
async fn node_refuses_a_non_loopback_api() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().expect("node data dir");
        let zeros = format!("sha256:{}", "0".repeat(64));
        let run = Command::new(TUBE)
            .args(["node", "--hub", "127.0.0.1:1", "--hub-fingerprint", &zeros])
            .args(["--name", "n2", "--api", "0.0.0.0:0", "--data-dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = run.await.expect("run tube node");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "exits non-zero: {}", out.status);
        assert!(out.stdout.is_empty(), "no contract line: {:?}", out.stdout);
        let last = last_line(&err);
        assert!(
            last.starts_with("error") && last.contains("loopback"),
            "one error line about loopback: {err}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_registration_token_that_is_not_64_hex_digits_is_refused_at_start() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().expect("hub data dir");
        let run = Command::new(TUBE)
            .args(["hub", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .env("TUBE_REGISTRATION_TOKEN", "letmein")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = run.await.expect("run tube hub");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "exits non-zero: {}", out.status);
        assert!(out.stdout.is_empty(), "no contract line: {:?}", out.stdout);
        let last = last_line(&err);
        assert!(
            last.starts_with("error") && last.contains("--registration-token must be 64 hex"),
            "one error line about the token: {err}"
        );
        assert!(!err.contains("letmein"), "the token is not echoed: {err}");
    })
    .await;
}

#[tokio::test]
async fn a_hub_at_max_accounts_registers_a_new_node_once_an_account_is_unseen_long_enough() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().expect("hub data dir");
        let extra = ["--max-accounts", "1", "--evict-unseen-after", "0s"];
        let mut hub = Hub::start(TUBE, dir.path(), &extra, &[("RUST_LOG", "info")]).await;
        let mut a = node(&hub, "a", "127.0.0.2", "info").await;
        a.logged_in().await;
        // The one account is in use: b is told to retry later, and does.
        let mut b = node(&hub, "b", "127.0.0.3", "info").await;
        let refused = b.proc.stderr_line("reconnecting").await.expect("b retries");
        assert!(
            refused.contains("6008") && refused.contains("no room"),
            "{refused}"
        );
        hub.proc
            .stderr_line("none may give way")
            .await
            .expect("the hub says it is full");
        // a leaves; its account gives way to b at b's next try.
        a.proc.kill().await;
        b.logged_in().await;
        let removed = hub
            .proc
            .stderr_line("removed to make room")
            .await
            .expect("the hub logs the removal");
        assert!(removed.contains("account=a"), "{removed}");
    })
    .await;
}

#[tokio::test]
async fn hub_max_nodes_limits_the_nodes_logged_in_at_once() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().expect("hub data dir");
        let hub = Hub::start(
            TUBE,
            dir.path(),
            &["--max-nodes", "1"],
            &[("RUST_LOG", "info")],
        )
        .await;
        let mut a = node(&hub, "a", "127.0.0.2", "info").await;
        a.logged_in().await;
        let mut b = node(&hub, "b", "127.0.0.3", "info").await;
        let refused = b.proc.stderr_line("reconnecting").await.expect("b retries");
        assert!(
            refused.contains("6008") && refused.contains("too many nodes online"),
            "{refused}"
        );
        a.proc.kill().await;
        b.logged_in().await;
    })
    .await;
}

#[tokio::test]
async fn hub_max_handshakes_closes_logins_over_the_limit_before_tls() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().expect("hub data dir");
        let extra = ["--max-handshakes", "1"];
        let mut hub = Hub::start(TUBE, dir.path(), &extra, &[("RUST_LOG", "info")]).await;
        // One connection that never starts TLS holds the only place in the login phase ...
        let _first = tokio::net::TcpStream::connect(&hub.control).await.unwrap();
        let mut second = tokio::net::TcpStream::connect(&hub.control).await.unwrap();
        assert!(
            ended(&mut second, LIMIT).await.is_some(),
            "the second is closed"
        );
        hub.proc
            .stderr_line("too many logins in progress")
            .await
            .expect("the hub says why");
    })
    .await;
}

#[tokio::test]
async fn hub_and_node_take_their_settings_from_config_files_and_flags_win() {
    deadline(LIMIT, async {
        let dir = tempfile::tempdir().expect("data dirs");
        let path = |name: &str| dir.path().join(name).to_str().expect("utf-8").to_string();
        // The hub's file: its address, data dir and one account at most; the flag allows two.
        let hub_toml = path("hub.toml");
        std::fs::write(
            &hub_toml,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmax_accounts = 1\nevict_unseen_after = \"1h\"\n",
                path("hub")
            ),
        )
        .expect("write hub.toml");
        let mut hub = tube(
            &["hub", "--config", &hub_toml, "--max-accounts", "2"],
            Stdio::null(),
            "info",
        );
        let control = field(&hub.line().await, "listening control ");
        assert!(control.starts_with("127.0.0.1:"), "{control}");
        let fingerprint = field(&hub.line().await, "fingerprint ");
        assert!(
            dir.path().join("hub").read_dir().expect("the file's data dir").count() > 0,
            "the hub keeps its data in the file's data_dir"
        );
        // Two nodes with everything in their files: both register (the flag's limit, not the
        // file's) and log in.
        let mut nodes = Vec::new();
        for (name, octet) in [("a", 2), ("b", 3)] {
            let node_toml = path(&format!("{name}.toml"));
            std::fs::write(
                &node_toml,
                format!(
                    "hub = \"{control}\"\nhub_fingerprint = \"{fingerprint}\"\nname = \"{name}\"\n\
                     bind = \"127.0.0.{octet}\"\napi = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
                    path(name)
                ),
            )
            .expect("write node.toml");
            let mut node = tube(&["node", "--config", &node_toml], Stdio::null(), "info");
            let api = field(&node.line().await, "listening api ");
            assert!(api.starts_with("127.0.0.1:"), "{api}");
            if let Err(err) = node.stderr_line("logged in to the hub").await {
                panic!("node {name} ended before logging in:\n{err}");
            }
            nodes.push(node);
        }
        assert!(
            dir.path().join("a").read_dir().expect("a's data dir").count() > 0,
            "node a keeps its password in the file's data_dir"
        );
        hub.stop().await;
    })
    .await;
}

/// Runs `tube hub accounts args... --data-dir dir` to its end: success, stdout, stderr.
async fn hub_accounts(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(TUBE)
        .args(["hub", "accounts"])
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run tube hub accounts");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn hub_accounts_lists_and_removes_accounts_while_the_hub_runs() {
    deadline(LIMIT, async {
        let hub_dir = tempfile::tempdir().expect("hub data dir");
        let hub = hub(hub_dir.path(), "info").await;
        let node_dir = tempfile::tempdir().expect("node data dir");
        let mut a = hub
            .node(TUBE, "a", "127.0.0.2", Some(node_dir.path()), &[])
            .await;
        a.logged_in().await;
        let mut ns = nodes(&hub, &["b"], &["127.0.0.3"]).await;

        let (ok, out, err) = hub_accounts(hub_dir.path(), &["list"]).await;
        assert!(ok, "{err}");
        let names: Vec<&str> = out
            .lines()
            .map(|l| l.split(' ').next().unwrap_or_default())
            .collect();
        assert_eq!(names, ["a", "b"], "{out}");
        for line in out.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields.len(), 3, "{line}");
            for (field, key) in fields[1..].iter().zip(["last_seen=", "created="]) {
                let time = field
                    .strip_prefix(key)
                    .unwrap_or_else(|| panic!("{key} in {line}"));
                humantime::parse_rfc3339(time).unwrap_or_else(|e| panic!("{time}: {e}"));
            }
        }

        let (ok, out, err) = hub_accounts(hub_dir.path(), &["remove", "a"]).await;
        assert!(ok, "{err}");
        assert_eq!(out, "removed a\n");
        let (ok, out, err) = hub_accounts(hub_dir.path(), &["remove", "a"]).await;
        assert!(!ok && out.is_empty(), "{out}");
        assert_eq!(last_line(&err), "error: no account a", "{err}");
        let (_, out, _) = hub_accounts(hub_dir.path(), &["list"]).await;
        assert!(out.starts_with("b ") && out.lines().count() == 1, "{out}");

        // a's node, started again with its password, is refused for good.
        a.proc.kill().await;
        let mut again = hub
            .node(TUBE, "a", "127.0.0.2", Some(node_dir.path()), &[])
            .await;
        let err = again.proc.wait_stderr().await;
        let last = last_line(&err);
        assert!(last.starts_with("error 6001"), "{err}");
        assert!(
            last.contains("to register the name again"),
            "the way out: {err}"
        );
        // Deleting the password file, as the line says, registers the name again.
        let hint = last.rsplit("delete ").next().unwrap_or_default();
        let file = hint
            .strip_suffix(" to register the name again)")
            .expect(last);
        std::fs::remove_file(file).expect("the named password file");
        let mut anew = hub
            .node(TUBE, "a", "127.0.0.2", Some(node_dir.path()), &[])
            .await;
        anew.logged_in().await;

        let elsewhere = tempfile::tempdir().expect("empty dir");
        let (ok, _, err) = hub_accounts(elsewhere.path(), &["list"]).await;
        assert!(!ok, "{err}");
        assert!(
            last_line(&err).starts_with("error: no node accounts at"),
            "{err}"
        );
        anew.proc.kill().await;
        for n in &mut ns {
            n.proc.kill().await;
        }
    })
    .await;
}

#[tokio::test]
async fn chain_listen_refuses_a_non_loopback_local_address() {
    deadline(LIMIT, async {
        // Checked before anything else: the API address is never dialled.
        let run = Command::new(TUBE)
            .args(["chain", "--api", "127.0.0.1:1", "listen", "n4"])
            .args(["--local", "0.0.0.0:0"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = run.await.expect("run tube chain listen");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "exits non-zero: {}", out.status);
        assert!(out.stdout.is_empty(), "no listening line: {:?}", out.stdout);
        let last = last_line(&err);
        assert!(
            last.starts_with("error") && last.contains("loopback"),
            "one error line about loopback: {err}"
        );
    })
    .await;
}

/// `tube chain accept` on the node of `api`, forwarding to `svc` the chains n2 asks for, once
/// it logs that its subscription is active.
async fn accept_to(api: &str, svc: &TestServer) -> Proc {
    let forward = svc.addr.to_string();
    let mut accept = tube(
        &[
            "chain",
            "--api",
            api,
            "accept",
            "--forward",
            &forward,
            "--allow",
            "n2",
        ],
        Stdio::null(),
        "info",
    );
    accept
        .stderr_line("accepting chains")
        .await
        .expect("accept subscribed");
    accept
}

/// The `tube chain list` lines of the node at `api` for chains it requested that are up.
async fn established(api: &str) -> Vec<String> {
    list(api)
        .await
        .into_iter()
        .filter(|l| l.contains(" requester established "))
        .collect()
}

/// [`accept_to`] on `ns[2]` (named n4) and `tube chain listen n4` on `ns[0]` (n2): the two
/// processes and listen's local address.
async fn listen_to_echo(ns: &[Node], svc: &TestServer) -> (Proc, Proc, String) {
    let accept = accept_to(&ns[2].api, svc).await;
    let mut listen = tube(
        &[
            "chain",
            "--api",
            &ns[0].api,
            "listen",
            "n4",
            "--local",
            "127.0.0.1:0",
        ],
        Stdio::null(),
        "info",
    );
    let local = field(&listen.line().await, "listening local ");
    (accept, listen, local)
}

#[tokio::test]
async fn chain_cli_listen_gives_each_connection_a_chain_and_close_ends_one() {
    deadline(LIMIT, async {
        // Trace logging everywhere: afterwards no log may hold a node's password.
        let hub_dir = tempfile::tempdir().expect("hub data dir");
        let mut hub = hub(hub_dir.path(), "trace").await;
        let mut ns = Vec::new();
        for (name, bind) in [
            ("n2", "127.0.0.2"),
            ("n3", "127.0.0.3"),
            ("n4", "127.0.0.4"),
        ] {
            ns.push(node(&hub, name, bind, "trace").await);
        }
        for n in &mut ns {
            n.logged_in().await;
        }
        let svc = echo_server().await;
        let (mut accept, listen, local) = listen_to_echo(&ns, &svc).await;
        // Two users of the local port: two chains, each carrying its own bytes.
        let mut users = Vec::new();
        for i in 0..2u8 {
            let mut u = tokio::net::TcpStream::connect(&local)
                .await
                .expect("local port");
            assert_eq!(roundtrip(&mut u, &[i; 1000]).await, vec![i; 1000]);
            users.push(u);
            accept.line().await; // `chain <id> <forward>` for each
        }
        let chains = established(&ns[0].api).await;
        assert_eq!(chains.len(), 2, "{chains:?}");

        // `close` ends exactly one of them: the other still echoes.
        let id = chains[0].split(' ').next().expect("id").to_string();
        let out = chain(&ns[0].api, &["close", &id]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let left = list(&ns[0].api).await;
        assert!(left.iter().all(|l| !l.starts_with(&id)), "{left:?}");
        let mut closed = 0;
        for u in &mut users {
            // The open chain echoes; the closed one ends (EOF or reset) instead.
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut back = [0u8; 10];
            let echoed = match u.write_all(b"still here").await {
                Ok(()) => u.read_exact(&mut back).await.is_ok(),
                Err(_) => false,
            };
            if echoed {
                assert_eq!(&back, b"still here");
            } else {
                closed += 1;
            }
        }
        assert_eq!(
            closed, 1,
            "exactly the closed chain's user saw its connection end"
        );

        // Closing an unknown chain is one error line with its code.
        let out = chain(&ns[0].api, &["close", &id]).await;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            last_line(&err).starts_with("error 6012 UNKNOWN_TUNNEL"),
            "{err}"
        );

        // No log line, at trace level, holds any node's current password.
        drop((listen, accept, users));
        let mut logs = Vec::new();
        let mut passwords = Vec::new();
        for (n, name) in ns.iter_mut().zip(["n2", "n3", "n4"]) {
            let path = n.dir().join(format!("node-{name}.password"));
            passwords.push(
                std::fs::read_to_string(path)
                    .expect("password file")
                    .trim()
                    .to_owned(),
            );
            n.proc.stop().await;
            logs.push(n.proc.stderr_now());
        }
        hub.proc.stop().await;
        logs.push(hub.proc.stderr_now());
        assert!(
            logs.iter()
                .all(|l| l.contains("TRACE") || l.contains("DEBUG")),
            "trace logs on"
        );
        for p in &passwords {
            assert_eq!(p.len(), 64);
            assert!(
                logs.iter().all(|l| !l.contains(p.as_str())),
                "a password reached a log"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_chain_whose_middle_node_dies_resets_the_user_of_chain_listen_within_2_s() {
    use tokio::io::AsyncReadExt;
    deadline(LIMIT, async {
        let hub_dir = tempfile::tempdir().expect("hub data dir");
        let hub = hub(hub_dir.path(), "info").await;
        // Three nodes: n3 is the only one that can relay, so every chain is n2 -> n3 -> n4.
        let mut ns = nodes(
            &hub,
            &["n2", "n3", "n4"],
            &["127.0.0.2", "127.0.0.3", "127.0.0.4"],
        )
        .await;
        let svc = echo_server().await;
        let (mut accept, listen, local) = listen_to_echo(&ns, &svc).await;
        let mut user = tokio::net::TcpStream::connect(&local)
            .await
            .expect("local port");
        assert_eq!(roundtrip(&mut user, &[7; 1000]).await, vec![7; 1000]);
        accept.line().await; // `chain <id> <forward>`: the chain is up end to end
        let hops = established(&ns[0].api).await;
        assert_eq!(hops.len(), 1, "{hops:?}");

        ns[1].proc.kill().await;
        let killed = std::time::Instant::now();
        // The break reaches the user as a reset: a clean end of stream would look like the
        // service had finished.
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(10), user.read(&mut buf))
            .await
            .expect("the user's connection ends within 10 s");
        let after = killed.elapsed();
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "the user must see a reset, not an orderly end"
        );
        assert!(after < Duration::from_secs(2), "reset after {after:?}");
        drop((listen, accept));
    })
    .await;
}
