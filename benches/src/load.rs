//! A closed-loop load driver: N threads, each running one operation after
//! another (the next starts when the previous is acknowledged), a warm-up,
//! then a measured window.
//!
//! Throughput counts operations that *complete* inside the measured window;
//! their latencies go to the histogram. Hooks run on the coordinating thread
//! just before the window opens and just after it closes, so a caller can
//! take counter snapshots (e.g. a store's `fdatasync` count) for the window.

use crate::latency::LatencyRecorder;
use crate::{BenchError, BenchResult};
use std::fmt::Display;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// How long to run and with how many workers.
#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    /// Concurrent workers (threads).
    pub threads: usize,
    /// Unmeasured time before the window opens.
    pub warmup: Duration,
    /// Length of the measured window.
    pub measure: Duration,
}

/// When a [`closed_loop`] hook is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Just before the measured window opens.
    Open,
    /// Just after it closes.
    Close,
}

/// What a [`closed_loop`] run measured.
#[derive(Debug, Clone)]
pub struct LoadOutcome {
    /// Workers that ran.
    pub threads: usize,
    /// Operations completed inside the window.
    pub ops: u64,
    /// Actual length of the window.
    pub elapsed: Duration,
    /// Latencies of the operations counted in `ops`.
    pub latency: LatencyRecorder,
}

impl LoadOutcome {
    /// Operations per second over the window.
    pub fn rate(&self) -> f64 {
        per_second(self.ops, self.elapsed)
    }
}

/// `count / elapsed`, or 0 for an empty interval.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// Runs `spec.threads` workers, each built by `make_worker(i)` on the
/// calling thread and then moved to its own thread, calling it in a loop
/// until the window closes. The first worker error stops the run and is
/// returned.
pub fn closed_loop<M, W, E>(
    spec: &LoadSpec,
    mut make_worker: M,
    mut hook: impl FnMut(Window) -> BenchResult<()>,
) -> BenchResult<LoadOutcome>
where
    M: FnMut(usize) -> BenchResult<W>,
    W: FnMut() -> Result<(), E> + Send,
    E: Display,
{
    let threads = spec.threads.max(1);
    let workers = (0..threads)
        .map(&mut make_worker)
        .collect::<BenchResult<Vec<W>>>()?;
    let phase = AtomicU8::new(WARMUP);
    let barrier = Barrier::new(threads + 1);
    let failure: Mutex<Option<String>> = Mutex::new(None);

    let (results, window) = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .into_iter()
            .enumerate()
            .map(|(i, mut op)| {
                let (phase, barrier, failure) = (&phase, &barrier, &failure);
                std::thread::Builder::new()
                    .name(format!("bench-worker-{i}"))
                    .spawn_scoped(scope, move || {
                        let mut rec = LatencyRecorder::new();
                        let mut ops = 0u64;
                        barrier.wait();
                        while phase.load(Ordering::Acquire) != STOP {
                            let started = Instant::now();
                            if let Err(e) = op() {
                                if let Ok(mut f) = failure.lock() {
                                    f.get_or_insert_with(|| format!("worker {i}: {e}"));
                                }
                                phase.store(STOP, Ordering::Release);
                                break;
                            }
                            let took = started.elapsed();
                            if phase.load(Ordering::Acquire) == MEASURE {
                                rec.record(took);
                                ops += 1;
                            }
                        }
                        (ops, rec)
                    })
            })
            .collect();

        let window = coordinate(spec, &phase, &barrier, &mut hook);
        phase.store(STOP, Ordering::Release);
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().map_err(|_| "a bench worker panicked".to_string()),
                Err(e) => Err(format!("spawning a bench worker: {e}")),
            })
            .collect();
        (results, window)
    });

    if let Some(msg) = failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(msg.into());
    }
    let elapsed = window?;
    let mut latency = LatencyRecorder::new();
    let mut ops = 0;
    for r in results {
        let (n, rec) = r?;
        ops += n;
        latency.merge(&rec);
    }
    Ok(LoadOutcome {
        threads,
        ops,
        elapsed,
        latency,
    })
}

