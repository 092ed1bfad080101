//! Plain-text report tables, number formatting and targets.
//!
//! Reports show ratios next to absolute figures: the absolute numbers depend
//! on the disk, the ratios to the same run's raw `fdatasync` rate travel.

use serde::Serialize;
use std::fmt;

use crate::env::{FsInfo, Machine};
use crate::fsync::RawFsync;

/// An aligned text table: the first column left-aligned, the rest right.
#[derive(Debug, Clone, Default)]
pub struct Table {
    title: String,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    /// A table with a title and column headers.
    pub fn new(title: impl Into<String>, headers: &[&str]) -> Self {
        Table {
            title: title.into(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            ..Table::default()
        }
    }

    /// Appends a row; missing cells print empty, extra cells are kept.
    pub fn row<I, S>(&mut self, cells: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows.push(cells.into_iter().map(Into::into).collect());
        self
    }

    /// Appends a footnote printed under the table.
    pub fn note(&mut self, note: impl Into<String>) -> &mut Self {
        self.notes.push(note.into());
        self
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

fn width(s: &str) -> usize {
    s.chars().count()
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cols = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; cols];
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            for (w, cell) in widths.iter_mut().zip(line) {
                *w = (*w).max(width(cell));
            }
        }
        let render = |f: &mut fmt::Formatter<'_>, line: &[String]| -> fmt::Result {
            let mut out = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = line.get(i).map_or("", String::as_str);
                let pad = " ".repeat(w - width(cell));
                if i > 0 {
                    out.push_str("  ");
                }
                if i == 0 {
                    out.push_str(cell);
                    out.push_str(&pad);
                } else {
                    out.push_str(&pad);
                    out.push_str(cell);
                }
            }
            writeln!(f, "  {}", out.trim_end())
        };
        writeln!(f, "{}", self.title)?;
        render(f, &self.headers)?;
        let total = widths.iter().sum::<usize>() + 2 * cols.saturating_sub(1);
        writeln!(f, "  {}", "-".repeat(total))?;
        for row in &self.rows {
            render(f, row)?;
        }
        for note in &self.notes {
            writeln!(f, "  {note}")?;
        }
        Ok(())
    }
}

/// A count with thousands separators: `12345.6` → `12,346`.
pub fn count(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let n = x.round() as i128;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// A rate per second: `3534.2` → `3,534/s`.
pub fn rate(per_s: f64) -> String {
    format!("{}/s", count(per_s))
}

/// A ratio: `31.24` → `31.2×`, `0.034` → `0.03×`.
pub fn ratio(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    if x >= 10.0 {
        format!("{x:.1}×")
    } else {
        format!("{x:.2}×")
    }
}

/// `a / b`, or NaN when `b` is zero.
pub fn div(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        f64::NAN
    } else {
        a / b
    }
}

/// A duration given in microseconds: `265.0` → `265 µs`, `1234.0` → `1.23 ms`,
/// `2_500_000.0` → `2.50 s`.
pub fn micros(us: f64) -> String {
    if !us.is_finite() {
        "-".into()
    } else if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1_000.0)
    } else {
        format!("{:.2} s", us / 1_000_000.0)
    }
}

/// A byte count in binary units: `1073741824` → `1.00 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// A goal shown next to a figure. Reports never fail on a missed target;
/// they say so.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is measured, e.g. "store, 64 appenders ÷ raw fdatasync".
    pub name: String,
    /// The goal, e.g. "≥ 30×".
    pub want: String,
    /// The measured value, formatted.
    pub got: String,
    /// Whether the goal was met; `None` when not measured.
    pub met: Option<bool>,
}

impl Target {
    /// A target that is met when `value >= goal`.
    pub fn at_least(name: &str, goal: f64, value: Option<f64>, fmt: fn(f64) -> String) -> Self {
        Target {
            name: name.into(),
            want: format!("≥ {}", fmt(goal)),
            got: value.map_or_else(|| "not measured".into(), fmt),
            met: value.map(|v| v >= goal),
        }
    }

    /// A target that is met when `value <= goal`.
    pub fn at_most(name: &str, goal: f64, value: Option<f64>, fmt: fn(f64) -> String) -> Self {
        Target {
            name: name.into(),
            want: format!("≤ {}", fmt(goal)),
            got: value.map_or_else(|| "not measured".into(), fmt),
            met: value.map(|v| v <= goal),
        }
    }
}

