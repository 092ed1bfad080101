//! Tokenizer for route expressions, reproducing edgeHub's ANTLR lexer (`GrammarLexer.g4`).
//!
//! Guarantees:
//! - Never panics; every input yields a token list ending with [`TokenKind::Eof`].
//! - Longest match wins, and on a tie the rule listed first in edgeHub's lexer wins. This keeps
//!   edgeHub's quirks on purpose, so a route means here what it meant there: identifier
//!   characters include `* + - . ' ! | & %`, so `a-b` and `3*4` are single identifiers and
//!   operators between names need spaces; `-5` is one integer token.
//! - Keywords `SELECT FROM WHERE INTO AND OR NOT` are case-insensitive; the literals `true`,
//!   `false`, `null` and `undefined` are lower-case only (as in edgeHub).
//! - Columns are 1-based character positions in the route text.

/// One token with the column of its first character.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Token {
    pub(crate) kind: TokenKind,
    pub(crate) column: usize,
    /// Character offset of the first character (0-based).
    pub(crate) start: usize,
    /// Character offset one past the last character.
    pub(crate) end: usize,
}

/// Token kinds, in edgeHub's lexer-rule order (ties go to the earlier kind).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum TokenKind {
    Select,
    From,
    Where,
    Into,
    /// A terminated string literal, already unescaped.
    Str(String),
    /// A string with no closing quote.
    UnterminatedStr,
    Integer(String),
    Hex(String),
    Real(String),
    True,
    False,
    Null,
    Undefined,
    LParen,
    RParen,
    Comma,
    Plus,
    Minus,
    Mul,
    Div,
    Mod,
    And,
    Or,
    Not,
    Eq,
    Ne,
    Le,
    Ge,
    Gt,
    Lt,
    Concat,
    Coalesce,
    LBrace,
    RBrace,
    /// `$` followed by query-path characters; the text includes the `$`.
    SysProp(String),
    Id(String),
    /// Identifier characters plus `[` or `]`: not valid in a condition, kept for the error.
    QueryPath(String),
    Unknown(char),
    Eof,
}

impl TokenKind {
    /// How the token is shown in an error message.
    pub(crate) fn describe(&self) -> String {
        match self {
            TokenKind::Str(s) => format!("string '{s}'"),
            TokenKind::UnterminatedStr => "unterminated string".to_owned(),
            TokenKind::Integer(t) | TokenKind::Hex(t) | TokenKind::Real(t) => format!("number {t}"),
            TokenKind::SysProp(t) | TokenKind::Id(t) | TokenKind::QueryPath(t) => format!("'{t}'"),
            TokenKind::Unknown(c) => format!("unexpected character '{c}'"),
            TokenKind::Eof => "end of route".to_owned(),
            other => format!("'{}'", fixed_text(other)),
        }
    }
}

fn fixed_text(kind: &TokenKind) -> &'static str {
    match kind {
        TokenKind::Select => "SELECT",
        TokenKind::From => "FROM",
        TokenKind::Where => "WHERE",
        TokenKind::Into => "INTO",
        TokenKind::True => "true",
        TokenKind::False => "false",
        TokenKind::Null => "null",
        TokenKind::Undefined => "undefined",
        TokenKind::LParen => "(",
        TokenKind::RParen => ")",
        TokenKind::Comma => ",",
        TokenKind::Plus => "+",
        TokenKind::Minus => "-",
        TokenKind::Mul => "*",
        TokenKind::Div => "/",
        TokenKind::Mod => "%",
        TokenKind::And => "AND",
        TokenKind::Or => "OR",
        TokenKind::Not => "NOT",
        TokenKind::Eq => "=",
        TokenKind::Ne => "!=",
        TokenKind::Le => "<=",
        TokenKind::Ge => ">=",
        TokenKind::Gt => ">",
        TokenKind::Lt => "<",
        TokenKind::Concat => "||",
        TokenKind::Coalesce => "??",
        TokenKind::LBrace => "{",
        TokenKind::RBrace => "}",
        _ => "?",
    }
}

