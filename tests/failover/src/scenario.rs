//! The six scenarios of issue 15, each one run with its own seeded random timing.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::SimError;
use crate::forward::{Backend, Forwarder};
use crate::module::{Line, Module, Role, SdkEnv};
use crate::net::{Net, Space};
use crate::node::{self, Hub, Start};
use crate::verdict::{check, Verdict};

/// The controller's epoch for the first hub (the contract's ConfigMap starts at 1).
pub const FIRST_EPOCH: u64 = 1;
/// Failure bound for a hub's start (store recovery of a large backlog included).
const START_WITHIN: Duration = Duration::from_secs(120);
/// Body size of a backlog message (under the hub's 256 KiB limit).
pub const BACKLOG_PAYLOAD: usize = 64 * 1024;
/// The first number a module on A's node sends (zombie, partition).
pub const STRANDED_FIRST: i64 = 1_000_000;
const APPENDS: &str = "edgehub_store_appends_total";
const SENT: &str = "edgehub_messages_sent_total";

/// Issue 15's scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// 1. SIGKILL A mid-stream; start B on the volume.
    Crash,
    /// 2. SIGSTOP A with publishes in flight; start B; modules move; SIGCONT A.
    Zombie,
    /// 3. A's link cut while A keeps running; start B.
    Partition,
    /// 4. A and B start on the volume at the same moment; exactly one serves.
    DoubleStart,
    /// 5. A dies holding an undelivered backlog; B serves it in order.
    Backlog,
    /// 6. After B took over, A restarts again and again with its old epoch.
    StaleRestart,
}

impl Scenario {
    /// All six, in the issue's order.
    pub const ALL: [Scenario; 6] = [
        Scenario::Crash,
        Scenario::Zombie,
        Scenario::Partition,
        Scenario::DoubleStart,
        Scenario::Backlog,
        Scenario::StaleRestart,
    ];

    /// Its name in verdicts and file names.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Crash => "crash",
            Scenario::Zombie => "zombie",
            Scenario::Partition => "partition",
            Scenario::DoubleStart => "double-start",
            Scenario::Backlog => "backlog",
            Scenario::StaleRestart => "stale-restart",
        }
    }
}

/// What every run shares.
#[derive(Clone, Debug)]
pub struct Config {
    /// The `edgehub` binary the nodes run.
    pub hub_bin: PathBuf,
    /// Where verdicts (and each run's logs, in `SCENARIO-RUN.d/`) go.
    pub out_dir: PathBuf,
    /// Messages in the sender's stream (backlog: added to the backlog).
    pub messages: u64,
    /// Scenario 5's backlog, bytes of message bodies.
    pub backlog_bytes: u64,
    /// The epoch scenario 6 restarts A with (None: its old one). Giving it B's epoch plays a
    /// stale pod that re-read a refreshed epoch (a mounted ConfigMap): the suite must catch
    /// the ping-pong that follows.
    pub stale_epoch: Option<u64>,
}

/// One run of `scenario`: sets up nodes, Service and modules, plays it with timing drawn from
/// `seed`, writes and returns the verdict. An error is a run that could not be carried out.
pub fn run(cfg: &Config, scenario: Scenario, run: u32, seed: u64) -> Result<Verdict, SimError> {
    let work = cfg.out_dir.join(format!("{}-{run:03}.d", scenario.name()));
    std::fs::create_dir_all(&work)
        .map_err(|e| SimError::io(format!("create {}", work.display()), e))?;
    let volume = work.join("volume");
    let result = Sim::new(cfg, scenario, run, seed, &work, &volume).and_then(|mut sim| {
        let mut v = sim.play()?;
        v.judge();
        Ok(v)
    });
    // The volume can be large (backlog); the logs stay next to the verdict.
    let _ = std::fs::remove_dir_all(&volume);
    let v = result?;
    v.write(&cfg.out_dir)?;
    Ok(v)
}

struct Sim<'a> {
    cfg: &'a Config,
    scenario: Scenario,
    rng: StdRng,
    v: Verdict,
    work: PathBuf,
    volume: PathBuf,
    sdk: SdkEnv,
    fwd: Forwarder,
    net: Net,
    run_id: String,
    t0: Instant,
}

