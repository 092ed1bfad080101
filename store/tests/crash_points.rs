//! Power cuts at every write and sync of a workload, on the simulated filesystem.
//!
//! For each crash point N, a workload (appends in bursts to two queues and to both, checkpoints,
//! segment rotation, retention) runs until its Nth mutating filesystem operation fails and the
//! machine "loses power". The surviving image keeps what was synced plus a seed-chosen subset of
//! what was not (torn writes, lost or resurrected directory entries). Reopening it must show:
//! every acknowledged append above the durable checkpoint, in order, nothing duplicated, nothing
//! invented, and every acknowledged checkpoint. A quarter of the images are cut again during
//! their own recovery before the final check.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use store::sim::{FaultMode, SimFs};
use store::{AppendChain, Epoch, Offset, QueueName, Store, StoreOptions, SystemClock};

const DIR: &str = "/store";

/// `on_caller`: lone appends may be committed on the caller's thread (the workload then appends
/// on a chain, so the first append of each burst is alone and the rest pipeline behind it).
fn opts(on_caller: bool) -> StoreOptions {
    StoreOptions {
        epoch: Epoch::new(1),
        segment_bytes: 4096,
        reserve_bytes: 4096,
        commit_on_caller: on_caller,
        // The simulated disk's syncs take no time; one measured long because the machine was
        // busy must not turn callers' commits off here.
        caller_commit_max_sync: std::time::Duration::MAX,
        ..StoreOptions::default()
    }
}

fn open(fs: &SimFs) -> Result<Store, store::OpenError> {
    open_as(fs, false)
}

fn open_as(fs: &SimFs, on_caller: bool) -> Result<Store, store::OpenError> {
    Store::open_with(
        Path::new(DIR),
        opts(on_caller),
        Arc::new(fs.clone()),
        Arc::new(SystemClock),
    )
}

/// What the workload saw acknowledged.
#[derive(Default, Debug)]
struct Acked {
    /// Per queue: (offset, body) in acknowledgement order.
    messages: BTreeMap<String, Vec<(Offset, Vec<u8>)>>,
    checkpoints: BTreeMap<String, Offset>,
    /// Every body ever submitted (acknowledged or not).
    submitted: HashSet<Vec<u8>>,
}

/// Runs the workload until it ends or an operation fails. Returns what was acknowledged.
fn workload(store: &Store, seed: u64, chain: Option<&AppendChain>) -> Acked {
    let mut rng = StdRng::seed_from_u64(seed);
    let a = QueueName::new("a").expect("name");
    let b = QueueName::new("b").expect("name");
    let mut acked = Acked::default();
    for step in 0..40u32 {
        let burst = rng.gen_range(1..=6);
        let mut pending = Vec::new();
        for i in 0..burst {
            let queues = match rng.gen_range(0..3) {
                0 => vec![a.clone()],
                1 => vec![b.clone()],
                _ => vec![a.clone(), b.clone()],
            };
            let len = rng.gen_range(10..300);
            let mut body = format!("{seed}:{step}:{i}:").into_bytes();
            body.resize(len.max(body.len()), b'.');
            acked.submitted.insert(body.clone());
            let p = match chain {
                Some(chain) => store.append_in(chain, &queues, Bytes::from(body.clone()), None),
                None => store.append(&queues, Bytes::from(body.clone()), None),
            };
            pending.push((queues, body, p));
        }
        let mut failed = false;
        for (queues, body, p) in pending {
            match p.wait() {
                Ok(off) => {
                    for q in queues {
                        acked
                            .messages
                            .entry(q.to_string())
                            .or_default()
                            .push((off, body.clone()));
                    }
                }
                Err(_) => failed = true,
            }
        }
        if failed {
            return acked;
        }
        if rng.gen_bool(0.4) {
            let q = if rng.gen_bool(0.5) { &a } else { &b };
            let list = acked.messages.get(q.as_str()).cloned().unwrap_or_default();
            if !list.is_empty() {
                let upto = list[rng.gen_range(0..list.len())].0;
                match store.checkpoint(q, upto).wait() {
                    Ok(()) => {
                        let c = acked.checkpoints.entry(q.to_string()).or_default();
                        *c = (*c).max(upto);
                    }
                    Err(_) => return acked,
                }
            }
        }
    }
    acked
}

/// Checks a recovered store against what was acknowledged before the crash.
fn verify(store: &Store, acked: &Acked, context: &str) {
    for name in ["a", "b"] {
        let q = QueueName::new(name).expect("name");
        let checkpoint = store.checkpoint_of(&q).unwrap_or(Offset::ZERO);
        let acked_ckpt = acked.checkpoints.get(name).copied().unwrap_or(Offset::ZERO);
        assert!(
            checkpoint >= acked_ckpt,
            "{context}: queue {name} checkpoint {checkpoint} went back before acknowledged {acked_ckpt}"
        );
        let read = store
            .read(&q, Offset::ZERO, usize::MAX)
            .unwrap_or_else(|e| panic!("{context}: read {name}: {e}"));
        assert!(
            read.windows(2).all(|w| w[0].offset < w[1].offset),
            "{context}: queue {name} out of order"
        );
        assert!(
            read.iter().all(|m| m.offset > checkpoint),
            "{context}: queue {name} returned a message at or below its checkpoint"
        );
        let mut seen = HashSet::new();
        for m in &read {
            assert!(
                acked.submitted.contains(m.body.as_ref()),
                "{context}: queue {name} invented a message at {}",
                m.offset
            );
            assert!(
                seen.insert(m.body.clone()),
                "{context}: queue {name} duplicated a message at {}",
                m.offset
            );
        }
        let present: BTreeMap<Offset, &[u8]> =
            read.iter().map(|m| (m.offset, m.body.as_ref())).collect();
        for (off, body) in acked.messages.get(name).into_iter().flatten() {
            if *off > checkpoint {
                assert_eq!(
                    present.get(off).copied(),
                    Some(body.as_slice()),
                    "{context}: queue {name} lost acknowledged message at offset {off}"
                );
            }
        }
    }
}