/// Fixed-text tokens, longest first where one is a prefix of another.
const OPERATORS: [(&str, TokenKind); 21] = [
    ("!=", TokenKind::Ne),
    ("<>", TokenKind::Ne),
    ("<=", TokenKind::Le),
    (">=", TokenKind::Ge),
    ("||", TokenKind::Concat),
    ("??", TokenKind::Coalesce),
    ("(", TokenKind::LParen),
    (")", TokenKind::RParen),
    (",", TokenKind::Comma),
    ("+", TokenKind::Plus),
    ("-", TokenKind::Minus),
    ("*", TokenKind::Mul),
    ("/", TokenKind::Div),
    ("%", TokenKind::Mod),
    ("=", TokenKind::Eq),
    (">", TokenKind::Gt),
    ("<", TokenKind::Lt),
    ("{", TokenKind::LBrace),
    ("}", TokenKind::RBrace),
    ("[", TokenKind::Unknown('[')),
    ("]", TokenKind::Unknown(']')),
];

/// Rule ranks for tie-breaking: lower rank = listed earlier in edgeHub's lexer.
const RANK_KEYWORD: u8 = 0;
const RANK_STRING: u8 = 1;
const RANK_NUMBER: u8 = 2;
const RANK_OPERATOR: u8 = 3;
const RANK_SYS_PROP: u8 = 4;
const RANK_ID: u8 = 5;
const RANK_QUERY_PATH: u8 = 6;
const RANK_COMMENT: u8 = 7;

/// Characters that end an identifier (edgeHub `ID_CHARS` is the complement, minus `[` `]`).
fn is_query_path_char(c: char) -> bool {
    !matches!(
        c,
        '(' | ')' | '<' | '>' | '@' | ',' | ';' | ':' | '\\' | '"' | '/' | '?' | '=' | '{' | '}'
    ) && !c.is_ascii_whitespace()
        && c != '\u{b}'
        && c != '\u{c}'
}

fn is_id_char(c: char) -> bool {
    is_query_path_char(c) && c != '[' && c != ']'
}

fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Splits `text` into tokens. Whitespace and `/* … */` comments are dropped.
pub(crate) fn tokenize(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut pos = 0;
    while pos < chars.len() {
        let ws = chars[pos..].iter().take_while(|c| is_ws(**c)).count();
        if ws > 0 {
            pos += ws;
            continue;
        }
        let (len, kind) = longest_match(&chars[pos..]);
        if let Some(kind) = kind {
            tokens.push(Token {
                kind,
                column: pos + 1,
                start: pos,
                end: pos + len,
            });
        }
        pos += len;
    }
    tokens.push(Token {
        kind: TokenKind::Eof,
        column: chars.len() + 1,
        start: pos,
        end: pos,
    });
    tokens
}

/// The longest token at the start of `rest` (`None` for a comment). `rest` is never empty.
fn longest_match(rest: &[char]) -> (usize, Option<TokenKind>) {
    let mut best: (usize, u8, Option<TokenKind>) = (0, u8::MAX, None);
    let mut offer = |len: usize, rank: u8, kind: Option<TokenKind>| {
        if len > best.0 || (len == best.0 && len > 0 && rank < best.1) {
            best = (len, rank, kind);
        }
    };
    if let Some((len, kind)) = string(rest) {
        offer(len, RANK_STRING, Some(kind));
    }
    if let Some((len, kind)) = number(rest) {
        offer(len, RANK_NUMBER, Some(kind));
    }
    if let Some((len, kind)) = operator(rest) {
        offer(len, RANK_OPERATOR, Some(kind));
    }
    if rest[0] == '$' {
        let len = 1 + rest[1..]
            .iter()
            .take_while(|c| is_query_path_char(**c))
            .count();
        if len > 1 {
            offer(
                len,
                RANK_SYS_PROP,
                Some(TokenKind::SysProp(rest[..len].iter().collect())),
            );
        }
    }
    let id_len = rest.iter().take_while(|c| is_id_char(**c)).count();
    if id_len > 0 {
        let text: String = rest[..id_len].iter().collect();
        match keyword(&text) {
            Some(kw) => offer(id_len, RANK_KEYWORD, Some(kw)),
            None => offer(id_len, RANK_ID, Some(TokenKind::Id(text))),
        }
    }
    let qp_len = rest.iter().take_while(|c| is_query_path_char(**c)).count();
    if qp_len > 0 {
        offer(
            qp_len,
            RANK_QUERY_PATH,
            Some(TokenKind::QueryPath(rest[..qp_len].iter().collect())),
        );
    }
    if let Some(len) = comment(rest) {
        offer(len, RANK_COMMENT, None);
    }
    if best.0 == 0 {
        return (1, Some(TokenKind::Unknown(rest[0])));
    }
    (best.0, best.2)
}

