//! Connections served on a few single-threaded runtimes, one thread each, instead of on one
//! work-stealing runtime: a connection and every task it spawns (the mux's reader and writer,
//! the users' proxies of its tunnels) live on one thread and one reactor. The runtimes have no
//! time driver: their timers are kept by the clock thread of [`crate::timer`].
//!
//! tokio's multi-threaded scheduler pays on every wake-up for being able to move a task to
//! another thread (shared run queues, the poll-time average its queue interval is tuned by,
//! parking through a driver the workers share). A relay's unit of work is an agent's
//! connection whose tasks wake one another and take one lock: moving them apart buys nothing,
//! so the relay shards by connection, as nginx's and Envoy's workers do. Each connection
//! goes to the shard with the fewest live tasks at that moment (a busy tunnel's user
//! connections count). What one shard cannot do is lend a second core to one very busy
//! connection; the agent at its other end serves it on one thread too. The measurements are in
//! docs/performance.md.

use std::future::Future;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Threads each shard's blocking pool may hold. Blocking work on a shard is short and rare
/// (the relay's lease writes, which take one database connection's lock in turn): more
/// threads would only wait on that lock. tokio's default (512 per runtime) starts a thread
/// whenever a call comes before the last one's thread has gone idle, so a burst of agents
/// would leave dozens idle for the pool's keep-alive (ten seconds).
pub const BLOCKING_THREADS: usize = 2;

/// A set of single-threaded runtimes, each on its own thread, that connections are handed to.
/// [`Shards::stop`] ends them; dropping the set without it lets the threads end on their own.
#[derive(Debug)]
pub struct Shards {
    shards: Vec<Handle>,
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Shards {
    /// Starts `count` runtimes (at least one) on threads named `name-0`, `name-1`, ..., each
    /// running when this returns.
    pub fn start(count: usize, name: &str) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut shards = Vec::new();
        let mut threads = Vec::new();
        for i in 0..count.max(1) {
            // No time driver: the shard's timers live on the clock thread (`crate::timer`).
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .max_blocking_threads(BLOCKING_THREADS)
                .thread_name(format!("{name}-{i}-blocking"))
                .build()?;
            let handle = runtime.handle().clone();
            let stopped = stop.clone();
            let (running, started) = std::sync::mpsc::sync_channel(1);
            let thread = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    // Marked before any task runs here; a clock that cannot start fails
                    // `start` rather than every timer later.
                    let borrowed = crate::timer::borrow_clock();
                    let failed = borrowed.is_err();
                    let _ = running.send(borrowed);
                    if failed {
                        return;
                    }
                    // A current-thread runtime runs its tasks only inside `block_on`: this
                    // thread drives them until the set stops, then drops whatever is left.
                    runtime.block_on(stopped.cancelled());
                    drop(runtime);
                });
            let thread = match thread {
                Ok(t) => t,
                Err(e) => {
                    stop.cancel();
                    return Err(e);
                }
            };
            // Running (and named) before `start` returns. A closed channel means the thread is
            // gone, which only a failed start could do; its tasks would then never run.
            let ready = started.recv().unwrap_or_else(|_| {
                Err(std::io::Error::other("a shard's thread ended at its start"))
            });
            if let Err(e) = ready {
                stop.cancel();
                return Err(e);
            }
            threads.push(thread);
            shards.push(handle);
        }
        Ok(Self {
            shards,
            stop,
            threads,
        })
    }

    /// Live tasks on each shard now, in shard order.
    pub fn loads(&self) -> Vec<usize> {
        self.shards
            .iter()
            .map(|s| s.metrics().num_alive_tasks())
            .collect()
    }

    /// Runs `serve(tcp)` on the shard with the fewest live tasks (the first of equals),
    /// tracked by `tracker`. The socket leaves this runtime's reactor for that shard's, so its
    /// wake-ups happen on the shard's thread. A socket that cannot be moved (its registration
    /// failing, which takes a broken epoll instance) is closed, with a log line.
    pub fn spawn<F, Fut>(&self, tracker: &TaskTracker, tcp: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let shard = self
            .shards
            .iter()
            .min_by_key(|s| s.metrics().num_alive_tasks())
            .expect("a set has at least one shard (start makes max(count, 1))");
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to a shard; closed");
                return;
            }
        };
        tracker.spawn_on(
            async move {
                match TcpStream::from_std(tcp) {
                    Ok(tcp) => serve(tcp).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot register a connection on its shard; closed");
                    }
                }
            },
            shard,
        );
    }

    /// Stops every shard (tasks still running there are dropped, which closes their sockets)
    /// and waits for the threads to end, off the async threads.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                // A shard's thread only panics if a task's drop does; nothing to add then.
                let _ = t.join();
            }
        });
        let _ = joined.await;
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Connects to `listener` and returns both ends.
    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn connections_go_to_the_least_loaded_shard_and_run_on_its_thread() {
        let shards = Shards::start(2, "test-shard").unwrap();
        assert_eq!(shards.loads(), [0, 0]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tracker = TaskTracker::new();
        let mut clients = Vec::new();
        let (threads_tx, mut threads_rx) = tokio::sync::mpsc::channel(8);
        for _ in 0..4 {
            let (client, accepted) = pair(&listener).await;
            let threads_tx = threads_tx.clone();
            // Each connection echoes what it reads, after reporting its thread.
            shards.spawn(&tracker, accepted, move |mut tcp| async move {
                let name = std::thread::current().name().map(str::to_owned);
                threads_tx.send(name).await.unwrap();
                let mut buf = [0u8; 64];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => tcp.write_all(&buf[..n]).await.unwrap(),
                    }
                }
            });
            clients.push(client);
        }
        let mut names = Vec::new();
        for _ in 0..4 {
            names.push(threads_rx.recv().await.unwrap().unwrap());
        }
        names.sort();
        assert_eq!(
            names,
            [
                "test-shard-0",
                "test-shard-0",
                "test-shard-1",
                "test-shard-1"
            ]
        );
        assert_eq!(shards.loads(), [2, 2]);
        // The sockets work from their shard's reactor.
        for (i, c) in clients.iter_mut().enumerate() {
            let msg = [i as u8; 10];
            c.write_all(&msg).await.unwrap();
            let mut back = [0u8; 10];
            c.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg);
        }
        // A connection that ends leaves its shard lighter: the next one goes there.
        let first = clients.remove(0);
        drop(first);
        crate::timer::timeout(Duration::from_secs(10), async {
            while shards.loads().iter().sum::<usize>() != 3 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        let freed = shards.loads().iter().position(|&l| l == 1).unwrap();
        let (_client, accepted) = pair(&listener).await;
        shards.spawn(&tracker, accepted, |_tcp| std::future::pending::<()>());
        assert_eq!(shards.loads()[freed], 2);
        tracker.close();
        shards.stop().await;
        // Stopping dropped the tasks still running.
        crate::timer::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn stopping_drops_the_tasks_left_and_closes_their_sockets() {
        let shards = Shards::start(1, "test-stop").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tracker = TaskTracker::new();
        let (mut client, accepted) = pair(&listener).await;
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        shards.spawn(&tracker, accepted, move |tcp| async move {
            let _tcp = tcp;
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
        });
        started_rx.await.unwrap();
        shards.stop().await;
        assert!(tracker.is_empty(), "the task was dropped with its shard");
        let mut buf = [0u8; 1];
        let n = crate::timer::timeout(Duration::from_secs(10), client.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "the socket closed with the task");
    }
}