/// Operations a full, uncut run performs (to know how many crash points there are).
fn total_ops(seed: u64, on_caller: bool) -> u64 {
    let fs = SimFs::new();
    let store = open_as(&fs, on_caller).expect("open");
    let chain = AppendChain::new();
    chain.set_producer_waits(true);
    let _ = workload(&store, seed, on_caller.then_some(&chain));
    if on_caller {
        // Otherwise the caller's path would go untested here.
        assert!(
            store.stats().caller_commits > 0,
            "no append was its caller's"
        );
    }
    store.close().expect("close");
    fs.ops()
}

#[test]
fn every_acknowledged_append_survives_a_power_cut_at_any_write_or_sync() {
    let cuts = power_cuts(1..=6, false);
    assert!(
        cuts.crash_points >= 1000,
        "only {} crash points",
        cuts.crash_points
    );
    // The images exercise sidecars: most reopens take sealed segments from them, and some meet a
    // sidecar the cut left torn or stale.
    assert!(
        cuts.from_sidecars >= cuts.crash_points / 2,
        "{} reopens used sidecars",
        cuts.from_sidecars
    );
    assert!(cuts.sidecars_refused > 0, "no reopen met a torn sidecar");
}

/// The same with lone appends committed on their producer's thread (`commit_on_caller`): the
/// power goes off inside a write or sync made by the caller as well as by the writer thread.
#[test]
fn every_acknowledged_append_survives_a_power_cut_when_callers_commit_their_own_appends() {
    let cuts = power_cuts(7..=10, true);
    assert!(
        cuts.crash_points >= 500,
        "only {} crash points",
        cuts.crash_points
    );
    assert!(cuts.from_sidecars > 0, "no reopen used sidecars");
}

/// What a run of power cuts met.
struct Cuts {
    crash_points: usize,
    /// Reopens that took segments from their sidecars.
    from_sidecars: usize,
    /// Reopens that refused a sidecar the cut left torn or stale.
    sidecars_refused: usize,
}

/// Cuts the power at every write or sync of each seed's workload (and sometimes again during
/// recovery).
fn power_cuts(seeds: std::ops::RangeInclusive<u64>, on_caller: bool) -> Cuts {
    let mut crash_points = 0;
    let mut cut_during_recovery = 0;
    // Reopens that took segments from their sidecars, and that refused one (cut by the power).
    let mut from_sidecars = 0;
    let mut sidecars_refused = 0;
    for seed in seeds {
        let total = total_ops(seed, on_caller);
        for n in 1..=total + 2 {
            let context = format!("seed {seed}, crash at op {n} of {total}");
            let fs = SimFs::new();
            fs.fault_after(n, FaultMode::PowerCut);
            let mut acked = match open_as(&fs, on_caller) {
                Ok(store) => {
                    let chain = AppendChain::new();
                    chain.set_producer_waits(true);
                    let acked = workload(&store, seed, on_caller.then_some(&chain));
                    drop(store);
                    acked
                }
                Err(_) => Acked::default(),
            };
            crash_points += 1;
            let mut image = fs.crash_image(seed * 1_000_003 + n);
            if n % 4 == 0 {
                // Cut the power again while the image recovers.
                image.fault_after(1 + n % 7, FaultMode::PowerCut);
                if let Ok(store) = open(&image) {
                    drop(store);
                }
                image = image.crash_image(seed ^ n);
                cut_during_recovery += 1;
            }
            let store = open(&image).unwrap_or_else(|e| panic!("{context}: reopen failed: {e}"));
            from_sidecars += usize::from(store.recovery().from_sidecar > 0);
            sidecars_refused += usize::from(store.recovery().sidecars_rejected > 0);
            verify(&store, &acked, &context);
            // The recovered store keeps working, and a clean reopen agrees.
            let q = QueueName::new("a").expect("name");
            acked.submitted.insert(b"after".to_vec());
            store
                .append(&[q], Bytes::from_static(b"after"), None)
                .wait()
                .unwrap_or_else(|e| panic!("{context}: append after recovery: {e}"));
            store.close().expect("close");
            let again = open(&image).unwrap_or_else(|e| panic!("{context}: second reopen: {e}"));
            verify(&again, &acked, &format!("{context}, second reopen"));
        }
    }
    eprintln!(
        "{crash_points} crash points, {cut_during_recovery} also cut during recovery; \
         {from_sidecars} reopens used sidecars, {sidecars_refused} refused one"
    );
    Cuts {
        crash_points,
        from_sidecars,
        sidecars_refused,
    }
}