fn keyword(text: &str) -> Option<TokenKind> {
    let insensitive = [
        ("select", TokenKind::Select),
        ("from", TokenKind::From),
        ("where", TokenKind::Where),
        ("into", TokenKind::Into),
        ("and", TokenKind::And),
        ("or", TokenKind::Or),
        ("not", TokenKind::Not),
    ];
    if let Some((_, kind)) = insensitive
        .into_iter()
        .find(|(k, _)| text.eq_ignore_ascii_case(k))
    {
        return Some(kind);
    }
    match text {
        "true" => Some(TokenKind::True),
        "false" => Some(TokenKind::False),
        "null" => Some(TokenKind::Null),
        "undefined" => Some(TokenKind::Undefined),
        _ => None,
    }
}

fn operator(rest: &[char]) -> Option<(usize, TokenKind)> {
    OPERATORS.iter().find_map(|(text, kind)| {
        let n = text.chars().count();
        let matches = rest.len() >= n && text.chars().zip(rest).all(|(a, b)| a == *b);
        matches.then(|| (n, kind.clone()))
    })
}

fn comment(rest: &[char]) -> Option<usize> {
    if rest.len() < 4 || rest[0] != '/' || rest[1] != '*' {
        return None;
    }
    (2..rest.len() - 1)
        .find(|&i| rest[i] == '*' && rest[i + 1] == '/')
        .map(|i| i + 2)
}

/// A quoted string: terminated, or running to the end of the input.
fn string(rest: &[char]) -> Option<(usize, TokenKind)> {
    let quote = rest[0];
    if quote != '"' && quote != '\'' {
        return None;
    }
    let mut i = 1;
    while i < rest.len() {
        match rest[i] {
            '\\' => match escape_len(&rest[i + 1..]) {
                Some(n) => i += 1 + n,
                // A backslash that starts no valid escape ends the string token unterminated.
                None => return Some((i, TokenKind::UnterminatedStr)),
            },
            c if c == quote => {
                let body: String = rest[1..i].iter().collect();
                return Some((i + 1, TokenKind::Str(unescape(&body))));
            }
            _ => i += 1,
        }
    }
    Some((rest.len(), TokenKind::UnterminatedStr))
}

/// Length of a valid escape after the backslash: `"`, `'`, `\`, or `uXXXX`.
fn escape_len(after: &[char]) -> Option<usize> {
    match after.first()? {
        '"' | '\'' | '\\' => Some(1),
        'u' if after.len() >= 5 && after[1..5].iter().all(char::is_ascii_hexdigit) => Some(5),
        _ => None,
    }
}

