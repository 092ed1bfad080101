//! A run's verdict (issue 15's fields) and the sequence arithmetic behind it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::SimError;

/// What one run measured. Counts are of sequence numbers; times in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Verdict {
    /// "crash", "zombie", "partition", "double-start", "backlog", "stale-restart".
    pub scenario: String,
    /// Its number within the batch.
    pub run: u32,
    /// The seed of this run's random timing (`edgehub-failover run --seed`).
    pub seed: u64,
    /// The hub binary that ran.
    pub hub_binary: String,
    /// The epoch A started with (the controller's).
    pub epoch_a: u64,
    /// The epoch B started with (A's + 1; the same in double-start).
    pub epoch_b: u64,
    /// Messages the sender was to send.
    pub planned: u64,
    /// Distinct sequence numbers the hub acknowledged to the sender.
    pub acked: u64,
    /// Deliveries to the receiver (duplicates included).
    pub delivered: u64,
    /// Acknowledged sequence numbers never delivered. Target 0.
    pub acked_but_lost: u64,
    /// The first few of them.
    pub lost_examples: Vec<i64>,
    /// Deliveries beyond the first of a sequence number (allowed after a failure).
    pub duplicates: u64,
    /// Sequence numbers first delivered after a higher one. Target 0.
    pub reordered: u64,
    /// From B's start to the receiver's first delivery after it (target < 2000; reported,
    /// never asserted).
    pub b_start_to_first_delivery_ms: Option<u64>,
    /// From B's start to its "edgehub ready" line (store recovery included).
    pub b_ready_ms: Option<u64>,
    /// From A's death (kill, stop, cut) to the sender's next acknowledgement.
    pub a_death_to_next_ack_ms: Option<u64>,
    /// Messages a stale A stored (so could have acknowledged) after B opened, from A's own
    /// `edgehub_store_appends_total` (zombie, partition). Target 0.
    pub stale_acks: Option<u64>,
    /// Acknowledgements a module on A's own node got from A after B opened (zombie,
    /// partition; that module still reaches A). Target 0.
    pub stale_acks_to_local_module: Option<u64>,
    /// Deliveries a stale A counted after B opened (`edgehub_messages_sent_total`).
    pub stale_deliveries: Option<u64>,
    /// Bytes A sent to modules through the Service after B opened (any PUBACK or delivery
    /// from A would be among them).
    pub stale_bytes_to_modules: u64,
    /// Starts of a stale A (old epoch) that opened the volume (stale-restart). Target 0.
    pub stale_reopenings: u64,
    /// How each stale restart ended (exit codes; stale-restart).
    pub stale_restart_exits: Vec<Option<i32>>,
    /// /healthz answers of B that were not 200 while A restarted (stale-restart).
    pub b_unhealthy_probes: u64,
    /// Whether the volume was empty when both started (double-start).
    pub fresh_volume: Option<bool>,
    /// Nodes that stored a message (double-start: exactly one serves). Target 1 there.
    pub serving_nodes: Option<u64>,
    /// What the old (fenced or stale) A did by the end of the run: "exited(N)",
    /// "running, healthz 503", … (a fenced hub is to exit; recorded, not required).
    pub a_outcome: String,
    /// Backlog held by A when it died (backlog), bytes of message bodies.
    pub backlog_bytes: u64,
    /// Times the modules' scripts were restarted (an SDK thread died, …).
    pub module_restarts: u32,
    /// Whether the run got every acknowledged message delivered before its failure bound.
    pub completed: bool,
    /// Whether every asserted target holds.
    pub targets_met: bool,
    /// Why not, or anything else worth reading.
    pub notes: Vec<String>,
}

/// Loss, duplicates and reordering of `delivered` (in arrival order) against `acked`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SeqCheck {
    /// Acknowledged, never delivered.
    pub lost: Vec<i64>,
    /// Deliveries beyond the first.
    pub duplicates: u64,
    /// First deliveries below an earlier first delivery.
    pub reordered: u64,
}

