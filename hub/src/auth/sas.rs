//! SAS tokens: parse, verify and generate Azure IoT Hub shared access signatures.
//!
//! Format (reference §1.3): `SharedAccessSignature sr={url-encoded resource}&sig={url-encoded
//! base64 HMAC}&se={expiry secs}[&skn={policy}]`, fields in any order.
//!
//! Guarantees:
//! - [`verify`] returns a [`VerifiedToken`] only if all of these hold, checked in this order:
//!   1. the token parses (exactly one space after `SharedAccessSignature`; `sr`, `sig` and `se`
//!      present; no field twice, field names compared case-insensitively; `se` a decimal integer);
//!   2. `sig` is the HMAC-SHA256, under the given key, of the **`sr` text exactly as sent (still
//!      URL-encoded, escape case preserved)** + `"\n"` + the `se` text as sent. This is what
//!      edgeHub's `SharedAccessSignature.ComputeSignature` does and what the SDK capture shows;
//!      re-encoding a decoded `sr` would break tokens whose encoder used `%2f` rather than `%2F`.
//!      The comparison is constant-time (`ring::hmac::verify`);
//!   3. the decoded `sr` names the expected identity: `{host}/devices/{d}` for a device,
//!      `{host}/devices/{d}/modules/{m}` for a module, with `{host}` one of the accepted host
//!      names (the IoT Hub host name or our gateway host name), compared ASCII
//!      case-insensitively; device and module ids compared exactly;
//!   4. the token has not expired: `now <= se + CLOCK_SKEW_SECS`.
//!
//!   The signature comes first so that a caller without the key learns nothing else.
//! - Nothing here panics on any input, allocates without bound, or does I/O; time is an argument.
//!
//! Choices where the reference is silent or loose (each is a deliberate decision):
//! - **Clock skew**: a token is accepted for [`CLOCK_SKEW_SECS`] (300 s) after `se`, like the
//!   IoT SDKs' `SharedAccessSignature.IsExpired` (`ExpiresOn + MaxClockSkew < now`).
//! - **Audience form**: a module must present a module-form `sr`; a device must present the
//!   device form. edgeHub also lets a module authenticate with a *device*-scoped token signed by
//!   the device key (`allowDeviceAuthForModule`); we do not, because keys here are per identity.
//! - **Audience shape is checked** (literal `devices` / `modules` segments), where edgeHub only
//!   counts segments; host comparison is case-insensitive (DNS), where edgeHub is ordinal.
//! - **Percent-decoding** of `sr` and `sig` never turns `+` into a space (edgeHub uses
//!   `WebUtility.UrlDecode`, which does): an unencoded `+` in a base64 signature is thus read as
//!   the `+` it is. Unknown fields are ignored (edgeHub keeps and ignores them).
//! - `skn` is parsed and reported, not used: the caller chooses the key.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use ring::hmac;

/// How long after `se` a token is still accepted, to absorb clock differences between the
/// module's signer and the hub (the IoT SDKs' `MaxClockSkew`).
pub const CLOCK_SKEW_SECS: u64 = 300;

/// The scheme word that starts every token.
const SCHEME: &str = "SharedAccessSignature";

/// Python's `urllib.parse.quote(s, safe="")`: everything but `A-Z a-z 0-9 - . _ ~` is
/// percent-encoded, with upper-case hex. The SDKs build `sr` and `sig` this way.
const QUOTE_ALL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The text is not a SAS token of the accepted shape; the reason says which rule failed.
    #[error("malformed SAS token: {0}")]
    Malformed(&'static str),
    /// The signature was not made with the given key over this token's `sr` and `se`.
    #[error("SAS token signature does not match the key")]
    BadSignature,
    /// The token's expiry (plus [`CLOCK_SKEW_SECS`]) is before `now`.
    #[error("SAS token expired at {expiry} (now {now})")]
    Expired {
        /// `se`, seconds since the Unix epoch.
        expiry: u64,
        /// The time the check was made at.
        now: u64,
    },
    /// The decoded `sr` does not name the expected identity under an accepted host name.
    #[error("SAS token audience {0:?} does not name this identity")]
    WrongAudience(String),
}