/// edgeHub's unescape: `\uXXXX` (either case of `u`) first, then `\"`, `\'`, `\\`.
/// Lone surrogates from `\uD800`… become U+FFFD.
fn unescape(body: &str) -> String {
    let chars: Vec<char> = body.chars().collect();
    let mut out = String::with_capacity(body.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\\' && i + 1 < chars.len() {
            let next = chars[i + 1];
            if next == 'u' || next == 'U' {
                if let Some(c) = unicode_escape(&chars[i + 2..]) {
                    out.push(c);
                    i += 6;
                    continue;
                }
            }
            if matches!(next, '"' | '\'' | '\\') {
                out.push(next);
                i += 2;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

fn unicode_escape(hex: &[char]) -> Option<char> {
    if hex.len() < 4 {
        return None;
    }
    let text: String = hex[..4].iter().collect();
    let code = u32::from_str_radix(&text, 16).ok()?;
    Some(char::from_u32(code).unwrap_or('\u{fffd}'))
}

/// Integer `-?[0-9]+`, hex `0[xX][0-9a-fA-F]+` or real `-?[0-9]*.[0-9]+(e…)?` | `-?[0-9]*e…`.
fn number(rest: &[char]) -> Option<(usize, TokenKind)> {
    let text = |n: usize| rest[..n].iter().collect::<String>();
    let mut best: Option<(usize, TokenKind)> = None;
    let mut offer = |n: usize, kind: TokenKind| {
        if best.as_ref().is_none_or(|(m, _)| n > *m) {
            best = Some((n, kind));
        }
    };
    let sign = usize::from(rest[0] == '-');
    let digits = count_digits(&rest[sign..]);
    if digits > 0 {
        offer(sign + digits, TokenKind::Integer(text(sign + digits)));
    }
    if rest.len() > 2 && rest[0] == '0' && (rest[1] == 'x' || rest[1] == 'X') {
        let hex = rest[2..]
            .iter()
            .take_while(|c| c.is_ascii_hexdigit())
            .count();
        if hex > 0 {
            offer(2 + hex, TokenKind::Hex(text(2 + hex)));
        }
    }
    if let Some(n) = real_len(rest, sign + digits) {
        offer(n, TokenKind::Real(text(n)));
    }
    best
}

fn count_digits(s: &[char]) -> usize {
    s.iter().take_while(|c| c.is_ascii_digit()).count()
}

/// Length of a real literal whose optional sign and integer part span `int_end` characters.
fn real_len(rest: &[char], int_end: usize) -> Option<usize> {
    let after = rest.get(int_end..)?;
    if after.first() == Some(&'.') {
        let frac = count_digits(&after[1..]);
        if frac == 0 {
            return None;
        }
        let end = int_end + 1 + frac;
        return Some(end + exponent_len(&rest[end..]).unwrap_or(0));
    }
    exponent_len(after).map(|n| int_end + n)
}

fn exponent_len(s: &[char]) -> Option<usize> {
    if !matches!(s.first(), Some('e' | 'E')) {
        return None;
    }
    let sign = usize::from(matches!(s.get(1), Some('+' | '-')));
    let digits = count_digits(s.get(1 + sign..)?);
    (digits > 0).then_some(1 + sign + digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<TokenKind> {
        tokenize(text).into_iter().map(|t| t.kind).collect()
    }

    fn id(s: &str) -> TokenKind {
        TokenKind::Id(s.to_owned())
    }

    #[test]
    fn keywords_are_case_insensitive_but_literals_are_not() {
        assert_eq!(
            kinds("fRoM wHeRe InTo and OR Not true True"),
            vec![
                TokenKind::From,
                TokenKind::Where,
                TokenKind::Into,
                TokenKind::And,
                TokenKind::Or,
                TokenKind::Not,
                TokenKind::True,
                id("True"),
                TokenKind::Eof
            ]
        );
    }

    #[test]
    fn operator_characters_inside_names_extend_the_name() {
        assert_eq!(kinds("a-b"), vec![id("a-b"), TokenKind::Eof]);
        assert_eq!(kinds("3*4"), vec![id("3*4"), TokenKind::Eof]);
        assert_eq!(kinds("android"), vec![id("android"), TokenKind::Eof]);
    }

    #[test]
    fn a_leading_minus_belongs_to_the_integer() {
        assert_eq!(
            kinds("-5"),
            vec![TokenKind::Integer("-5".into()), TokenKind::Eof]
        );
        assert_eq!(
            kinds("- 5"),
            vec![
                TokenKind::Minus,
                TokenKind::Integer("5".into()),
                TokenKind::Eof
            ]
        );
    }

    #[test]
    fn numbers_of_every_form() {
        assert_eq!(kinds("0x1F")[0], TokenKind::Hex("0x1F".into()));
        assert_eq!(kinds("1.5e3")[0], TokenKind::Real("1.5e3".into()));
        assert_eq!(kinds(".5")[0], TokenKind::Real(".5".into()));
        assert_eq!(kinds("2E-2")[0], TokenKind::Real("2E-2".into()));
    }

    #[test]
    fn strings_unescape_quotes_backslashes_and_unicode() {
        assert_eq!(kinds(r#"'it\'s'"#)[0], TokenKind::Str("it's".into()));
        assert_eq!(kinds(r#""a\"b""#)[0], TokenKind::Str("a\"b".into()));
        assert_eq!(kinds(r"'\u0041\\'")[0], TokenKind::Str("A\\".into()));
        assert_eq!(kinds("'open")[0], TokenKind::UnterminatedStr);
    }

    #[test]
    fn system_properties_keep_brackets_and_dots() {
        assert_eq!(
            kinds("$body.a[0].b")[0],
            TokenKind::SysProp("$body.a[0].b".into())
        );
        assert_eq!(
            kinds("$upstream")[0],
            TokenKind::SysProp("$upstream".into())
        );
    }

    #[test]
    fn comments_are_skipped_and_columns_are_one_based() {
        let tokens = tokenize("a /* c */ = 'x'");
        assert_eq!(tokens[1].kind, TokenKind::Eq);
        assert_eq!(tokens[1].column, 11);
        assert_eq!(tokens[0].column, 1);
    }

    #[test]
    fn path_tokens() {
        assert_eq!(
            kinds("/messages/*"),
            vec![
                TokenKind::Div,
                id("messages"),
                TokenKind::Div,
                TokenKind::Mul,
                TokenKind::Eof
            ]
        );
    }
}
