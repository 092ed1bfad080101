//! Per-connection AMQP authentication state, kept apart from I/O (like
//! `mqtt::session_state`): the `$cbs` put-token decision and the authorization of every link
//! attach. These types only change state and say what to answer; they never touch a socket, a
//! clock or a task (time and the token check are arguments).
//!
//! Guarantees:
//! - **Put-token** ([`ConnectionAuth::put_token`]): a request is answered 200 only if it has
//!   `operation = "put-token"`, a SAS token `type` edgeHub accepts
//!   (`servicebus.windows.net:sastoken` or `azure-devices.net:sastoken`), a `name` (the token's
//!   audience, URL-encoded or not) of the form `{host}/devices/{d}/modules/{m}` with `{host}`
//!   one of the hub's names, a string body, and the caller's check of the token for that
//!   identity passes. Then that identity is authenticated on this connection until the token's
//!   expiry (plus the SAS clock skew). A malformed request is 400; any authentication failure is
//!   401 and changes nothing (an identity authenticated earlier stays authenticated).
//! - **Renewal**: a later put-token for the same identity on the same connection replaces its
//!   expiry ([`PutTokenReply::renewed`] says so); the identity never leaves the connection
//!   in between.
//! - **Link authorization** ([`ConnectionAuth::authorize_attach`]): `$cbs` links are always
//!   allowed (that is how a client authenticates). A link on
//!   `/devices/{d}/modules/{m}/messages/events` is allowed only if `{d}/{m}` is authenticated on
//!   this connection and its token has not expired; the client's sender link is the module's
//!   outputs (events), its receiver link is the module's inputs. The module's twin
//!   (`…/twin`) and direct-method (`…/methods/deviceBound`) link pairs are allowed under the
//!   same rule. Every other address (C2D, device-scoped links) is refused as not implemented,
//!   so no link of one identity is ever attached on a connection authenticated only as
//!   another.
//! - A device-scoped audience (`{host}/devices/{d}`, no module) is refused: this hub serves
//!   modules only (as its MQTT head).

use std::collections::HashMap;

use percent_encoding::percent_decode_str;
use router::{DeviceId, ModuleId};

use crate::auth::credentials::CredentialError;
use crate::auth::sas::CLOCK_SKEW_SECS;
use crate::identity::Identity;

/// The token types edgeHub's `CbsNode` accepts.
pub const TOKEN_TYPES: [&str; 2] = [
    "servicebus.windows.net:sastoken",
    "azure-devices.net:sastoken",
];

/// The address of the claims-based-security node.
pub const CBS_ADDRESS: &str = "$cbs";

/// A put-token request, as read from the request message (every field optional: the state
/// decides what is missing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PutTokenRequest {
    /// Application property `operation`.
    pub operation: Option<String>,
    /// Application property `type`.
    pub token_type: Option<String>,
    /// Application property `name`: the audience.
    pub name: Option<String>,
    /// The body: the SAS token text.
    pub token: Option<String>,
}

/// The put-token status of an identity refused after its token was accepted
/// ([`ConnectionAuth::withdraw`]): "service unavailable", as MQTT's CONNACK 3.
pub const REFUSED_STATUS: i32 = 503;

/// What to answer a put-token with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutTokenReply {
    /// `status-code`: 200, 400, 401, or 503 ([`ConnectionAuth::withdraw`]).
    pub status: i32,
    /// `status-description`.
    pub description: String,
    /// The identity authenticated by this request (on 200).
    pub identity: Option<Identity>,
    /// True if the identity was already authenticated on this connection (a renewal).
    pub renewed: bool,
}

impl PutTokenReply {
    fn refused(status: i32, description: impl Into<String>) -> Self {
        PutTokenReply {
            status,
            description: description.into(),
            identity: None,
            renewed: false,
        }
    }
}

/// Which side of a link the client is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientRole {
    /// The client sends on the link (its target is the address).
    Sender,
    /// The client receives on the link (its source is the address).
    Receiver,
}

/// Why a link is refused (the AMQP error condition to detach with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseCondition {
    /// `amqp:unauthorized-access`.
    Unauthorized,
    /// `amqp:not-implemented`.
    NotImplemented,
    /// `amqp:invalid-field` (no address).
    InvalidField,
    /// `amqp:resource-limit-exceeded` (too many links on the session).
    ResourceLimitExceeded,
}

