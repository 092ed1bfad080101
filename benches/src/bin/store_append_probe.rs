//! Appends N 256-byte messages to edgehub's store, waiting for each to be
//! acknowledged durable, with a marker on stderr around every append, so
//! that `benches/sled-evidence.sh` can show under strace that an
//! `fdatasync` on the log comes between the write and the acknowledgement.
//!
//! Usage: `store_append_probe <dir> <count>`

use benches::probe::{marker, ProbeArgs};
use store::{Epoch, QueueName, Store, StoreOptions};

const USAGE: &str = "usage: store_append_probe <dir> <count>";

fn main() {
    if let Err(e) = run() {
        eprintln!("store_append_probe: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = ProbeArgs::from_env(USAGE)?;
    let store = Store::open(
        &args.dir,
        StoreOptions {
            epoch: Epoch::new(1),
            ..StoreOptions::default()
        },
    )?;
    let queue = [QueueName::new("probe")?];
    marker(format_args!("opened"));
    let body = bytes::Bytes::from(vec![0x5au8; 256]);
    for i in 0..args.count {
        marker(format_args!("begin {i}"));
        store.append(&queue, body.clone(), None).wait()?;
        marker(format_args!("end {i}"));
    }
    marker(format_args!("done"));
    store.close()?;
    marker(format_args!("closed"));
    Ok(())
}
