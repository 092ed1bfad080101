//! `$edgeHub` desired properties and deployment manifests, end to end to a route table.

// A test crate: a failed expect is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use router::{
    parse_deployment, parse_edge_hub_desired, DeviceId, Endpoint, InputName, ManifestIssue,
    Message, ModuleId, OutputName, Priority, RouteId, Source, Ttl,
};

fn output(module: &str, output: &str) -> Message {
    let source = Source::ModuleOutput {
        device: DeviceId::new("edge"),
        module: ModuleId::new(module),
        output: Some(OutputName::new(output)),
    };
    Message::new(source, "{}").with_property("level", "critical")
}

fn issue_paths(json: &str) -> Vec<String> {
    let err = parse_edge_hub_desired(json).expect_err("manifest should be rejected");
    err.issues
        .iter()
        .map(|issue| match issue {
            ManifestIssue::Route(e) => format!("route {} @{}", e.route, e.column),
            ManifestIssue::Structure { path, .. } | ManifestIssue::Replicas { path, .. } => {
                path.clone()
            }
        })
        .collect()
}

#[test]
fn schema_1_0_takes_route_strings_and_defaults() {
    let config = parse_edge_hub_desired(
        r#"{"schemaVersion": "1.0", "routes": {"up": "FROM /messages/* INTO $upstream"}}"#,
    )
    .expect("valid");
    assert_eq!(config.store_ttl, Ttl::Infinite);
    let targets = config.routes.targets(&output("m", "o")).into_vec();
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].priority, Priority::DEFAULT);
    assert_eq!(targets[0].ttl, Ttl::Infinite);
}

#[test]
fn schema_1_1_routes_carry_priority_and_ttl_with_store_ttl_as_fallback() {
    let config = parse_edge_hub_desired(
        r#"{
            "schemaVersion": "1.1.0",
            "routes": {
                "urgent": {"route": "FROM /messages/* WHERE level = 'critical' INTO $upstream", "priority": 0, "timeToLiveSecs": 60},
                "bulk": {"route": "FROM /messages/* INTO $upstream", "priority": 5},
                "local": {"route": "FROM /messages/modules/m/* INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")", "timeToLiveSecs": 0}
            },
            "storeAndForwardConfiguration": {"timeToLiveSecs": 7200, "storeLimits": {"maxSizeBytes": 1024}}
        }"#,
    )
    .expect("valid");
    assert_eq!(config.store_ttl, Ttl::Seconds(7200));
    assert_eq!(config.max_store_size_bytes, Some(1024));
    let targets = config.routes.targets(&output("m", "o")).into_vec();
    assert_eq!(targets.len(), 2);
    let local = &targets[1];
    assert_eq!(
        local.endpoint,
        Endpoint::ModuleInput {
            module: ModuleId::new("sink"),
            input: InputName::new("in")
        }
    );
    assert_eq!(
        (local.priority, local.ttl),
        (Priority::DEFAULT, Ttl::Seconds(7200))
    );
    let upstream = &targets[0];
    assert_eq!(upstream.endpoint, Endpoint::Upstream);
    assert_eq!(
        (upstream.priority, upstream.ttl),
        (Priority(0), Ttl::Seconds(60))
    );
    assert_eq!(upstream.route, RouteId::new("urgent"));
}

#[test]
fn a_negative_store_ttl_is_infinite() {
    let config = parse_edge_hub_desired(
        r#"{"schemaVersion": "1.3", "routes": {}, "storeAndForwardConfiguration": {"timeToLiveSecs": -1}}"#,
    )
    .expect("valid");
    assert_eq!(config.store_ttl, Ttl::Infinite);
    assert!(config.routes.targets(&output("m", "o")).is_unrouted());
}

#[test]
fn every_problem_is_reported_with_its_route_column_or_path() {
    let paths = issue_paths(
        r#"{
            "schemaVersion": "1.1",
            "routes": {
                "bad syntax": "FROM /messages WHERE INTO $upstream",
                "badPriority": {"route": "FROM /* INTO $upstream", "priority": 10},
                "badTtl": {"route": "FROM /* INTO $upstream", "timeToLiveSecs": -5},
                "noRoute": {"priority": 1},
                "typeError": "FROM /* WHERE level > 3 INTO $upstream",
                "notARoute": 42
            },
            "storeAndForwardConfiguration": {"timeToLiveSecs": "soon"}
        }"#,
    );
    assert_eq!(
        paths,
        vec![
            "storeAndForwardConfiguration.timeToLiveSecs",
            "routes.bad syntax",
            "route bad syntax @22",
            "routes.badPriority.priority",
            "routes.badTtl.timeToLiveSecs",
            "routes.noRoute.route",
            "routes.notARoute",
            "route typeError @21",
        ]
    );
}

