//! A child process of the binary under test, for tests that drive `tube` itself: stdout read
//! line by line, stderr collected continuously in the background (so a chatty trace log never
//! fills the pipe and stalls the child), and waits on events — a stdout line, a stderr line
//! containing some text, the exit — each bounded by [`LINE_LIMIT`]. The process is killed when
//! the handle drops. Also what `tube relay`, `tube hub` and `tube node` print once ready
//! ([`RelayLines`], [`Hub`], [`Node`]).

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long one expected stdout or stderr line, or an exit, may take.
pub const LINE_LIMIT: Duration = Duration::from_secs(30);

/// A running child process (see the module docs).
pub struct Proc {
    /// The child (take its stdin when it was spawned with a piped one).
    pub child: Child,
    /// Its stdout, line by line (`get_mut()` for raw bytes).
    pub out: tokio::io::Lines<BufReader<ChildStdout>>,
    err: Arc<Mutex<String>>,
    /// Ticks at every stderr line; closed once the child's stderr ends (it exited).
    err_seen: watch::Receiver<usize>,
    err_task: Option<JoinHandle<()>>,
}

impl Proc {
    /// Starts `bin args...` with `RUST_LOG=info` (unless `env` sets it), `env`, and `stdin`.
    pub fn spawn(bin: &str, args: &[&str], env: &[(&str, &str)], stdin: Stdio) -> Self {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the binary under test");
        let out = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let stderr = child.stderr.take().expect("stderr");
        let err = Arc::new(Mutex::new(String::new()));
        let (tick, err_seen) = watch::channel(0usize);
        let sink = err.clone();
        let err_task = tokio::spawn(async move {
            let mut r = BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        sink.lock()
                            .expect("stderr lock")
                            .push_str(&String::from_utf8_lossy(&line));
                        tick.send_modify(|n| *n += 1);
                    }
                }
            }
            // Dropping `tick` closes the channel: waiters learn that stderr ended.
        });
        Self {
            child,
            out,
            err,
            err_seen,
            err_task: Some(err_task),
        }
    }

    /// The next stdout line, or `None` once the process closed its stdout (it exited).
    pub async fn next_line(&mut self) -> Option<String> {
        match tokio::time::timeout(LINE_LIMIT, self.out.next_line()).await {
            Ok(r) => r.expect("read stdout"),
            Err(_) => panic!(
                "no stdout line within {LINE_LIMIT:?}; stderr so far:\n{}",
                self.stderr_now()
            ),
        }
    }

    /// The next stdout line; the test fails if the process ends first.
    pub async fn line(&mut self) -> String {
        match self.next_line().await {
            Some(l) => l,
            None => panic!("stdout ended; stderr:\n{}", self.wait_stderr().await),
        }
    }

    /// What the process wrote on stderr so far.
    pub fn stderr_now(&self) -> String {
        self.err.lock().expect("stderr lock").clone()
    }

    /// Waits for a stderr line containing `needle`: `Ok(line)`, or `Err(all of stderr)` if
    /// the process closed its stderr (exited) without writing one.
    pub async fn stderr_line(&mut self, needle: &str) -> Result<String, String> {
        let wait = async {
            loop {
                // Mark everything up to now as seen before looking, so no line is missed.
                self.err_seen.borrow_and_update();
                let found = self
                    .stderr_now()
                    .lines()
                    .find(|l| l.contains(needle))
                    .map(str::to_owned);
                if let Some(l) = found {
                    return Ok(l);
                }
                if self.err_seen.changed().await.is_err() {
                    // Stderr ended; read what arrived with the last tick.
                    let all = self.stderr_now();
                    return match all.lines().find(|l| l.contains(needle)) {
                        Some(l) => Ok(l.to_owned()),
                        None => Err(all),
                    };
                }
            }
        };
        match tokio::time::timeout(LINE_LIMIT, wait).await {
            Ok(r) => r,
            Err(_) => panic!(
                "no stderr line with {needle:?} within {LINE_LIMIT:?}; stderr so far:\n{}",
                self.stderr_now()
            ),
        }
    }

    /// Waits for the process to exit; its status and all of its stderr.
    pub async fn wait_exit(&mut self) -> (ExitStatus, String) {
        let status = match tokio::time::timeout(LINE_LIMIT, self.child.wait()).await {
            Ok(s) => s.expect("wait for the child"),
            Err(_) => panic!(
                "the child did not exit within {LINE_LIMIT:?}; stderr so far:\n{}",
                self.stderr_now()
            ),
        };
        if let Some(t) = self.err_task.take() {
            let _ = t.await;
        }
        (status, self.stderr_now())
    }

    /// Waits for the process to exit and returns all of its stderr.
    pub async fn wait_stderr(&mut self) -> String {
        self.wait_exit().await.1
    }

    /// SIGTERM, the way an operator stops it; waits for the exit and returns every stdout
    /// line it had not read yet (its stderr is then in [`Proc::stderr_now`]).
    pub async fn stop(&mut self) -> Vec<String> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").arg(pid.to_string()).status().await;
        }
        let mut rest = Vec::new();
        while let Some(l) = self.next_line().await {
            rest.push(l);
        }
        self.wait_exit().await;
        rest
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill the child");
    }
}

