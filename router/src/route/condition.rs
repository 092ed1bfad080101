//! The `WHERE` condition: compile a parsed expression, then evaluate it against messages.
//!
//! Guarantees:
//! - Compilation rejects what edgeHub's compiler rejects: unknown functions, wrong argument
//!   counts, operands whose static types an operator cannot take (an application property is
//!   a string, so `temperature > 30` is an error; `as_number(temperature) > 30` is not),
//!   unsupported `$body` paths, `twin_change_includes` outside `/twinChangeNotifications`
//!   routes, and a condition that is not boolean.
//! - Evaluation is pure and total: it never panics and never fails; problems at run time
//!   (missing properties, a body that is not JSON, type mismatches from body queries) give
//!   Undefined.
//! - Logic is three-valued (true, false, Undefined) as edgeHub's `Bool`; a message matches only
//!   when the condition is exactly true, so Undefined counts as false at the top.
//! - Name resolution, as edgeHub: a bare name is an application property; `$name` is the
//!   application property literally named `$name` if the message has one, else a body query
//!   (`$body.…`), else the system property `name`; `{$name}` skips the application property.
//!   A `$name` containing `[` or `]` is only ever a body query.
//!
//! Size: compile-time typing and run-time evaluation share this file (about 530 lines without
//! tests) because each operator's static rule and its run-time rule must be read side by side.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::cmp::Ordering;

use crate::message::Message;
use crate::route::body::{json_body, BodyPath};
use crate::route::builtins::Builtin;
use crate::route::error::{RouteParseError, RouteParseErrorKind};
use crate::route::parse::{
    parse_condition, BinaryOp, Expr, ExprKind, Literal, SourcePattern, UnaryOp,
};
use crate::route::RouteId;

/// A run-time value of the condition language.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    /// Missing, or the result of an operation on incompatible values.
    Undefined,
    /// `null` (a literal, or a JSON `null` in the body).
    Null,
    /// A boolean.
    Bool(bool),
    /// A number (all numbers are doubles, as in edgeHub).
    Number(f64),
    /// A string.
    String(Cow<'a, str>),
}

impl Value<'_> {
    /// Whether the value is exactly `true` (the top-level match rule).
    pub fn is_true(&self) -> bool {
        matches!(self, Value::Bool(true))
    }

    /// The same value, owning its string.
    pub fn into_owned(self) -> Value<'static> {
        match self {
            Value::Undefined => Value::Undefined,
            Value::Null => Value::Null,
            Value::Bool(b) => Value::Bool(b),
            Value::Number(n) => Value::Number(n),
            Value::String(s) => Value::String(Cow::Owned(s.into_owned())),
        }
    }
}

/// Static types used by the compile-time checks. `Any` is a body query, known only at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ty {
    Bool,
    Number,
    String,
    Null,
    Undefined,
    Any,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Bool => "bool",
            Ty::Number => "number",
            Ty::String => "string",
            Ty::Null => "null",
            Ty::Undefined => "undefined",
            Ty::Any => "any",
        }
    }

    /// Whether a value of static type `self` may be passed where `expected` is required.
    fn fits(self, expected: Ty) -> bool {
        self == expected || matches!(self, Ty::Any | Ty::Undefined) || expected == Ty::Any
    }
}

/// What a `$name` falls back to when no application property `$name` exists.
#[derive(Clone, Debug, PartialEq)]
enum Lookup {
    Body(BodyPath),
    System(String),
    Nothing,
}

/// A compiled condition node.
#[derive(Clone, Debug, PartialEq)]
enum Node {
    Const(Value<'static>),
    Property(String),
    Dollar {
        app_key: Option<String>,
        fallback: Lookup,
    },
    Unary(UnaryOp, Box<Node>),
    Binary(BinaryOp, Box<Node>, Box<Node>),
    Call(Builtin, Vec<Node>),
    TwinChangeIncludes(BodyPath),
}

/// A compiled, type-checked `WHERE` condition.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    root: Node,
}

/// Per-message evaluation state: the body is decoded as JSON at most once, however many
/// conditions look at it.
#[derive(Debug)]
pub struct EvalContext<'m> {
    msg: &'m Message,
    json: OnceCell<Option<serde_json::Value>>,
    source_key: OnceCell<String>,
}

