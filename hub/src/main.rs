//! The `edgehub` binary (being written).

fn main() {}
