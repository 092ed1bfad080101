//! A direct-method invocation as a module sends it over HTTPS (`POST
//! /twins/{device}/modules/{module}/methods`), parsed and checked; pure.
//!
//! The body is edgeHub's and IoT Hub's: `{"methodName", "payload", "responseTimeoutInSeconds",
//! "connectTimeoutInSeconds"}`. Limits are IoT Hub's: a response timeout of 5–300 s (30 by
//! default), a connect timeout of 0–300 s (0 by default: the target must be connected and
//! subscribed now), a payload of at most [`MAX_PAYLOAD_BYTES`] once serialized.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

/// Largest method payload, request or response (IoT Hub's 128 KB).
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;
/// Largest request body read: a full payload, the other fields and some whitespace.
pub const MAX_BODY_BYTES: usize = MAX_PAYLOAD_BYTES + 4 * 1024;
/// The response timeout when the request names none (IoT Hub and edgeHub: 30 s).
pub const DEFAULT_RESPONSE_TIMEOUT_SECS: u64 = 30;
/// The shortest response timeout a request may ask for.
pub const MIN_RESPONSE_TIMEOUT_SECS: u64 = 5;
/// The longest response or connect timeout a request may ask for.
pub const MAX_TIMEOUT_SECS: u64 = 300;
/// Longest method name (IoT Hub's limit for names in topics and properties).
pub const MAX_METHOD_NAME_BYTES: usize = 128;

/// A method name that can be written as one MQTT topic level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodName(String);

