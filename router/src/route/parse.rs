//! Route expression text → syntax tree: `[SELECT *] FROM <path> [WHERE <condition>] INTO <sink>`.
//!
//! Guarantees:
//! - Pure and total: never panics, whatever the input; every failure is a [`RouteParseError`]
//!   that names the route and the 1-based column of the offending token.
//! - Follows edgeHub's `Route.g4`/`Condition` grammar and lexer (see [`super::lexer`]):
//!   keywords and the `BrokeredEndpoint` function name are case-insensitive, strings take single
//!   or double quotes, and operator precedence from loosest to tightest is
//!   `??`, `OR`, `AND`, `= != <>`, `< <= > >=`, `+ - ||`, `* / %`, then unary `-` and `NOT`.
//! - Size: the syntax tree types live here with the parser (about 590 lines without tests) so
//!   that the grammar can be read in one place.
//! - Only syntax is checked here; names of builtins, operand types and `$body` paths are
//!   checked when the condition is compiled ([`super::condition`]).

use crate::message::{InputName, ModuleId, Source};
use crate::route::endpoint::Endpoint;
use crate::route::error::{RouteParseError, RouteParseErrorKind};
use crate::route::lexer::{tokenize, Token, TokenKind};
use crate::route::RouteId;

/// A parsed route expression.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteSpec {
    /// The `FROM` pattern.
    pub source: SourcePattern,
    /// The `WHERE` condition, if any.
    pub condition: Option<Expr>,
    /// The `INTO` endpoint.
    pub endpoint: Endpoint,
}

/// A `FROM` path such as `/messages/modules/m1/*`.
///
/// Matching is edgeHub's: trailing `*` and `/` are trimmed, `/` is appended, and the result is
/// a case-insensitive prefix of the message's source path plus `/`. A `*` elsewhere is literal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourcePattern {
    text: String,
    prefix: String,
}

impl SourcePattern {
    /// A pattern from its path text (already known to be a valid path).
    pub fn new(text: impl Into<String>) -> Self {
        let text = text.into();
        let prefix = format!("{}/", text.trim_end_matches(['*', '/'])).to_lowercase();
        SourcePattern { text, prefix }
    }

    /// The path as written in the route.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether a message from `source` is selected by this pattern.
    pub fn matches(&self, source: &Source) -> bool {
        self.matches_key(&super::condition::source_key(source))
    }

    /// Whether a lower-cased source path plus `/` is selected by this pattern.
    pub(crate) fn matches_key(&self, source_key: &str) -> bool {
        source_key.starts_with(&self.prefix)
    }

    /// Whether this pattern can only select twin change notifications.
    pub fn is_twin_change_notifications(&self) -> bool {
        self.prefix.starts_with("/twinchangenotifications/")
    }
}

/// A condition expression node with the column it is reported at.
#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    /// What the node is.
    pub kind: ExprKind,
    /// 1-based column: of the operator for unary and binary nodes, of the name for calls, of
    /// the token for leaves.
    pub column: usize,
}

/// Condition expression nodes.
#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    /// A literal value.
    Literal(Literal),
    /// A bare identifier: an application property.
    Property(String),
    /// `$name` (text after the `$`): application property `$name`, else body query, else
    /// system property.
    SysProperty(String),
    /// `{$name}` (text after the `$`): body query or system property, never an application
    /// property.
    EscapedSysProperty(String),
    /// A prefix operator.
    Unary {
        /// The operator.
        op: UnaryOp,
        /// Its operand.
        operand: Box<Expr>,
    },
    /// An infix operator.
    Binary {
        /// The operator.
        op: BinaryOp,
        /// Left operand.
        left: Box<Expr>,
        /// Right operand.
        right: Box<Expr>,
    },
    /// A function call, name as written.
    Call {
        /// The function name as written (builtins are matched case-insensitively).
        function: String,
        /// Parsed arguments (empty for `twin_change_includes`, which takes a raw path).
        args: Vec<Expr>,
        /// The argument text as written, whitespace removed (used by `twin_change_includes`).
        raw_args: String,
    },
}

/// Literal values.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    /// `true` / `false`.
    Bool(bool),
    /// Integer, hex or real literal.
    Number(f64),
    /// A quoted string, unescaped.
    String(String),
    /// `null`.
    Null,
    /// `undefined` (also a hex literal that does not fit in 64 bits, as in edgeHub).
    Undefined,
}

/// Prefix operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    /// `-x`.
    Negate,
    /// `NOT x`.
    Not,
}

