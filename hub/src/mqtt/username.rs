//! The MQTT CONNECT username: `hostName/deviceId[/moduleId]/?api-version=…&DeviceClientType=…`.
//!
//! Guarantees: [`parse`] accepts exactly what edgeHub's `MqttUsernameParser` accepts (reference
//! §1.2), except the stricter points listed below, and never panics. It does not authenticate:
//! the identity it returns is a *claim* that the caller must match against the client id and
//! the SAS token before trusting it.
//!
//! Grammar (split on every `/`):
//! - `host/device/?query` and `host/device/module/?query`: the last segment starts with `?`;
//! - `host/device/query` and `host/device/module/query` where the query contains `api-version=`;
//! - the one legacy Azure ML form
//!   `host/device/module/api-version=2017-06-30/DeviceClientType=Microsoft.Azure.Devices.Client/1.5.1-preview-003`
//!   (suffix matched case-insensitively), which stands for those two properties.
//!
//! Query: `name=value` pairs joined by `&`; a pair without `=` has an empty value; names are
//! case-sensitive; for a repeated name the **first** wins; values are percent-decoded without
//! turning `+` into a space (.NET `Uri.UnescapeDataString`; a value that does not decode to UTF-8
//! is kept as sent). Recognised: `api-version` (mandatory, non-blank, value not checked),
//! `DeviceClientType`, `model-id`, `auth-chain`; every other name is ignored. The host name is
//! not validated. Device and module ids are trimmed of surrounding whitespace, not decoded: the
//! SDKs send them raw.
//!
//! Stricter than edgeHub (a choice): an empty module segment (`host/dev//?api-version=1`) is an
//! error, where edgeHub silently treats the client as the device.

use percent_encoding::percent_decode_str;
use router::{DeviceId, ModuleId};

/// The legacy Azure ML client's username tail (segments 4–6), matched case-insensitively.
const LEGACY_SUFFIX: &str =
    "/api-version=2017-06-30/DeviceClientType=Microsoft.Azure.Devices.Client/1.5.1-preview-003";
const LEGACY_API_VERSION: &str = "2017-06-30";
const LEGACY_CLIENT_TYPE: &str = "Microsoft.Azure.Devices.Client/1.5.1-preview-003";

/// What a CONNECT username claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    /// The first segment, as sent: the IoT Hub host name the SDK was configured with.
    pub iothub_host: String,
    /// The device id.
    pub device: DeviceId,
    /// The module id, for a module client.
    pub module: Option<ModuleId>,
    /// `api-version`, decoded; never blank.
    pub api_version: String,
    /// `DeviceClientType` (the SDK's user agent), decoded, if present.
    pub client_type: Option<String>,
    /// `model-id` (IoT Plug and Play), decoded, if present and not blank.
    pub model_id: Option<String>,
    /// `auth-chain` (nested edge), decoded, if present and not blank.
    pub auth_chain: Option<String>,
}

impl ClientInfo {
    /// The MQTT client id this username implies: `device` or `device/module`. edgeHub requires
    /// the CONNECT client id to equal it exactly.
    pub fn client_id(&self) -> String {
        match &self.module {
            Some(m) => format!("{}/{}", self.device, m),
            None => self.device.to_string(),
        }
    }
}

/// Why a username was refused (CONNACK "bad user name or password" / "not authorized").
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    /// The segments do not form any accepted shape.
    #[error("username does not have the shape host/device[/module]/[?]properties")]
    Shape,
    /// `api-version` is absent or blank.
    #[error("username has no api-version property")]
    MissingApiVersion,
    /// The device id segment is blank.
    #[error("username has an empty device id")]
    EmptyDeviceId,
    /// The module id segment is present but blank.
    #[error("username has an empty module id")]
    EmptyModuleId,
}

