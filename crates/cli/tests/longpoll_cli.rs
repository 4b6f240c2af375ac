//! `tube longpoll` as a binary: `--help` documents every setting, a missing backend is one
//! clear error line, the config file and flags both take effect (flags win), traffic flows to a
//! real HTTP backend, `/metrics` answers, and SIGTERM ends it promptly even with a request
//! held open; the HTTP limits (connections, header timeout) from the file and flags.

use std::process::Stdio;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use tube_testkit::proc::Proc;

const TUBE: &str = env!("CARGO_BIN_EXE_tube");

/// A backend that logs every client in as the user named in the body and echoes packets.
async fn backend() -> std::net::SocketAddr {
    async fn handle(headers: HeaderMap, body: bytes::Bytes) -> axum::response::Response {
        let kind = headers
            .get("type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let from = headers
            .get("from")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mut r = axum::response::Response::new(axum::body::Body::empty());
        match kind {
            "Auth" | "Register" => {
                let user = String::from_utf8_lossy(&body).to_string();
                r.headers_mut().insert("client-id", user.parse().unwrap());
                *r.body_mut() = axum::body::Body::from(format!("token-{user}"));
            }
            "Packet" if !body.is_empty() => {
                r.headers_mut().insert("to", from.parse().unwrap());
                *r.body_mut() = axum::body::Body::from([&b"echo:"[..], &body].concat());
            }
            _ => {}
        }
        r
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(l, axum::Router::new().fallback(handle))
            .await
            .unwrap();
    });
    addr
}

#[test]
fn help_documents_every_setting() {
    let out = std::process::Command::new(TUBE)
        .args(["longpoll", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--backend",
        "--admin",
        "--config",
        "--poll-timeout",
        "--token-ttl",
        "--idle-timeout",
        "--backend-timeout",
        "--backoff-min",
        "--backoff-max",
        "--max-body",
        "--max-client-packets",
        "--max-client-bytes",
        "--max-total-bytes",
        "--max-clients",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
}

#[test]
fn without_a_backend_it_says_so_and_fails() {
    let out = std::process::Command::new(TUBE)
        .args(["longpoll", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error: at least one --backend"), "{err}");
    let out = std::process::Command::new(TUBE)
        .args([
            "longpoll",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "ftp://x/",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only http://"));
}

/// `text` as a config file in a new temporary directory (kept while the first value lives),
/// and the file's path.
fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("longpoll.toml");
    std::fs::write(&file, text).unwrap();
    let path = file.to_str().unwrap().to_string();
    (dir, path)
}

#[tokio::test]
async fn config_file_and_flags_take_effect_and_sigterm_ends_it() {
    let backend = backend().await;
    let (_dir, config) = config_file(&format!(
        "listen = \"127.0.0.1:0\"\nbackends = [\"http://{backend}/\"]\nmax_body = 12\npoll_timeout = \"60s\"\n"
    ));
    let config = config.as_str();
    let mut p = Proc::spawn(
        TUBE,
        &[
            "longpoll",
            "--config",
            config,
            "--admin",
            "127.0.0.1:0",
            "--poll-timeout",
            "200ms",
        ],
        &[],
        Stdio::null(),
    );
    let http = p.line().await;
    let admin = p.line().await;
    let http = http
        .strip_prefix("listening http ")
        .expect("listening http line")
        .to_string();
    let admin = admin
        .strip_prefix("listening admin ")
        .expect("listening admin line")
        .to_string();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let token = client
        .post(format!("http://{http}/auth"))
        .body("alice")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(token, "token-alice", "{}", p.stderr_now());
    let send = |body: &'static str| {
        client
            .post(format!("http://{http}/"))
            .bearer_auth(&token)
            .body(body)
            .send()
    };
    let r = send("hi").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "echo:hi");
    // max_body = 12 from the file.
    assert_eq!(send("0123456789ABC").await.unwrap().status(), 413);
    // --poll-timeout 200ms overrides the file's 60s.
    let started = Instant::now();
    let r = send("").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(30));
    let metrics = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("tube_longpoll_clients 1"), "{metrics}");
    // A request held open does not keep SIGTERM waiting.
    let held = tokio::spawn({
        let url = format!("http://{http}/");
        let token = token.clone();
        let client = client.clone();
        async move { client.post(url).bearer_auth(token).send().await }
    });
    let stopped = Instant::now();
    p.stop().await;
    assert!(stopped.elapsed() < Duration::from_secs(10));
    let _ = held.await;
}

/// Waits (at most 20 s) for the proxy to close `s`; the time it took.
async fn closed_after(s: &mut tokio::net::TcpStream) -> Duration {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => started.elapsed(),
        other => panic!("expected the proxy to close the connection, got {other:?}"),
    }
}

#[tokio::test]
async fn http_limits_come_from_the_file_and_flags() {
    let backend = backend().await;
    // The file: one connection at most, and a 60 s header timeout the flag overrides.
    let (_dir, config) = config_file(&format!(
        "backends = [\"http://{backend}/\"]\nmax_connections = 1\nheader_timeout = \"60s\"\n"
    ));
    let mut p = Proc::spawn(
        TUBE,
        &[
            "longpoll",
            "--config",
            &config,
            "--listen",
            "127.0.0.1:0",
            "--header-timeout",
            "300ms",
        ],
        &[],
        Stdio::null(),
    );
    let http = p.line().await;
    let http = http
        .strip_prefix("listening http ")
        .expect("listening http line")
        .to_string();
    let mut first = tokio::net::TcpStream::connect(&http).await.unwrap();
    // The first connection holds the only place: a second one is closed at once ...
    let mut second = tokio::net::TcpStream::connect(&http).await.unwrap();
    closed_after(&mut second).await;
    // ... and the first, which sends no header, is closed after 300 ms (the flag), not 60 s.
    let waited = closed_after(&mut first).await;
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    p.stop().await;
}
