//! Inserts N 256-byte values into sled 0.34.7, calling `flush()` after each,
//! with a marker on stderr around every insert + flush, so that
//! `benches/sled-evidence.sh` can see under strace which syscalls make an
//! insert "durable" before `flush()` returns.
//!
//! Usage: `sled_flush_probe <dir> <count> [--flush-every-ms <ms>|off]`
//! (`off` disables sled's background flusher, leaving only `flush()`).

use benches::probe::{marker, ProbeArgs};

const USAGE: &str = "usage: sled_flush_probe <dir> <count> [--flush-every-ms <ms>|off]";

fn main() {
    if let Err(e) = run() {
        eprintln!("sled_flush_probe: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = ProbeArgs::from_env(USAGE)?;
    let mut config = sled::Config::new().path(&args.dir);
    match args.option("flush-every-ms") {
        None => {}
        Some("off") => config = config.flush_every_ms(None),
        Some(ms) => config = config.flush_every_ms(Some(ms.parse()?)),
    }
    let db = config.open()?;
    marker(format_args!("opened"));
    let value = sled::IVec::from(&[0x5au8; 256][..]);
    for i in 0..args.count {
        marker(format_args!("begin {i}"));
        db.insert(i.to_be_bytes(), value.clone())?;
        db.flush()?;
        marker(format_args!("end {i}"));
    }
    marker(format_args!("done"));
    drop(db);
    marker(format_args!("closed"));
    Ok(())
}
