//! SAS token verification as IoT Hub does it for device and module keys.
//!
//! Token: `SharedAccessSignature sr={url-encoded resource}&sig={url-encoded base64}&se={expiry}`
//! (fields in any order, field names exact lower case, unknown fields ignored).
//!
//! Guarantees:
//! - The signature is checked with [`ring::hmac::verify`] (constant time) over
//!   `encoded_sr + "\n" + se`, where `encoded_sr` is the `sr` value **as it appears in the
//!   token**. That is what SDKs sign (they encode once and use the same text in both places).
//!   If that fails, the canonical encoding of the decoded resource (Python
//!   `quote(uri, safe="")`: everything but `A-Z a-z 0-9 - . _ ~` percent-encoded, upper-case hex)
//!   is tried too, so a token whose `sr` was re-encoded differently still verifies when signed
//!   canonically. Both require the identity's key.
//! - `se` must be a decimal integer strictly greater than the current Unix time (no skew).
//! - The decoded resource must be exactly `{hostname}/devices/{device}` for a device identity or
//!   `{hostname}/devices/{device}/modules/{module}` for a module identity; the host name compares
//!   ASCII case-insensitively, the ids exactly.
//! - A token carrying `skn` (a shared access *policy* token) is refused: the emulator only knows
//!   device and module keys.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything but `A-Z a-z 0-9 - . _ ~` (Python `quote(s, safe="")`).
const QUOTE_ALL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

const SCHEME: &str = "SharedAccessSignature ";

/// Why a SAS token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The token does not have the SAS shape.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// A policy (`skn`) token: not accepted for device/module identities here.
    #[error("policy tokens (skn) are not supported")]
    PolicyToken,
    /// `se` is not in the future.
    #[error("token expired at {expiry} (now {now})")]
    Expired {
        /// `se` of the token.
        expiry: u64,
        /// Unix time at the check.
        now: u64,
    },
    /// The resource (`sr`) is not this identity on this hub.
    #[error("audience `{got}` is not `{expected}`")]
    Audience {
        /// Decoded `sr`.
        got: String,
        /// What the identity needs.
        expected: String,
    },
    /// The signature does not verify with the identity's key.
    #[error("signature does not verify")]
    Signature,
}

/// A parsed token; fields still as on the wire where signing needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    encoded_resource: String,
    resource: String,
    signature: Vec<u8>,
    expiry_text: String,
    expiry: u64,
    key_name: Option<String>,
}

impl SasToken {
    /// Parses `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]`.
    pub fn parse(token: &str) -> Result<SasToken, SasError> {
        let rest = token.strip_prefix(SCHEME).ok_or(SasError::Malformed(
            "does not start with `SharedAccessSignature `",
        ))?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for field in rest.split('&') {
            let (name, value) = field
                .split_once('=')
                .ok_or(SasError::Malformed("field without `=`"))?;
            let slot = match name {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(SasError::Malformed("duplicate field"));
            }
        }
        let encoded_resource = sr.ok_or(SasError::Malformed("missing `sr`"))?;
        let sig = sig.ok_or(SasError::Malformed("missing `sig`"))?;
        let expiry_text = se.ok_or(SasError::Malformed("missing `se`"))?;
        let resource = decode(encoded_resource).ok_or(SasError::Malformed("`sr` is not UTF-8"))?;
        let sig = decode(sig).ok_or(SasError::Malformed("`sig` is not UTF-8"))?;
        let signature = STANDARD
            .decode(sig.as_bytes())
            .map_err(|_| SasError::Malformed("`sig` is not base64"))?;
        if expiry_text.is_empty() || !expiry_text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SasError::Malformed("`se` is not a decimal integer"));
        }
        let expiry = expiry_text
            .parse::<u64>()
            .map_err(|_| SasError::Malformed("`se` out of range"))?;
        Ok(SasToken {
            encoded_resource: encoded_resource.to_owned(),
            resource,
            signature,
            expiry_text: expiry_text.to_owned(),
            expiry,
            key_name: skn.map(str::to_owned),
        })
    }

    /// The decoded resource URI (`sr`).
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// `se`, seconds since the Unix epoch.
    pub fn expiry(&self) -> u64 {
        self.expiry
    }

    /// Checks everything: not a policy token, audience, expiry at `now`, then the signature
    /// with `key` (raw key bytes).
    pub fn verify(
        &self,
        hostname: &str,
        device: &str,
        module: Option<&str>,
        key: &[u8],
        now: u64,
    ) -> Result<(), SasError> {
        if self.key_name.is_some() {
            return Err(SasError::PolicyToken);
        }
        let expected_path = resource_path(device, module);
        let audience_ok = self.resource.split_once('/').is_some_and(|(host, path)| {
            host.eq_ignore_ascii_case(hostname) && path == expected_path
        });
        if !audience_ok {
            return Err(SasError::Audience {
                got: self.resource.clone(),
                expected: format!("{hostname}/{expected_path}"),
            });
        }
        if self.expiry <= now {
            return Err(SasError::Expired {
                expiry: self.expiry,
                now,
            });
        }
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let raw = format!("{}\n{}", self.encoded_resource, self.expiry_text);
        if ring::hmac::verify(&key, raw.as_bytes(), &self.signature).is_ok() {
            return Ok(());
        }
        let canonical = format!(
            "{}\n{}",
            utf8_percent_encode(&self.resource, QUOTE_ALL),
            self.expiry_text
        );
        if canonical != raw
            && ring::hmac::verify(&key, canonical.as_bytes(), &self.signature).is_ok()
        {
            return Ok(());
        }
        Err(SasError::Signature)
    }
}