/// What to do with an attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkDecision {
    /// The client's end of the `$cbs` node (requests if it sends, replies if it receives).
    Cbs(ClientRole),
    /// The module's outputs: the client sends messages to route.
    Events(Identity),
    /// The module's inputs: the hub delivers to the client.
    Inputs(Identity),
    /// One of the module's twin link pair (`/devices/{d}/modules/{m}/twin`): requests if the
    /// client sends, answers and desired patches if it receives.
    Twin(Identity, ClientRole),
    /// One of the module's direct-method link pair
    /// (`/devices/{d}/modules/{m}/methods/deviceBound`): responses if the client sends,
    /// requests if it receives.
    Methods(Identity, ClientRole),
    /// Refuse the link.
    Refuse(RefuseCondition, String),
}

/// The identities a connection authenticated, with their token expiry (seconds since the epoch).
#[derive(Clone, Debug, Default)]
pub struct ConnectionAuth {
    expiry: HashMap<Identity, u64>,
}

impl ConnectionAuth {
    /// Nothing authenticated yet.
    pub fn new() -> Self {
        ConnectionAuth::default()
    }

    /// Authenticates an identity by SASL PLAIN (the token was already checked), until `expiry`.
    pub fn authenticated_by_sasl(&mut self, identity: Identity, expiry: u64) {
        self.expiry.insert(identity, expiry);
    }

    /// Handles a put-token. `hosts` are the host names an audience may name; `check` verifies
    /// the token for the identity and returns its expiry (or why it is refused).
    pub fn put_token(
        &mut self,
        request: &PutTokenRequest,
        hosts: &[&str],
        check: impl FnOnce(&Identity, &str) -> Result<u64, CredentialError>,
    ) -> PutTokenReply {
        match request.operation.as_deref() {
            Some("put-token") => {}
            Some(other) => {
                return PutTokenReply::refused(400, format!("unsupported operation {other:?}"))
            }
            None => return PutTokenReply::refused(400, "no operation"),
        }
        match request.token_type.as_deref() {
            Some(t) if TOKEN_TYPES.contains(&t) => {}
            Some(other) => {
                return PutTokenReply::refused(400, format!("unsupported token type {other:?}"))
            }
            None => return PutTokenReply::refused(400, "no token type"),
        }
        let Some(name) = request.name.as_deref() else {
            return PutTokenReply::refused(400, "no audience (name)");
        };
        let Some(token) = request.token.as_deref() else {
            return PutTokenReply::refused(400, "the body is not a token string");
        };
        let identity = match identity_of_audience(name, hosts) {
            Ok(identity) => identity,
            Err(reason) => return PutTokenReply::refused(401, reason.to_string()),
        };
        match check(&identity, token) {
            Ok(expiry) => {
                let renewed = self.expiry.insert(identity.clone(), expiry).is_some();
                PutTokenReply {
                    status: 200,
                    description: "OK".into(),
                    identity: Some(identity),
                    renewed,
                }
            }
            Err(reason) => PutTokenReply::refused(401, reason.to_string()),
        }
    }

    /// Takes back the put-token that just authenticated `identity` (its first on this
    /// connection): the connection is refused for it (a replicated module with its count of
    /// replicas connected), so it is not authenticated here and its links are refused. The
    /// answer is 503 with `reason` (the Node SDK, like for every status but 200, fails its
    /// connect with an UnauthorizedError and does not retry).
    pub fn withdraw(&mut self, identity: &Identity, reason: impl Into<String>) -> PutTokenReply {
        self.expiry.remove(identity);
        PutTokenReply::refused(REFUSED_STATUS, reason)
    }

    /// Whether `identity` is authenticated on this connection with a token valid at `now`.
    pub fn is_authenticated(&self, identity: &Identity, now: u64) -> bool {
        self.expiry
            .get(identity)
            .is_some_and(|e| now <= e.saturating_add(CLOCK_SKEW_SECS))
    }