/// Compares what the receiver got with what the sender was told is stored.
pub fn check(acked: &BTreeSet<i64>, delivered: &[i64]) -> SeqCheck {
    let mut seen: BTreeMap<i64, u64> = BTreeMap::new();
    let mut highest: Option<i64> = None;
    let mut out = SeqCheck::default();
    for &s in delivered {
        let c = seen.entry(s).or_insert(0);
        *c += 1;
        if *c > 1 {
            out.duplicates += 1;
            continue;
        }
        if matches!(highest, Some(h) if s < h) {
            out.reordered += 1;
        }
        highest = Some(highest.map_or(s, |h| h.max(s)));
    }
    out.lost = acked
        .iter()
        .filter(|s| !seen.contains_key(s))
        .copied()
        .collect();
    out
}

impl Verdict {
    /// Sets `targets_met` from the asserted targets: nothing acknowledged lost, nothing
    /// reordered, no stale acknowledgement, no stale reopening, one serving node in a double
    /// start, and a run that completed.
    pub fn judge(&mut self) {
        let mut why = Vec::new();
        if !self.completed {
            why.push("the run did not complete within its failure bound".to_owned());
        }
        if self.acked_but_lost > 0 {
            why.push(format!(
                "{} acknowledged messages lost",
                self.acked_but_lost
            ));
        }
        if self.reordered > 0 {
            why.push(format!("{} messages reordered", self.reordered));
        }
        if self.stale_acks.unwrap_or(0) > 0 {
            why.push(format!(
                "a stale A stored {:?} messages after B opened",
                self.stale_acks
            ));
        }
        if self.stale_acks_to_local_module.unwrap_or(0) > 0 {
            why.push(format!(
                "A acknowledged {:?} publishes of a module on its node after B opened",
                self.stale_acks_to_local_module
            ));
        }
        if self.stale_reopenings > 0 {
            why.push(format!(
                "a stale A opened the volume {} times",
                self.stale_reopenings
            ));
        }
        if self.serving_nodes.is_some_and(|n| n != 1) {
            why.push(format!("{:?} nodes stored messages", self.serving_nodes));
        }
        self.targets_met = why.is_empty();
        self.notes.extend(why);
    }

    /// Writes it as `DIR/SCENARIO-RUN.json`.
    pub fn write(&self, dir: &Path) -> Result<std::path::PathBuf, SimError> {
        let path = dir.join(format!("{}-{:03}.json", self.scenario, self.run));
        let text = serde_json::to_string_pretty(self).map_err(|e| SimError::Verdict {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        std::fs::write(&path, text + "\n").map_err(|e| SimError::Verdict {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_loss_duplicates_and_reordering() {
        let acked: BTreeSet<i64> = (0..6).collect();
        let c = check(&acked, &[0, 1, 1, 3, 2, 5]);
        assert_eq!(c.lost, vec![4]);
        assert_eq!(c.duplicates, 1);
        assert_eq!(c.reordered, 1, "2 came after 3");
        let clean = check(&acked, &[0, 1, 2, 2, 3, 4, 5]);
        assert_eq!(
            clean,
            SeqCheck {
                lost: vec![],
                duplicates: 1,
                reordered: 0
            }
        );
    }

    #[test]
    fn a_redelivered_tail_after_a_failover_is_duplicates_not_reordering() {
        // B redelivers 3..5 (not checkpointed by A) after A delivered up to 5.
        let acked: BTreeSet<i64> = (0..8).collect();
        let c = check(&acked, &[0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]);
        assert_eq!(
            c,
            SeqCheck {
                lost: vec![],
                duplicates: 3,
                reordered: 0
            }
        );
    }

    #[test]
    fn judging_names_every_missed_target() {
        let mut v = Verdict {
            completed: true,
            ..Verdict::default()
        };
        v.judge();
        assert!(v.targets_met, "{v:?}");
        let mut v = Verdict {
            completed: true,
            acked_but_lost: 1,
            stale_acks: Some(2),
            serving_nodes: Some(2),
            ..Verdict::default()
        };
        v.judge();
        assert!(!v.targets_met);
        assert_eq!(v.notes.len(), 3, "{:?}", v.notes);
    }
}
