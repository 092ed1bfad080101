//! Table-driven tests of the condition language: one row per operator, builtin and
//! name-resolution rule. Each row evaluates a real expression against a real message, so a
//! change in semantics fails the row.

// A test crate: a failed expect is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use router::route::{Condition, EvalContext, SourcePattern, Value};
use router::{
    DeviceId, Message, ModuleId, OutputName, RouteId, RouteParseErrorKind, Source, SystemProperty,
};

const JSON_BODY: &str = r#"{"temp": 30.5, "name": "sensor", "flag": true, "nothing": null,
    "arr": [1, 2, 3], "obj": {"a": 1}, "x": "body-x", "deep": {"list": [{"v": "found"}]}}"#;

/// A module output with application properties, system properties and a JSON body.
fn module_msg() -> Message {
    let source = Source::ModuleOutput {
        device: DeviceId::new("edge"),
        module: ModuleId::new("filter"),
        output: Some(OutputName::new("alerts")),
    };
    Message::new(source, JSON_BODY)
        .with_property("level", "critical")
        .with_property("temp", "25.5")
        .with_property("$messageId", "from-app")
        .with_property("$body.x", "app-body")
        .with_system_property(SystemProperty::MessageId, "mid-1")
        .with_system_property(SystemProperty::CorrelationId, "cid-1")
        .with_system_property(SystemProperty::ContentType, "application/json")
        .with_system_property(SystemProperty::ContentEncoding, "utf-8")
}

/// Leaf-device telemetry with the same JSON body but no content type.
fn leaf_msg() -> Message {
    Message::new(
        Source::Telemetry {
            device: DeviceId::new("leaf"),
        },
        JSON_BODY,
    )
}

/// A module output whose JSON body is UTF-16LE.
fn utf16_msg() -> Message {
    let body: Vec<u8> = JSON_BODY
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let source = Source::ModuleOutput {
        device: DeviceId::new("edge"),
        module: ModuleId::new("m"),
        output: None,
    };
    Message::new(source, body)
        .with_system_property(SystemProperty::ContentType, "Application/JSON")
        .with_system_property(SystemProperty::ContentEncoding, "UTF-16")
}

/// JSON content type but an encoding edgeHub does not read.
fn latin1_msg() -> Message {
    leaf_msg()
        .with_system_property(SystemProperty::ContentType, "application/json")
        .with_system_property(SystemProperty::ContentEncoding, "iso-8859-1")
}

fn twin_msg() -> Message {
    let body = r#"{"properties": {"reported": {"temp": 1, "gone": null}}}"#;
    Message::new(
        Source::TwinChange {
            device: DeviceId::new("edge"),
            module: Some(ModuleId::new("m")),
        },
        body,
    )
}

fn t() -> Value<'static> {
    Value::Bool(true)
}

fn f() -> Value<'static> {
    Value::Bool(false)
}

fn u() -> Value<'static> {
    Value::Undefined
}

fn compile(text: &str, from: &str) -> Result<Condition, router::RouteParseError> {
    Condition::parse(&RouteId::new("row"), text, &SourcePattern::new(from))
}

fn evaluate(text: &str, from: &str, msg: &Message) -> Value<'static> {
    let condition = compile(text, from).unwrap_or_else(|e| panic!("{text}: {e}"));
    let ctx = EvalContext::new(msg);
    let value = condition.evaluate(&ctx).into_owned();
    assert_eq!(
        condition.matches(msg),
        value == t(),
        "{text}: matches() disagrees with evaluate()"
    );
    value
}

/// One row: condition text, the message to evaluate it against, the expected value.
type Row = (&'static str, fn() -> Message, Value<'static>);