    /// The identities authenticated (expired or not).
    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        self.expiry.keys()
    }

    /// The earliest moment (seconds) a token of this connection stops being valid, if any.
    pub fn earliest_expiry(&self) -> Option<u64> {
        self.expiry
            .values()
            .map(|e| e.saturating_add(CLOCK_SKEW_SECS))
            .min()
    }

    /// Decides an attach of `address` (the client's target if it sends, its source if it
    /// receives) at `now`.
    pub fn authorize_attach(
        &self,
        address: Option<&str>,
        role: ClientRole,
        now: u64,
    ) -> LinkDecision {
        let Some(address) = address else {
            return LinkDecision::Refuse(RefuseCondition::InvalidField, "no link address".into());
        };
        if address == CBS_ADDRESS {
            return LinkDecision::Cbs(role);
        }
        let Some((identity, node)) = module_address(address) else {
            return LinkDecision::Refuse(
                RefuseCondition::NotImplemented,
                format!("address {address:?} is not served"),
            );
        };
        if !self.is_authenticated(&identity, now) {
            return LinkDecision::Refuse(
                RefuseCondition::Unauthorized,
                format!("{identity} is not authenticated on this connection"),
            );
        }
        match (node, role) {
            (ModuleNode::Events, ClientRole::Sender) => LinkDecision::Events(identity),
            (ModuleNode::Events, ClientRole::Receiver) => LinkDecision::Inputs(identity),
            (ModuleNode::Twin, role) => LinkDecision::Twin(identity, role),
            (ModuleNode::Methods, role) => LinkDecision::Methods(identity, role),
        }
    }
}

/// Why a `$cbs` audience names no module of this hub.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AudienceError {
    /// It names a module of another hub (its host is none of ours).
    #[error("audience {0:?} names another hub")]
    OtherHub(String),
    /// It names a device; only modules are served.
    #[error("audience {0:?} is a device; only modules are served")]
    Device(String),
    /// It has some other shape.
    #[error("audience {0:?} is not a module's")]
    NotAModule(String),
}

/// The module a `$cbs` audience names: `{host}/devices/{d}/modules/{m}`, URL-encoded or not,
/// with `{host}` one of `hosts` (ASCII case-insensitive).
pub fn identity_of_audience(name: &str, hosts: &[&str]) -> Result<Identity, AudienceError> {
    let decoded = percent_decode_str(name).decode_utf8_lossy();
    let parts: Vec<&str> = decoded.split('/').collect();
    match parts.as_slice() {
        [host, "devices", d, "modules", m] if !d.is_empty() && !m.is_empty() => {
            if !hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
                return Err(AudienceError::OtherHub(decoded.into_owned()));
            }
            Ok(Identity::new(DeviceId::new(*d), ModuleId::new(*m)))
        }
        [_, "devices", _] => Err(AudienceError::Device(decoded.into_owned())),
        _ => Err(AudienceError::NotAModule(decoded.into_owned())),
    }
}

/// Why a SASL PLAIN user name names no module.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlainUserError {
    /// There is no `@{hub}` part.
    #[error("user name {0:?} has no @")]
    NoHub(String),
    /// It names a device; only modules are served.
    #[error("user name {0:?} is a device; only modules are served")]
    Device(String),
    /// It has some other shape.
    #[error("user name {0:?} is not a module's")]
    NotAModule(String),
}

/// The module a SASL PLAIN user name names: `{d}/modules/{m}@sas.{hub}` or
/// `{d}/modules/{m}@{hub}` (edgeHub's `SaslIdentityHelper`); the hub part is not checked here
/// (the token's audience is).
pub fn identity_of_plain_user(user: &str) -> Result<Identity, PlainUserError> {
    let (who, _hub) = user
        .rsplit_once('@')
        .ok_or_else(|| PlainUserError::NoHub(user.to_owned()))?;
    match who.split('/').collect::<Vec<_>>().as_slice() {
        [d, "modules", m] if !d.is_empty() && !m.is_empty() => {
            Ok(Identity::new(DeviceId::new(*d), ModuleId::new(*m)))
        }
        [d] if !d.is_empty() => Err(PlainUserError::Device(user.to_owned())),
        _ => Err(PlainUserError::NotAModule(user.to_owned())),
    }
}

