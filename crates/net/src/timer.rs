//! Timers for the threads that carry a relay's or an agent's traffic, kept on a clock thread of
//! their own so that those threads' runtimes need no time driver.
//!
//! tokio's time driver runs on every park of its runtime: it locks its wheel, reads the clock,
//! works out the next deadline and, after the wait, processes the wheel again. On a 64-byte
//! round trip a relay parks twice and that came to about 1,060 of its 8,486 instructions
//! (callgrind, docs/performance.md), paid whether a timer was due or not. The timers of a
//! connection (heartbeats, handshake deadlines, grace periods) fire rarely, so the shards
//! (`tube_net::shards`) and the agent's runtime are built without a time driver and their
//! timers live on one process-wide clock thread: creating or moving a timer takes that
//! wheel's lock, and a timer that fires wakes its task across threads, which costs a system
//! call per firing instead of work on every wake-up.
//!
//! Code that may run on such a thread makes its timers through this module: `tokio::time`'s
//! own functions would panic there ("timers are disabled"), so `crates/net/clippy.toml`
//! (linked from tube-relay and tube-agent) makes them a lint error in those crates. On any
//! other thread these are `tokio::time`'s functions, on the current runtime's clock (the
//! tests' paused clock too).

use std::cell::Cell;
use std::future::IntoFuture;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::{Instant, Interval, Sleep, Timeout};

thread_local! {
    /// Set on a thread whose runtime has no time driver: its timers go to the clock thread.
    static BORROWS: Cell<bool> = const { Cell::new(false) };
}

/// The clock thread's runtime, started on first use and kept for the process's life.
static CLOCK: OnceLock<Handle> = OnceLock::new();

/// Marks the calling thread as one whose runtime has no time driver (built with
/// `enable_io()` alone): the timers made on it through this module go to the clock thread,
/// started here if need be. Call it on the thread that runs the runtime's `block_on`: a
/// current-thread runtime runs every task there.
pub fn borrow_clock() -> std::io::Result<()> {
    clock()?;
    BORROWS.with(|b| b.set(true));
    Ok(())
}

/// The clock thread's handle, starting the thread on first use. The runtime is built and kept
/// on that thread: dropped elsewhere (an async context) it would panic.
fn clock() -> std::io::Result<&'static Handle> {
    if let Some(h) = CLOCK.get() {
        return Ok(h);
    }
    static STARTING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = STARTING.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(h) = CLOCK.get() {
        return Ok(h);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("tube-clock".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(runtime) => {
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
    let handle = rx
        .recv()
        .map_err(|_| std::io::Error::other("the clock thread ended at its start"))??;
    Ok(CLOCK.get_or_init(|| handle))
}

/// Runs `make` with the clock thread's runtime as the current one when this thread borrows
/// it, so that the timer `make` creates registers there.
fn on_clock<T>(make: impl FnOnce() -> T) -> T {
    match CLOCK.get() {
        Some(clock) if BORROWS.with(Cell::get) => {
            let _entered = clock.enter();
            make()
        }
        _ => make(),
    }
}

/// [`tokio::time::sleep`].
#[allow(clippy::disallowed_methods)]
pub fn sleep(duration: Duration) -> Sleep {
    on_clock(|| tokio::time::sleep(duration))
}

/// [`tokio::time::sleep_until`].
#[allow(clippy::disallowed_methods)]
pub fn sleep_until(deadline: Instant) -> Sleep {
    on_clock(|| tokio::time::sleep_until(deadline))
}

/// [`tokio::time::timeout`].
#[allow(clippy::disallowed_methods)]
pub fn timeout<F: IntoFuture>(duration: Duration, future: F) -> Timeout<F::IntoFuture> {
    on_clock(|| tokio::time::timeout(duration, future))
}

/// [`tokio::time::timeout_at`].
#[allow(clippy::disallowed_methods)]
pub fn timeout_at<F: IntoFuture>(deadline: Instant, future: F) -> Timeout<F::IntoFuture> {
    on_clock(|| tokio::time::timeout_at(deadline, future))
}

/// [`tokio::time::interval`].
#[allow(clippy::disallowed_methods)]
pub fn interval(period: Duration) -> Interval {
    on_clock(|| tokio::time::interval(period))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` on a new thread that borrows the clock, inside a runtime without a time
    /// driver, as a shard does.
    fn on_clockless_thread<T: Send + 'static>(
        body: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            borrow_clock().unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .unwrap();
            runtime.block_on(body)
        })
        .join()
        .unwrap()
    }

    #[test]
    fn timers_made_here_run_on_a_runtime_without_a_time_driver() {
        let (slept, timed_out, finished, ticks, at) = on_clockless_thread(async {
            let start = Instant::now();
            sleep(Duration::from_millis(20)).await;
            let slept = start.elapsed();
            let timed_out = timeout(Duration::from_millis(10), std::future::pending::<()>())
                .await
                .is_err();
            let finished = timeout(Duration::from_secs(10), async { 7 }).await;
            let mut tick = interval(Duration::from_millis(5));
            for _ in 0..3 {
                tick.tick().await;
            }
            let ticks = start.elapsed();
            let deadline = Instant::now() + Duration::from_millis(10);
            sleep_until(deadline).await;
            let at = timeout_at(deadline + Duration::from_secs(10), async {}).await;
            (
                slept,
                timed_out,
                finished,
                ticks,
                (Instant::now() >= deadline, at),
            )
        });
        assert!(slept >= Duration::from_millis(20), "slept only {slept:?}");
        assert!(timed_out, "a pending future outlived its timeout");
        assert_eq!(finished.ok(), Some(7));
        assert!(
            ticks >= slept + Duration::from_millis(10),
            "three ticks 5 ms apart"
        );
        assert_eq!(at, (true, Ok(())));
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn tokio_timers_are_unavailable_where_the_clock_is_borrowed() {
        // What the clippy.toml rule is for: the shards' runtimes have no driver to hold them.
        let made = on_clockless_thread(async {
            std::panic::catch_unwind(|| tokio::time::sleep(Duration::from_millis(1))).is_ok()
        });
        assert!(!made);
    }

    #[tokio::test(start_paused = true)]
    async fn elsewhere_the_timers_are_the_current_runtimes_own() {
        // With the clock thread running, a thread that does not borrow it keeps its timers on
        // its own runtime: this test's paused clock, moved an hour on, has them due at once
        // (on the clock thread they would still be an hour away).
        clock().unwrap();
        let slept = sleep(Duration::from_secs(3600));
        let timed = timeout(Duration::from_secs(3600), std::future::pending::<()>());
        tokio::pin!(slept, timed);
        tokio::time::advance(Duration::from_secs(3601)).await;
        let (slept, timed) = std::future::poll_fn(|cx| {
            let s = slept.as_mut().poll(cx).is_ready();
            let t = timed.as_mut().poll(cx);
            std::task::Poll::Ready((s, t))
        })
        .await;
        assert!(slept, "an hour's sleep not due an hour later");
        assert!(
            matches!(timed, std::task::Poll::Ready(Err(_))),
            "the timeout did not expire"
        );
    }
}
