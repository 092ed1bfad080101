//! Deployment manifests and `$edgeHub` desired properties as JSON text
//! (`router::parse_deployment`, `router::parse_edge_hub_desired`): routes, priorities, TTLs,
//! store limits and edgehub's `x-edgehub-…` extensions.
//!
//! Checked beyond "no panic, no hang, bounded allocation":
//! - a refused manifest lists at least one problem, and its message names them;
//! - the result depends on the JSON value only: the same value re-serialised parses to the
//!   same deployment, or to as many problems;
//! - an accepted manifest's route table yields at most one target per endpoint.

#![no_main]

use libfuzzer_sys::fuzz_target;
use router::{
    parse_deployment, parse_edge_hub_desired, DeviceId, ManifestError, Message, ModuleId,
    OutputName, Source,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let deployment = parse_deployment(text);
    let desired = parse_edge_hub_desired(text);
    for e in [deployment.as_ref().err(), desired.as_ref().err()]
        .into_iter()
        .flatten()
    {
        assert!(!e.issues.is_empty(), "a refusal without a problem");
        let _ = e.to_string();
    }
    if let Ok(d) = &deployment {
        check_routes(&d.edge_hub.routes);
    }
    if let Ok(c) = &desired {
        check_routes(&c.routes);
    }
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        let again = serde_json::to_string(&value).expect("a JSON value serialises");
        same(&parse_deployment(&again), &deployment);
        same(&parse_edge_hub_desired(&again), &desired);
    }
});

/// The same result: equal when accepted, the same number of problems when refused (a problem's
/// text may print a huge number differently: serde_json's float parsing is not exact).
fn same<T: PartialEq + std::fmt::Debug>(
    a: &Result<T, ManifestError>,
    b: &Result<T, ManifestError>,
) {
    match (a, b) {
        (Ok(x), Ok(y)) => assert_eq!(x, y, "the result depends on the JSON layout"),
        (Err(x), Err(y)) => assert_eq!(x.issues.len(), y.issues.len(), "{x} vs {y}"),
        _ => panic!("the result depends on the JSON layout: {a:?} vs {b:?}"),
    }
}

fn check_routes(table: &router::RouteTable) {
    let m = Message::new(
        Source::ModuleOutput {
            device: DeviceId::new("d"),
            module: ModuleId::new("m"),
            output: Some(OutputName::new("out")),
        },
        b"{\"temperature\":30}".to_vec(),
    )
    .with_property("a", "1");
    let targets = table.targets(&m);
    let mut endpoints: Vec<_> = targets
        .as_slice()
        .iter()
        .map(|t| t.endpoint.clone())
        .collect();
    let n = endpoints.len();
    endpoints.sort_by_key(|e| e.to_string());
    endpoints.dedup();
    assert_eq!(endpoints.len(), n, "one target per endpoint");
    let _ = table.endpoints();
}
