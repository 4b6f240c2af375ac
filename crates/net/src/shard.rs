//! Thread per core: a set of single-threaded tokio runtimes ("shards"), each on a thread of its
//! own, that a server hands accepted connections to. A connection's task, and every task it
//! spawns (a tunnel's mux reader and writer, its user connections' proxies), stay on the shard
//! it was given: no work stealing, no wake-up that crosses threads, and one core's caches hold
//! the connection's state.
//!
//! Why not tokio's multi-threaded runtime for the relay: its per-wake-up bookkeeping
//! (work-stealing queues, a poll-time average, parking through a shared driver) is a large
//! part of what a small message costs in user space (docs/performance.md, "One runtime per
//! core").
//!
//! A process installs its shards once ([`Shards::start`]); [`spawn_conn`] then places each
//! connection on the shard with the fewest live tasks, and runs it on the caller's runtime when
//! no shards are installed (tests, library use).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;

/// The shards of the process, while they run. Dropping it stops them: their threads end and
/// the tasks left on them are dropped (servers wait for their trackers before that).
pub struct Shards {
    pool: Arc<Pool>,
    threads: Vec<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
    installed: bool,
}

struct Pool {
    shards: Vec<Shard>,
}

struct Shard {
    handle: Handle,
    /// Tasks placed here and not yet finished: the load [`Pool::pick`] balances.
    live: AtomicUsize,
}

/// The process's shards, once [`Shards::start`] has installed them.
static INSTALLED: Mutex<Option<Arc<Pool>>> = Mutex::new(None);

fn installed() -> Option<Arc<Pool>> {
    INSTALLED.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Shards {
    /// Starts `n` shards (at least one) and installs them as the process's: [`spawn_conn`]
    /// uses them from now on. Fails if the threads cannot be started, or if another set is
    /// installed.
    pub fn start(n: usize) -> io::Result<Shards> {
        let mut shards = Shards::new(n)?;
        let mut slot = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Err(io::Error::other("shards are already installed"));
        }
        *slot = Some(shards.pool.clone());
        shards.installed = true;
        Ok(shards)
    }

    /// Starts `n` shards (at least one) without installing them: work reaches them only
    /// through [`Shards::spawn_conn`].
    pub fn new(n: usize) -> io::Result<Shards> {
        let mut shards = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            shards.push(Shard {
                handle: rt.handle().clone(),
                live: AtomicUsize::new(0),
            });
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("tube-shard-{i}"))
                .spawn(move || {
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            threads.push((stop, thread));
        }
        Ok(Shards {
            pool: Arc::new(Pool { shards }),
            threads,
            installed: false,
        })
    }

    /// [`spawn_conn`] on these shards.
    pub fn spawn_conn<F, Fut>(&self, tracker: &TaskTracker, tcp: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.pool.spawn_conn(tracker, tcp, serve);
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        if self.installed {
            let mut slot = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
            if slot.as_ref().is_some_and(|p| Arc::ptr_eq(p, &self.pool)) {
                *slot = None;
            }
        }
        for (stop, thread) in self.threads.drain(..) {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

/// Counts a task as live on its shard until dropped (the task finished or was dropped).
struct Live<'a>(&'a AtomicUsize);

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// The shard with the fewest live tasks (the first of equals), counted as one more.
    fn pick(&self) -> usize {
        let i = self
            .shards
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.live.load(Ordering::Relaxed))
            .map_or(0, |(i, _)| i);
        self.shards[i].live.fetch_add(1, Ordering::Relaxed);
        i
    }

    fn spawn_conn<F, Fut>(self: &Arc<Self>, tracker: &TaskTracker, tcp: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // A socket is registered with the runtime that made it: it leaves this one here and
        // joins the shard's inside the task, so its readiness wakes the shard's thread.
        let std = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to a shard");
                return;
            }
        };
        let i = self.pick();
        let pool = self.clone();
        self.shards[i]
            .handle
            .spawn(tracker.track_future(async move {
                let _live = Live(&pool.shards[i].live);
                match TcpStream::from_std(std) {
                    Ok(tcp) => serve(tcp).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot register a connection on its shard")
                    }
                }
            }));
    }
}

/// Serves an accepted connection on the installed shard with the fewest live tasks: `tcp`
/// moves there and `serve(tcp)` runs there, tracked by `tracker`; on the caller's runtime when
/// no shards are installed.
pub fn spawn_conn<F, Fut>(tracker: &TaskTracker, tcp: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    match installed() {
        Some(pool) => pool.spawn_conn(tracker, tcp, serve),
        None => {
            tracker.spawn(serve(tcp));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Accepts `n` connections and serves each with `place`: it echoes one 5-byte message
    /// followed by the name of the thread that served it.
    async fn serve_n(
        listener: &tokio::net::TcpListener,
        n: usize,
        place: impl Fn(&TaskTracker, TcpStream, fn(TcpStream) -> Served),
    ) -> TaskTracker {
        let tracker = TaskTracker::new();
        for _ in 0..n {
            let (tcp, _) = listener.accept().await.unwrap();
            place(&tracker, tcp, |tcp| Box::pin(echo_with_thread(tcp)));
        }
        tracker.close();
        tracker
    }

    type Served = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

    async fn echo_with_thread(mut tcp: TcpStream) {
        let mut buf = [0u8; 5];
        tcp.read_exact(&mut buf).await.unwrap();
        let name = std::thread::current().name().unwrap_or("").to_string();
        tcp.write_all(&buf).await.unwrap();
        tcp.write_all(name.as_bytes()).await.unwrap();
    }

    /// Connects `n` clients, has `place` serve them, then sends each a message and returns
    /// the names of the threads that answered, sorted.
    async fn threads_serving(
        n: usize,
        place: impl Fn(&TaskTracker, TcpStream, fn(TcpStream) -> Served),
    ) -> Vec<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Every client connects before the first is served: all their tasks are live when
        // each is placed.
        let mut socks = Vec::new();
        for _ in 0..n {
            socks.push(TcpStream::connect(addr).await.unwrap());
        }
        let tracker = serve_n(&listener, n, place).await;
        let mut names = Vec::new();
        for s in &mut socks {
            s.write_all(b"hello").await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            assert_eq!(&got[..5], b"hello", "the echo crosses the shard intact");
            names.push(String::from_utf8(got[5..].to_vec()).unwrap());
        }
        tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .expect("every connection's task ends within 10 s");
        names.sort();
        names
    }

    #[tokio::test]
    async fn connections_are_served_on_the_shards_and_spread_over_them() {
        let shards = Shards::new(2).unwrap();
        let names = threads_serving(4, |tracker, tcp, serve| {
            shards.spawn_conn(tracker, tcp, serve);
        })
        .await;
        assert_eq!(
            names,
            [
                "tube-shard-0",
                "tube-shard-0",
                "tube-shard-1",
                "tube-shard-1"
            ],
            "served on the shards' threads, two each (the least loaded is picked)"
        );
        for s in &shards.pool.shards {
            assert_eq!(
                s.live.load(Ordering::Relaxed),
                0,
                "finished tasks are not live"
            );
        }
    }

    #[tokio::test]
    async fn without_installed_shards_connections_are_served_on_the_callers_runtime() {
        // Nothing in this test binary installs shards.
        let here = std::thread::current().name().unwrap_or("").to_string();
        let names = threads_serving(2, |tracker, tcp, serve| {
            spawn_conn(tracker, tcp, serve);
        })
        .await;
        assert_eq!(names, [here.clone(), here], "this test's own thread");
    }
}