/// A parsed, not yet verified, SAS token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as sent: the string-to-sign uses it unchanged.
    encoded_resource: String,
    /// `sr` percent-decoded: the audience.
    resource: String,
    /// `sig` percent-decoded and base64-decoded.
    signature: Vec<u8>,
    /// `se` exactly as sent: the string-to-sign uses it unchanged.
    expiry_text: String,
    /// `se` as a number.
    expiry: u64,
    /// `skn`, percent-decoded, when present.
    key_name: Option<String>,
}

impl SasToken {
    /// Parses a token. Field names are case-insensitive; a repeated field, a missing `sr`,
    /// `sig` or `se`, a non-integer `se`, or a `sig` that is not base64 is [`SasError::Malformed`].
    pub fn parse(token: &str) -> Result<SasToken, SasError> {
        let fields = token
            .strip_prefix(SCHEME)
            .and_then(|rest| rest.strip_prefix(' '))
            .ok_or(SasError::Malformed(
                "does not start with `SharedAccessSignature `",
            ))?;
        if fields.chars().any(char::is_whitespace) {
            return Err(SasError::Malformed("whitespace inside the fields"));
        }
        let mut sr = None;
        let mut sig = None;
        let mut se = None;
        let mut skn = None;
        for field in fields.split('&').filter(|f| !f.is_empty()) {
            let (name, value) = field
                .split_once('=')
                .ok_or(SasError::Malformed("a field without `=`"))?;
            let slot = if name.eq_ignore_ascii_case("sr") {
                &mut sr
            } else if name.eq_ignore_ascii_case("sig") {
                &mut sig
            } else if name.eq_ignore_ascii_case("se") {
                &mut se
            } else if name.eq_ignore_ascii_case("skn") {
                &mut skn
            } else {
                continue;
            };
            if slot.replace(value).is_some() {
                return Err(SasError::Malformed("a field appears twice"));
            }
        }
        let encoded_resource = sr.ok_or(SasError::Malformed("missing `sr`"))?;
        let sig = sig.ok_or(SasError::Malformed("missing `sig`"))?;
        let expiry_text = se.ok_or(SasError::Malformed("missing `se`"))?;
        let resource = decode(encoded_resource).ok_or(SasError::Malformed("`sr` is not UTF-8"))?;
        let signature = STANDARD
            .decode(percent_decode_str(sig).collect::<Vec<u8>>())
            .map_err(|_| SasError::Malformed("`sig` is not base64"))?;
        let expiry = parse_expiry(expiry_text)?;
        let key_name = match skn {
            Some(k) => Some(decode(k).ok_or(SasError::Malformed("`skn` is not UTF-8"))?),
            None => None,
        };
        Ok(SasToken {
            encoded_resource: encoded_resource.to_owned(),
            resource,
            signature,
            expiry_text: expiry_text.to_owned(),
            expiry,
            key_name,
        })
    }

    /// The decoded `sr` (the audience), e.g. `hub.example/devices/d/modules/m`.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// `se`: expiry in seconds since the Unix epoch.
    pub fn expiry(&self) -> u64 {
        self.expiry
    }

    /// `skn`, if the token names a shared-access policy.
    pub fn key_name(&self) -> Option<&str> {
        self.key_name.as_deref()
    }

    /// The exact text the signature covers: `sr` as sent, `\n`, `se` as sent.
    pub fn string_to_sign(&self) -> String {
        format!("{}\n{}", self.encoded_resource, self.expiry_text)
    }

    /// Checks the signature against `key` (the base64-decoded SharedAccessKey), in constant time.
    pub fn check_signature(&self, key: &[u8]) -> Result<(), SasError> {
        let key = hmac::Key::new(hmac::HMAC_SHA256, key);
        hmac::verify(&key, self.string_to_sign().as_bytes(), &self.signature)
            .map_err(|_| SasError::BadSignature)
    }

