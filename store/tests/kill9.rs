//! kill -9 of a real process appending to the store, at hundreds of random moments, reopening the
//! same directory each time.
//!
//! Property: whatever instant the writer dies at (during recovery, mid-batch, mid-rotation,
//! between an fdatasync and its acknowledgement), reopening yields every acknowledged message
//! above the durable checkpoint, in order, without duplicates or invented messages, and a
//! checkpoint no older than the last acknowledged one. This is the crash the store exists to
//! survive: an edge gateway killed by the OOM killer or a watchdog must lose nothing it confirmed.
//!
//! The test binary re-executes itself: `child_appender` does the appending when
//! `EDGEHUB_KILL9_CHILD` names a directory, and reports every acknowledgement on stdout before
//! the parent kills it. Rerun a failure with `EDGEHUB_KILL9_SEED=<seed printed at start>`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use store::{Epoch, Offset, QueueName, Store, StoreOptions};

const CHILD_ENV: &str = "EDGEHUB_KILL9_CHILD";
const RUN_ENV: &str = "EDGEHUB_KILL9_RUN";
const CHILD_SEED_ENV: &str = "EDGEHUB_KILL9_CHILD_SEED";
const SEED_ENV: &str = "EDGEHUB_KILL9_SEED";

/// Appender threads in the child; thread `t` owns queue `q{t}` and also feeds `q{t+1}`.
const THREADS: usize = 4;
const KILLS: usize = 300;
/// A fresh directory every this many kills keeps recovery (which reads every segment) fast.
const KILLS_PER_DIR: usize = 75;
/// A child that was never killed stops by itself after this, so no orphan outlives a failure.
const CHILD_LIFETIME: Duration = Duration::from_secs(20);

fn queue(i: usize) -> QueueName {
    QueueName::new(&format!("q{i}")).expect("valid queue name")
}

fn opts() -> StoreOptions {
    StoreOptions {
        epoch: Epoch::new(1),
        segment_bytes: 64 << 10,
        ..StoreOptions::default()
    }
}

/// Who appended a message: the child run, its appender thread, and that thread's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Id {
    run: u64,
    thread: usize,
    seq: u64,
}

fn encode_body(id: Id, pad: usize) -> Bytes {
    let mut body = format!("{} {} {} ", id.run, id.thread, id.seq).into_bytes();
    body.resize(body.len() + pad, b'.');
    Bytes::from(body)
}

fn decode_body(body: &[u8]) -> Option<Id> {
    let text = std::str::from_utf8(body).ok()?;
    let mut parts = text.splitn(4, ' ');
    let id = Id {
        run: parts.next()?.parse().ok()?,
        thread: parts.next()?.parse().ok()?,
        seq: parts.next()?.parse().ok()?,
    };
    let pad = parts.next()?;
    pad.bytes().all(|b| b == b'.').then_some(id)
}

/// Writes one whole line to stdout and flushes it, so the parent sees it before any kill.
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("write to the parent's pipe");
    out.flush().expect("flush to the parent's pipe");
}

