//! Raw results as JSON under `<target>/bench-results/`.

use crate::args::Mode;
use crate::BenchResult;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

/// `<target>/bench-results/<name>.json`.
pub fn results_path(name: &str) -> PathBuf {
    crate::env::target_dir()
        .join("bench-results")
        .join(format!("{name}.json"))
}

/// Writes `value` as pretty JSON to [`results_path`]`(name)`, replacing any
/// earlier file atomically (write to a temp file, then rename). Returns the
/// path written.
pub fn write_results<T: Serialize>(name: &str, value: &T) -> BenchResult<PathBuf> {
    let path = results_path(name);
    let dir = path
        .parent()
        .ok_or_else(|| format!("{} has no parent", path.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer_pretty(&mut tmp, value)?;
    tmp.write_all(b"\n")?;
    tmp.persist(&path)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

/// Writes a bench run's results with [`write_results`]`(bench, ..)` and prints where; after a
/// smoke run prints instead that none were written.
pub fn save<T: Serialize>(bench: &str, mode: Mode, results: &T) -> BenchResult<()> {
    if mode == Mode::Smoke {
        println!(
            "(smoke run without --bench: no JSON written; use `cargo bench -p benches --bench {bench}`)"
        );
    } else {
        let path = write_results(bench, results)?;
        println!("raw results: {}", path.display());
    }
    Ok(())
}