    /// Splits the decoded `sr` into host, device and module. Only the two shapes
    /// `{host}/devices/{d}` and `{host}/devices/{d}/modules/{m}` with non-empty parts are accepted.
    pub fn audience(&self) -> Result<Audience, SasError> {
        let wrong = || SasError::WrongAudience(self.resource.clone());
        let parts: Vec<&str> = self.resource.split('/').collect();
        let (host, device, module) = match parts.as_slice() {
            [host, "devices", device] => (*host, *device, None),
            [host, "devices", device, "modules", module] => (*host, *device, Some(*module)),
            _ => return Err(wrong()),
        };
        if host.is_empty() || device.is_empty() || module.is_some_and(str::is_empty) {
            return Err(wrong());
        }
        Ok(Audience {
            host: host.to_owned(),
            device: device.to_owned(),
            module: module.map(str::to_owned),
        })
    }
}

/// The identity a token's `sr` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Audience {
    /// The host name part, as written in the token.
    pub host: String,
    /// The device id.
    pub device: String,
    /// The module id, for a module-scoped token.
    pub module: Option<String>,
}

/// What the hub expects a token to name: the identity that is connecting and the host names
/// it may be addressed under.
#[derive(Clone, Copy, Debug)]
pub struct ExpectedAudience<'a> {
    /// Accepted host names: the IoT Hub host name and our gateway host name (case-insensitive).
    pub hosts: &'a [&'a str],
    /// The device id that is connecting.
    pub device: &'a str,
    /// The module id that is connecting, or `None` for a device.
    pub module: Option<&'a str>,
}

/// A token that passed [`verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedToken {
    /// Whom the token names (equal to the expected identity).
    pub audience: Audience,
    /// `se`: after this (plus [`CLOCK_SKEW_SECS`]) the connection's credential is stale.
    pub expiry: u64,
    /// `skn`, if present.
    pub key_name: Option<String>,
}

/// Verifies `token` for the expected identity with `key` (the base64-decoded SharedAccessKey)
/// at `now_secs` (seconds since the Unix epoch). See the module doc for the order of checks.
///
/// To try a primary and then a secondary key, call again on [`SasError::BadSignature`].
pub fn verify(
    token: &str,
    key: &[u8],
    expected: &ExpectedAudience<'_>,
    now_secs: u64,
) -> Result<VerifiedToken, SasError> {
    let token = SasToken::parse(token)?;
    token.check_signature(key)?;
    let audience = token.audience()?;
    let host_ok = expected
        .hosts
        .iter()
        .any(|h| h.eq_ignore_ascii_case(&audience.host));
    if !host_ok
        || audience.device != expected.device
        || audience.module.as_deref() != expected.module
    {
        return Err(SasError::WrongAudience(token.resource));
    }
    if now_secs > token.expiry.saturating_add(CLOCK_SKEW_SECS) {
        return Err(SasError::Expired {
            expiry: token.expiry,
            now: now_secs,
        });
    }
    Ok(VerifiedToken {
        audience,
        expiry: token.expiry,
        key_name: token.key_name,
    })
}

/// The resource URI (unencoded `sr`) for a device or module: `{host}/devices/{d}[/modules/{m}]`.
pub fn resource_uri(host: &str, device: &str, module: Option<&str>) -> String {
    match module {
        Some(m) => format!("{host}/devices/{device}/modules/{m}"),
        None => format!("{host}/devices/{device}"),
    }
}

/// Generates a token for `resource` (unencoded, e.g. from [`resource_uri`]) with `key` (the
/// base64-decoded SharedAccessKey), expiring at `expiry` seconds since the Unix epoch, exactly as
/// the Python SDK does: `sr` and `sig` encoded like `quote(s, safe="")`, fields `sr, sig, se`.
pub fn generate(resource: &str, key: &[u8], expiry: u64) -> String {
    let sr = utf8_percent_encode(resource, QUOTE_ALL).to_string();
    let to_sign = format!("{sr}\n{expiry}");
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), to_sign.as_bytes());
    let sig = STANDARD.encode(tag.as_ref());
    let sig = utf8_percent_encode(&sig, QUOTE_ALL);
    format!("{SCHEME} sr={sr}&sig={sig}&se={expiry}")
}

