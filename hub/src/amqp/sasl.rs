//! The SASL layer of the AMQP head (reference §2): mechanisms `ANONYMOUS`, `MSSBCBS` (an
//! anonymous alias used by the C SDK) and `PLAIN` with the SAS token as password.
//!
//! Guarantees:
//! - `ANONYMOUS` and `MSSBCBS` succeed and authenticate nothing: the client must then
//!   authenticate through `$cbs` before any link of a module is attached.
//! - `PLAIN` succeeds only if the user name names a declared module
//!   (`{d}/modules/{m}@sas.{hub}`) and the password is a SAS token valid now for that module
//!   ([`HeadContext::verify_token_expiry`]); the identity is then authenticated on the
//!   connection (read with [`HubSasl::outcome`]). Any other mechanism or a bad credential is the
//!   SASL `auth` outcome, and the connection ends.

use std::sync::{Arc, Mutex};

use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::acceptor::SaslAcceptor;
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};

use crate::amqp::auth_state::{identity_of_plain_user, PlainUserError};
use crate::auth::credentials::CredentialError;
use crate::head::context::HeadContext;
use crate::identity::Identity;

/// The mechanisms offered, strongest first.
pub const MECHANISMS: [&str; 3] = ["PLAIN", "MSSBCBS", "ANONYMOUS"];

/// What a SASL exchange established.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SaslResult {
    /// No exchange finished (yet).
    #[default]
    None,
    /// ANONYMOUS or MSSBCBS: authenticate through `$cbs`.
    Anonymous,
    /// PLAIN: this module, until this expiry (seconds since the epoch).
    Plain(Identity, u64),
}

/// One connection's SASL acceptor. Clones share the outcome.
#[derive(Clone)]
pub struct HubSasl {
    ctx: Arc<HeadContext>,
    outcome: Arc<Mutex<SaslResult>>,
}

impl std::fmt::Debug for HubSasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSasl").finish_non_exhaustive()
    }
}

impl HubSasl {
    /// An acceptor for one connection.
    pub fn new(ctx: Arc<HeadContext>) -> Self {
        HubSasl {
            ctx,
            outcome: Arc::new(Mutex::new(SaslResult::None)),
        }
    }

    /// What the exchange established.
    pub fn outcome(&self) -> SaslResult {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, result: SaslResult) {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = result;
    }

    fn plain(&self, response: &[u8]) -> Result<(Identity, u64), PlainError> {
        let mut parts = response.split(|b| *b == 0);
        let (_authzid, user, password) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(u), Some(p)) => (a, u, p),
            _ => return Err(PlainError::Shape),
        };
        let user = std::str::from_utf8(user).map_err(|_| PlainError::UserNotUtf8)?;
        let token = std::str::from_utf8(password).map_err(|_| PlainError::PasswordNotUtf8)?;
        let identity = identity_of_plain_user(user)?;
        let key = self
            .ctx
            .identities
            .key(&identity)
            .ok_or_else(|| CredentialError::UnknownModule(identity.clone()))?;
        let expiry = self.ctx.verify_token_expiry(token, &key, &identity)?;
        Ok((identity, expiry))
    }
}

/// Why a SASL PLAIN response was refused (the SASL `auth` outcome).
#[derive(Debug, thiserror::Error)]
pub enum PlainError {
    /// The response is not three NUL-separated parts.
    #[error("PLAIN response is not authzid\\0user\\0password")]
    Shape,
    /// The user name is not UTF-8.
    #[error("user name is not UTF-8")]
    UserNotUtf8,
    /// The password (the SAS token) is not UTF-8.
    #[error("password is not UTF-8")]
    PasswordNotUtf8,
    /// The user name names no module.
    #[error(transparent)]
    User(#[from] PlainUserError),
    /// The module is unknown or its token does not verify.
    #[error(transparent)]
    Credentials(#[from] CredentialError),
}

fn outcome(code: SaslCode) -> SaslServerFrame {
    SaslServerFrame::Outcome(SaslOutcome {
        code,
        additional_data: None,
    })
}

impl SaslAcceptor for HubSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(
            MECHANISMS
                .iter()
                .map(|m| Symbol::from(*m))
                .collect::<Vec<_>>(),
        )
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        match init.mechanism.0.as_str() {
            "ANONYMOUS" | "MSSBCBS" => {
                self.set(SaslResult::Anonymous);
                outcome(SaslCode::Ok)
            }
            "PLAIN" => {
                let response = init
                    .initial_response
                    .map(|b| b.into_vec())
                    .unwrap_or_default();
                match self.plain(&response) {
                    Ok((identity, expiry)) => {
                        self.set(SaslResult::Plain(identity, expiry));
                        outcome(SaslCode::Ok)
                    }
                    Err(reason) => {
                        tracing::warn!(%reason, "SASL PLAIN refused");
                        self.ctx.metrics.client_connect_failed("not_authorized");
                        outcome(SaslCode::Auth)
                    }
                }
            }
            other => {
                tracing::warn!(mechanism = other, "SASL mechanism not offered");
                outcome(SaslCode::Auth)
            }
        }
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // No mechanism offered here sends challenges.
        outcome(SaslCode::Auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed refusals read as the strings did (they are logged).
    #[test]
    fn plain_refusals_read_as_before() {
        assert_eq!(
            PlainError::Shape.to_string(),
            "PLAIN response is not authzid\\0user\\0password"
        );
        assert_eq!(
            PlainError::from(PlainUserError::NoHub("dev".into())).to_string(),
            "user name \"dev\" has no @"
        );
        let err = PlainError::from(CredentialError::Token(
            crate::auth::sas::SasError::BadSignature,
        ));
        assert_eq!(
            err.to_string(),
            "SAS token: SAS token signature does not match the key"
        );
        assert!(
            std::error::Error::source(&err).is_some(),
            "the cause is kept"
        );
    }
}