/// A table of targets with a met / MISSED column.
pub fn targets_table(title: &str, targets: &[Target]) -> Table {
    let mut t = Table::new(title, &["target", "goal", "measured", "status"]);
    for tg in targets {
        let status = match tg.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "-",
        };
        t.row([tg.name.as_str(), &tg.want, &tg.got, status]);
    }
    t
}

/// "data: DIR on FS (SOURCE, mounted at MOUNT)": where a bench wrote, for its report header.
pub fn data_line(bench_dir: &str, filesystem: Option<&FsInfo>) -> String {
    let fs = filesystem.map_or("an unknown filesystem".into(), |f| {
        format!("{} ({}, mounted at {})", f.fstype, f.source, f.mount_point)
    });
    format!("data: {bench_dir} on {fs}")
}

/// The raw 4 KiB append + fdatasync samples of a run, and the mean every ratio divides by.
pub fn raw_fdatasync_table(samples: &[RawFsync], reference: Option<f64>) -> Table {
    let mut raw = Table::new(
        "Raw disk: 4 KiB append + fdatasync, one writer",
        &["sample", "rate", "p50", "p99"],
    );
    for s in samples {
        raw.row([
            s.label.clone(),
            rate(s.rate_per_s),
            micros(s.latency.p50_us),
            micros(s.latency.p99_us),
        ]);
    }
    if let Some(rf) = reference {
        raw.row([
            "reference (mean)".to_string(),
            rate(rf),
            String::new(),
            String::new(),
        ]);
    }
    raw
}

/// The mean of `xs`; `None` when empty.
pub fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Prints what opens every report after its title line: where the data went, then the raw
/// fdatasync table (when there were samples).
pub fn print_opening(
    bench_dir: &str,
    filesystem: Option<&FsInfo>,
    samples: &[RawFsync],
    reference: Option<f64>,
) {
    println!("{}", data_line(bench_dir, filesystem));
    println!();
    let raw = raw_fdatasync_table(samples, reference);
    if !raw.is_empty() {
        println!("{raw}");
    }
}

/// Prints what closes every report: its warnings, then its errors.
pub fn print_problems(warnings: &[String], errors: &[String]) {
    for w in warnings {
        println!("WARNING: {w}");
    }
    for e in errors {
        println!("ERROR: {e}");
    }
}

/// A warning when other work kept more than a quarter of the CPUs busy `when` (e.g. "before the
/// run started").
pub fn busy_warning(machine: &Machine, when: &str, busy: Option<f64>) -> Option<String> {
    let busy = busy.filter(|&b| b > 0.25)?;
    Some(format!(
        "the machine was busy {when} ({:.0}% of {} CPUs in use by other work): it competes for \
         CPU and disk, figures are low and noisy",
        busy * 100.0,
        machine.cpus
    ))
}

/// A warning when the raw fdatasync rate moved by more than half during the run.
pub fn drift_warning(raw: &[RawFsync]) -> Option<String> {
    let rates: Vec<f64> = raw.iter().map(|r| r.rate_per_s).collect();
    let (lo, hi) = rates.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| {
        (lo.min(r), hi.max(r))
    });
    (rates.len() > 1 && hi > 1.5 * lo).then(|| {
        format!(
            "the raw fdatasync rate drifted from {} to {} during the run: \
             compare each point with its neighbouring raw samples only",
            rate(lo),
            rate(hi)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_format_for_people() {
        assert_eq!(count(3534.2), "3,534");
        assert_eq!(count(999.0), "999");
        assert_eq!(count(1_234_567.0), "1,234,567");
        assert_eq!(rate(120_000.0), "120,000/s");
        assert_eq!(ratio(31.24), "31.2×");
        assert_eq!(ratio(0.5), "0.50×");
        assert_eq!(micros(265.2), "265 µs");
        assert_eq!(micros(4_321.0), "4.32 ms");
        assert_eq!(micros(2_500_000.0), "2.50 s");
        assert_eq!(bytes(1 << 30), "1.00 GiB");
        assert_eq!(bytes(10), "10 B");
        assert!(div(1.0, 0.0).is_nan());
    }

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new("T", &["name", "value"]);
        t.row(["a", "1"]).row(["long name", "12,345"]).note("n");
        let s = t.to_string();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "T");
        assert_eq!(lines[1], "  name        value");
        assert_eq!(lines[3], "  a               1");
        assert_eq!(lines[4], "  long name  12,345");
        assert_eq!(lines[5], "  n");
    }

    #[test]
    fn targets_say_missed() {
        let t = Target::at_most("p99", 5_000.0, Some(6_000.0), micros);
        assert_eq!(t.met, Some(false));
        assert!(targets_table("x", &[t]).to_string().contains("MISSED"));
    }
}