/// The text after `prefix` on a contract line; the test fails, naming both, on any other line.
pub fn field(line: &str, prefix: &str) -> String {
    line.strip_prefix(prefix)
        .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
        .to_string()
}

/// What `tube relay` prints on stdout once it is ready: `listening control ADDR`, then
/// `listening admin ADDR` when it serves one, then `fingerprint sha256:HEX`.
#[derive(Debug, Clone)]
pub struct RelayLines {
    /// The control (and public-port) listener's address.
    pub control: String,
    /// The admin listener's address, with `--admin`.
    pub admin: Option<String>,
    /// The certificate fingerprint agents pin, `sha256:HEX`.
    pub fingerprint: String,
}

impl RelayLines {
    /// Reads the lines from the relay's stdout; `None` if stdout ends before the first one
    /// (the relay did not start). Any other line fails the test.
    pub async fn read(proc: &mut Proc) -> Option<Self> {
        let control = field(&proc.next_line().await?, "listening control ");
        let mut next = proc.line().await;
        let admin = next.strip_prefix("listening admin ").map(str::to_string);
        if admin.is_some() {
            next = proc.line().await;
        }
        let fingerprint = field(&next, "fingerprint ");
        Some(Self {
            control,
            admin,
            fingerprint,
        })
    }
}

/// A running `tube hub` and what it printed on stdout once ready: `listening control ADDR`,
/// then `fingerprint sha256:HEX`.
pub struct Hub {
    /// The hub's process.
    pub proc: Proc,
    /// Both stdout lines as printed, for tests that check the contract's format.
    pub lines: [String; 2],
    /// The control listener's address, where nodes log in.
    pub control: String,
    /// The certificate fingerprint nodes pin, `sha256:HEX`.
    pub fingerprint: String,
}

impl Hub {
    /// Starts `bin hub --listen 127.0.0.1:0 --data-dir dir extra...` with `env` and reads its
    /// two lines; any other line fails the test.
    pub async fn start(bin: &str, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let d = dir.to_str().expect("utf-8 dir");
        let mut args = vec!["hub", "--listen", "127.0.0.1:0", "--data-dir", d];
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(bin, &args, env, Stdio::null());
        let lines = [proc.line().await, proc.line().await];
        let control = field(&lines[0], "listening control ");
        let fingerprint = field(&lines[1], "fingerprint ");
        Self {
            proc,
            lines,
            control,
            fingerprint,
        }
    }

    /// Starts `bin node` on this hub as `name`, bound to `bind`, with its front API on
    /// 127.0.0.1:0, its data in `dir` (a fresh temporary one, kept by the node, if `None`) and
    /// `env`; reads its `listening api ADDR` line. It may not have logged in yet:
    /// [`Node::logged_in`] waits for that.
    pub async fn node(
        &self,
        bin: &str,
        name: &str,
        bind: &str,
        dir: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Node {
        let temp = match dir {
            Some(_) => None,
            None => Some(tempfile::tempdir().expect("node data dir")),
        };
        let d = dir
            .or(temp.as_ref().map(|t| t.path()))
            .and_then(Path::to_str)
            .expect("utf-8 dir");
        let args = [
            "node",
            "--hub",
            &self.control,
            "--hub-fingerprint",
            &self.fingerprint,
            "--name",
            name,
            "--bind",
            bind,
            "--api",
            "127.0.0.1:0",
            "--data-dir",
            d,
        ];
        let mut proc = Proc::spawn(bin, &args, env, Stdio::null());
        let line = proc.line().await;
        let api = field(&line, "listening api ");
        Node {
            proc,
            line,
            api,
            dir: PathBuf::from(d),
            _temp: temp,
        }
    }
}

/// A running `tube node` (see [`Hub::node`]).
pub struct Node {
    /// The node's process.
    pub proc: Proc,
    /// Its stdout line as printed.
    pub line: String,
    /// Its front API's address.
    pub api: String,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Node {
    /// Its data dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits until the node has logged in to its hub (its log line on stderr); fails the test,
    /// with the node's stderr, if it ends first.
    pub async fn logged_in(&mut self) {
        if let Err(err) = self.proc.stderr_line("logged in to the hub").await {
            panic!("the node ended before logging in; stderr:\n{err}");
        }
    }
}
