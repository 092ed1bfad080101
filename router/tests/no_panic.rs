//! Property tests: parsing, compiling and evaluating never panic, whatever the input.

// A test crate: a failed expect is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use proptest::prelude::*;
use router::route::{parse, Condition, SourcePattern};
use router::{
    parse_deployment, parse_edge_hub_desired, DeviceId, Message, ModuleId, OutputName, Priority,
    Route, RouteId, Source, SystemProperty, Ttl,
};

/// Fragments that exercise every lexer rule and the parser's error paths.
const FRAGMENTS: &[&str] = &[
    "SELECT",
    "select",
    "*",
    "FROM",
    "from",
    "/",
    "messages",
    "modules",
    "m1",
    "outputs",
    "o1",
    "/twinChangeNotifications",
    "WHERE",
    "INTO",
    "$upstream",
    "$UPSTREAM",
    "BrokeredEndpoint",
    "(",
    ")",
    "'/modules/a/inputs/b'",
    "\"modules/a/inputs/b/\"",
    "'",
    "\"",
    "\"x",
    "'x",
    "AND",
    "OR",
    "NOT",
    "=",
    "!=",
    "<>",
    "<",
    "<=",
    ">",
    ">=",
    "+",
    "-",
    "%",
    "||",
    "??",
    "{",
    "}",
    "$body.a",
    "$body.a[0]",
    "$body.",
    "$body.a['k']",
    "[",
    "]",
    "0x",
    "0x1F",
    "0xFFFFFFFFFFFFFFFFFFFF",
    "1e999",
    "-5",
    ".5",
    "1.",
    "3*4",
    "true",
    "false",
    "null",
    "undefined",
    "abs",
    "power",
    "substring",
    "concat",
    "is_defined",
    "as_number",
    "twin_change_includes",
    "properties.reported.x",
    ",",
    "/*",
    "*/",
    "\\u00",
    "\\u0041",
    "\\",
    "é",
    "😀",
    " ",
    "\t",
    "\n",
    "level",
    "$connectionModuleId",
    "{$messageId}",
    "#",
];

fn soup() -> impl Strategy<Value = String> {
    prop::collection::vec((prop::sample::select(FRAGMENTS), prop::bool::ANY), 0..40).prop_map(
        |parts| {
            parts
                .into_iter()
                .map(|(frag, space)| {
                    if space {
                        format!("{frag} ")
                    } else {
                        frag.to_owned()
                    }
                })
                .collect()
        },
    )
}

fn messages(body: Vec<u8>, content_type: String, encoding: String) -> Vec<Message> {
    let module = Source::ModuleOutput {
        device: DeviceId::new("d"),
        module: ModuleId::new("m1"),
        output: Some(OutputName::new("o1")),
    };
    let twin = Source::TwinChange {
        device: DeviceId::new("d"),
        module: None,
    };
    let leaf = Source::Telemetry {
        device: DeviceId::new("d"),
    };
    [module, twin, leaf]
        .into_iter()
        .map(|source| {
            Message::new(source, body.clone())
                .with_property("level", "critical")
                .with_property("$messageId", "x")
                .with_system_property(SystemProperty::ContentType, content_type.clone())
                .with_system_property(SystemProperty::ContentEncoding, encoding.clone())
        })
        .collect()
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        Just(br#"{"a": [1, {"b": null}], "k": "v", "x": 1e308}"#.to_vec()),
        Just(br#"{"properties": {"reported": {"x": 1}}}"#.to_vec()),
    ]
}

fn exercise(text: &str, msgs: &[Message]) {
    let id = RouteId::new("p");
    let _ = parse::parse_route(&id, text);
    for from in ["/messages/*", "/twinChangeNotifications"] {
        if let Ok(condition) = Condition::parse(&id, text, &SourcePattern::new(from)) {
            for msg in msgs {
                let _ = condition.matches(msg);
            }
        }
    }
    if let Ok(route) = Route::parse(id, text, Priority(0), Ttl::Infinite) {
        let table = router::RouteTable::new(vec![route]);
        for msg in msgs {
            let _ = table.targets(msg);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_strings_never_panic(text in any::<String>()) {
        exercise(&text, &messages(Vec::new(), "application/json".into(), "utf-8".into()));
    }

    #[test]
    fn token_soups_never_panic(
        text in soup(),
        body in body(),
        content_type in prop::sample::select(vec!["application/json", "text/plain", "APPLICATION/JSON"]),
        encoding in prop::sample::select(vec!["utf-8", "utf-16", "utf-32", "ascii"]),
    ) {
        exercise(&text, &messages(body, content_type.into(), encoding.into()));
    }

    #[test]
    fn conditions_from_soup_never_panic(cond in soup(), body in body()) {
        let text = format!("FROM /* WHERE {cond} INTO $upstream");
        exercise(&text, &messages(body, "application/json".into(), "utf-16".into()));
    }

    #[test]
    fn arbitrary_manifests_never_panic(text in any::<String>(), route in soup(), n in any::<i64>()) {
        let _ = parse_edge_hub_desired(&text);
        let _ = parse_deployment(&text);
        let desired = serde_json::json!({
            "schemaVersion": "1.1",
            "routes": { "r": route, "o": { "route": route, "priority": n, "timeToLiveSecs": n } },
            "storeAndForwardConfiguration": { "timeToLiveSecs": n },
        });
        let _ = parse_edge_hub_desired(&desired.to_string());
    }
}
