//! The route language as a manifest author (or whoever controls the deployment) writes it:
//! `router::route::parse::parse_route`, `parse_condition`, `Route::parse` (compile) and
//! condition evaluation against messages.
//!
//! Checked beyond "no panic, no hang, bounded allocation":
//! - an error names the route and a 1-based column inside the text (or just past its end);
//! - printing a parsed condition back as text and parsing that gives the same tree (columns
//!   aside): the parser reads what it was given, no more, no less;
//! - a compiled route evaluates totally on messages with and without JSON bodies.

#![no_main]

use libfuzzer_sys::fuzz_target;
use router::route::parse::{parse_condition, parse_route, Expr, ExprKind, Literal, UnaryOp};
use router::{
    DeviceId, Message, ModuleId, OutputName, Priority, Route, RouteId, RouteTable, Source,
    SystemProperty, Ttl,
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let id = RouteId::new("fuzz");
    let columns = text.chars().count() + 1;
    match parse_route(&id, &text) {
        Ok(spec) => {
            if let Some(expr) = &spec.condition {
                round_trip(&id, expr);
            }
        }
        Err(e) => {
            assert_eq!(e.route, id);
            assert!(
                (1..=columns).contains(&e.column),
                "column {} of {columns}",
                e.column
            );
            let _ = e.to_string();
        }
    }
    match parse_condition(&id, &text) {
        Ok(expr) => round_trip(&id, &expr),
        Err(e) => assert!(
            (1..=columns).contains(&e.column),
            "column {} of {columns}",
            e.column
        ),
    }
    match Route::parse(id.clone(), &text, Priority(0), Ttl::Seconds(60)) {
        Ok(route) => {
            let table = RouteTable::new(vec![route]);
            for m in messages(&text) {
                let targets = table.targets(&m);
                assert!(targets.as_slice().len() <= 1);
            }
        }
        Err(e) => assert!(
            (1..=columns).contains(&e.column),
            "column {} of {columns}",
            e.column
        ),
    }
    // The same text as a condition of a catch-all route.
    let route = format!("FROM /messages/* WHERE {text} INTO $upstream");
    if let Ok(route) = Route::parse(id, &route, Priority(1), Ttl::Infinite) {
        let table = RouteTable::new(vec![route]);
        for m in messages(&text) {
            let _ = table.targets(&m);
        }
    }
});

/// Messages a condition may look at: a module output with properties and a JSON body built
/// from the text, and a leaf device's telemetry with a non-JSON body.
fn messages(text: &str) -> Vec<Message> {
    let json = format!(
        "{{\"a\":1,\"b\":\"x\",\"c\":[1,2,{{\"d\":true}}],\"t\":{}}}",
        serde_json::Value::String(text.to_owned())
    );
    let output = Message::new(
        Source::ModuleOutput {
            device: DeviceId::new("d"),
            module: ModuleId::new("m"),
            output: Some(OutputName::new("out")),
        },
        json.into_bytes(),
    )
    .with_property("a", "1")
    .with_property("b", text)
    .with_property("$a", "2")
    .with_system_property(SystemProperty::ContentType, "application/json")
    .with_system_property(SystemProperty::ContentEncoding, "utf-8")
    .with_system_property(SystemProperty::MessageId, text);
    let telemetry = Message::new(
        Source::Telemetry {
            device: DeviceId::new("leaf"),
        },
        text.as_bytes().to_vec(),
    )
    .with_property("a", text);
    vec![output, telemetry]
}

/// Prints `expr` as condition text, parses it and compares.
fn round_trip(id: &RouteId, expr: &Expr) {
    if !printable(expr, 0) {
        return;
    }
    let mut text = String::new();
    print(expr, &mut text);
    let again = parse_condition(id, &text)
        .unwrap_or_else(|e| panic!("printed condition {text:?} does not parse: {e}"));
    assert!(
        same(expr, &again),
        "{text:?} parses to {again:?}, not {expr:?}"
    );
}

/// Whether the printer can reproduce the tree: finite numbers, nesting well inside the
/// parser's depth limit, and raw arguments without comment markers (whitespace is removed
/// from them, which can join `/ *` into a comment).
fn printable(expr: &Expr, depth: usize) -> bool {
    if depth > 40 {
        return false;
    }
    match &expr.kind {
        ExprKind::Literal(Literal::Number(n)) => n.is_finite(),
        ExprKind::Literal(_)
        | ExprKind::Property(_)
        | ExprKind::SysProperty(_)
        | ExprKind::EscapedSysProperty(_) => true,
        ExprKind::Unary { operand, .. } => printable(operand, depth + 1),
        ExprKind::Binary { left, right, .. } => {
            printable(left, depth + 1) && printable(right, depth + 1)
        }
        ExprKind::Call { args, raw_args, .. } => {
            !raw_args.contains("/*") && args.iter().all(|a| printable(a, depth + 1))
        }
    }
}

fn print(expr: &Expr, out: &mut String) {
    match &expr.kind {
        ExprKind::Literal(l) => match l {
            Literal::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Literal::Number(n) => out.push_str(&format!("{n:?}")),
            Literal::String(s) => {
                out.push('"');
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
            Literal::Null => out.push_str("null"),
            Literal::Undefined => out.push_str("undefined"),
        },
        ExprKind::Property(name) => out.push_str(name),
        ExprKind::SysProperty(name) => {
            out.push('$');
            out.push_str(name);
        }
        ExprKind::EscapedSysProperty(name) => {
            out.push_str("{$");
            out.push_str(name);
            out.push('}');
        }
        ExprKind::Unary { op, operand } => {
            out.push_str(match op {
                UnaryOp::Negate => "- (",
                UnaryOp::Not => "NOT (",
            });
            print(operand, out);
            out.push(')');
        }
        ExprKind::Binary { op, left, right } => {
            out.push('(');
            print(left, out);
            out.push_str(") ");
            out.push_str(op.symbol());
            out.push_str(" (");
            print(right, out);
            out.push(')');
        }
        ExprKind::Call {
            function,
            args,
            raw_args,
        } => {
            out.push_str(function);
            out.push('(');
            if args.is_empty() {
                out.push_str(raw_args);
            }
            for (i, a) in args.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                print(a, out);
            }
            out.push(')');
        }
    }
}

/// Tree equality, columns aside.
fn same(a: &Expr, b: &Expr) -> bool {
    match (&a.kind, &b.kind) {
        (ExprKind::Unary { op: o1, operand: x }, ExprKind::Unary { op: o2, operand: y }) => {
            o1 == o2 && same(x, y)
        }
        (
            ExprKind::Binary {
                op: o1,
                left: l1,
                right: r1,
            },
            ExprKind::Binary {
                op: o2,
                left: l2,
                right: r2,
            },
        ) => o1 == o2 && same(l1, l2) && same(r1, r2),
        (
            ExprKind::Call {
                function: f1,
                args: a1,
                raw_args: r1,
            },
            ExprKind::Call {
                function: f2,
                args: a2,
                raw_args: r2,
            },
        ) => {
            f1 == f2
                && r1 == r2
                && a1.len() == a2.len()
                && a1.iter().zip(a2).all(|(x, y)| same(x, y))
        }
        (x, y) => x == y,
    }
}