impl<'m> EvalContext<'m> {
    /// A context for evaluating conditions against `msg`.
    pub fn new(msg: &'m Message) -> Self {
        EvalContext {
            msg,
            json: OnceCell::new(),
            source_key: OnceCell::new(),
        }
    }

    /// The message's source path plus `/`, lower-cased: what `FROM` prefixes are matched
    /// against. Computed once per message.
    pub(crate) fn source_key(&self) -> &str {
        self.source_key
            .get_or_init(|| source_key(self.msg.source()))
    }

    fn json(&self) -> Option<&serde_json::Value> {
        self.json.get_or_init(|| json_body(self.msg)).as_ref()
    }
}

/// `source`'s path plus `/`, lower-cased (one allocation when the path is ASCII, as module and
/// output names almost always are).
pub(crate) fn source_key(source: &crate::message::Source) -> String {
    let mut key = String::with_capacity(64);
    source.write_path(&mut key);
    key.push('/');
    if key.is_ascii() {
        key.make_ascii_lowercase();
        key
    } else {
        key.to_lowercase()
    }
}

type CompileResult = Result<(Node, Ty), (usize, RouteParseErrorKind)>;

impl Condition {
    /// Parses and compiles condition text for a route whose `FROM` is `source`.
    pub fn parse(
        route: &RouteId,
        text: &str,
        source: &SourcePattern,
    ) -> Result<Self, RouteParseError> {
        let expr = parse_condition(route, text)?;
        Self::compile(route, &expr, source)
    }

    /// Compiles a parsed condition for a route whose `FROM` is `source`.
    pub fn compile(
        route: &RouteId,
        expr: &Expr,
        source: &SourcePattern,
    ) -> Result<Self, RouteParseError> {
        let to_error = |(column, kind)| RouteParseError {
            route: route.clone(),
            column,
            kind,
        };
        let (root, ty) = Compiler { source }.node(expr).map_err(to_error)?;
        if matches!(ty, Ty::String | Ty::Number) {
            return Err(to_error((
                expr.column,
                RouteParseErrorKind::NotBoolean(ty.name().to_owned()),
            )));
        }
        Ok(Condition { root })
    }

    /// Whether `msg` satisfies the condition (the result is exactly `true`).
    pub fn matches(&self, msg: &Message) -> bool {
        self.evaluate(&EvalContext::new(msg)).is_true()
    }

    /// The condition's value for the context's message.
    pub fn evaluate<'a>(&'a self, ctx: &'a EvalContext<'a>) -> Value<'a> {
        eval(&self.root, ctx)
    }
}

struct Compiler<'s> {
    source: &'s SourcePattern,
}

fn operand_error(column: usize, operator: &str, given: &[Ty]) -> (usize, RouteParseErrorKind) {
    let given = given
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(" and ");
    (
        column,
        RouteParseErrorKind::OperandType {
            operator: operator.to_owned(),
            given,
        },
    )
}

