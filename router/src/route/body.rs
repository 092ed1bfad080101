//! `$body.…` queries: the JSON path subset and when a body may be read as JSON.
//!
//! Guarantees:
//! - A body is read as JSON only when the message's `contentType` is `application/json`
//!   (any case) and its `contentEncoding` is `utf-8`, `utf-16` or `utf-32` (any case), as in
//!   edgeHub. One exception: a twin change notification without a content type is read as
//!   UTF-8 JSON, because the hub itself creates those bodies as JSON.
//! - UTF-16 and UTF-32 honour a byte-order mark and default to little-endian (.NET's
//!   `Encoding.Unicode` / `Encoding.UTF32`).
//! - Paths are validated when the route is compiled: `name(.name | [index] | ['key'])*`.
//! - A query whose result is an object or an array is Undefined, as is a missing member.

use crate::message::{Message, Source, SystemProperty};

/// One step of a body path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Member(String),
    Index(usize),
}

/// A validated body path such as `a.b[0]['c d']`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BodyPath(Vec<Step>);

impl BodyPath {
    /// Parses a path; the error says why it is not supported.
    pub(crate) fn parse(text: &str) -> Result<BodyPath, String> {
        if text.is_empty() {
            return Err("the query is empty".to_owned());
        }
        let chars: Vec<char> = text.chars().collect();
        let mut steps = Vec::new();
        let mut i = 0;
        loop {
            let name_len = chars[i..]
                .iter()
                .take_while(|c| !matches!(c, '.' | '[' | ']'))
                .count();
            if name_len == 0 {
                return Err(format!("expected a member name at position {}", i + 1));
            }
            steps.push(Step::Member(chars[i..i + name_len].iter().collect()));
            i += name_len;
            while chars.get(i) == Some(&'[') {
                let (step, len) = bracket(&chars[i..])?;
                steps.push(step);
                i += len;
            }
            match chars.get(i) {
                None => return Ok(BodyPath(steps)),
                Some('.') => i += 1,
                Some(c) => return Err(format!("unexpected '{c}' at position {}", i + 1)),
            }
        }
    }

    /// Follows the path through `json`.
    pub(crate) fn lookup<'j>(&self, json: &'j serde_json::Value) -> Option<&'j serde_json::Value> {
        self.0.iter().try_fold(json, |node, step| match step {
            Step::Member(name) => node.get(name.as_str()),
            Step::Index(i) => node.get(*i),
        })
    }
}

/// `[123]` or `['key']` / `["key"]` at the start of `chars`; returns the step and its length.
fn bracket(chars: &[char]) -> Result<(Step, usize), String> {
    let close = chars.iter().position(|c| *c == ']').ok_or("unclosed '['")?;
    let inner: String = chars[1..close].iter().collect();
    let quoted = inner.len() >= 2
        && ((inner.starts_with('\'') && inner.ends_with('\''))
            || (inner.starts_with('"') && inner.ends_with('"')));
    let step = if quoted {
        Step::Member(inner[1..inner.len() - 1].to_owned())
    } else {
        let index = inner
            .parse::<usize>()
            .map_err(|_| format!("invalid index '[{inner}]'"))?;
        Step::Index(index)
    };
    Ok((step, close + 1))
}

/// The body as JSON, if the message's content type and encoding allow reading it.
pub(crate) fn json_body(msg: &Message) -> Option<serde_json::Value> {
    let content_type = msg.system_property(SystemProperty::ContentType);
    let encoding = msg.system_property(SystemProperty::ContentEncoding);
    let text = match (content_type, encoding) {
        (None, _) if matches!(msg.source(), Source::TwinChange { .. }) => {
            decode(msg.body(), "utf-8")?
        }
        (Some(ct), Some(enc)) if ct.eq_ignore_ascii_case("application/json") => {
            decode(msg.body(), enc)?
        }
        _ => return None,
    };
    serde_json::from_str(&text).ok()
}

fn decode(bytes: &[u8], encoding: &str) -> Option<String> {
    if encoding.eq_ignore_ascii_case("utf-8") {
        let bytes = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]).unwrap_or(bytes);
        return std::str::from_utf8(bytes).ok().map(str::to_owned);
    }
    if encoding.eq_ignore_ascii_case("utf-16") {
        return decode_utf16(bytes);
    }
    if encoding.eq_ignore_ascii_case("utf-32") {
        return decode_utf32(bytes);
    }
    None
}

fn decode_utf16(bytes: &[u8]) -> Option<String> {
    let (big_endian, bytes) = match bytes {
        [0xFE, 0xFF, rest @ ..] => (true, rest),
        [0xFF, 0xFE, rest @ ..] => (false, rest),
        _ => (false, bytes),
    };
    if bytes.len() % 2 != 0 {
        return None;
    }
    let units = bytes.chunks_exact(2).map(|c| {
        let pair = [c[0], c[1]];
        if big_endian {
            u16::from_be_bytes(pair)
        } else {
            u16::from_le_bytes(pair)
        }
    });
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .ok()
}

fn decode_utf32(bytes: &[u8]) -> Option<String> {
    let (big_endian, bytes) = match bytes {
        [0x00, 0x00, 0xFE, 0xFF, rest @ ..] => (true, rest),
        [0xFF, 0xFE, 0x00, 0x00, rest @ ..] => (false, rest),
        _ => (false, bytes),
    };
    if bytes.len() % 4 != 0 {
        return None;
    }
    bytes
        .chunks_exact(4)
        .map(|c| {
            let quad = [c[0], c[1], c[2], c[3]];
            char::from_u32(if big_endian {
                u32::from_be_bytes(quad)
            } else {
                u32::from_le_bytes(quad)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_members_indexes_and_quoted_keys() {
        let path = BodyPath::parse("a.b[2]['c.d']").expect("valid path");
        assert_eq!(
            path,
            BodyPath(vec![
                Step::Member("a".into()),
                Step::Member("b".into()),
                Step::Index(2),
                Step::Member("c.d".into()),
            ])
        );
    }

    #[test]
    fn malformed_paths_are_rejected() {
        for bad in ["", ".a", "a.", "a..b", "a[x]", "a[1", "[0]", "a]b"] {
            assert!(BodyPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn utf16_and_utf32_bodies_decode_with_and_without_bom() {
        let text = "{\"t\":1}";
        let le16: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let mut be16 = vec![0xFE, 0xFF];
        be16.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
        let le32: Vec<u8> = text
            .chars()
            .flat_map(|c| u32::from(c).to_le_bytes())
            .collect();
        assert_eq!(decode(&le16, "UTF-16").as_deref(), Some(text));
        assert_eq!(decode(&be16, "utf-16").as_deref(), Some(text));
        assert_eq!(decode(&le32, "utf-32").as_deref(), Some(text));
        assert_eq!(decode(b"x", "latin1"), None);
    }
}
