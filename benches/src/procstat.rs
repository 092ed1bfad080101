//! CPU time and memory of processes and of the machine, from `/proc` (Linux).

use serde::Serialize;
use std::collections::HashMap;

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`, 100 on every
/// Linux architecture the project runs on).
pub const TICKS_PER_S: f64 = 100.0;

/// `(pid, ppid, utime + stime in ticks)` of every process.
fn all_processes() -> Vec<(u32, u32, u64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((ppid, ticks)) = stat_of(pid) {
            out.push((pid, ppid, ticks));
        }
    }
    out
}

/// `(ppid, utime + stime)` of one process.
fn stat_of(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // rest[0] = state (field 3); ppid = field 4; utime = 14; stime = 15.
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// `pid` and all its descendants.
pub fn tree_of(pid: u32) -> Vec<u32> {
    let procs = all_processes();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (p, pp, _) in &procs {
        children.entry(*pp).or_default().push(*p);
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c.iter().copied());
        }
        i += 1;
    }
    out
}

/// CPU seconds used so far by `pid` and its descendants.
pub fn tree_cpu_secs(pid: u32) -> f64 {
    let ticks: u64 = tree_of(pid)
        .iter()
        .filter_map(|p| stat_of(*p))
        .map(|(_, t)| t)
        .sum();
    ticks as f64 / TICKS_PER_S
}

/// CPU seconds used so far by this process.
pub fn self_cpu_secs() -> f64 {
    stat_of(std::process::id()).map_or(0.0, |(_, t)| t as f64 / TICKS_PER_S)
}

/// Peak resident set size (`VmHWM`) of `pid` and its descendants, in KiB, summed.
pub fn tree_peak_rss_kib(pid: u32) -> u64 {
    tree_of(pid)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// Whole-machine CPU counters from `/proc/stat` (all CPUs).
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    /// Busy ticks (everything but idle and iowait).
    pub busy: u64,
    /// Interrupt and softirq ticks (loopback TCP work lands here, charged to no process).
    pub irq: u64,
    /// Ticks stolen by the hypervisor.
    pub steal: u64,
    /// All ticks.
    pub total: u64,
}

impl MachineCpu {
    /// Reads the counters now.
    pub fn now() -> MachineCpu {
        let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
            return MachineCpu::default();
        };
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        let total: u64 = v.iter().take(8).sum();
        MachineCpu {
            busy: total.saturating_sub(at(3) + at(4)),
            irq: at(5) + at(6),
            steal: at(7),
            total,
        }
    }

    /// Share of all CPUs busy between `earlier` and `self`, 0..1.
    pub fn busy_since(&self, earlier: &MachineCpu) -> f64 {
        self.share(earlier, |m| m.busy)
    }

    /// Share of all CPUs in interrupts/softirqs or stolen between `earlier` and `self`, 0..1.
    pub fn irq_steal_since(&self, earlier: &MachineCpu) -> f64 {
        self.share(earlier, |m| m.irq + m.steal)
    }

    fn share(&self, earlier: &MachineCpu, f: fn(&MachineCpu) -> u64) -> f64 {
        let t = self.total.saturating_sub(earlier.total);
        if t == 0 {
            return 0.0;
        }
        f(self).saturating_sub(f(earlier)) as f64 / t as f64
    }
}

/// Number of CPUs (from `/proc/stat`).
pub fn cpu_count() -> usize {
    std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count()
        .max(1)
}

/// CPU use over a window: this process, a broker tree, the machine.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct CpuWindow {
    /// Wall seconds of the window.
    pub wall_s: f64,
    /// CPU seconds of this process (the load generator).
    pub client_cpu_s: f64,
    /// CPU seconds of the broker and its children (0 without a broker pid).
    pub broker_cpu_s: f64,
    /// Share of all CPUs busy, 0..1.
    pub machine_busy: f64,
    /// Share of all CPUs in interrupts, softirqs (much of loopback TCP) or stolen by the hypervisor, 0..1.
    pub irq_steal: f64,
    /// Share of all CPUs used by other processes (busy less client, broker, irq, softirq, steal), 0..1.
    pub others_busy: f64,
}

/// A CPU snapshot to diff later with [`CpuMark::window`].
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    at: std::time::Instant,
    client: f64,
    broker: f64,
    machine: MachineCpu,
}

impl CpuMark {
    /// Snapshot now; `broker` is the broker's pid, if known.
    pub fn now(broker: Option<u32>) -> CpuMark {
        CpuMark {
            at: std::time::Instant::now(),
            client: self_cpu_secs(),
            broker: broker.map_or(0.0, tree_cpu_secs),
            machine: MachineCpu::now(),
        }
    }

    /// The window from `self` to `end`.
    pub fn window(&self, end: &CpuMark) -> CpuWindow {
        let wall_s = end.at.duration_since(self.at).as_secs_f64();
        let client_cpu_s = end.client - self.client;
        let broker_cpu_s = end.broker - self.broker;
        let machine_busy = end.machine.busy_since(&self.machine);
        let irq_steal = end.machine.irq_steal_since(&self.machine);
        let ncpu = cpu_count() as f64;
        let others = if wall_s > 0.0 {
            (machine_busy - irq_steal - (client_cpu_s + broker_cpu_s) / (wall_s * ncpu)).max(0.0)
        } else {
            0.0
        };
        CpuWindow {
            wall_s,
            client_cpu_s,
            broker_cpu_s,
            machine_busy,
            irq_steal,
            others_busy: others,
        }
    }
}
