//! Markers for syscall-level probes.
//!
//! A probe binary runs under `strace -f -y` and brackets each acknowledged
//! append with a marker written to stderr in a single `write(2)`:
//! `edgehub-probe begin <i>` before the append starts and
//! `edgehub-probe end <i>` after it is acknowledged (for sled: after
//! `flush()` returned; for the store: after `.wait()` returned). A script
//! then checks which syscalls on the data files fell between the two.

use std::io::Write;

/// Writes `edgehub-probe <what>` to stderr in one `write(2)` call.
pub fn marker(what: std::fmt::Arguments<'_>) {
    let line = format!("edgehub-probe {what}\n");
    // Unbuffered stderr: one write_all of a short line is one syscall.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Parses `<dir> <count>` plus `--key value` options from the command line.
#[derive(Debug, Clone)]
pub struct ProbeArgs {
    /// Directory to open the database or store in.
    pub dir: std::path::PathBuf,
    /// Number of acknowledged appends to make.
    pub count: u64,
    /// Remaining `--key value` pairs.
    pub options: Vec<(String, String)>,
}

impl ProbeArgs {
    /// Reads the process arguments; `usage` is printed on error.
    pub fn from_env(usage: &str) -> Result<Self, String> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut positional = Vec::new();
        let mut options = Vec::new();
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            if let Some(key) = a.strip_prefix("--") {
                let value = it
                    .next()
                    .ok_or_else(|| format!("--{key} needs a value\n{usage}"))?;
                options.push((key.to_string(), value));
            } else {
                positional.push(a);
            }
        }
        let [dir, count] = positional.as_slice() else {
            return Err(usage.to_string());
        };
        let count = count
            .parse()
            .map_err(|e| format!("count {count:?}: {e}\n{usage}"))?;
        Ok(ProbeArgs {
            dir: dir.into(),
            count,
            options,
        })
    }

    /// The value of `--key`, if given.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}
