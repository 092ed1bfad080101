//! Errors of the route language: every one names the route and the 1-based column it points at.

use thiserror::Error;

use crate::route::RouteId;

/// A route expression that cannot be parsed or compiled.
#[derive(Clone, Debug, PartialEq, Error)]
#[error("route '{route}', column {column}: {kind}")]
pub struct RouteParseError {
    /// The route's name in the manifest.
    pub route: RouteId,
    /// 1-based character column in the route text.
    pub column: usize,
    /// What is wrong.
    pub kind: RouteParseErrorKind,
}

/// What is wrong with a route expression.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum RouteParseErrorKind {
    /// The route text is empty or only whitespace and comments.
    #[error("the route is empty")]
    Empty,
    /// A token that the grammar does not allow here.
    #[error("expected {expected}, found {found}")]
    Unexpected {
        /// What the grammar allows at this point.
        expected: String,
        /// The token found instead.
        found: String,
    },
    /// A string literal with no closing quote.
    #[error("unterminated string")]
    UnterminatedString,
    /// `INTO` names something other than `$upstream` or `BrokeredEndpoint(…)`.
    #[error("unknown endpoint {0}; expected $upstream or BrokeredEndpoint(\"/modules/<module>/inputs/<input>\")")]
    UnknownEndpoint(String),
    /// The `BrokeredEndpoint` address is not `/modules/<module>/inputs/<input>`.
    #[error("invalid BrokeredEndpoint address '{0}': expected /modules/<module>/inputs/<input>")]
    InvalidEndpointAddress(String),
    /// A call to a function that is not a builtin.
    #[error("unknown function '{0}'")]
    UnknownFunction(String),
    /// A builtin called with the wrong number of arguments.
    #[error("function {function} takes {expected} argument(s), got {got}")]
    Arity {
        /// The builtin's name.
        function: String,
        /// The allowed argument count, e.g. `2` or `2 or 3`.
        expected: String,
        /// The number of arguments given.
        got: usize,
    },
    /// An operator or builtin applied to operands of a type it does not accept.
    #[error("'{operator}' cannot be applied to {given}")]
    OperandType {
        /// The operator or builtin.
        operator: String,
        /// The operand types given.
        given: String,
    },
    /// A `$body.…` query (or `twin_change_includes` path) that is not a supported JSON path.
    #[error("invalid body query '{query}': {reason}")]
    BodyQuery {
        /// The query text after `$body.`.
        query: String,
        /// Why it is rejected.
        reason: String,
    },
    /// `twin_change_includes` in a route whose source is not `/twinChangeNotifications`.
    #[error("twin_change_includes is only valid in routes FROM /twinChangeNotifications")]
    TwinChangeIncludesSource,
    /// The `WHERE` condition has a non-boolean type (for example a bare string).
    #[error("the condition must be a boolean, not {0}")]
    NotBoolean(String),
}
