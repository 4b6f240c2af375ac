//! The command-line contract of `../shared/ARCHITECTURE.md`, checked on the real binary:
//! `tube relay` stdout lines and first-start files, `tube token`, `tube expose` tunnel lines,
//! and one-line errors with codes and non-zero exits.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::TcpStream;
use tube_testkit::proc::field;
use tube_testkit::*;

const TUBE: &str = env!("CARGO_BIN_EXE_tube");

/// A child process killed on drop, with its stdout read line by line.
struct Proc {
    child: Child,
    out: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(TUBE)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tube");
        let out = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self { child, out }
    }

    fn line(&mut self) -> String {
        self.out.next().expect("a stdout line").expect("utf-8 line")
    }

    /// Reads stderr until the process exits (after a kill or on its own).
    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    fn stop(&mut self) {
        // SIGTERM, the way an operator stops it.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(dir: &str, subject: &str) -> String {
    let out = Command::new(TUBE)
        .args([
            "token",
            "--subject",
            subject,
            "--ttl",
            "1h",
            "--data-dir",
            dir,
        ])
        .output()
        .expect("run tube token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(t.split('.').count(), 3, "a JWT: {t}");
    t
}

#[test]
fn relay_first_start_prints_contract_lines_and_creates_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("relay");
    let ds = d.to_str().unwrap();
    let mut relay = Proc::spawn(&["relay", "--listen", "127.0.0.1:0", "--data-dir", ds]);
    let addr = field(&relay.line(), "listening control ");
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    let fp = field(&relay.line(), "fingerprint ");
    assert!(fp.starts_with("sha256:") && fp.len() == 71, "{fp}");
    for f in ["relay-cert.pem", "relay-key.pem", "relay-jwt.key"] {
        assert!(d.join(f).exists(), "{f} created on first start");
    }
    relay.stop();
    let err = relay.stderr();
    assert!(
        err.contains("tube expose 127.0.0.1:3000 --relay"),
        "ready-to-paste command: {err}"
    );
    assert!(err.contains(&format!("--fingerprint {fp}")), "{err}");
    // A restart keeps the same identity.
    let mut again = Proc::spawn(&["relay", "--listen", "127.0.0.1:0", "--data-dir", ds]);
    let _ = again.line();
    assert_eq!(field(&again.line(), "fingerprint "), fp);
}

#[tokio::test]
async fn expose_prints_tunnel_lines_and_carries_traffic() {
    deadline(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().to_str().unwrap().to_string();
        let mut relay = Proc::spawn(&["relay", "--listen", "127.0.0.1:0", "--data-dir", &ds]);
        let addr = field(&relay.line(), "listening control ");
        let fp = field(&relay.line(), "fingerprint ");
        let t = token(&ds, "alice");
        let svc1 = echo_server().await;
        let svc2 = echo_server().await;
        let (l1, l2) = (svc1.addr.to_string(), svc2.addr.to_string());
        let mut agent = Proc::spawn(&[
            "expose",
            &l1,
            &l2,
            "--relay",
            &addr,
            "--token",
            &t,
            "--fingerprint",
            &fp,
        ]);
        let mut tunnels = Vec::new();
        for _ in 0..2 {
            let line = agent.line();
            let parts: Vec<&str> = line.split(' ').collect();
            assert_eq!(parts.len(), 3, "tunnel <public> <local>: {line}");
            assert_eq!(parts[0], "tunnel");
            tunnels.push((parts[1].to_string(), parts[2].to_string()));
        }
        assert_eq!(tunnels[0].1, l1);
        assert_eq!(tunnels[1].1, l2);
        for (public, _) in &tunnels {
            let mut u = TcpStream::connect(public.as_str()).await.unwrap();
            assert_eq!(
                roundtrip(&mut u, b"through the binary").await,
                b"through the binary"
            );
        }
        // The agent exits cleanly on SIGTERM; the relay then closes its ports.
        agent.stop();
        relay.stop();
    })
    .await;
}

#[test]
fn failures_print_one_error_line_with_the_code_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().to_str().unwrap();
    let mut relay = Proc::spawn(&["relay", "--listen", "127.0.0.1:0", "--data-dir", ds]);
    let addr = field(&relay.line(), "listening control ");
    let fp = field(&relay.line(), "fingerprint ");
    let run = |args: &[&str]| {
        let out = Command::new(TUBE).args(args).output().expect("run tube");
        // Logs go to stderr too; the failure is the last line.
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.trim().lines().last().unwrap_or_default().to_string();
        (out.status.code(), last, out.stdout)
    };
    let (code, err, out) = run(&[
        "expose",
        "127.0.0.1:1",
        "--relay",
        &addr,
        "--token",
        "bad",
        "--fingerprint",
        &fp,
    ]);
    assert_eq!(code, Some(1));
    assert_eq!(err, "error 1002 INVALID_TOKEN: invalid token");
    assert!(out.is_empty(), "nothing on stdout for a failed agent");

    let zeros = format!("sha256:{}", "0".repeat(64));
    let t = token(ds, "bob");
    let (code, err, _) = run(&[
        "expose",
        "127.0.0.1:1",
        "--relay",
        &addr,
        "--token",
        &t,
        "--fingerprint",
        &zeros,
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with("error: relay certificate fingerprint does not match"),
        "{err}"
    );

    let (code, err, _) = run(&[
        "expose",
        "127.0.0.1:1",
        "--relay",
        &addr,
        "--token",
        &t,
        "--fingerprint",
        "nope",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with("error: --fingerprint must be sha256:"),
        "{err}"
    );

    let empty = tempfile::tempdir().unwrap();
    let (code, err, _) = run(&[
        "token",
        "--subject",
        "x",
        "--data-dir",
        empty.path().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: no relay secret at "), "{err}");
    relay.stop();
}

/// Runs `tube args` with stdout a pipe whose reader is already gone (every write fails with
/// EPIPE, as when the consumer of a script's pipe has exited) and returns its exit code and
/// stderr.
fn run_with_stdout_gone(args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(TUBE)
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run tube");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn commands_whose_stdout_is_gone_fail_with_one_error_line_instead_of_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().to_str().unwrap();
    // A relay secret to mint from: the relay's first start writes it.
    let mut relay = Proc::spawn(&["relay", "--listen", "127.0.0.1:0", "--data-dir", ds]);
    relay.line();
    relay.stop();
    // One-shot answers (`tube token`), and a server's contract lines at startup.
    for args in [
        vec!["token", "--subject", "x", "--data-dir", ds],
        vec!["relay", "--listen", "127.0.0.1:0", "--data-dir", ds],
    ] {
        let (code, err) = run_with_stdout_gone(&args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: writing to stdout: "),
            "{args:?}: {last}"
        );
    }
}