/// Like [`closed_loop`], but each of `spec.threads` workers is an async task on a tokio runtime
/// with two worker threads (as the hub runs its connections), awaiting `make_task(i)()` in a loop.
pub fn closed_loop_async<M, T, F, E>(
    spec: &LoadSpec,
    mut make_task: M,
    mut hook: impl FnMut(Window) -> BenchResult<()>,
) -> BenchResult<LoadOutcome>
where
    M: FnMut(usize) -> BenchResult<T>,
    T: FnMut() -> F + Send + 'static,
    F: std::future::Future<Output = Result<(), E>> + Send,
    E: Display,
{
    let tasks = spec.threads.max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()?;
    let phase = std::sync::Arc::new(AtomicU8::new(WARMUP));
    let failure = std::sync::Arc::new(Mutex::new(None::<String>));
    let mut handles = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let mut op = make_task(i)?;
        let (phase, failure) = (phase.clone(), failure.clone());
        handles.push(runtime.spawn(async move {
            let mut rec = LatencyRecorder::new();
            let mut ops = 0u64;
            while phase.load(Ordering::Acquire) != STOP {
                let started = Instant::now();
                if let Err(e) = op().await {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert_with(|| format!("task {i}: {e}"));
                    }
                    phase.store(STOP, Ordering::Release);
                    break;
                }
                if phase.load(Ordering::Acquire) == MEASURE {
                    rec.record(started.elapsed());
                    ops += 1;
                }
            }
            (ops, rec)
        }));
    }
    let window = (|| {
        if !sleep_unless_stopped(&phase, spec.warmup) {
            return Err(BenchError::from("stopped during warm-up"));
        }
        hook(Window::Open)?;
        let opened = Instant::now();
        phase.store(MEASURE, Ordering::Release);
        let completed = sleep_unless_stopped(&phase, spec.measure);
        phase.store(STOP, Ordering::Release);
        let elapsed = opened.elapsed();
        hook(Window::Close)?;
        if !completed {
            return Err(BenchError::from("stopped during the measured window"));
        }
        Ok(elapsed)
    })();
    phase.store(STOP, Ordering::Release);
    let results = runtime.block_on(async {
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(h.await.map_err(|_| "a bench task panicked".to_string()));
        }
        out
    });
    if let Some(msg) = failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(msg.into());
    }
    let elapsed = window?;
    let mut latency = LatencyRecorder::new();
    let mut ops = 0;
    for r in results {
        let (n, rec) = r?;
        ops += n;
        latency.merge(&rec);
    }
    Ok(LoadOutcome {
        threads: tasks,
        ops,
        elapsed,
        latency,
    })
}

fn coordinate(
    spec: &LoadSpec,
    phase: &AtomicU8,
    barrier: &Barrier,
    hook: &mut impl FnMut(Window) -> BenchResult<()>,
) -> BenchResult<Duration> {
    // If a worker failed to spawn, the barrier would never fill; the scope
    // would then hang. Spawn errors are vanishingly rare; accept that.
    barrier.wait();
    if !sleep_unless_stopped(phase, spec.warmup) {
        return Err("stopped during warm-up".into());
    }
    hook(Window::Open)?;
    let opened = Instant::now();
    phase.store(MEASURE, Ordering::Release);
    let completed = sleep_unless_stopped(phase, spec.measure);
    phase.store(STOP, Ordering::Release);
    let elapsed = opened.elapsed();
    hook(Window::Close)?;
    if !completed {
        return Err(BenchError::from("stopped during the measured window"));
    }
    Ok(elapsed)
}

/// Sleeps for `d` in short steps; false if the phase turned to STOP.
fn sleep_unless_stopped(phase: &AtomicU8, d: Duration) -> bool {
    let until = Instant::now() + d;
    loop {
        if phase.load(Ordering::Acquire) == STOP {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(20)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn counts_and_hooks_cover_the_window() {
        let counter = AtomicU64::new(0);
        let mut seen = Vec::new();
        let spec = LoadSpec {
            threads: 3,
            warmup: Duration::from_millis(20),
            measure: Duration::from_millis(100),
        };
        let out = closed_loop(
            &spec,
            |_| {
                let counter = &counter;
                Ok(move || -> Result<(), String> {
                    counter.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                    Ok(())
                })
            },
            |w| {
                seen.push(w);
                Ok(())
            },
        );
        let out = out.map_err(|e| e.to_string());
        assert!(out.is_ok(), "{out:?}");
        if let Ok(out) = out {
            assert_eq!(seen, vec![Window::Open, Window::Close]);
            assert!(out.ops > 0 && out.ops <= counter.load(Ordering::Relaxed));
            assert_eq!(out.latency.count(), out.ops);
            assert!(out.elapsed >= Duration::from_millis(100));
        }
    }

    #[test]
    fn a_worker_error_stops_the_run() {
        let spec = LoadSpec {
            threads: 2,
            warmup: Duration::from_millis(10),
            measure: Duration::from_secs(30),
        };
        let started = Instant::now();
        let out = closed_loop(
            &spec,
            |i| Ok(move || if i == 1 { Err("disk on fire") } else { Ok(()) }),
            |_| Ok(()),
        );
        assert!(out.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