impl Compiler<'_> {
    fn node(&self, expr: &Expr) -> CompileResult {
        let column = expr.column;
        match &expr.kind {
            ExprKind::Literal(lit) => Ok(literal(lit)),
            ExprKind::Property(name) => Ok((Node::Property(name.clone()), Ty::String)),
            ExprKind::SysProperty(name) => dollar(name, false).map_err(|k| (column, k)),
            ExprKind::EscapedSysProperty(name) => dollar(name, true).map_err(|k| (column, k)),
            ExprKind::Unary { op, operand } => self.unary(*op, operand, column),
            ExprKind::Binary { op, left, right } => self.binary(*op, left, right, column),
            ExprKind::Call {
                function,
                args,
                raw_args,
            } => self.call(function, args, raw_args, column),
        }
    }

    fn unary(&self, op: UnaryOp, operand: &Expr, column: usize) -> CompileResult {
        let (node, ty) = self.node(operand)?;
        let (ok, result, symbol) = match op {
            UnaryOp::Negate => (ty.fits(Ty::Number), Ty::Number, "-"),
            UnaryOp::Not => (ty.fits(Ty::Bool) || ty == Ty::Null, Ty::Bool, "NOT"),
        };
        if !ok {
            return Err(operand_error(column, symbol, &[ty]));
        }
        Ok((Node::Unary(op, Box::new(node)), result))
    }

    fn binary(&self, op: BinaryOp, left: &Expr, right: &Expr, column: usize) -> CompileResult {
        let (l, lt) = self.node(left)?;
        let (r, rt) = self.node(right)?;
        let result =
            binary_type(op, lt, rt).ok_or_else(|| operand_error(column, op.symbol(), &[lt, rt]))?;
        Ok((Node::Binary(op, Box::new(l), Box::new(r)), result))
    }

    fn call(&self, function: &str, args: &[Expr], raw: &str, column: usize) -> CompileResult {
        let builtin = Builtin::lookup(function).ok_or_else(|| {
            (
                column,
                RouteParseErrorKind::UnknownFunction(function.to_owned()),
            )
        })?;
        if builtin == Builtin::TwinChangeIncludes {
            return self.twin_change_includes(raw, column);
        }
        let signature = builtin.signature();
        check_arity(builtin, args.len(), column)?;
        let mut nodes = Vec::with_capacity(args.len());
        let mut types = Vec::with_capacity(args.len());
        for arg in args {
            let (node, ty) = self.node(arg)?;
            nodes.push(node);
            types.push(ty);
        }
        let last = signature.params.len().saturating_sub(1);
        let fits = types.iter().enumerate().all(|(i, ty)| {
            signature
                .params
                .get(i.min(last))
                .is_some_and(|expected| ty.fits(*expected))
        });
        if !fits {
            return Err(operand_error(column, builtin.name(), &types));
        }
        Ok((Node::Call(builtin, nodes), signature.returns))
    }

    fn twin_change_includes(&self, raw: &str, column: usize) -> CompileResult {
        if !self.source.is_twin_change_notifications() {
            return Err((column, RouteParseErrorKind::TwinChangeIncludesSource));
        }
        let path = BodyPath::parse(raw).map_err(|reason| {
            (
                column,
                RouteParseErrorKind::BodyQuery {
                    query: raw.to_owned(),
                    reason,
                },
            )
        })?;
        Ok((Node::TwinChangeIncludes(path), Ty::Bool))
    }
}

fn check_arity(
    builtin: Builtin,
    got: usize,
    column: usize,
) -> Result<(), (usize, RouteParseErrorKind)> {
    let signature = builtin.signature();
    let max = signature.params.len();
    let ok = got >= signature.required && (signature.variadic || got <= max);
    if ok {
        return Ok(());
    }
    let expected = match (signature.variadic, signature.required == max) {
        (true, _) => format!("at least {}", signature.required),
        (false, true) => max.to_string(),
        (false, false) => format!("{} or {}", signature.required, max),
    };
    let function = builtin.name().to_owned();
    Err((
        column,
        RouteParseErrorKind::Arity {
            function,
            expected,
            got,
        },
    ))
}

/// The static result type of `left op right`, or `None` when edgeHub would reject the operands.
fn binary_type(op: BinaryOp, left: Ty, right: Ty) -> Option<Ty> {
    use BinaryOp::*;
    let both = |t: Ty| left.fits(t) && right.fits(t);
    let comparable = left.fits(right) || right.fits(left) || left == Ty::Null || right == Ty::Null;
    match op {
        Mul | Div | Mod | Add | Sub => both(Ty::Number).then_some(Ty::Number),
        Concat => both(Ty::String).then_some(Ty::String),
        Lt | Le | Gt | Ge | Eq | Ne => comparable.then_some(Ty::Bool),
        And | Or => {
            let logical = |t: Ty| matches!(t, Ty::Bool | Ty::Null | Ty::Undefined | Ty::Any);
            (logical(left) && logical(right)).then_some(Ty::Bool)
        }
        Coalesce => comparable.then_some(match (left, right) {
            (Ty::Undefined, r) => r,
            (l, r) if l == r => l,
            _ => Ty::Any,
        }),
    }
}