/// Infix operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `%`
    Mod,
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `||`: string concatenation.
    Concat,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `=`
    Eq,
    /// `!=` or `<>`
    Ne,
    /// `AND`
    And,
    /// `OR`
    Or,
    /// `??`: left if defined, else right.
    Coalesce,
}

impl BinaryOp {
    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Mod => "%",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Concat => "||",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Eq => "=",
            BinaryOp::Ne => "!=",
            BinaryOp::And => "AND",
            BinaryOp::Or => "OR",
            BinaryOp::Coalesce => "??",
        }
    }

    /// Binding strength: higher binds tighter.
    fn precedence(self) -> u8 {
        match self {
            BinaryOp::Coalesce => 1,
            BinaryOp::Or => 2,
            BinaryOp::And => 3,
            BinaryOp::Eq | BinaryOp::Ne => 4,
            BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => 5,
            BinaryOp::Add | BinaryOp::Sub | BinaryOp::Concat => 6,
            BinaryOp::Mul | BinaryOp::Div | BinaryOp::Mod => 7,
        }
    }

    fn from_token(kind: &TokenKind) -> Option<BinaryOp> {
        Some(match kind {
            TokenKind::Mul => BinaryOp::Mul,
            TokenKind::Div => BinaryOp::Div,
            TokenKind::Mod => BinaryOp::Mod,
            TokenKind::Plus => BinaryOp::Add,
            TokenKind::Minus => BinaryOp::Sub,
            TokenKind::Concat => BinaryOp::Concat,
            TokenKind::Lt => BinaryOp::Lt,
            TokenKind::Le => BinaryOp::Le,
            TokenKind::Gt => BinaryOp::Gt,
            TokenKind::Ge => BinaryOp::Ge,
            TokenKind::Eq => BinaryOp::Eq,
            TokenKind::Ne => BinaryOp::Ne,
            TokenKind::And => BinaryOp::And,
            TokenKind::Or => BinaryOp::Or,
            TokenKind::Coalesce => BinaryOp::Coalesce,
            _ => return None,
        })
    }
}

/// The builtin whose argument is a raw twin path rather than an expression.
pub(crate) const TWIN_CHANGE_INCLUDES: &str = "twin_change_includes";

/// Nesting limit for parentheses and prefix operators, so hostile input cannot exhaust the stack.
const MAX_DEPTH: usize = 128;

/// Parses a whole route expression.
pub fn parse_route(route: &RouteId, text: &str) -> Result<RouteSpec, RouteParseError> {
    Parser::new(route, text).route()
}

/// Parses a condition on its own (the text after `WHERE`).
pub fn parse_condition(route: &RouteId, text: &str) -> Result<Expr, RouteParseError> {
    let mut parser = Parser::new(route, text);
    let expr = parser.expr(0)?;
    parser.expect_eof()?;
    Ok(expr)
}