/// Parses a CONNECT username; see the module doc for the grammar.
pub fn parse(username: &str) -> Result<ClientInfo, UsernameError> {
    if username.trim().is_empty() {
        return Err(UsernameError::Shape);
    }
    let segments: Vec<&str> = username.split('/').collect();
    let (host, device, module, query) = match segments.as_slice() {
        [host, device, last] if last.starts_with('?') => (*host, *device, None, Some(&last[1..])),
        [host, device, module, last] if last.starts_with('?') => {
            (*host, *device, Some(*module), Some(&last[1..]))
        }
        [host, device, last] if last.contains("api-version=") => {
            (*host, *device, None, Some(*last))
        }
        [host, device, module, last] if last.contains("api-version=") => {
            (*host, *device, Some(*module), Some(*last))
        }
        [host, device, module, _, _, _] if ends_with_ignore_case(username, LEGACY_SUFFIX) => {
            (*host, *device, Some(*module), None)
        }
        _ => return Err(UsernameError::Shape),
    };
    let query = match query {
        Some(q) => Query::parse(q.trim()),
        None => Query::legacy(),
    };
    let api_version = query
        .get("api-version")
        .filter(|v| !v.trim().is_empty())
        .ok_or(UsernameError::MissingApiVersion)?;
    let device = device.trim();
    if device.is_empty() {
        return Err(UsernameError::EmptyDeviceId);
    }
    let module = match module.map(str::trim) {
        Some("") => return Err(UsernameError::EmptyModuleId),
        m => m.map(ModuleId::new),
    };
    let not_blank = |v: &String| !v.trim().is_empty();
    Ok(ClientInfo {
        iothub_host: host.to_owned(),
        device: DeviceId::new(device),
        module,
        api_version: api_version.clone(),
        client_type: query.get("DeviceClientType").cloned(),
        model_id: query.get("model-id").filter(|v| not_blank(v)).cloned(),
        auth_chain: query.get("auth-chain").filter(|v| not_blank(v)).cloned(),
    })
}

/// Decoded query pairs in arrival order; lookups return the first of a repeated name.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Query {
        let pairs = query
            .split('&')
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (name.to_owned(), unescape(value))
            })
            .collect();
        Query(pairs)
    }

    fn legacy() -> Query {
        Query(vec![
            ("api-version".to_owned(), LEGACY_API_VERSION.to_owned()),
            ("DeviceClientType".to_owned(), LEGACY_CLIENT_TYPE.to_owned()),
        ])
    }

    fn get(&self, name: &str) -> Option<&String> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// Percent-decodes like .NET `Uri.UnescapeDataString`: `+` stays `+`; if the result is not
/// UTF-8 the value is kept as sent.
fn unescape(value: &str) -> String {
    match percent_decode_str(value).decode_utf8() {
        Ok(v) => v.into_owned(),
        Err(_) => value.to_owned(),
    }
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.is_char_boundary(s.len() - suffix.len())
        && s[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_of_a_repeated_property_wins() {
        let c = parse("h/d/?api-version=1&api-version=2&DeviceClientType=a&DeviceClientType=b")
            .unwrap();
        assert_eq!(c.api_version, "1");
        assert_eq!(c.client_type.as_deref(), Some("a"));
    }

    #[test]
    fn property_names_are_case_sensitive() {
        assert_eq!(
            parse("h/d/?API-VERSION=1&api-version="),
            Err(UsernameError::MissingApiVersion)
        );
        let c = parse("h/d/?api-version=1&deviceclienttype=x").unwrap();
        assert_eq!(c.client_type, None);
    }

    #[test]
    fn plus_is_not_a_space() {
        let c = parse("h/d/?api-version=1&DeviceClientType=a+b%20c").unwrap();
        assert_eq!(c.client_type.as_deref(), Some("a+b c"));
    }

    #[test]
    fn undecodable_values_are_kept_as_sent() {
        let c = parse("h/d/?api-version=1&DeviceClientType=%FF%FE").unwrap();
        assert_eq!(c.client_type.as_deref(), Some("%FF%FE"));
    }

    #[test]
    fn ids_are_trimmed_and_not_decoded() {
        let c = parse("h/ d%41 / m /?api-version=1").unwrap();
        assert_eq!(c.device.as_str(), "d%41");
        assert_eq!(c.module.as_ref().map(ModuleId::as_str), Some("m"));
    }

    #[test]
    fn legacy_suffix_is_matched_case_insensitively() {
        let c = parse("h/d/m/API-VERSION=2017-06-30/deviceclienttype=microsoft.azure.devices.client/1.5.1-preview-003").unwrap();
        assert_eq!(c.api_version, LEGACY_API_VERSION);
        assert_eq!(c.client_type.as_deref(), Some(LEGACY_CLIENT_TYPE));
    }

    #[test]
    fn multibyte_text_never_splits_inside_a_character() {
        assert_eq!(parse("h/d/m/é/é/é"), Err(UsernameError::Shape));
        assert!(parse("éééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééé/a/b").is_err());
    }
}