/// `devices/{d}` or `devices/{d}/modules/{m}`: the resource path under the host.
fn resource_path(device: &str, module: Option<&str>) -> String {
    match module {
        Some(m) => format!("devices/{device}/modules/{m}"),
        None => format!("devices/{device}"),
    }
}

/// The resource URI (unencoded `sr`) of an identity: `{host}/devices/{d}[/modules/{m}]`.
pub fn resource_uri(hostname: &str, device: &str, module: Option<&str>) -> String {
    format!("{hostname}/{}", resource_path(device, module))
}

/// Builds a token the way the SDKs do (`sr`, `sig` encoded like Python `quote(s, safe="")`),
/// for tests and tools. `key` is the raw key, `expiry` Unix seconds.
pub fn generate(resource: &str, key: &[u8], expiry: u64) -> String {
    let sr = utf8_percent_encode(resource, QUOTE_ALL).to_string();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&key, format!("{sr}\n{expiry}").as_bytes());
    let sig = STANDARD.encode(tag.as_ref());
    let sig = utf8_percent_encode(&sig, QUOTE_ALL);
    format!("{SCHEME}sr={sr}&sig={sig}&se={expiry}")
}

/// Unix time now, in seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn decode(s: &str) -> Option<String> {
    percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "emulated.azure-devices.net";
    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000;

    /// A token built here independently of `generate`: the SDK algorithm step by step.
    fn hand_built(resource: &str, key: &[u8], se: u64) -> String {
        let sr = resource.replace('/', "%2F");
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let sig = STANDARD.encode(ring::hmac::sign(&k, format!("{sr}\n{se}").as_bytes()));
        let sig = sig
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D");
        format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}")
    }

    #[test]
    fn hand_built_module_token_verifies() {
        let t = hand_built(&format!("{HOST}/devices/d1/modules/m1"), KEY, NOW + 60);
        let tok = SasToken::parse(&t).expect("parses");
        assert_eq!(tok.resource(), format!("{HOST}/devices/d1/modules/m1"));
        assert_eq!(tok.verify(HOST, "d1", Some("m1"), KEY, NOW), Ok(()));
        // Host name compares case-insensitively.
        assert_eq!(
            tok.verify("Emulated.Azure-Devices.NET", "d1", Some("m1"), KEY, NOW),
            Ok(())
        );
    }

    #[test]
    fn generated_device_token_verifies_and_fields_are_order_free() {
        let t = generate(&resource_uri(HOST, "dev", None), KEY, NOW + 1);
        assert_eq!(
            SasToken::parse(&t)
                .expect("parses")
                .verify(HOST, "dev", None, KEY, NOW),
            Ok(())
        );
        let body = t.strip_prefix(SCHEME).expect("scheme");
        let mut fields: Vec<&str> = body.split('&').collect();
        fields.reverse();
        let reordered = format!("{SCHEME}{}&skipme=1", fields.join("&"));
        assert_eq!(
            SasToken::parse(&reordered)
                .expect("parses")
                .verify(HOST, "dev", None, KEY, NOW),
            Ok(())
        );
    }

    #[test]
    fn lower_case_escapes_in_sr_verify_when_signed_as_sent() {
        let sr = format!("{HOST}/devices/d/modules/m").replace('/', "%2f");
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, KEY);
        let sig = STANDARD.encode(ring::hmac::sign(
            &k,
            format!("{sr}\n{}", NOW + 5).as_bytes(),
        ));
        let sig = utf8_percent_encode(&sig, QUOTE_ALL);
        let t = format!("{SCHEME}sr={sr}&sig={sig}&se={}", NOW + 5);
        let tok = SasToken::parse(&t).expect("parses");
        assert_eq!(tok.verify(HOST, "d", Some("m"), KEY, NOW), Ok(()));
    }

    #[test]
    fn wrong_key_is_refused() {
        let t = generate(&resource_uri(HOST, "d", Some("m")), KEY, NOW + 60);
        let tok = SasToken::parse(&t).expect("parses");
        assert_eq!(
            tok.verify(HOST, "d", Some("m"), b"another key", NOW),
            Err(SasError::Signature)
        );
    }

    #[test]
    fn tampered_expiry_is_refused() {
        let t = generate(&resource_uri(HOST, "d", Some("m")), KEY, NOW + 60);
        let t = t.replace(&format!("se={}", NOW + 60), &format!("se={}", NOW + 6000));
        let tok = SasToken::parse(&t).expect("parses");
        assert_eq!(
            tok.verify(HOST, "d", Some("m"), KEY, NOW),
            Err(SasError::Signature)
        );
    }

    #[test]
    fn expiry_is_strict() {
        let t = generate(&resource_uri(HOST, "d", Some("m")), KEY, NOW);
        let tok = SasToken::parse(&t).expect("parses");
        assert!(matches!(
            tok.verify(HOST, "d", Some("m"), KEY, NOW),
            Err(SasError::Expired { .. })
        ));
        assert_eq!(tok.verify(HOST, "d", Some("m"), KEY, NOW - 1), Ok(()));
    }

    #[test]
    fn audience_must_be_this_identity_on_this_hub() {
        let cases = [
            resource_uri("other.azure-devices.net", "d", Some("m")),
            resource_uri(HOST, "d", Some("other")),
            resource_uri(HOST, "other", Some("m")),
            resource_uri(HOST, "d", None),
            format!("{HOST}/devices/d/modules/m/extra"),
            HOST.to_owned(),
        ];
        for resource in cases {
            let tok = SasToken::parse(&generate(&resource, KEY, NOW + 60)).expect("parses");
            assert!(
                matches!(
                    tok.verify(HOST, "d", Some("m"), KEY, NOW),
                    Err(SasError::Audience { .. })
                ),
                "{resource} accepted"
            );
        }
        // And a module token is not a device token.
        let tok = SasToken::parse(&generate(
            &resource_uri(HOST, "d", Some("m")),
            KEY,
            NOW + 60,
        ))
        .expect("parses");
        assert!(matches!(
            tok.verify(HOST, "d", None, KEY, NOW),
            Err(SasError::Audience { .. })
        ));
    }

    #[test]
    fn malformed_and_policy_tokens_are_refused() {
        let good = generate(&resource_uri(HOST, "d", Some("m")), KEY, NOW + 60);
        for bad in [
            "",
            "sr=a&sig=b&se=1",
            "SharedAccessSignature",
            "SharedAccessSignature sr=a&sig=b",
            "SharedAccessSignature sr=a&se=1",
            "SharedAccessSignature sig=YQ%3D%3D&se=1",
            "SharedAccessSignature sr=a&sig=!!!&se=1",
            "SharedAccessSignature sr=a&sig=YQ%3D%3D&se=-1",
            "SharedAccessSignature sr=a&sig=YQ%3D%3D&se=1&se=2",
            "SharedAccessSignature sr=a&sig=YQ%3D%3D&se=1&junk",
            "SharedAccessSignature sr=%FF&sig=YQ%3D%3D&se=1",
        ] {
            assert!(
                matches!(SasToken::parse(bad), Err(SasError::Malformed(_))),
                "{bad:?} parsed"
            );
        }
        let policy = SasToken::parse(&format!("{good}&skn=iothubowner")).expect("parses");
        assert_eq!(
            policy.verify(HOST, "d", Some("m"), KEY, NOW),
            Err(SasError::PolicyToken)
        );
    }
}
