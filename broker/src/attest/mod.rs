//! Attestation: turning evidence into an identity record. Each method yields the record and
//! how it was proved; the gates then decide what may be minted.
//!
//! - [`join_token`]: a one-time token an operator created for one identity.
//! - [`x509`]: renewal over mutual TLS with a current Sigil certificate.
//! - [`oidc`]: a JWT from a configured OIDC issuer (Kubernetes, GitHub Actions, GitLab CI);
//!   its claims are selectors.
//! - [`unix`]: the kernel's peer credentials on the broker's Unix socket; the uid, gid and
//!   binary are selectors.
//!
//! Selector-based methods find the identity whose selectors are all among those the evidence
//! yielded ([`crate::registry::Registry::matching`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::model::{IdentityRecord, Selector};
use crate::store::StoreError;

pub mod join_token;
pub mod oidc;
pub mod unix;
pub mod x509;

/// Why evidence was refused: a stable reason code (for metrics) and a message for the caller
/// and the audit log. Neither ever contains the evidence itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The reason code; each method lists its own.
    pub reason: &'static str,
    /// What was wrong, in plain words.
    pub message: String,
}

pub(crate) fn reject(reason: &'static str, message: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        message: message.into(),
    }
}

/// A successful attestation.
#[derive(Debug, Clone)]
pub struct Attested {
    /// The identity proved.
    pub identity: Arc<IdentityRecord>,
    /// The method (`join_token`, `x509`).
    pub method: &'static str,
    /// Who acted, for the audit log (`join_token:<fingerprint>`, a SPIFFE ID).
    pub actor: String,
    /// The join token (by hash) to consume in the issuance commit.
    pub consume_join_token: Option<String>,
    /// Generation of the presented certificate (renewal).
    pub presented_generation: Option<u64>,
    /// When fresh evidence (a join token) was issued: a compromised identity is restored only
    /// by evidence newer than the compromise.
    pub evidence_issued_at: Option<i64>,
    /// The store's commit sequence that created the evidence (join tokens): compared with the
    /// commit that marked the identity compromised, at full precision.
    pub evidence_seq: Option<u64>,
    /// What the evidence showed (selector-based methods); empty for join tokens and renewal.
    pub selectors: BTreeSet<Selector>,
}

/// Why attestation failed. `detail` is for the audit log only; callers learn just the method.
#[derive(Debug)]
pub enum AttestError {
    /// The evidence did not prove an identity.
    Failed {
        /// The method.
        method: &'static str,
        /// A short, stable reason code for metrics (`unknown`, `used`, `revoked`, ...).
        reason: &'static str,
        /// Who presented it, as far as known.
        actor: String,
        /// The identity it pointed at, if known.
        identity_id: Option<String>,
        /// What was wrong (audit only).
        detail: String,
        /// What the caller may be told, when it differs from the method's generic hint (e.g.
        /// why its own OIDC token was refused).
        public: Option<String>,
    },
    /// The store could not be read.
    Store(StoreError),
}

impl From<StoreError> for AttestError {
    fn from(e: StoreError) -> Self {
        AttestError::Store(e)
    }
}