/// Percent-decodes (no `+` → space) into UTF-8, or `None` if the bytes are not UTF-8.
fn decode(s: &str) -> Option<String> {
    percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// `se` must be a plain decimal integer that fits in `u64`.
fn parse_expiry(text: &str) -> Result<u64, SasError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SasError::Malformed("`se` is not a decimal integer"));
    }
    text.parse()
        .map_err(|_| SasError::Malformed("`se` is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"k";

    #[test]
    fn field_names_are_case_insensitive_and_order_free() {
        let t = SasToken::parse("SharedAccessSignature SE=5&Sig=AAAA&sR=h%2Fdevices%2Fd").unwrap();
        assert_eq!(t.resource(), "h/devices/d");
        assert_eq!(t.expiry(), 5);
        assert_eq!(t.string_to_sign(), "h%2Fdevices%2Fd\n5");
    }

    #[test]
    fn duplicate_fields_are_malformed() {
        let err = SasToken::parse("SharedAccessSignature sr=a&sig=AAAA&se=1&SR=b").unwrap_err();
        assert_eq!(err, SasError::Malformed("a field appears twice"));
    }

    #[test]
    fn missing_fields_are_malformed() {
        for t in [
            "SharedAccessSignature sig=AAAA&se=1",
            "SharedAccessSignature sr=a&se=1",
            "SharedAccessSignature sr=a&sig=AAAA",
        ] {
            assert!(
                matches!(SasToken::parse(t), Err(SasError::Malformed(_))),
                "{t}"
            );
        }
    }

    #[test]
    fn scheme_and_spacing_are_exact() {
        for t in [
            "sharedaccesssignature sr=a&sig=AAAA&se=1",
            "SharedAccessSignature  sr=a&sig=AAAA&se=1",
            "SharedAccessSignaturesr=a&sig=AAAA&se=1",
            "SharedAccessSignature sr=a&sig=AAAA&se=1 ",
            "SharedAccessSignature sr=a&sig=AAAA&se=-1",
            "SharedAccessSignature sr=a&sig=AAAA&se=1.5",
            "SharedAccessSignature sr=a&sig=not*base64&se=1",
            "SharedAccessSignature sr=a&sig=AAAA&se=1&flag",
        ] {
            assert!(
                matches!(SasToken::parse(t), Err(SasError::Malformed(_))),
                "{t}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_ignored_and_skn_is_reported() {
        let t = SasToken::parse("SharedAccessSignature sr=a&sig=AAAA&se=1&x=y&skn=iothubowner")
            .unwrap();
        assert_eq!(t.key_name(), Some("iothubowner"));
    }

    #[test]
    fn generated_token_verifies_and_names_the_module() {
        let token = generate(&resource_uri("Hub.Example", "d", Some("m")), KEY, 100);
        let expected = ExpectedAudience {
            hosts: &["hub.example"],
            device: "d",
            module: Some("m"),
        };
        let v = verify(&token, KEY, &expected, 100).unwrap();
        assert_eq!(v.audience.module.as_deref(), Some("m"));
        assert_eq!(v.expiry, 100);
    }

    #[test]
    fn expiry_allows_the_clock_skew_and_no_more() {
        let token = generate(&resource_uri("h", "d", None), KEY, 100);
        let expected = ExpectedAudience {
            hosts: &["h"],
            device: "d",
            module: None,
        };
        assert!(verify(&token, KEY, &expected, 100 + CLOCK_SKEW_SECS).is_ok());
        assert_eq!(
            verify(&token, KEY, &expected, 101 + CLOCK_SKEW_SECS),
            Err(SasError::Expired {
                expiry: 100,
                now: 101 + CLOCK_SKEW_SECS
            })
        );
    }

    #[test]
    fn audience_shapes_other_than_device_and_module_are_refused() {
        for r in [
            "h/devices",
            "h/devices/",
            "h/device/d",
            "h/devices/d/modules",
            "h/devices/d/modules/",
            "h/devices/d/modules/m/x",
            "/devices/d",
        ] {
            let t = SasToken::parse(&generate(r, KEY, 1)).unwrap();
            assert!(
                matches!(t.audience(), Err(SasError::WrongAudience(_))),
                "{r}"
            );
        }
    }
}