impl<'a> Sim<'a> {
    fn new(
        cfg: &'a Config,
        scenario: Scenario,
        run: u32,
        seed: u64,
        work: &Path,
        volume: &Path,
    ) -> Result<Sim<'a>, SimError> {
        let sdk = SdkEnv::locate()?;
        let net = Net::new(&["a", "b"], &["s", "r"])?;
        let fwd = Forwarder::new()?;
        for (label, role) in [("sender", "s"), ("receiver", "r")] {
            let space = space(&net, role)?;
            fwd.listen(label, SocketAddr::from((space.host_ip, node::MQTT_PORT)))?;
        }
        let v = Verdict {
            scenario: scenario.name().to_owned(),
            run,
            seed,
            hub_binary: cfg.hub_bin.display().to_string(),
            epoch_a: FIRST_EPOCH,
            epoch_b: FIRST_EPOCH + 1,
            ..Verdict::default()
        };
        Ok(Sim {
            cfg,
            scenario,
            rng: StdRng::seed_from_u64(seed),
            v,
            work: work.to_owned(),
            volume: volume.to_owned(),
            sdk,
            fwd,
            net,
            run_id: format!("{}-{run}", scenario.name()),
            t0: Instant::now(),
        })
    }

    fn space(&self, role: &str) -> Result<&Space, SimError> {
        space(&self.net, role)
    }

    fn backend(&self, node: &str) -> Result<Backend, SimError> {
        Ok(Backend {
            node: node.to_owned(),
            addr: SocketAddr::from((self.space(node)?.ns_ip, node::MQTT_PORT)),
        })
    }

    fn spawn_hub(&self, node: &str, epoch: u64) -> Result<Hub, SimError> {
        Hub::spawn(
            &self.cfg.hub_bin,
            node,
            self.space(node)?,
            &self.volume,
            epoch,
            &self.work.join(format!("hub-{node}.log")),
        )
    }

    fn ready(&self, hub: &mut Hub) -> Result<(), SimError> {
        match hub.wait_start(START_WITHIN) {
            Start::Ready => Ok(()),
            other => Err(SimError::NotReady {
                node: hub.node.clone(),
                why: format!("{other:?}"),
                log: hub.log_path.clone(),
            }),
        }
    }

    /// The two modules' connection strings and the CA (identities exist once a hub ran).
    fn credentials(&self) -> Result<(String, String, PathBuf), SimError> {
        let bin = &self.cfg.hub_bin;
        let cs_s = node::cli(bin, &["connection-string", "sender"], &self.volume)?;
        let cs_r = node::cli(bin, &["connection-string", "receiver"], &self.volume)?;
        let ca = PathBuf::from(node::cli(bin, &["ca-path"], &self.volume)?);
        Ok((cs_s, cs_r, ca))
    }

    fn receiver(&self, cs: &str, ca: &Path) -> Result<Module, SimError> {
        Ok(Module::start(
            &self.sdk,
            self.space("r")?,
            Role::Receiver,
            cs,
            ca,
            &self.run_id,
        ))
    }

    fn sender(
        &self,
        cs: &str,
        ca: &Path,
        count: u64,
        interval_ms: u64,
        payload: usize,
    ) -> Result<Module, SimError> {
        let role = Role::Sender {
            first: 0,
            count,
            interval_ms,
            payload_size: payload,
        };
        Ok(Module::start(
            &self.sdk,
            self.space("s")?,
            role,
            cs,
            ca,
            &self.run_id,
        ))
    }

    fn play(&mut self) -> Result<Verdict, SimError> {
        match self.scenario {
            Scenario::DoubleStart => self.double_start(),
            Scenario::Backlog => self.backlog(),
            _ => self.takeover(),
        }
    }

    /// Crash, zombie, partition and stale restart: A serves a stream; at a random moment A
    /// dies its way; B starts at A's epoch + 1 and the Service follows it.
    fn takeover(&mut self) -> Result<Verdict, SimError> {
        let count = self.cfg.messages;
        self.v.planned = count;
        let interval = self.rng.gen_range(5..=15);
        let fail_at = self.rng.gen_range(count / 5..=count / 2).max(1) as usize;
        let mut a = self.spawn_hub("a", FIRST_EPOCH)?;
        self.ready(&mut a)?;
        self.fwd.designate(Some(self.backend("a")?));
        let (cs_s, cs_r, ca) = self.credentials()?;
        let rx = self.receiver(&cs_r, &ca)?;
        self.expect(&rx, "receiver connected", |l| has_event(l, "ready"))?;
        let tx = self.sender(&cs_s, &ca, count, interval, 0)?;
        self.expect(&tx, "sender's acknowledgements before the failure", |l| {
            data_count(l) >= fail_at
        })?;

        let mut base = None;
        let a_death;
        match self.scenario {
            Scenario::Zombie => {
                // Freeze the modules so A settles, read A's counters, stop A, then let the
                // modules publish into the stopped A (in flight) for a random moment.
                tx.signal("STOP")?;
                rx.signal("STOP")?;
                base = settled(&a);
                a_death = Instant::now();
                a.signal("STOP")?;
                tx.signal("CONT")?;
                rx.signal("CONT")?;
                thread::sleep(Duration::from_millis(self.rng.gen_range(100..600)));
                self.fwd.designate(None);
            }
            Scenario::Partition => {
                a_death = Instant::now();
                self.space("a")?.cut()?;
                self.fwd.designate(None);
                base = settled(&a);
            }
            _ => {
                a_death = Instant::now();
                a.signal("KILL")?;
                self.fwd.designate(None);
            }
        }
        let b_start = Instant::now();
        // Anything A sends to modules from now on is after B opened (B's start bounds it).
        self.fwd.mark_stale("a");
        let mut b = self.spawn_hub("b", FIRST_EPOCH + 1)?;
        self.ready(&mut b)?;
        self.v.b_ready_ms = Some(ms(b_start.elapsed()));
        self.fwd.designate(Some(self.backend("b")?));

        if self.scenario == Scenario::Zombie {
            // Modules move to B; after a random number of B's acknowledgements, thaw A.
            let more = data_count(&tx.lines()) + self.rng.gen_range(5..30) as usize;
            let _ = tx.wait(self.bound(), |l| data_count(l) >= more.min(count as usize));
            a.signal("CONT")?;
        }
        let stranded = if matches!(self.scenario, Scenario::Zombie | Scenario::Partition) {
            Some(self.stranded(&mut a, &cs_s, &ca)?)
        } else {
            None
        };
        if self.scenario == Scenario::StaleRestart {
            self.stale_restarts(&b)?;
        }

        if self.v.stale_reopenings > 0 {
            // B is fenced for good by then: the stream cannot complete; say so at once.
            self.v
                .notes
                .push("B was fenced by a stale reopening; the stream stopped".into());
        } else {
            self.v.completed = self.complete(&tx, &rx);
        }
        if matches!(self.scenario, Scenario::Zombie | Scenario::Partition) {
            let after = settled(&a);
            let (base_appends, base_sent) = base.unwrap_or((0, 0));
            match after {
                Some((appends, sent)) => {
                    self.v.stale_acks = Some(appends.saturating_sub(base_appends));
                    self.v.stale_deliveries = Some(sent.saturating_sub(base_sent));
                }
                None => self.v.notes.push(format!(
                    "A's counters were unreadable at the end ({}): stale acks from the module on \
                     A's node and the Service's bytes only",
                    a.outcome()
                )),
            }
            if let Some(mut m) = stranded {
                self.v.stale_acks_to_local_module = Some(data_count(&m.lines()) as u64);
                m.stop();
            }
            if base.is_none() {
                self.v
                    .notes
                    .push("A's counters were unreadable before B started".into());
            }
            self.v.a_outcome = a.outcome();
        } else if self.v.a_outcome.is_empty() {
            self.v.a_outcome = "killed (SIGKILL)".into();
        }
        self.finish(&tx, &rx, Some(a_death), b_start);
        drop(b);
        Ok(self.v.clone())
    }

    /// A module on A's own node (zombie, partition): it still reaches A after B opened (A's
    /// node's Service rules are as stale as A). It sends numbers from [`STRANDED_FIRST`]; A
    /// must acknowledge none. Returns once A met one of its publishes: A's store said it is
    /// fenced, A exited, or A acknowledged one (the failure the verdict then shows).
    fn stranded(&self, a: &mut Hub, cs: &str, ca: &Path) -> Result<Module, SimError> {
        let role = Role::Sender {
            first: STRANDED_FIRST,
            count: 20,
            interval_ms: 50,
            payload_size: 0,
        };
        let run_id = format!("{}-stranded", self.run_id);
        let m = Module::start(&self.sdk, self.space("a")?, role, cs, ca, &run_id);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if a.log_contains("fenced") || a.exit_status().is_some() || data_count(&m.lines()) > 0 {
                break;
            }
            if Instant::now() >= deadline {
                return Err(SimError::Stalled {
                    what: format!("{}: a module on A's node", self.run_id),
                    detail: format!(
                        "A neither refused, acknowledged nor exited within 60 s; module exits {:?}: {}",
                        m.exits(),
                        m.stderr_tail()
                    ),
                });
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(m)
    }

    /// Scenario 6's middle: A restarted 3-6 times at its old epoch while B serves.
    fn stale_restarts(&mut self, b: &Hub) -> Result<(), SimError> {
        let times = self.rng.gen_range(3..=6);
        for _ in 0..times {
            thread::sleep(Duration::from_millis(self.rng.gen_range(50..400)));
            let epoch = self.cfg.stale_epoch.unwrap_or(FIRST_EPOCH);
            let mut stale = self.spawn_hub("a", epoch)?;
            let start = stale.wait_start(START_WITHIN);
            // An open the store refused logs no "store opened" (the store's own line).
            if start != Start::Ready && stale.log_contains("store opened") {
                self.v.stale_reopenings += 1;
                self.v
                    .notes
                    .push("a stale restart opened the store, then exited".into());
            }
            match start {
                Start::Ready => {
                    self.v.stale_reopenings += 1;
                    let _ = stale.signal("KILL");
                    self.v.stale_restart_exits.push(None);
                }
                Start::Exited(code) => self.v.stale_restart_exits.push(code),
                Start::TimedOut => {
                    self.v.stale_reopenings += 1;
                    self.v
                        .notes
                        .push("a stale restart neither failed nor became ready".into());
                    let _ = stale.signal("KILL");
                    self.v.stale_restart_exits.push(None);
                }
            }
            if !matches!(b.http("/healthz"), Some((200, _))) {
                self.v.b_unhealthy_probes += 1;
            }
        }
        self.v.a_outcome = format!("stale restarts exited {:?}", self.v.stale_restart_exits);
        Ok(())
    }

    /// Scenario 4: both start at once at the same epoch. The Service follows readiness (as a
    /// Service's endpoints do): it sends to a ready node and moves when that node's /readyz
    /// stops answering 200.
    fn double_start(&mut self) -> Result<Verdict, SimError> {
        let count = self.cfg.messages;
        self.v.planned = count;
        self.v.epoch_b = FIRST_EPOCH;
        let interval = self.rng.gen_range(5..=15);
        // Even runs on an empty volume (a first deployment), odd runs on one the hub's CLI
        // initialized (identities, CA, record: a volume that served before), so two runs
        // cover both.
        let fresh = self.v.run.is_multiple_of(2);
        self.v.fresh_volume = Some(fresh);
        let early = if fresh {
            None
        } else {
            Some(self.credentials()?)
        };
        let b_start = Instant::now();
        let mut hubs = [
            self.spawn_hub("a", FIRST_EPOCH)?,
            self.spawn_hub("b", FIRST_EPOCH)?,
        ];
        let starts: Vec<Start> = hubs
            .iter_mut()
            .map(|h| h.wait_start(START_WITHIN))
            .collect();
        let ready: Vec<usize> = (0..2).filter(|&i| starts[i] == Start::Ready).collect();
        if ready.is_empty() {
            return Err(SimError::NotReady {
                node: "a and b".into(),
                why: format!("{starts:?}"),
                log: self.work.clone(),
            });
        }
        let mut current = ready[self.rng.gen_range(0..ready.len())];
        self.fwd.designate(Some(self.backend(&hubs[current].node)?));
        let (cs_s, cs_r, ca) = match early {
            Some(c) => c,
            None => self.credentials()?,
        };
        let rx = self.receiver(&cs_r, &ca)?;
        let tx = self.sender(&cs_s, &ca, count, interval, 0)?;
        // The readiness probe (a period, as a kubelet's): the Service's model, not a wait.
        let deadline = Instant::now() + self.bound();
        let mut moves = 0;
        loop {
            if complete_now(&tx, &rx) || Instant::now() >= deadline {
                break;
            }
            if !matches!(hubs[current].http("/readyz"), Some((200, _))) {
                let other = 1 - current;
                if matches!(hubs[other].http("/readyz"), Some((200, _))) {
                    current = other;
                    moves += 1;
                    self.fwd.designate(Some(self.backend(&hubs[current].node)?));
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
        self.v.completed = complete_now(&tx, &rx);
        let serving = hubs
            .iter()
            .filter(|h| h.counter(APPENDS).is_some_and(|n| n > 0))
            .count();
        self.v.serving_nodes = Some(serving as u64);
        self.v.a_outcome = format!(
            "starts {:?}; at the end a: {}, b: {}; the Service moved {moves} times",
            starts,
            hubs[0].outcome(),
            hubs[1].outcome()
        );
        self.finish(&tx, &rx, None, b_start);
        Ok(self.v.clone())
    }

    /// Scenario 5: no receiver while A takes a backlog; A dies just after; B serves it.
    fn backlog(&mut self) -> Result<Verdict, SimError> {
        let backlog_msgs = (self.cfg.backlog_bytes / BACKLOG_PAYLOAD as u64).max(1);
        let count = backlog_msgs + self.cfg.messages.min(50);
        self.v.planned = count;
        let fail_at = (backlog_msgs + self.rng.gen_range(0..20)) as usize;
        let mut a = self.spawn_hub("a", FIRST_EPOCH)?;
        self.ready(&mut a)?;
        self.fwd.designate(Some(self.backend("a")?));
        let (cs_s, cs_r, ca) = self.credentials()?;
        let tx = self.sender(&cs_s, &ca, count, 0, BACKLOG_PAYLOAD)?;
        self.expect(&tx, "the backlog acknowledged", |l| {
            data_count(l) >= fail_at.min(count as usize)
        })?;
        let acked_then = data_count(&tx.lines()) as u64;
        self.v.backlog_bytes = acked_then * BACKLOG_PAYLOAD as u64;
        let a_death = Instant::now();
        a.signal("KILL")?;
        self.fwd.designate(None);
        // The receiver starts now and waits at the Service, as a module whose hub is away.
        let rx = self.receiver(&cs_r, &ca)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.fwd.accepted("receiver") == 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        let b_start = Instant::now();
        self.fwd.mark_stale("a");
        let mut b = self.spawn_hub("b", FIRST_EPOCH + 1)?;
        self.ready(&mut b)?;
        self.v.b_ready_ms = Some(ms(b_start.elapsed()));
        self.fwd.designate(Some(self.backend("b")?));
        self.v.completed = self.complete(&tx, &rx);
        self.v.a_outcome = "killed (SIGKILL)".into();
        self.finish(&tx, &rx, Some(a_death), b_start);
        drop(b);
        Ok(self.v.clone())
    }

    /// Writes every line a module printed (acknowledgements or deliveries, status lines) to
    /// `RUN.d/FILE`, each with `at_ms`, when the simulation read it since the run began.
    fn record(&self, file: &str, lines: &[Line]) -> std::io::Result<()> {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(self.work.join(file))?);
        for l in lines {
            let mut v = l.value.clone();
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "at_ms".into(),
                    ms(l.at.saturating_duration_since(self.t0)).into(),
                );
            }
            writeln!(out, "{v}")?;
        }
        out.flush()
    }

    /// The failure bound of a run's stream (a loaded machine; never what a run waits for).
    fn bound(&self) -> Duration {
        Duration::from_secs(180 + self.cfg.backlog_bytes / (512 * 1024))
    }

    fn expect(&self, m: &Module, what: &str, ok: impl Fn(&[Line]) -> bool) -> Result<(), SimError> {
        if m.wait(self.bound(), ok) {
            Ok(())
        } else {
            Err(SimError::Stalled {
                what: format!("{}: waiting for {what}", self.run_id),
                detail: format!("exits {:?}; stderr: {}", m.exits(), m.stderr_tail()),
            })
        }
    }

    /// Waits until the sender is done and the receiver has every acknowledged number.
    fn complete(&self, tx: &Module, rx: &Module) -> bool {
        rx.wait(self.bound(), |got| {
            tx.done() && {
                let have: BTreeSet<i64> = got.iter().filter_map(Line::seq).collect();
                tx.seqs().iter().all(|s| have.contains(s))
            }
        })
    }

    /// Stops the modules and fills the sequence and timing fields.
    fn finish(&mut self, tx: &Module, rx: &Module, a_death: Option<Instant>, b_start: Instant) {
        let sent = tx.lines();
        let got = rx.lines();
        for (file, lines) in [("acks.jsonl", &sent), ("deliveries.jsonl", &got)] {
            if let Err(e) = self.record(file, lines) {
                self.v.notes.push(format!("could not record {file}: {e}"));
            }
        }
        let acked: BTreeSet<i64> = sent.iter().filter_map(Line::seq).collect();
        let delivered: Vec<i64> = got.iter().filter_map(Line::seq).collect();
        let c = check(&acked, &delivered);
        self.v.acked = acked.len() as u64;
        self.v.delivered = delivered.len() as u64;
        self.v.acked_but_lost = c.lost.len() as u64;
        self.v.lost_examples = c.lost.iter().take(10).copied().collect();
        self.v.duplicates = c.duplicates;
        self.v.reordered = c.reordered;
        // Count only lines read after the live node's first byte to that module: a line of
        // the old node's, read late from the pipe, must not pass for the new node's.
        let live = self.fwd.designated().map(|b| b.node).unwrap_or_default();
        let rx_from = self
            .fwd
            .first_byte("receiver", &live)
            .map(|t| t.max(b_start));
        self.v.b_start_to_first_delivery_ms = rx_from.and_then(|from| {
            got.iter()
                .find(|l| l.seq().is_some() && l.at >= from)
                .map(|l| ms(l.at - b_start))
        });
        let tx_from = self.fwd.first_byte("sender", &live);
        self.v.a_death_to_next_ack_ms = a_death.zip(tx_from).and_then(|(d, from)| {
            sent.iter()
                .find(|l| l.seq().is_some() && l.at >= from.max(d))
                .map(|l| ms(l.at - d))
        });
        self.v.stale_bytes_to_modules = self.fwd.stale_bytes();
        self.v.module_restarts = tx.restarts() + rx.restarts();
        if !self.v.completed {
            self.v.notes.push(format!(
                "sender exits {:?} ({}), receiver exits {:?} ({})",
                tx.exits(),
                tx.stderr_tail().trim(),
                rx.exits(),
                rx.stderr_tail().trim()
            ));
        }
    }
}

fn space<'n>(net: &'n Net, role: &str) -> Result<&'n Space, SimError> {
    net.space(role).ok_or_else(|| SimError::Command {
        what: format!("namespace {role}"),
        detail: "not made".into(),
    })
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn has_event(lines: &[Line], event: &str) -> bool {
    lines
        .iter()
        .any(|l| l.value.get("event").and_then(|e| e.as_str()) == Some(event))
}

fn data_count(lines: &[Line]) -> usize {
    lines.iter().filter(|l| l.seq().is_some()).count()
}

/// The sender printed "done" and every number it had acknowledged has been delivered.
fn complete_now(tx: &Module, rx: &Module) -> bool {
    if !tx.done() {
        return false;
    }
    let acked: BTreeSet<i64> = tx.seqs().into_iter().collect();
    let got: BTreeSet<i64> = rx.seqs().into_iter().collect();
    acked.is_subset(&got)
}

/// A's store appends and deliveries once they stop changing (None: unreadable).
fn settled(hub: &Hub) -> Option<(u64, u64)> {
    let appends = hub.settled_counter(APPENDS, Duration::from_secs(10))?;
    let sent = hub.counter(SENT)?;
    Some((appends, sent))
}