fn check_rows(rows: &[Row]) {
    let mut failures = Vec::new();
    for (text, msg, expected) in rows {
        let got = evaluate(text, "/*", &msg());
        if &got != expected {
            failures.push(format!("{text}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} row(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn literals() {
    check_rows(&[
        ("true", module_msg, t()),
        ("false", module_msg, f()),
        ("null", module_msg, Value::Null),
        ("undefined", module_msg, u()),
        ("0x1F = 31", module_msg, t()),
        ("0XfF = 255", module_msg, t()),
        ("1.5e1 = 15", module_msg, t()),
        (".5 = 0.5", module_msg, t()),
        ("-5 < 0", module_msg, t()),
        (r#"'a' = "a""#, module_msg, t()),
        (r"'\u0041' = 'A'", module_msg, t()),
        (r"'it\'s' = concat('it', '\'s')", module_msg, t()),
        (r#""say \"hi\"" = 'say "hi"'"#, module_msg, t()),
    ]);
}

#[test]
fn arithmetic_operators() {
    check_rows(&[
        ("3 * 4 = 12", module_msg, t()),
        ("7 / 2 = 3.5", module_msg, t()),
        ("7 % 4 = 3", module_msg, t()),
        ("1 + 2 = 3", module_msg, t()),
        ("5 - 7 = -2", module_msg, t()),
        ("- 3 = -3", module_msg, t()),
        ("-(2 + 1) = -3", module_msg, t()),
        ("2 + 3 * 4 = 14", module_msg, t()),
        ("(2 + 3) * 4 = 20", module_msg, t()),
        ("1 / 0 > 1000000", module_msg, t()),
        ("$body.temp * 2 = 61", module_msg, t()),
        ("$body.name * 2 = 1", module_msg, u()),
        ("$body.missing + 1 = 1", module_msg, u()),
    ]);
}

#[test]
fn string_concatenation() {
    check_rows(&[
        ("'a' || 'b' = 'ab'", module_msg, t()),
        ("level || '!' = 'critical!'", module_msg, t()),
        ("missing || '!' = '!'", module_msg, u()),
    ]);
}

#[test]
fn comparison_operators() {
    check_rows(&[
        ("2 < 3", module_msg, t()),
        ("3 < 3", module_msg, f()),
        ("3 <= 3", module_msg, t()),
        ("4 > 3", module_msg, t()),
        ("3 >= 4", module_msg, f()),
        ("'abc' < 'abd'", module_msg, t()),
        ("'B' < 'a'", module_msg, t()),
        ("level >= 'critical'", module_msg, t()),
        ("missing < 'a'", module_msg, u()),
        ("$body.name < 1", module_msg, u()),
        ("false < true", module_msg, t()),
    ]);
}

#[test]
fn equality_operators() {
    check_rows(&[
        ("1 = 1", module_msg, t()),
        ("1 != 2", module_msg, t()),
        ("1 <> 1", module_msg, f()),
        ("'x' = 'X'", module_msg, f()),
        ("null = null", module_msg, t()),
        ("level = null", module_msg, f()),
        ("level != null", module_msg, t()),
        ("missing = null", module_msg, u()),
        ("missing = missing", module_msg, u()),
        ("true = true", module_msg, t()),
    ]);
}

#[test]
fn three_valued_logic() {
    check_rows(&[
        ("true AND true", module_msg, t()),
        ("true AND false", module_msg, f()),
        ("true AND undefined", module_msg, u()),
        ("false AND undefined", module_msg, f()),
        ("undefined and false", module_msg, f()),
        ("true OR false", module_msg, t()),
        ("false OR false", module_msg, f()),
        ("true OR undefined", module_msg, t()),
        ("false or undefined", module_msg, u()),
        ("NOT true", module_msg, f()),
        ("not false", module_msg, t()),
        ("NOT undefined", module_msg, u()),
        ("NOT (missing = 'x')", module_msg, u()),
        ("level = 'critical' AND temp = '25.5'", module_msg, t()),
        ("level = 'low' OR temp = '25.5'", module_msg, t()),
        ("true OR true AND false", module_msg, t()),
    ]);
}

#[test]
fn coalesce() {
    check_rows(&[
        ("(missing ?? 'dflt') = 'dflt'", module_msg, t()),
        ("(level ?? 'dflt') = 'critical'", module_msg, t()),
        ("($body.nothing ?? 1) = null", module_msg, t()),
        ("($body.missing ?? $body.temp) = 30.5", module_msg, t()),
        ("missing ?? undefined", module_msg, u()),
    ]);
}

#[test]
fn name_resolution() {
    check_rows(&[
        ("level = 'critical'", module_msg, t()),
        ("Level = 'critical'", module_msg, u()),
        ("$messageId = 'from-app'", module_msg, t()),
        ("{$messageId} = 'mid-1'", module_msg, t()),
        ("$MESSAGEID = 'mid-1'", module_msg, t()),
        ("$correlationId = 'cid-1'", module_msg, t()),
        ("$cid = 'cid-1'", module_msg, t()),
        ("$contentType = 'application/json'", module_msg, t()),
        ("$connectionDeviceId = 'edge'", module_msg, t()),
        ("$connectionModuleId = 'filter'", module_msg, t()),
        ("$outputName = 'alerts'", module_msg, t()),
        ("$connectionDeviceId = 'leaf'", leaf_msg, t()),
        ("NOT IS_DEFINED($connectionModuleId)", leaf_msg, t()),
        ("NOT IS_DEFINED($connectionModuleId)", module_msg, f()),
        ("$unknownSystemProperty = 'x'", module_msg, u()),
        ("$a[0] = 'x'", module_msg, u()),
    ]);
}

#[test]
fn body_queries() {
    check_rows(&[
        ("$body.x = 'app-body'", module_msg, t()),
        ("{$body.x} = 'body-x'", module_msg, t()),
        ("$body.temp > 30", module_msg, t()),
        ("$BODY.name = 'sensor'", module_msg, t()),
        ("$body.flag", module_msg, t()),
        ("$body.nothing = null", module_msg, t()),
        ("is_null($body.nothing)", module_msg, t()),
        ("$body.arr[1] = 2", module_msg, t()),
        ("$body.deep.list[0].v = 'found'", module_msg, t()),
        ("$body.deep['list'][0]['v'] = 'found'", module_msg, t()),
        ("is_defined($body.obj)", module_msg, f()),
        ("is_defined($body.arr)", module_msg, f()),
        ("$body.missing = 1", module_msg, u()),
        ("$body.arr[9] = 1", module_msg, u()),
        ("$body.temp = 30.5", utf16_msg, t()),
        ("$body.temp = 30.5", leaf_msg, u()),
        ("$body.temp = 30.5", latin1_msg, u()),
    ]);
}

#[test]
fn math_builtins() {
    check_rows(&[
        ("abs(-2.5) = 2.5", module_msg, t()),
        ("exp(0) = 1", module_msg, t()),
        ("power(2, 10) = 1024", module_msg, t()),
        ("square(3) = 9", module_msg, t()),
        ("ceiling(1.2) = 2", module_msg, t()),
        ("floor(1.8) = 1", module_msg, t()),
        ("floor(-1.2) = -2", module_msg, t()),
        ("sign(-4) = -1", module_msg, t()),
        ("sign(0) = 0", module_msg, t()),
        ("sign(7) = 1", module_msg, t()),
        ("sqrt(16) = 4", module_msg, t()),
        ("ABS($body.temp) = 30.5", module_msg, t()),
        ("abs($body.name) = 1", module_msg, u()),
        ("abs(undefined) = 1", module_msg, u()),
    ]);
}

#[test]
fn type_builtins() {
    check_rows(&[
        ("as_number(temp) = 25.5", module_msg, t()),
        ("as_number(' 7 ') = 7", module_msg, t()),
        ("as_number(temp) > 25", module_msg, t()),
        ("is_defined(as_number(level))", module_msg, f()),
        ("is_bool(true)", module_msg, t()),
        ("is_bool(1)", module_msg, f()),
        ("is_bool($body.flag)", module_msg, t()),
        ("is_defined(level)", module_msg, t()),
        ("is_defined(missing)", module_msg, f()),
        ("is_null(null)", module_msg, t()),
        ("is_null(level)", module_msg, f()),
        ("is_number(1)", module_msg, t()),
        ("is_number('1')", module_msg, f()),
        ("is_number($body.temp)", module_msg, t()),
        ("is_string('s')", module_msg, t()),
        ("is_string(1)", module_msg, f()),
        ("is_string(missing)", module_msg, f()),
    ]);
}

#[test]
fn string_builtins() {
    check_rows(&[
        ("concat('a', 'b', 'c') = 'abc'", module_msg, t()),
        ("concat(level) = 'critical'", module_msg, t()),
        ("is_defined(concat(level, missing))", module_msg, f()),
        ("length('héllo') = 5", module_msg, t()),
        ("length('😀') = 2", module_msg, t()),
        ("length(level) = 8", module_msg, t()),
        ("lower('AbC') = 'abc'", module_msg, t()),
        ("upper('AbC') = 'ABC'", module_msg, t()),
        ("substring('hello', 1) = 'ello'", module_msg, t()),
        ("substring('hello', 1, 3) = 'ell'", module_msg, t()),
        ("substring('hello', 5) = ''", module_msg, t()),
        ("is_defined(substring('hello', 9))", module_msg, f()),
        ("is_defined(substring('hello', 2, 9))", module_msg, f()),
        ("index_of('hello', 'l') = 2", module_msg, t()),
        ("index_of('😀hello', 'h') = 2", module_msg, t()),
        ("index_of('hello', 'z') = -1", module_msg, t()),
        ("starts_with(level, 'crit')", module_msg, t()),
        ("starts_with(level, 'Crit')", module_msg, f()),
        ("ends_with(level, 'cal')", module_msg, t()),
        ("contains(level, 'itic')", module_msg, t()),
        ("contains(level, 'xyz')", module_msg, f()),
        ("STARTS_WITH(level, 'crit')", module_msg, t()),
        ("contains(missing, 'x')", module_msg, u()),
    ]);
}

#[test]
fn twin_change_includes() {
    let rows = [
        ("twin_change_includes(properties.reported.temp)", t()),
        ("twin_change_includes(properties.reported.gone)", f()),
        ("twin_change_includes(properties.reported.absent)", u()),
        (
            "TWIN_CHANGE_INCLUDES( properties.reported.temp ) AND true",
            t(),
        ),
    ];
    for (text, expected) in rows {
        assert_eq!(
            evaluate(text, "/twinChangeNotifications", &twin_msg()),
            expected,
            "{text}"
        );
    }
}

fn kind_name(kind: &RouteParseErrorKind) -> &'static str {
    match kind {
        RouteParseErrorKind::Empty => "empty",
        RouteParseErrorKind::Unexpected { .. } => "unexpected",
        RouteParseErrorKind::UnterminatedString => "unterminated",
        RouteParseErrorKind::UnknownEndpoint(_) => "endpoint",
        RouteParseErrorKind::InvalidEndpointAddress(_) => "address",
        RouteParseErrorKind::UnknownFunction(_) => "function",
        RouteParseErrorKind::Arity { .. } => "arity",
        RouteParseErrorKind::OperandType { .. } => "operand",
        RouteParseErrorKind::BodyQuery { .. } => "body",
        RouteParseErrorKind::TwinChangeIncludesSource => "twin",
        RouteParseErrorKind::NotBoolean(_) => "not-boolean",
    }
}

#[test]
fn compile_errors_name_the_kind_and_column() {
    let rows = [
        ("temp > 30", "operand", 6),
        ("abs('x') = 1", "operand", 1),
        ("nope() = 1", "function", 1),
        ("length() = 1", "arity", 1),
        ("substring('a') = 'a'", "arity", 1),
        ("contains('a', 'b', 'c')", "arity", 1),
        ("'a' || 1 = 'a'", "operand", 5),
        ("1 AND true", "operand", 3),
        ("NOT 'x'", "operand", 1),
        ("- 'x' = 1", "operand", 1),
        ("'a' = 1", "operand", 5),
        ("missing ?? 'd' = 'd'", "operand", 9),
        ("$body.a..b = 1", "body", 1),
        ("{$body.} = 1", "body", 1),
        ("twin_change_includes(properties.x)", "twin", 1),
        ("'str'", "not-boolean", 1),
        ("1 + 1", "not-boolean", 3),
        ("a = = b", "unexpected", 5),
        ("(a = 'b'", "unexpected", 9),
        ("a = 'b')", "unexpected", 8),
        ("a = 'open", "unterminated", 5),
        ("f(1,)", "unexpected", 5),
        ("{level} = 'x'", "unexpected", 2),
        ("a[0] = 'x'", "unexpected", 1),
        ("a = 'x' #", "unexpected", 9),
    ];
    let mut failures = Vec::new();
    for (text, kind, column) in rows {
        match compile(text, "/messages/*") {
            Ok(_) => failures.push(format!("{text}: compiled")),
            Err(e) if (kind_name(&e.kind), e.column) != (kind, column) => failures.push(format!(
                "{text}: expected {kind} at {column}, got {} at {} ({e})",
                kind_name(&e.kind),
                e.column
            )),
            Err(e) => assert_eq!(e.route, RouteId::new("row")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn edgehub_lexing_quirks_are_kept() {
    // `a-b` is one identifier (an application property named "a-b"), not a subtraction.
    let msg = module_msg().with_property("a-b", "yes");
    assert_eq!(evaluate("a-b = 'yes'", "/*", &msg), t());
    // Without spaces, `3*4` is the name of an application property, so this is a type error.
    assert!(compile("3*4 = 12", "/*").is_err());
}