fn literal(lit: &Literal) -> (Node, Ty) {
    let (value, ty) = match lit {
        Literal::Bool(b) => (Value::Bool(*b), Ty::Bool),
        Literal::Number(n) => (Value::Number(*n), Ty::Number),
        Literal::String(s) => (Value::String(Cow::Owned(s.clone())), Ty::String),
        Literal::Null => (Value::Null, Ty::Null),
        Literal::Undefined => (Value::Undefined, Ty::Undefined),
    };
    (Node::Const(value), ty)
}

/// Resolves `$name` (or `{$name}` when `escaped`) per edgeHub's order.
fn dollar(name: &str, escaped: bool) -> Result<(Node, Ty), RouteParseErrorKind> {
    let has_brackets = name.contains('[') || name.contains(']');
    let body_query = name
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("body."))
        .then(|| &name[5..]);
    let (fallback, ty) = match body_query {
        Some(query) => {
            let path = BodyPath::parse(query).map_err(|reason| RouteParseErrorKind::BodyQuery {
                query: query.to_owned(),
                reason,
            })?;
            (Lookup::Body(path), Ty::Any)
        }
        None if has_brackets => (Lookup::Nothing, Ty::Undefined),
        None => (Lookup::System(name.to_owned()), Ty::String),
    };
    let app_key = (!escaped && !has_brackets).then(|| format!("${name}"));
    Ok((Node::Dollar { app_key, fallback }, ty))
}

fn eval<'a>(node: &'a Node, ctx: &'a EvalContext<'a>) -> Value<'a> {
    match node {
        Node::Const(v) => v.clone(),
        Node::Property(name) => string_or_undefined(ctx.msg.property(name)),
        Node::Dollar { app_key, fallback } => dollar_value(app_key.as_deref(), fallback, ctx),
        Node::Unary(op, operand) => unary(*op, eval(operand, ctx)),
        Node::Binary(op, l, r) => binary(*op, l, r, ctx),
        Node::Call(builtin, args) => builtin.call(args.iter().map(|a| eval(a, ctx)).collect()),
        Node::TwinChangeIncludes(path) => match ctx.json().and_then(|j| path.lookup(j)) {
            None => Value::Undefined,
            Some(serde_json::Value::Null) => Value::Bool(false),
            Some(_) => Value::Bool(true),
        },
    }
}

fn string_or_undefined(s: Option<&str>) -> Value<'_> {
    s.map_or(Value::Undefined, |s| Value::String(Cow::Borrowed(s)))
}

fn dollar_value<'a>(
    app_key: Option<&str>,
    fallback: &'a Lookup,
    ctx: &'a EvalContext<'a>,
) -> Value<'a> {
    if let Some(value) = app_key.and_then(|k| ctx.msg.property(k)) {
        return Value::String(Cow::Borrowed(value));
    }
    match fallback {
        Lookup::Body(path) => ctx
            .json()
            .and_then(|j| path.lookup(j))
            .map_or(Value::Undefined, json_value),
        Lookup::System(name) => string_or_undefined(ctx.msg.system_property_by_name(name)),
        Lookup::Nothing => Value::Undefined,
    }
}

/// Scalars map to values; objects and arrays are Undefined (edgeHub `BodyQuery`).
fn json_value(json: &serde_json::Value) -> Value<'_> {
    match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => n.as_f64().map_or(Value::Undefined, Value::Number),
        serde_json::Value::String(s) => Value::String(Cow::Borrowed(s)),
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => Value::Undefined,
    }
}

fn unary(op: UnaryOp, value: Value<'_>) -> Value<'_> {
    match (op, value) {
        (UnaryOp::Negate, Value::Number(n)) => Value::Number(-n),
        (UnaryOp::Not, Value::Bool(b)) => Value::Bool(!b),
        _ => Value::Undefined,
    }
}

/// Three-valued truth: `Some(bool)` or `None` for Undefined (anything not a boolean).
fn truth(value: &Value<'_>) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        _ => None,
    }
}

fn from_truth<'a>(t: Option<bool>) -> Value<'a> {
    t.map_or(Value::Undefined, Value::Bool)
}