impl MethodName {
    /// `name` if it is 1–[`MAX_METHOD_NAME_BYTES`] bytes and holds no `/`, `+`, `#`, `?`, NUL
    /// or control character (it becomes a level of `$iothub/methods/POST/{name}/?$rid=…`).
    pub fn new(name: &str) -> Result<MethodName, RequestError> {
        if name.is_empty()
            || name.len() > MAX_METHOD_NAME_BYTES
            || name
                .chars()
                .any(|c| matches!(c, '/' | '+' | '#' | '?') || c.is_control())
        {
            return Err(RequestError::MethodName(name.chars().take(160).collect()));
        }
        Ok(MethodName(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for MethodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A checked invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodRequest {
    /// The method to call.
    pub name: MethodName,
    /// The payload as JSON text (`null` when the request has none), at most
    /// [`MAX_PAYLOAD_BYTES`].
    pub payload: Bytes,
    /// How long to wait for the target's answer once the request is handed to it.
    pub response_timeout: Duration,
    /// How long to wait for the target to be connected and subscribed (0: not at all).
    pub connect_timeout: Duration,
}

/// Why a request body was refused. [`RequestError::status`] is the HTTP status to answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The body is not a JSON object of the expected shape.
    #[error("the request body is not a valid method invocation: {0}")]
    Json(#[source] serde_json::Error),
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("the request body exceeds {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    /// The payload is larger than [`MAX_PAYLOAD_BYTES`].
    #[error("the method payload is {0} bytes; the limit is {MAX_PAYLOAD_BYTES}")]
    PayloadTooLarge(usize),
    /// No or an unusable `methodName`.
    #[error(
        "methodName {0:?} is empty, too long or holds '/', '+', '#', '?' or a control character"
    )]
    MethodName(String),
    /// A timeout out of range.
    #[error("{field} must be {min}..={max} seconds, not {value}")]
    Timeout {
        /// The JSON field.
        field: &'static str,
        /// What it said.
        value: i64,
        /// The smallest accepted.
        min: u64,
        /// The largest accepted.
        max: u64,
    },
}

impl RequestError {
    /// The HTTP status: 413 for a payload or body over the limit (IoT Hub's 413001
    /// RequestEntityTooLarge), 400 for anything else (IoT Hub's 400004 ArgumentInvalid).
    pub fn status(&self) -> u16 {
        match self {
            RequestError::BodyTooLarge | RequestError::PayloadTooLarge(_) => 413,
            _ => 400,
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    method_name: String,
    #[serde(default)]
    payload: Value,
    response_timeout_in_seconds: Option<i64>,
    connect_timeout_in_seconds: Option<i64>,
}

impl MethodRequest {
    /// Parses and checks a request body (already bounded by [`MAX_BODY_BYTES`] by the reader).
    pub fn parse(body: &[u8]) -> Result<MethodRequest, RequestError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(RequestError::BodyTooLarge);
        }
        let body: Body = serde_json::from_slice(body).map_err(RequestError::Json)?;
        let name = MethodName::new(&body.method_name)?;
        let payload = serde_json::to_vec(&body.payload).map_err(RequestError::Json)?;
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(RequestError::PayloadTooLarge(payload.len()));
        }
        let response_timeout = timeout(
            "responseTimeoutInSeconds",
            body.response_timeout_in_seconds,
            DEFAULT_RESPONSE_TIMEOUT_SECS,
            MIN_RESPONSE_TIMEOUT_SECS,
        )?;
        let connect_timeout = timeout(
            "connectTimeoutInSeconds",
            body.connect_timeout_in_seconds,
            0,
            0,
        )?;
        Ok(MethodRequest {
            name,
            payload: Bytes::from(payload),
            response_timeout,
            connect_timeout,
        })
    }
}

fn timeout(
    field: &'static str,
    value: Option<i64>,
    default: u64,
    min: u64,
) -> Result<Duration, RequestError> {
    let Some(value) = value else {
        return Ok(Duration::from_secs(default));
    };
    match u64::try_from(value) {
        Ok(secs) if (min..=MAX_TIMEOUT_SECS).contains(&secs) => Ok(Duration::from_secs(secs)),
        _ => Err(RequestError::Timeout {
            field,
            value,
            min,
            max: MAX_TIMEOUT_SECS,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<MethodRequest, RequestError> {
        MethodRequest::parse(json.as_bytes())
    }

    #[test]
    fn defaults_are_iot_hubs() {
        let r = parse(r#"{"methodName":"reboot"}"#).unwrap();
        assert_eq!(r.name.as_str(), "reboot");
        assert_eq!(&r.payload[..], b"null");
        assert_eq!(r.response_timeout, Duration::from_secs(30));
        assert_eq!(r.connect_timeout, Duration::ZERO);
    }

    #[test]
    fn the_payload_is_kept_as_json_and_the_timeouts_as_given() {
        let r = parse(
            r#"{"methodName":"m","payload":{"a":[1,"x"]},"responseTimeoutInSeconds":5,
               "connectTimeoutInSeconds":300}"#,
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&r.payload).unwrap(),
            serde_json::json!({"a":[1,"x"]})
        );
        assert_eq!(r.response_timeout, Duration::from_secs(5));
        assert_eq!(r.connect_timeout, Duration::from_secs(300));
    }

    #[test]
    fn timeouts_out_of_range_are_400() {
        for body in [
            r#"{"methodName":"m","responseTimeoutInSeconds":4}"#,
            r#"{"methodName":"m","responseTimeoutInSeconds":301}"#,
            r#"{"methodName":"m","responseTimeoutInSeconds":-1}"#,
            r#"{"methodName":"m","connectTimeoutInSeconds":301}"#,
            r#"{"methodName":"m","connectTimeoutInSeconds":-5}"#,
        ] {
            let e = parse(body).unwrap_err();
            assert!(matches!(e, RequestError::Timeout { .. }), "{body}: {e}");
            assert_eq!(e.status(), 400, "{body}");
        }
    }

    #[test]
    fn bad_names_and_shapes_are_400() {
        for body in [
            r#"{"methodName":""}"#,
            r#"{"methodName":"a/b"}"#,
            r#"{"methodName":"a#"}"#,
            r#"{"methodName":"a+"}"#,
            r#"{"methodName":"a?b"}"#,
            r#"{"payload":1}"#,
            r#"[]"#,
            r#"not json"#,
            r#"{"methodName":"m","responseTimeoutInSeconds":"5"}"#,
        ] {
            assert_eq!(parse(body).unwrap_err().status(), 400, "{body}");
        }
        let long = format!(r#"{{"methodName":"{}"}}"#, "m".repeat(129));
        assert_eq!(parse(&long).unwrap_err().status(), 400);
    }

    #[test]
    fn a_payload_over_128_kib_is_413_and_one_at_the_limit_passes() {
        // A JSON string of n characters serializes to n + 2 bytes.
        let at_limit = format!(
            r#"{{"methodName":"m","payload":"{}"}}"#,
            "x".repeat(MAX_PAYLOAD_BYTES - 2)
        );
        assert_eq!(parse(&at_limit).unwrap().payload.len(), MAX_PAYLOAD_BYTES);
        let over = format!(
            r#"{{"methodName":"m","payload":"{}"}}"#,
            "x".repeat(MAX_PAYLOAD_BYTES - 1)
        );
        let e = parse(&over).unwrap_err();
        assert!(matches!(e, RequestError::PayloadTooLarge(n) if n == MAX_PAYLOAD_BYTES + 1));
        assert_eq!(e.status(), 413);
        let body = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(MethodRequest::parse(&body).unwrap_err().status(), 413);
    }
}