#[test]
fn schema_versions_outside_1_0_to_1_3_are_rejected() {
    for version in ["\"2.0\"", "\"1.4\"", "1.1", "\"one\""] {
        let json =
            format!(r#"{{"schemaVersion": {version}, "storeAndForwardConfiguration": {{}}}}"#);
        assert_eq!(issue_paths(&json), vec!["schemaVersion"], "{version}");
    }
    assert_eq!(issue_paths("{}"), vec!["schemaVersion"]);
}

#[test]
fn store_and_forward_is_required_from_1_1_and_route_objects_need_1_1() {
    assert_eq!(
        issue_paths(r#"{"schemaVersion": "1.1", "routes": {}}"#),
        vec!["storeAndForwardConfiguration"]
    );
    assert_eq!(
        issue_paths(
            r#"{"schemaVersion": "1.0", "routes": {"r": {"route": "FROM /* INTO $upstream"}}}"#
        ),
        vec!["routes.r"]
    );
}

#[test]
fn invalid_json_is_one_issue_at_the_root() {
    assert_eq!(issue_paths("{not json"), vec!["$"]);
}

const DEPLOYMENT: &str = r#"{
    "modulesContent": {
        "$edgeAgent": {"properties.desired": {
            "schemaVersion": "1.1",
            "systemModules": {"edgeAgent": {}, "edgeHub": {}},
            "modules": {"tempSensor": {"type": "docker"}, "filter": {"type": "docker"}}
        }},
        "$edgeHub": {"properties": {"desired": {
            "schemaVersion": "1.2",
            "routes": {"sensorToFilter": "FROM /messages/modules/tempSensor/outputs/temperatureOutput INTO BrokeredEndpoint(\"/modules/filter/inputs/input1\")"},
            "storeAndForwardConfiguration": {"timeToLiveSecs": 7200},
            "mqttBroker": {"authorizations": []}
        }}},
        "filter": {"properties.desired": {}}
    }
}"#;

#[test]
fn desired_properties_given_both_ways_are_refused_with_their_path() {
    let both = DEPLOYMENT.replace(
        r#""$edgeHub": {"properties": {"desired": {"#,
        r#""$edgeHub": {"properties.desired": {}, "properties": {"desired": {"#,
    );
    let err = parse_deployment(&both).expect_err("ambiguous");
    assert!(
        err.to_string()
            .contains("modulesContent.$edgeHub.properties.desired"),
        "{err}"
    );
}

#[test]
fn a_deployment_yields_routes_and_module_names() {
    let deployment = parse_deployment(DEPLOYMENT).expect("valid");
    assert_eq!(
        deployment.modules,
        vec![ModuleId::new("filter"), ModuleId::new("tempSensor")]
    );
    let targets = deployment
        .edge_hub
        .routes
        .targets(&output("tempSensor", "temperatureOutput"));
    assert_eq!(targets.as_slice().len(), 1);
    let wrapped = format!(r#"{{"content": {DEPLOYMENT}}}"#);
    assert_eq!(parse_deployment(&wrapped).map(|d| d.modules.len()), Ok(2));
}

#[test]
fn deployment_errors_carry_full_json_paths() {
    let broken = DEPLOYMENT
        .replace(
            r#""modules": {"tempSensor""#,
            r#""modules": 3, "x": {"tempSensor""#,
        )
        .replace("\"priority\"", "\"p\"")
        .replace("\"timeToLiveSecs\": 7200", "\"timeToLiveSecs\": 1.5");
    let err = parse_deployment(&broken).expect_err("rejected");
    let paths: Vec<String> = err
        .issues
        .iter()
        .filter_map(|i| match i {
            ManifestIssue::Structure { path, .. } => Some(path.clone()),
            ManifestIssue::Route(_) | ManifestIssue::Replicas { .. } => None,
        })
        .collect();
    assert_eq!(
        paths,
        vec![
            "modulesContent.$edgeAgent.properties.desired.modules",
            "modulesContent.$edgeHub.properties.desired.storeAndForwardConfiguration.timeToLiveSecs",
        ]
    );
    let missing = parse_deployment(r#"{"modulesContent": {}}"#).expect_err("rejected");
    assert_eq!(missing.issues.len(), 2);
}