/// The child side: appends from several threads until killed, reporting each acknowledgement.
/// Returns at once in an ordinary test run.
#[test]
fn child_appender() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let run: u64 = std::env::var(RUN_ENV)
        .expect("the parent passes the run number")
        .parse()
        .expect("run number is an integer");
    let seed: u64 = std::env::var(CHILD_SEED_ENV)
        .expect("the parent passes a seed")
        .parse()
        .expect("seed is an integer");
    let store = Store::open(&dir, opts()).expect("the child opens the store");
    // The harness has printed "test child_appender ... " without a newline: end that line first.
    emit("");
    emit("open");
    // Highest offset per queue whose `ack` line was printed: checkpoints never pass it, so every
    // checkpoint the parent recovers names a message it heard about.
    let printed: Arc<Vec<AtomicU64>> = Arc::new((0..THREADS).map(|_| AtomicU64::new(0)).collect());
    let started = Instant::now();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            let printed = Arc::clone(&printed);
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed ^ (t as u64).wrapping_mul(0x9E37));
                let own = queue(t);
                let neighbour = (t + 1) % THREADS;
                let mut seq = 0u64;
                while started.elapsed() < CHILD_LIFETIME {
                    let targets: Vec<usize> = if seq % 3 == 2 {
                        vec![t, neighbour]
                    } else {
                        vec![t]
                    };
                    let names: Vec<QueueName> = targets.iter().map(|&i| queue(i)).collect();
                    let id = Id {
                        run,
                        thread: t,
                        seq,
                    };
                    let body = encode_body(id, rng.gen_range(50..1500));
                    let off = store
                        .append(&names, body, None)
                        .wait()
                        .expect("the child's append succeeds");
                    let list: Vec<String> = targets.iter().map(|i| i.to_string()).collect();
                    emit(&format!("ack {} {t} {seq} {}", off.get(), list.join(",")));
                    for &i in &targets {
                        printed[i].fetch_max(off.get(), Ordering::SeqCst);
                    }
                    if seq % 8 == 7 {
                        checkpoint_a_prefix(&store, t, &own, &printed[t], &mut rng);
                    }
                    seq += 1;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("appender thread");
    }
}

/// Checkpoints somewhere in the first half of what the queue holds after its checkpoint, never
/// past a message whose acknowledgement was printed.
fn checkpoint_a_prefix(
    store: &Store,
    t: usize,
    name: &QueueName,
    printed: &AtomicU64,
    rng: &mut StdRng,
) {
    let limit = printed.load(Ordering::SeqCst);
    let read = store
        .read(name, Offset::ZERO, 64)
        .expect("the child reads back");
    let eligible: Vec<Offset> = read
        .iter()
        .map(|m| m.offset)
        .take_while(|o| o.get() <= limit)
        .collect();
    if eligible.len() < 2 {
        return;
    }
    let upto = eligible[rng.gen_range(0..eligible.len() / 2)];
    store
        .checkpoint(name, upto)
        .wait()
        .expect("the child's checkpoint succeeds");
    emit(&format!("ckpt {t} {}", upto.get()));
}

/// When the parent kills the child.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// This long after spawning: often during process start or recovery.
    AfterSpawn(Duration),
    /// This long after the store reported open.
    AfterOpen(Duration),
    /// As soon as the first acknowledgement arrives.
    AtFirstAck,
}

/// Kills and reaps the child if the parent fails before doing so.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What one child reported before it died.
struct Report {
    lines: Vec<String>,
}

