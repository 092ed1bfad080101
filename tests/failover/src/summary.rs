//! `edgehub-failover summary DIR`: the verdicts of a directory as one Markdown table.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::SimError;
use crate::verdict::Verdict;

/// Every `*.json` verdict in `dir`.
pub fn load(dir: &Path) -> Result<Vec<Verdict>, SimError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| SimError::io(format!("read {}", dir.display()), e))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| SimError::io(format!("read {}", path.display()), e))?;
        let v: Verdict = serde_json::from_str(&text).map_err(|e| SimError::Verdict {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        out.push(v);
    }
    Ok(out)
}

fn median_max(mut xs: Vec<u64>) -> String {
    if xs.is_empty() {
        return "–".into();
    }
    xs.sort_unstable();
    let n = xs.len();
    let median = (xs[(n - 1) / 2] + xs[n / 2]) / 2;
    format!("{median} / {}", xs[n - 1])
}

/// The table: per scenario, runs, targets met, the worst of each count, median / max times.
pub fn table(verdicts: &[Verdict]) -> String {
    let order = [
        "crash",
        "zombie",
        "partition",
        "double-start",
        "backlog",
        "stale-restart",
    ];
    let mut by: BTreeMap<usize, (String, Vec<&Verdict>)> = BTreeMap::new();
    for v in verdicts {
        let i = order
            .iter()
            .position(|o| *o == v.scenario)
            .unwrap_or(order.len());
        by.entry(i)
            .or_insert_with(|| (v.scenario.clone(), Vec::new()))
            .1
            .push(v);
    }
    let mut s = String::from(
        "| scenario | runs | targets met | acked (min) | acked-but-lost (max) | reordered (max) | duplicates (max) | stale acks (max) | stale acks to A's local module (max) | stale bytes (max) | stale reopenings (max) | serving nodes | B start → first delivery ms (median / max) | A death → next ack ms (median / max) | fenced A at the end |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (_, (name, vs)) in by {
        let max = |f: &dyn Fn(&Verdict) -> u64| vs.iter().map(|v| f(v)).max().unwrap_or(0);
        let min = |f: &dyn Fn(&Verdict) -> u64| vs.iter().map(|v| f(v)).min().unwrap_or(0);
        let met = vs.iter().filter(|v| v.targets_met).count();
        let serving: Vec<u64> = vs.iter().filter_map(|v| v.serving_nodes).collect();
        let serving = if serving.is_empty() {
            "–".to_owned()
        } else {
            format!(
                "{}–{}",
                serving.iter().min().unwrap_or(&0),
                serving.iter().max().unwrap_or(&0)
            )
        };
        let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
        for v in &vs {
            *outcomes.entry(short_outcome(&v.a_outcome)).or_insert(0) += 1;
        }
        let outcomes = outcomes
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect::<Vec<_>>()
            .join("; ");
        s.push_str(&format!(
            "| {name} | {} | {met} | {} | {} | {} | {} | {} | {} | {} | {} | {serving} | {} | {} | {outcomes} |\n",
            vs.len(),
            min(&|v| v.acked),
            max(&|v| v.acked_but_lost),
            max(&|v| v.reordered),
            max(&|v| v.duplicates),
            max(&|v| v.stale_acks.unwrap_or(0)),
            max(&|v| v.stale_acks_to_local_module.unwrap_or(0)),
            max(&|v| v.stale_bytes_to_modules),
            max(&|v| v.stale_reopenings),
            median_max(vs.iter().filter_map(|v| v.b_start_to_first_delivery_ms).collect()),
            median_max(vs.iter().filter_map(|v| v.a_death_to_next_ack_ms).collect()),
        ));
    }
    s
}

fn short_outcome(o: &str) -> String {
    if let Some(list) = o.strip_prefix("stale restarts exited ") {
        // "[Some(1), Some(1), None]" → "stale restarts exited 1, none": the distinct codes.
        let mut codes: Vec<String> = list
            .trim_matches(|c| c == '[' || c == ']')
            .split(", ")
            .map(|c| {
                c.trim_start_matches("Some(")
                    .trim_end_matches(')')
                    .to_lowercase()
            })
            .collect();
        codes.sort();
        codes.dedup();
        return format!("stale restarts exited {}", codes.join(", "));
    }
    if o.starts_with("starts ") {
        // Double start and stale restart describe several processes; keep the tail short.
        return o.split(';').next().unwrap_or(o).chars().take(60).collect();
    }
    o.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_per_scenario_with_the_worst_and_the_median() {
        let v = |scenario: &str, lost, first| Verdict {
            scenario: scenario.into(),
            acked_but_lost: lost,
            b_start_to_first_delivery_ms: Some(first),
            a_outcome: "running, healthz 503".into(),
            ..Verdict::default()
        };
        let t = table(&[
            v("zombie", 0, 900),
            v("crash", 0, 100),
            v("crash", 2, 300),
            v("crash", 0, 200),
        ]);
        let rows: Vec<&str> = t.lines().skip(2).collect();
        assert_eq!(rows.len(), 2, "{t}");
        assert!(rows[0].starts_with("| crash | 3 | 0 | 0 | 2 |"), "{t}");
        assert!(rows[0].contains("| 200 / 300 |"), "{t}");
        assert_eq!(
            median_max(vec![100, 300]),
            "200 / 300",
            "an even count averages the middle two"
        );
        assert!(rows[1].starts_with("| zombie | 1 |"), "{t}");
        assert_eq!(
            short_outcome("stale restarts exited [Some(1), Some(4), Some(1), None]"),
            "stale restarts exited 1, 4, none"
        );
    }
}
