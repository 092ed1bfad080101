//! Why a module's credentials were refused, the same for every way a module logs in (MQTT
//! CONNECT, SASL PLAIN, a `$cbs` put-token). Each head adds its own shape errors around it.

use crate::auth::sas::SasError;
use crate::identity::Identity;

/// A module named by a login was refused: it is not declared, or its SAS token does not verify.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// No module of this identity is declared (or it has no key).
    #[error("unknown module {0}")]
    UnknownModule(Identity),
    /// The SAS token does not verify against the module's key now.
    #[error("SAS token: {0}")]
    Token(#[source] SasError),
}