fn binary<'a>(op: BinaryOp, l: &'a Node, r: &'a Node, ctx: &'a EvalContext<'a>) -> Value<'a> {
    let left = eval(l, ctx);
    match op {
        // edgeHub evaluates both sides; so do we (there are no side effects to skip).
        BinaryOp::And => from_truth(match (truth(&left), truth(&eval(r, ctx))) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        }),
        BinaryOp::Or => from_truth(match (truth(&left), truth(&eval(r, ctx))) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        }),
        BinaryOp::Coalesce if left != Value::Undefined => left,
        BinaryOp::Coalesce => eval(r, ctx),
        _ => strict_binary(op, left, eval(r, ctx)),
    }
}

/// Operators that are Undefined as soon as either side is.
fn strict_binary<'a>(op: BinaryOp, left: Value<'a>, right: Value<'a>) -> Value<'a> {
    use BinaryOp::*;
    match (op, left, right) {
        (_, Value::Undefined, _) | (_, _, Value::Undefined) => Value::Undefined,
        (Mul | Div | Mod | Add | Sub, Value::Number(a), Value::Number(b)) => {
            Value::Number(arith(op, a, b))
        }
        (Concat, Value::String(a), Value::String(b)) => {
            Value::String(Cow::Owned(format!("{a}{b}")))
        }
        (Eq | Ne, Value::Null, other) | (Eq | Ne, other, Value::Null) => {
            Value::Bool((other == Value::Null) == (op == Eq))
        }
        (Lt | Le | Gt | Ge | Eq | Ne, a, b) => {
            from_truth(compare(&a, &b).map(|o| ordering_holds(op, o)))
        }
        _ => Value::Undefined,
    }
}

fn arith(op: BinaryOp, a: f64, b: f64) -> f64 {
    match op {
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Mod => a % b,
        BinaryOp::Add => a + b,
        _ => a - b,
    }
}

/// Ordering of two values of the same type; strings compare ordinally by UTF-16 code unit
/// (.NET `string.CompareOrdinal`). `None` for different types or a NaN.
fn compare(a: &Value<'_>, b: &Value<'_>) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.partial_cmp(y),
        (Value::String(x), Value::String(y)) => Some(x.encode_utf16().cmp(y.encode_utf16())),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn ordering_holds(op: BinaryOp, o: Ordering) -> bool {
    match op {
        BinaryOp::Lt => o.is_lt(),
        BinaryOp::Le => o.is_le(),
        BinaryOp::Gt => o.is_gt(),
        BinaryOp::Ge => o.is_ge(),
        BinaryOp::Eq => o.is_eq(),
        _ => o.is_ne(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{DeviceId, Source};

    fn compile(text: &str) -> Result<Condition, RouteParseError> {
        Condition::parse(&RouteId::new("r"), text, &SourcePattern::new("/messages/*"))
    }

    fn leaf() -> Message {
        Message::new(
            Source::Telemetry {
                device: DeviceId::new("d"),
            },
            "",
        )
    }

    #[test]
    fn application_properties_are_strings_so_numeric_comparison_is_rejected() {
        let err = compile("temperature > 30").err().map(|e| e.column);
        assert_eq!(err, Some(13));
        assert!(compile("as_number(temperature) > 30").is_ok());
    }

    #[test]
    fn a_non_boolean_condition_is_rejected() {
        assert!(matches!(
            compile("'text'").map_err(|e| e.kind),
            Err(RouteParseErrorKind::NotBoolean(_))
        ));
    }

    #[test]
    fn undefined_is_false_at_the_top() {
        let cond = compile("missing = 'x'").expect("compiles");
        assert!(!cond.matches(&leaf()));
        let negated = compile("NOT (missing = 'x')").expect("compiles");
        assert!(!negated.matches(&leaf()));
    }

    #[test]
    fn unknown_functions_and_bad_arity_are_rejected() {
        assert!(matches!(
            compile("nope(1)").map_err(|e| e.kind),
            Err(RouteParseErrorKind::UnknownFunction(_))
        ));
        assert!(matches!(
            compile("contains('a')").map_err(|e| e.kind),
            Err(RouteParseErrorKind::Arity { .. })
        ));
    }
}
