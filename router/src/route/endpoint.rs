//! Endpoints: where a route delivers (`INTO …`).
//!
//! Guarantees:
//! - Two endpoints are the same delivery target exactly when their [`EndpointId`]s are equal.
//! - [`EndpointId`] is derived from the endpoint in one function ([`Endpoint::id`]) and never
//!   parsed back.

use std::fmt;

use crate::message::{InputName, ModuleId};

/// A delivery target.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    /// `$upstream`: the cloud IoT Hub.
    Upstream,
    /// `BrokeredEndpoint("/modules/{module}/inputs/{input}")`.
    ModuleInput {
        /// The receiving module.
        module: ModuleId,
        /// The input it receives on.
        input: InputName,
    },
}

/// The stable identity of an endpoint: `iothub` for upstream, `{module}/{input}` for a module
/// input. edgeHub prefixes module inputs with the edge device id; we leave it out so queue
/// identities survive a device rename (a hub serves exactly one edge device).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointId(String);

impl EndpointId {
    /// An id read back from bytes the router stored (see `codec`): kept as the text it was,
    /// never parsed into an endpoint.
    pub(crate) fn from_stored(text: String) -> EndpointId {
        EndpointId(text)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Endpoint {
    /// The endpoint's identity.
    pub fn id(&self) -> EndpointId {
        match self {
            Endpoint::Upstream => EndpointId("iothub".to_owned()),
            Endpoint::ModuleInput { module, input } => EndpointId(format!("{module}/{input}")),
        }
    }

    /// The endpoint an id names (the inverse of [`Endpoint::id`]; module ids hold no `/`).
    pub fn from_id(id: &EndpointId) -> Option<Endpoint> {
        match id.0.split_once('/') {
            None if id.0 == "iothub" => Some(Endpoint::Upstream),
            Some((module, input)) if !module.is_empty() && !input.is_empty() => {
                Some(Endpoint::ModuleInput {
                    module: ModuleId::new(module),
                    input: InputName::new(input),
                })
            }
            _ => None,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Upstream => f.write_str("$upstream"),
            Endpoint::ModuleInput { module, input } => {
                write!(f, "BrokeredEndpoint(\"/modules/{module}/inputs/{input}\")")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_the_target() {
        assert_eq!(Endpoint::Upstream.id().as_str(), "iothub");
        let input = Endpoint::ModuleInput {
            module: ModuleId::new("m"),
            input: InputName::new("i"),
        };
        assert_eq!(input.id().as_str(), "m/i");
    }

    #[test]
    fn an_id_names_its_endpoint_back() {
        let input = Endpoint::ModuleInput {
            module: ModuleId::new("m"),
            input: InputName::new("i"),
        };
        assert_eq!(Endpoint::from_id(&input.id()), Some(input));
        assert_eq!(
            Endpoint::from_id(&Endpoint::Upstream.id()),
            Some(Endpoint::Upstream)
        );
        assert_eq!(Endpoint::from_id(&EndpointId("nope".into())), None);
        assert_eq!(Endpoint::from_id(&EndpointId("m/".into())), None);
    }
}
