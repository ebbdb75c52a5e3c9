//! The broker's error type. The gRPC layer turns it into a `tonic::Status` in one place
//! (`api::status`); messages are written for the caller and never carry secrets.

use crate::authz::GateId;
use crate::store::{Conflict, StoreError};

/// Everything a broker operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The evidence did not prove an identity. The detail goes to the audit log only.
    #[error("attestation failed: {method} ({hint})")]
    AttestationFailed {
        /// The method (`join_token`, `x509`).
        method: &'static str,
        /// What the caller can check, without revealing more than it knows.
        hint: String,
    },
    /// The call needs a credential the caller did not present.
    #[error("{0}")]
    Unauthenticated(String),
    /// A gate refused.
    #[error("denied by {gate}: {reason}")]
    Denied {
        /// Which gate.
        gate: GateId,
        /// Why, in plain words.
        reason: String,
    },
    /// A request field is malformed.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field, as named in the API.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// It exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The operation does not fit the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The broker could not make the result durable; nothing was issued or changed.
    #[error("{0}")]
    Unavailable(String),
    /// The caller used up a limit (streams, rate); retry later or use fewer.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A bug or an unexpected failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    /// Shorthand for [`BrokerError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        BrokerError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(c) => match c {
                Conflict::IdentityIdTaken(_) | Conflict::SpiffeIdTaken(_) => BrokerError::AlreadyExists(c.to_string()),
                Conflict::IdentityMissing(_) => BrokerError::NotFound(c.to_string()),
                Conflict::StaleRevision { .. } => BrokerError::FailedPrecondition(c.to_string()),
                Conflict::JoinTokenUnknown | Conflict::JoinTokenExpired | Conflict::JoinTokenUsed => {
                    BrokerError::AttestationFailed { method: "join_token", hint: crate::attest::join_token::HINT.into() }
                }
                // A conflict this build does not know yet: the change was not made.
                other => BrokerError::FailedPrecondition(other.to_string()),
            },
            StoreError::Overloaded(_) => BrokerError::Unavailable(
                "the broker is overloaded and refused this before doing anything; retry shortly with backoff".into(),
            ),
            StoreError::Tampered(why) => BrokerError::Unavailable(format!(
                "the broker refuses every change to its store: {why}"
            )),
            StoreError::Unavailable(_) | StoreError::Open(_) | StoreError::Closed => BrokerError::Unavailable(
                "the broker could not record this durably, so nothing was issued or changed; retry shortly".into(),
            ),
            other => BrokerError::Internal(other.to_string()),
        }
    }
}

impl From<crate::registry::InvalidField> for BrokerError {
    fn from(e: crate::registry::InvalidField) -> Self {
        BrokerError::InvalidArgument {
            field: e.field,
            reason: e.reason,
        }
    }
}

impl From<crate::authz::operator::NotAnOperator> for BrokerError {
    fn from(e: crate::authz::operator::NotAnOperator) -> Self {
        BrokerError::Unauthenticated(e.0)
    }
}

impl From<sigil_pki::PkiError> for BrokerError {
    fn from(e: sigil_pki::PkiError) -> Self {
        BrokerError::Internal(e.to_string())
    }
}