struct Parser<'a> {
    route: &'a RouteId,
    chars: Vec<char>,
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn new(route: &'a RouteId, text: &str) -> Self {
        Parser {
            route,
            chars: text.chars().collect(),
            tokens: tokenize(text),
            pos: 0,
            depth: 0,
        }
    }

    fn peek(&self) -> &Token {
        // `tokenize` always ends with Eof and `advance` never moves past it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn advance(&mut self) -> Token {
        let token = self.peek().clone();
        if token.kind != TokenKind::Eof {
            self.pos += 1;
        }
        token
    }

    fn error(&self, column: usize, kind: RouteParseErrorKind) -> RouteParseError {
        RouteParseError {
            route: self.route.clone(),
            column,
            kind,
        }
    }

    fn unexpected(&self, expected: &str) -> RouteParseError {
        let token = self.peek();
        let kind = match token.kind {
            TokenKind::UnterminatedStr => RouteParseErrorKind::UnterminatedString,
            _ => RouteParseErrorKind::Unexpected {
                expected: expected.to_owned(),
                found: token.kind.describe(),
            },
        };
        self.error(token.column, kind)
    }

    fn eat(&mut self, kind: &TokenKind) -> bool {
        if &self.peek().kind == kind {
            self.advance();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, kind: &TokenKind, expected: &str) -> Result<Token, RouteParseError> {
        if &self.peek().kind == kind {
            Ok(self.advance())
        } else {
            Err(self.unexpected(expected))
        }
    }

    fn expect_eof(&mut self) -> Result<(), RouteParseError> {
        self.expect(&TokenKind::Eof, "end of route").map(|_| ())
    }

    fn route(mut self) -> Result<RouteSpec, RouteParseError> {
        if self.peek().kind == TokenKind::Eof {
            return Err(self.error(1, RouteParseErrorKind::Empty));
        }
        if self.eat(&TokenKind::Select) {
            self.expect(&TokenKind::Mul, "'*' after SELECT")?;
        }
        self.expect(&TokenKind::From, "FROM")?;
        let source = self.path()?;
        let condition = if self.eat(&TokenKind::Where) {
            Some(self.expr(0)?)
        } else {
            None
        };
        self.expect(&TokenKind::Into, "WHERE or INTO")?;
        let endpoint = self.sink()?;
        self.expect_eof()?;
        Ok(RouteSpec {
            source,
            condition,
            endpoint,
        })
    }

    /// `'/' item ('/' item)*` where an item is `*` or a name.
    fn path(&mut self) -> Result<SourcePattern, RouteParseError> {
        let mut text = String::new();
        self.expect(&TokenKind::Div, "a source path starting with '/'")?;
        loop {
            text.push('/');
            match self.peek().kind.clone() {
                TokenKind::Mul => text.push('*'),
                TokenKind::Id(name) | TokenKind::Integer(name) => text.push_str(&name),
                _ => return Err(self.unexpected("a path segment or '*'")),
            }
            self.advance();
            if !self.eat(&TokenKind::Div) {
                return Ok(SourcePattern::new(text));
            }
        }
    }

    /// `$upstream` or `BrokeredEndpoint("/modules/m/inputs/i")`.
    fn sink(&mut self) -> Result<Endpoint, RouteParseError> {
        let token = self.advance();
        match token.kind {
            TokenKind::SysProp(name) if name.eq_ignore_ascii_case("$upstream") => {
                Ok(Endpoint::Upstream)
            }
            TokenKind::SysProp(name) => {
                Err(self.error(token.column, RouteParseErrorKind::UnknownEndpoint(name)))
            }
            TokenKind::Id(name) if name.eq_ignore_ascii_case("BrokeredEndpoint") => {
                self.brokered_endpoint()
            }
            TokenKind::Id(name) => {
                Err(self.error(token.column, RouteParseErrorKind::UnknownEndpoint(name)))
            }
            _ => {
                self.pos -= usize::from(token.kind != TokenKind::Eof);
                Err(self.unexpected("$upstream or BrokeredEndpoint(\"…\")"))
            }
        }
    }

    fn brokered_endpoint(&mut self) -> Result<Endpoint, RouteParseError> {
        self.expect(&TokenKind::LParen, "'('")?;
        let token = self.peek().clone();
        let TokenKind::Str(address) = token.kind else {
            return Err(self.unexpected("a quoted endpoint address"));
        };
        self.advance();
        self.expect(&TokenKind::RParen, "')'")?;
        module_input(&address).ok_or_else(|| {
            self.error(
                token.column,
                RouteParseErrorKind::InvalidEndpointAddress(address),
            )
        })
    }

    /// Precedence climbing over binary operators binding at least as tight as `min`.
    fn expr(&mut self, min: u8) -> Result<Expr, RouteParseError> {
        let mut left = self.unary()?;
        while let Some(op) = BinaryOp::from_token(&self.peek().kind) {
            if op.precedence() < min {
                break;
            }
            let column = self.advance().column;
            let right = self.expr(op.precedence() + 1)?;
            let kind = ExprKind::Binary {
                op,
                left: Box::new(left),
                right: Box::new(right),
            };
            left = Expr { kind, column };
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, RouteParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            let column = self.peek().column;
            return Err(self.error(
                column,
                RouteParseErrorKind::Unexpected {
                    expected: format!("at most {MAX_DEPTH} levels of nesting"),
                    found: "deeper nesting".to_owned(),
                },
            ));
        }
        let result = self.unary_inner();
        self.depth -= 1;
        result
    }

    fn unary_inner(&mut self) -> Result<Expr, RouteParseError> {
        let op = match self.peek().kind {
            TokenKind::Minus => UnaryOp::Negate,
            TokenKind::Not => UnaryOp::Not,
            _ => return self.primary(),
        };
        let column = self.advance().column;
        let operand = Box::new(self.unary()?);
        Ok(Expr {
            kind: ExprKind::Unary { op, operand },
            column,
        })
    }

    fn primary(&mut self) -> Result<Expr, RouteParseError> {
        let token = self.peek().clone();
        let kind = match token.kind {
            TokenKind::LParen => return self.nested(),
            TokenKind::LBrace => return self.escaped_sys_property(),
            TokenKind::Id(name) => return self.property_or_call(name, token.column),
            TokenKind::SysProp(text) => ExprKind::SysProperty(text[1..].to_owned()),
            kind => ExprKind::Literal(literal(&kind).ok_or_else(|| self.unexpected("a value"))?),
        };
        self.advance();
        Ok(Expr {
            kind,
            column: token.column,
        })
    }

    fn nested(&mut self) -> Result<Expr, RouteParseError> {
        self.advance();
        let inner = self.expr(0)?;
        self.expect(&TokenKind::RParen, "')'")?;
        Ok(inner)
    }

    fn escaped_sys_property(&mut self) -> Result<Expr, RouteParseError> {
        let column = self.advance().column;
        let TokenKind::SysProp(text) = self.peek().kind.clone() else {
            return Err(self.unexpected("a $name inside '{…}'"));
        };
        self.advance();
        self.expect(&TokenKind::RBrace, "'}'")?;
        Ok(Expr {
            kind: ExprKind::EscapedSysProperty(text[1..].to_owned()),
            column,
        })
    }

    fn property_or_call(&mut self, name: String, column: usize) -> Result<Expr, RouteParseError> {
        self.advance();
        if self.peek().kind != TokenKind::LParen {
            return Ok(Expr {
                kind: ExprKind::Property(name),
                column,
            });
        }
        let open = self.advance();
        let (args, raw_args) = if name.eq_ignore_ascii_case(TWIN_CHANGE_INCLUDES) {
            (Vec::new(), self.raw_arguments(&open)?)
        } else {
            (self.arguments()?, String::new())
        };
        Ok(Expr {
            kind: ExprKind::Call {
                function: name,
                args,
                raw_args,
            },
            column,
        })
    }

    /// `)` or `expr (',' expr)* ')'`, after the `(`.
    fn arguments(&mut self) -> Result<Vec<Expr>, RouteParseError> {
        let mut args = Vec::new();
        if self.eat(&TokenKind::RParen) {
            return Ok(args);
        }
        loop {
            args.push(self.expr(0)?);
            if self.eat(&TokenKind::RParen) {
                return Ok(args);
            }
            self.expect(&TokenKind::Comma, "',' or ')'")?;
        }
    }

    /// The text up to the matching `)`, whitespace removed.
    fn raw_arguments(&mut self, open: &Token) -> Result<String, RouteParseError> {
        let mut depth = 0usize;
        loop {
            let token = self.advance();
            match token.kind {
                TokenKind::LParen => depth += 1,
                TokenKind::RParen if depth == 0 => {
                    let raw: String = self.chars[open.end..token.start].iter().collect();
                    return Ok(raw.chars().filter(|c| !c.is_whitespace()).collect());
                }
                TokenKind::RParen => depth -= 1,
                TokenKind::Eof => {
                    self.pos = self.tokens.len() - 1;
                    return Err(self.unexpected("')'"));
                }
                _ => {}
            }
        }
    }
}