fn run_child_until_killed(dir: &Path, run: u64, child_seed: u64, moment: Moment) -> Report {
    let exe = std::env::current_exe().expect("path of this test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "child_appender",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .env(RUN_ENV, run.to_string())
        .env(CHILD_SEED_ENV, child_seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let spawned = Instant::now();
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let mut guard = ChildGuard(Some(child));
    let (events, event_rx) = mpsc::channel::<String>();
    let reader = thread::spawn(move || {
        let mut lines = Vec::new();
        let mut out = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match out.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                // A line cut by the kill (no newline) is not a report.
                Ok(_) if !line.ends_with('\n') => break,
                Ok(_) => {
                    let l = line.trim_end().to_owned();
                    let _ = events.send(l.clone());
                    lines.push(l);
                }
            }
        }
        lines
    });
    let wait_for = |prefix: &str| loop {
        match event_rx.recv() {
            Ok(l) if l.starts_with(prefix) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    };
    let reached = match moment {
        Moment::AfterSpawn(d) => {
            thread::sleep(d.saturating_sub(spawned.elapsed()));
            true
        }
        Moment::AfterOpen(d) => {
            let ok = wait_for("open");
            thread::sleep(d);
            ok
        }
        Moment::AtFirstAck => wait_for("ack "),
    };
    let mut child = guard.0.take().expect("child still owned");
    let _ = child.kill();
    let status = child.wait().expect("reap the child");
    let lines = reader.join().expect("stdout reader thread");
    let mut err = String::new();
    let _ = stderr.read_to_string(&mut err);
    assert!(
        reached && status.signal() == Some(libc::SIGKILL),
        "the child died by itself ({status}) instead of by SIGKILL; its stderr:\n{err}"
    );
    Report { lines }
}

/// What the parent knows about one directory, across every child that wrote to it.
#[derive(Default)]
struct Model {
    /// Per queue: every acknowledged (or since recovered) message, by offset.
    acked: Vec<BTreeMap<u64, Id>>,
    /// Per queue: the highest acknowledged checkpoint.
    ckpt: Vec<u64>,
    /// Highest acknowledged sequence of each (run, thread).
    last_seq: HashMap<(u64, usize), u64>,
}

impl Model {
    fn new() -> Model {
        Model {
            acked: vec![BTreeMap::new(); THREADS],
            ckpt: vec![0; THREADS],
            last_seq: HashMap::new(),
        }
    }

    fn record(&mut self, q: usize, offset: u64, id: Id) {
        if let Some(prev) = self.acked[q].insert(offset, id) {
            assert_eq!(prev, id, "offset {offset} reported for two messages");
        }
        let last = self.last_seq.entry((id.run, id.thread)).or_insert(id.seq);
        *last = (*last).max(id.seq);
    }

    /// Absorbs a child's report; returns how many acknowledgements it held.
    fn absorb(&mut self, run: u64, report: &Report) -> usize {
        let mut acks = 0;
        for line in &report.lines {
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["ack", off, t, seq, queues] => {
                    let id = Id {
                        run,
                        thread: t.parse().expect("thread number"),
                        seq: seq.parse().expect("sequence number"),
                    };
                    let off: u64 = off.parse().expect("offset");
                    for q in queues.split(',') {
                        self.record(q.parse().expect("queue index"), off, id);
                    }
                    acks += 1;
                }
                ["ckpt", q, off] => {
                    let q: usize = q.parse().expect("queue index");
                    let off: u64 = off.parse().expect("offset");
                    self.ckpt[q] = self.ckpt[q].max(off);
                }
                _ => {}
            }
        }
        acks
    }
}

/// What the parent's recoveries did, to show the kills landed in interesting places.
#[derive(Default, Debug)]
struct Seen {
    torn_tails: usize,
    removed_files: usize,
    unacked_recovered: usize,
    /// Recoveries that took sealed segments from their sidecar index files.
    from_sidecar: usize,
}