/// The module of an events address `/devices/{d}/modules/{m}/messages/events` (leading `/`
/// optional, ids percent-decoded), or `None` for any other address.
pub fn events_address_identity(address: &str) -> Option<Identity> {
    match module_address(address)? {
        (identity, ModuleNode::Events) => Some(identity),
        _ => None,
    }
}

/// The nodes of a module the hub serves over AMQP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleNode {
    /// `…/messages/events`: outputs and inputs.
    Events,
    /// `…/twin`: twin requests, answers and desired patches.
    Twin,
    /// `…/methods/deviceBound`: direct-method requests and responses.
    Methods,
}

/// The module and node of `/devices/{d}/modules/{m}/{messages/events | twin |
/// methods/deviceBound}` (leading `/` optional, ids percent-decoded, `deviceBound` in any
/// case: the Node SDK writes `devicebound`), or `None` for any other address.
pub fn module_address(address: &str) -> Option<(Identity, ModuleNode)> {
    let path = address.strip_prefix('/').unwrap_or(address);
    let parts: Vec<&str> = path.split('/').collect();
    let (d, m, node) = match parts.as_slice() {
        ["devices", d, "modules", m, "messages", "events"] => (d, m, ModuleNode::Events),
        ["devices", d, "modules", m, "twin"] => (d, m, ModuleNode::Twin),
        // The Node SDK writes `devicebound`, edgeHub's template `deviceBound`.
        ["devices", d, "modules", m, "methods", bound]
            if bound.eq_ignore_ascii_case("deviceBound") =>
        {
            (d, m, ModuleNode::Methods)
        }
        _ => return None,
    };
    if d.is_empty() || m.is_empty() {
        return None;
    }
    let d = percent_decode_str(d).decode_utf8_lossy();
    let m = percent_decode_str(m).decode_utf8_lossy();
    Some((
        Identity::new(DeviceId::new(d.into_owned()), ModuleId::new(m.into_owned())),
        node,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const HOSTS: [&str; 2] = ["edgehub.local", "127.0.0.1"];

    fn id(d: &str, m: &str) -> Identity {
        Identity::new(DeviceId::new(d), ModuleId::new(m))
    }

    fn request(name: &str) -> PutTokenRequest {
        PutTokenRequest {
            operation: Some("put-token".into()),
            token_type: Some("servicebus.windows.net:sastoken".into()),
            name: Some(name.into()),
            token: Some("SharedAccessSignature sr=x&sig=y&se=1".into()),
        }
    }

    #[test]
    fn a_good_put_token_authenticates_the_module_it_names() {
        let mut auth = ConnectionAuth::new();
        let mut seen = None;
        let reply = auth.put_token(
            &request("edgehub.local%2Fdevices%2Fdev%2Fmodules%2FmodA"),
            &HOSTS,
            |who, token| {
                seen = Some((who.clone(), token.to_owned()));
                Ok(1000)
            },
        );
        assert_eq!(reply.status, 200);
        assert_eq!(reply.identity, Some(id("dev", "modA")));
        assert!(!reply.renewed);
        assert_eq!(seen.unwrap().0, id("dev", "modA"));
        assert!(auth.is_authenticated(&id("dev", "modA"), 1000 + CLOCK_SKEW_SECS));
        assert!(!auth.is_authenticated(&id("dev", "modA"), 1001 + CLOCK_SKEW_SECS));
        assert!(!auth.is_authenticated(&id("dev", "modB"), 0));
    }

    /// A put-token taken back (a replicated module with its count of replicas): 503 with the
    /// reason; the identity is not authenticated and its links are refused, while another
    /// identity of the connection stays.
    #[test]
    fn a_withdrawn_put_token_is_503_and_authenticates_nothing() {
        let mut auth = ConnectionAuth::new();
        let other = auth.put_token(
            &request("edgehub.local/devices/dev/modules/other"),
            &HOSTS,
            |_, _| Ok(100),
        );
        assert_eq!(other.status, 200);
        let ok = auth.put_token(
            &request("edgehub.local/devices/dev/modules/filter"),
            &HOSTS,
            |_, _| Ok(100),
        );
        assert_eq!(ok.status, 200);
        let reply = auth.withdraw(&id("dev", "filter"), "filter has all its replicas");
        assert_eq!(reply.status, 503);
        assert_eq!(reply.description, "filter has all its replicas");
        assert_eq!(reply.identity, None);
        assert!(!auth.is_authenticated(&id("dev", "filter"), 0));
        assert!(matches!(
            auth.authorize_attach(
                Some("/devices/dev/modules/filter/messages/events"),
                ClientRole::Receiver,
                0
            ),
            LinkDecision::Refuse(RefuseCondition::Unauthorized, _)
        ));
        assert!(auth.is_authenticated(&id("dev", "other"), 0));
        assert_eq!(auth.earliest_expiry(), Some(100 + CLOCK_SKEW_SECS));
    }

    #[test]
    fn a_refused_token_is_401_and_keeps_what_was_authenticated() {
        let mut auth = ConnectionAuth::new();
        let ok = auth.put_token(
            &request("edgehub.local/devices/dev/modules/a"),
            &HOSTS,
            |_, _| Ok(50),
        );
        assert_eq!(ok.status, 200);
        let bad = auth.put_token(
            &request("edgehub.local/devices/dev/modules/a"),
            &HOSTS,
            |_, _| {
                Err(CredentialError::Token(
                    crate::auth::sas::SasError::BadSignature,
                ))
            },
        );
        assert_eq!(bad.status, 401);
        assert_eq!(
            bad.description,
            "SAS token: SAS token signature does not match the key"
        );
        assert!(auth.is_authenticated(&id("dev", "a"), 10));
        let other = auth.put_token(
            &request("edgehub.local/devices/dev/modules/b"),
            &HOSTS,
            |identity, _| Err(CredentialError::UnknownModule(identity.clone())),
        );
        assert_eq!(other.status, 401);
        assert!(!auth.is_authenticated(&id("dev", "b"), 10));
    }

    #[test]
    fn renewal_replaces_the_expiry() {
        let mut auth = ConnectionAuth::new();
        let name = "edgehub.local/devices/dev/modules/a";
        auth.put_token(&request(name), &HOSTS, |_, _| Ok(10));
        let renewed = auth.put_token(&request(name), &HOSTS, |_, _| Ok(5000));
        assert_eq!(renewed.status, 200);
        assert!(renewed.renewed);
        assert!(auth.is_authenticated(&id("dev", "a"), 4000));
        assert_eq!(auth.earliest_expiry(), Some(5000 + CLOCK_SKEW_SECS));
    }

    #[test]
    fn malformed_requests_are_400_and_the_token_is_not_checked() {
        let cases = [
            PutTokenRequest {
                operation: Some("delete-token".into()),
                ..request("edgehub.local/devices/d/modules/m")
            },
            PutTokenRequest {
                operation: None,
                ..request("edgehub.local/devices/d/modules/m")
            },
            PutTokenRequest {
                token_type: Some("jwt".into()),
                ..request("edgehub.local/devices/d/modules/m")
            },
            PutTokenRequest {
                name: None,
                ..request("x")
            },
            PutTokenRequest {
                token: None,
                ..request("edgehub.local/devices/d/modules/m")
            },
        ];
        for case in cases {
            let mut auth = ConnectionAuth::new();
            let reply = auth.put_token(&case, &HOSTS, |_, _| panic!("checked a malformed request"));
            assert_eq!(reply.status, 400, "{case:?}");
            assert_eq!(reply.identity, None);
        }
    }

    #[test]
    fn audiences_of_other_hubs_devices_and_odd_shapes_are_401() {
        for name in [
            "other.hub/devices/d/modules/m",
            "edgehub.local/devices/d",
            "edgehub.local/devices/d/modules/",
            "edgehub.local/devices/d/modules/m/extra",
            "",
        ] {
            let mut auth = ConnectionAuth::new();
            let reply = auth.put_token(&request(name), &HOSTS, |_, _| panic!("checked {name}"));
            assert_eq!(reply.status, 401, "{name}");
        }
        assert_eq!(
            identity_of_audience("EDGEHUB.LOCAL/devices/d/modules/m", &HOSTS),
            Ok(id("d", "m"))
        );
    }

    #[test]
    fn links_need_the_identity_authenticated_on_this_connection() {
        let mut auth = ConnectionAuth::new();
        auth.put_token(
            &request("edgehub.local/devices/d/modules/a"),
            &HOSTS,
            |_, _| Ok(100),
        );
        let events_a = Some("/devices/d/modules/a/messages/events");
        let events_b = Some("/devices/d/modules/b/messages/events");
        assert_eq!(
            auth.authorize_attach(events_a, ClientRole::Sender, 0),
            LinkDecision::Events(id("d", "a"))
        );
        assert_eq!(
            auth.authorize_attach(events_a, ClientRole::Receiver, 0),
            LinkDecision::Inputs(id("d", "a"))
        );
        assert_eq!(
            auth.authorize_attach(
                Some("devices/d/modules/a/messages/events"),
                ClientRole::Sender,
                0
            ),
            LinkDecision::Events(id("d", "a"))
        );
        for role in [ClientRole::Sender, ClientRole::Receiver] {
            assert!(matches!(
                auth.authorize_attach(events_b, role, 0),
                LinkDecision::Refuse(RefuseCondition::Unauthorized, _)
            ));
            assert!(matches!(
                auth.authorize_attach(events_a, role, 100 + CLOCK_SKEW_SECS + 1),
                LinkDecision::Refuse(RefuseCondition::Unauthorized, _)
            ));
            assert_eq!(
                auth.authorize_attach(Some("$cbs"), role, 0),
                LinkDecision::Cbs(role)
            );
        }
        for (address, twin) in [
            ("/devices/d/modules/a/twin", true),
            ("devices/d/modules/a/twin", true),
            ("/devices/d/modules/a/methods/deviceBound", false),
            ("/devices/d/modules/a/methods/devicebound", false),
        ] {
            for role in [ClientRole::Sender, ClientRole::Receiver] {
                let expected = if twin {
                    LinkDecision::Twin(id("d", "a"), role)
                } else {
                    LinkDecision::Methods(id("d", "a"), role)
                };
                assert_eq!(auth.authorize_attach(Some(address), role, 0), expected);
                // Another module's twin or methods, even of the same device: refused.
                let other = address.replace("/a/", "/b/");
                assert!(matches!(
                    auth.authorize_attach(Some(&other), role, 0),
                    LinkDecision::Refuse(RefuseCondition::Unauthorized, _)
                ));
                assert!(matches!(
                    auth.authorize_attach(Some(address), role, 100 + CLOCK_SKEW_SECS + 1),
                    LinkDecision::Refuse(RefuseCondition::Unauthorized, _)
                ));
            }
        }
        for other in [
            "/devices/d/modules/a/methods/other",
            "/devices/d/twin",
            "/devices/d/messages/events",
            "/devices/d/messages/deviceBound",
        ] {
            assert!(matches!(
                auth.authorize_attach(Some(other), ClientRole::Sender, 0),
                LinkDecision::Refuse(RefuseCondition::NotImplemented, _)
            ));
        }
        assert!(matches!(
            auth.authorize_attach(None, ClientRole::Sender, 0),
            LinkDecision::Refuse(RefuseCondition::InvalidField, _)
        ));
    }

    #[test]
    fn plain_user_names_name_modules() {
        assert_eq!(
            identity_of_plain_user("dev/modules/a@sas.edgehub.local"),
            Ok(id("dev", "a"))
        );
        assert_eq!(
            identity_of_plain_user("dev/modules/a@edgehub.local"),
            Ok(id("dev", "a"))
        );
        assert!(identity_of_plain_user("dev@sas.edgehub.local").is_err());
        assert!(identity_of_plain_user("dev/modules/a").is_err());
        assert!(identity_of_plain_user("dev/modules/@hub").is_err());
    }

    #[test]
    fn sasl_authentication_counts_like_a_put_token() {
        let mut auth = ConnectionAuth::new();
        auth.authenticated_by_sasl(id("d", "a"), 100);
        assert_eq!(
            auth.authorize_attach(
                Some("/devices/d/modules/a/messages/events"),
                ClientRole::Sender,
                50
            ),
            LinkDecision::Events(id("d", "a"))
        );
        assert_eq!(auth.identities().count(), 1);
    }
}