fn literal(kind: &TokenKind) -> Option<Literal> {
    Some(match kind {
        TokenKind::Str(s) => Literal::String(s.clone()),
        TokenKind::Integer(t) | TokenKind::Real(t) => {
            t.parse::<f64>().map_or(Literal::Undefined, Literal::Number)
        }
        TokenKind::Hex(t) => i64::from_str_radix(&t[2..], 16)
            .map_or(Literal::Undefined, |n| Literal::Number(n as f64)),
        TokenKind::True => Literal::Bool(true),
        TokenKind::False => Literal::Bool(false),
        TokenKind::Null => Literal::Null,
        TokenKind::Undefined => Literal::Undefined,
        _ => return None,
    })
}

/// `/modules/{m}/inputs/{i}` with the leading and trailing `/` optional.
fn module_input(address: &str) -> Option<Endpoint> {
    let trimmed = address.strip_prefix('/').unwrap_or(address);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    let segments: Vec<&str> = trimmed.split('/').collect();
    match segments.as_slice() {
        [modules, module, inputs, input]
            if modules.eq_ignore_ascii_case("modules")
                && inputs.eq_ignore_ascii_case("inputs")
                && !module.is_empty()
                && !input.is_empty() =>
        {
            Some(Endpoint::ModuleInput {
                module: ModuleId::new(*module),
                input: InputName::new(*input),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{DeviceId, OutputName};

    fn id() -> RouteId {
        RouteId::new("r")
    }

    fn parse(text: &str) -> Result<RouteSpec, RouteParseError> {
        parse_route(&id(), text)
    }

    fn module(m: &str, o: Option<&str>) -> Source {
        Source::ModuleOutput {
            device: DeviceId::new("d"),
            module: ModuleId::new(m),
            output: o.map(OutputName::new),
        }
    }

    #[test]
    fn a_minimal_route_parses() {
        let spec = parse("FROM /messages/* INTO $upstream").map_err(|e| e.to_string());
        let spec = spec.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.source.as_str(), "/messages/*");
        assert_eq!(spec.condition, None);
        assert_eq!(spec.endpoint, Endpoint::Upstream);
    }

    #[test]
    fn select_star_keywords_and_endpoint_name_are_case_insensitive() {
        let spec = parse("select * from /messages/modules/a/outputs/o where true into brokeredendpoint('modules/b/inputs/i/')");
        let expected = Endpoint::ModuleInput {
            module: ModuleId::new("b"),
            input: InputName::new("i"),
        };
        assert_eq!(spec.map(|s| s.endpoint), Ok(expected));
        assert_eq!(
            parse("FROM /* INTO $UPSTREAM").map(|s| s.endpoint),
            Ok(Endpoint::Upstream)
        );
    }

    #[test]
    fn brokered_endpoint_needs_exactly_four_segments() {
        let err = parse(r#"FROM /* INTO BrokeredEndpoint("/modules/b/inputs")"#);
        assert!(matches!(
            err,
            Err(RouteParseError {
                column: 31,
                kind: RouteParseErrorKind::InvalidEndpointAddress(_),
                ..
            })
        ));
    }

    #[test]
    fn errors_name_the_route_and_column() {
        let err = parse("FROM /messages WHERE a = INTO $upstream");
        let err = err.err().map(|e| (e.route.to_string(), e.column));
        assert_eq!(err, Some(("r".to_owned(), 26)));
    }

    #[test]
    fn unknown_sink_is_reported() {
        let err = parse("FROM /messages INTO $downstream")
            .err()
            .map(|e| e.kind);
        assert_eq!(
            err,
            Some(RouteParseErrorKind::UnknownEndpoint("$downstream".into()))
        );
    }

    #[test]
    fn empty_route_is_an_error() {
        assert_eq!(
            parse("  /* nothing */ ").err().map(|e| e.kind),
            Some(RouteParseErrorKind::Empty)
        );
    }

    #[test]
    fn source_matching_is_prefix_and_case_insensitive() {
        let all_messages = SourcePattern::new("/messages/*");
        let modules = SourcePattern::new("/messages/modules/*");
        let m1 = SourcePattern::new("/Messages/Modules/M1/*");
        let everything = SourcePattern::new("/*");
        let leaf = Source::Telemetry {
            device: DeviceId::new("d"),
        };
        let twin = Source::TwinChange {
            device: DeviceId::new("d"),
            module: None,
        };
        assert!(all_messages.matches(&leaf) && all_messages.matches(&module("m1", Some("o"))));
        assert!(!modules.matches(&leaf) && modules.matches(&module("m2", None)));
        assert!(m1.matches(&module("m1", Some("o"))) && m1.matches(&module("m1", None)));
        assert!(!m1.matches(&module("m10", Some("o"))));
        assert!(everything.matches(&twin) && !all_messages.matches(&twin));
    }

    #[test]
    fn precedence_follows_the_reference() {
        let expr = parse_condition(&id(), "a = 'x' OR b = 'y' AND c = 'z'");
        let Ok(Expr {
            kind: ExprKind::Binary { op, .. },
            ..
        }) = expr
        else {
            panic!("not a binary expression: {expr:?}")
        };
        assert_eq!(op, BinaryOp::Or);
        let expr = parse_condition(&id(), "x ?? y OR z");
        assert!(matches!(
            expr,
            Ok(Expr {
                kind: ExprKind::Binary {
                    op: BinaryOp::Coalesce,
                    ..
                },
                ..
            })
        ));
    }

    #[test]
    fn twin_change_includes_keeps_its_raw_argument() {
        let expr = parse_condition(&id(), "twin_change_includes( properties.reported.temp )");
        let Ok(Expr {
            kind: ExprKind::Call { raw_args, .. },
            ..
        }) = expr
        else {
            panic!("not a call: {expr:?}")
        };
        assert_eq!(raw_args, "properties.reported.temp");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let text = format!("{}true{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(parse_condition(&id(), &text).is_err());
        let nots = format!("{}true", "NOT ".repeat(10_000));
        assert!(parse_condition(&id(), &nots).is_err());
    }
}