/// Reopens the directory and checks it against everything the children acknowledged.
fn verify(dir: &Path, model: &mut Model, run: u64, ctx: &str, seen: &mut Seen) {
    let store =
        Store::open(dir, opts()).unwrap_or_else(|e| panic!("{ctx}: reopen after kill -9: {e}"));
    seen.torn_tails += usize::from(store.recovery().torn_tail.is_some());
    seen.removed_files += store.recovery().removed.len();
    seen.from_sidecar += usize::from(store.recovery().from_sidecar > 0);
    let stats = store.stats();
    let mut by_offset: HashMap<u64, Id> = HashMap::new();
    let mut recovered_unacked = Vec::new();
    for q in 0..THREADS {
        let name = queue(q);
        let ckpt = store.checkpoint_of(&name).map_or(0, Offset::get);
        assert!(
            ckpt >= model.ckpt[q],
            "{ctx}: queue {q} recovered checkpoint {ckpt}, below the acknowledged {}",
            model.ckpt[q]
        );
        assert!(
            ckpt == 0 || model.acked[q].contains_key(&ckpt),
            "{ctx}: queue {q} checkpoint {ckpt} is not the offset of a message it holds"
        );
        if let Some(qs) = stats.queues.iter().find(|s| s.name == name) {
            assert!(
                qs.checkpoint.get() <= qs.tail.get(),
                "{ctx}: queue {q} checkpoint {} past its last message {}",
                qs.checkpoint,
                qs.tail
            );
        }
        let read = store
            .read(&name, Offset::ZERO, usize::MAX)
            .unwrap_or_else(|e| panic!("{ctx}: read queue {q}: {e}"));
        let mut last_offset = ckpt;
        let mut last_run = 0;
        let mut seen_seq: HashMap<(u64, usize), u64> = HashMap::new();
        for m in &read {
            let off = m.offset.get();
            assert!(
                off > last_offset,
                "{ctx}: queue {q} offsets not increasing past the checkpoint: {off} after {last_offset}"
            );
            last_offset = off;
            let id = decode_body(&m.body).unwrap_or_else(|| {
                panic!("{ctx}: queue {q} offset {off} holds bytes nobody wrote")
            });
            assert!(
                id.run <= run,
                "{ctx}: message from a run that never happened"
            );
            assert!(
                id.run >= last_run,
                "{ctx}: queue {q}: run {} stored after run {last_run}",
                id.run
            );
            last_run = id.run;
            if let Some(prev) = seen_seq.insert((id.run, id.thread), id.seq) {
                assert!(
                    id.seq > prev,
                    "{ctx}: queue {q}: {id:?} follows seq {prev} (duplicate or reordered)"
                );
            }
            if let Some(other) = by_offset.insert(off, id) {
                assert_eq!(other, id, "{ctx}: offset {off} differs between queues");
            }
            match model.acked[q].get(&off) {
                Some(&known) => assert_eq!(known, id, "{ctx}: queue {q} offset {off} changed"),
                None => {
                    // Durable but never acknowledged: only the one append each thread had in
                    // flight when the child died.
                    let expected = model
                        .last_seq
                        .get(&(id.run, id.thread))
                        .map_or(0, |s| s + 1);
                    assert_eq!(
                        id.seq, expected,
                        "{ctx}: queue {q} offset {off} holds {id:?}, which was never in flight"
                    );
                    recovered_unacked.push((q, off, id));
                }
            }
        }
        let held: std::collections::HashSet<u64> = read.iter().map(|m| m.offset.get()).collect();
        for (&off, id) in model.acked[q].range(ckpt + 1..) {
            assert!(
                held.contains(&off),
                "{ctx}: queue {q} lost acknowledged message {id:?} at offset {off} (checkpoint {ckpt})"
            );
        }
    }
    store.close().expect("close after verifying");
    seen.unacked_recovered += recovered_unacked.len();
    // What recovery kept is durable from now on: later reopens must keep it too.
    for (q, off, id) in recovered_unacked {
        model.record(q, off, id);
    }
}

#[test]
fn kill_9_at_random_moments_never_loses_an_acknowledged_message() {
    let seed: u64 = match std::env::var(SEED_ENV) {
        Ok(s) => s.parse().expect("EDGEHUB_KILL9_SEED is an integer"),
        Err(_) => rand::random(),
    };
    eprintln!("kill9 seed = {seed} (rerun with {SEED_ENV}={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut dir = tempfile::tempdir().expect("tempdir");
    let mut model = Model::new();
    let mut total_acks = 0;
    let mut kills_with_acks = 0;
    let mut seen = Seen::default();
    for kill in 0..KILLS {
        if kill % KILLS_PER_DIR == 0 {
            dir = tempfile::tempdir().expect("tempdir");
            model = Model::new();
        }
        let run = kill as u64 + 1;
        let moment = match rng.gen_range(0..100) {
            0..15 => Moment::AfterSpawn(Duration::from_micros(rng.gen_range(0..30_000))),
            15..30 => Moment::AtFirstAck,
            _ => Moment::AfterOpen(Duration::from_micros(rng.gen_range(0..30_000))),
        };
        let report = run_child_until_killed(dir.path(), run, rng.gen(), moment);
        let acks = model.absorb(run, &report);
        total_acks += acks;
        kills_with_acks += usize::from(acks > 0);
        let ctx = format!("seed {seed}, kill {kill} ({moment:?}, {acks} acks)");
        verify(dir.path(), &mut model, run, &ctx, &mut seen);
    }
    eprintln!(
        "kill9: {KILLS} kills, {total_acks} acknowledged appends, {kills_with_acks} kills after \
         acknowledgements, {:.1}s; recoveries: {seen:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        seen.from_sidecar > 0,
        "no recovery used a sidecar: the test is not exercising them"
    );
    assert!(
        kills_with_acks >= KILLS / 2,
        "only {kills_with_acks} of {KILLS} kills came after an acknowledgement: the test is not \
         exercising the store"
    );
}
