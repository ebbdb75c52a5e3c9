//! Attestation: turning evidence into an identity record. Each method yields the record and
//! how it was proved ([`Attested`]); the gates then decide what may be minted. Every method
//! takes only what it reads (the store, the registry, its verifier), never the whole broker.
//!
//! - [`join_token`]: a one-time token an operator created for one identity.
//! - [`x509`]: renewal over mutual TLS with a current Sigil certificate.
//! - [`oidc`]: a JWT from a configured OIDC issuer (Kubernetes, GitHub Actions, GitLab CI);
//!   its claims are selectors.
//! - [`unix`]: the kernel's peer credentials on the broker's Unix socket; the uid, gid and
//!   binary are selectors.
//!
//! Selector-based methods find the identity whose selectors are all among those the evidence
//! yielded ([`select`]).
//!
//! A new method goes in a file of its own here: a function from its evidence (and the narrow
//! state it needs) to [`Attested`] or [`AttestError`], a [`Method`] variant, its [`Reason`]s,
//! and an arm in the issuance flow's evidence match (`crate::issue`).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use crate::model::{IdentityRecord, Selector};
use crate::registry::Registry;
use crate::store::StoreError;

pub mod join_token;
pub mod oidc;
pub mod unix;
pub mod x509;

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// A one-time join token.
    JoinToken,
    /// A current Sigil certificate over mutual TLS.
    X509,
    /// A JWT from a trusted OIDC issuer.
    Oidc,
    /// The kernel's peer credentials on the Unix socket.
    Unix,
}

impl Method {
    /// The name in audit entries, metrics, ledger records and policy (`join_token`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Method::JoinToken => "join_token",
            Method::X509 => "x509",
            Method::Oidc => "oidc",
            Method::Unix => "unix",
        }
    }
}

impl From<Method> for serde_json::Value {
    fn from(m: Method) -> Self {
        serde_json::Value::String(m.as_str().to_owned())
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! reasons {
    ($($variant:ident => $code:literal: $doc:literal,)*) => {
        /// Why evidence was refused: a stable code for metrics and audit entries.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Reason {
            $(#[doc = $doc] $variant,)*
        }

        impl Reason {
            /// The code (`used`, `pid_reused`, ...).
            pub fn code(self) -> &'static str {
                match self {
                    $(Reason::$variant => $code,)*
                }
            }
        }
    };
}

reasons! {
    Malformed => "malformed": "The evidence does not parse.",
    Unknown => "unknown": "A join token that was never issued.",
    Used => "used": "A join token already used.",
    Expired => "expired": "Evidence past its expiry.",
    IdentityMissing => "identity_missing": "The identity the evidence names is gone.",
    NoMatch => "no_match": "Selector evidence matches no (or not the named) identity.",
    Ambiguous => "ambiguous": "Selector evidence matches several identities and names none.",
    NotConfigured => "not_configured": "The method is not set up on this broker.",
    OperatorCredential => "operator_credential": "An operator credential used as a workload's.",
    Revoked => "revoked": "A revoked certificate.",
    CaRevoked => "ca_revoked": "A certificate from a revoked CA.",
    NoSpiffeId => "no_spiffe_id": "A certificate without one SPIFFE ID.",
    UnknownIdentity => "unknown_identity": "A certificate of no known identity.",
    NotInLedger => "not_in_ledger": "A certificate the ledger never recorded.",
    WrongIdentity => "wrong_identity": "A certificate issued to another identity.",
    AlgRefused => "alg_refused": "An OIDC token signed with none or HMAC.",
    AlgNotAllowed => "alg_not_allowed": "An OIDC algorithm outside the issuer's list.",
    UnknownIssuer => "unknown_issuer": "An OIDC token from an issuer not trusted here.",
    UnknownKey => "unknown_key": "An OIDC token signed with a key the issuer does not publish.",
    KeyMismatch => "key_mismatch": "An OIDC key that does not fit the token's algorithm.",
    BadSignature => "bad_signature": "A signature that does not verify.",
    NotYetValid => "not_yet_valid": "An OIDC token before its nbf.",
    WrongAudience => "wrong_audience": "An OIDC token for another audience.",
    BadClaim => "bad_claim": "An OIDC claim of the wrong type or value.",
    JwksUnavailable => "jwks_unavailable": "The issuer's keys could not be fetched.",
    NotUnix => "not_unix": "Unix evidence over something other than the Unix socket.",
    NoPid => "no_pid": "The kernel did not report the caller's pid.",
    ProcessGone => "process_gone": "The calling process exited.",
    PidReused => "pid_reused": "The pid now belongs to another process.",
    Exec => "exec": "The calling process replaced its program after connecting.",
    UidChanged => "uid_changed": "The calling process changed its uid.",
    Unreadable => "unreadable": "The calling process's binary could not be read.",
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Why evidence was refused: a stable reason code (for metrics) and a message for the caller
/// and the audit log. Neither ever contains the evidence itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The reason code.
    pub reason: Reason,
    /// What was wrong, in plain words.
    pub message: String,
}

pub(crate) fn reject(reason: Reason, message: impl Into<String>) -> Rejection {
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
    /// How.
    pub method: Method,
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
        method: Method,
        /// A short, stable reason code for metrics.
        reason: Reason,
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

/// The identity that selector-based evidence (what `shown`) proves: the one named
/// (`spiffe_id`), or the only match. Refusals name what the evidence showed, so the operator
/// can register the right selectors.
// AttestError is returned once per failed attestation; its size does not matter.
#[allow(clippy::result_large_err)]
pub fn select(
    registry: &Registry,
    method: Method,
    shown: &BTreeSet<Selector>,
    spiffe_id: Option<&str>,
    actor: &str,
) -> Result<Arc<IdentityRecord>, AttestError> {
    let matches = registry.matching(shown);
    let shown_list = || {
        shown
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fail = |reason: Reason, msg: String| AttestError::Failed {
        method,
        reason,
        actor: actor.to_owned(),
        identity_id: None,
        detail: msg.clone(),
        public: Some(msg),
    };
    if let Some(want) = spiffe_id {
        return matches
            .into_iter()
            .find(|r| r.spiffe_id.as_str() == want)
            .ok_or_else(|| {
                fail(
                    Reason::NoMatch,
                    format!(
                        "the {method} evidence does not match identity {want} (it showed: {})",
                        shown_list()
                    ),
                )
            });
    }
    let mut matches = matches.into_iter();
    match (matches.next(), matches.next()) {
        (None, _) => Err(fail(
            Reason::NoMatch,
            format!(
                "the {method} evidence matches no identity (it showed: {}); an operator registers one with `sigil identity create --selector ...`",
                shown_list()
            ),
        )),
        (Some(one), None) => Ok(one),
        (Some(a), Some(b)) => Err(fail(
            Reason::Ambiguous,
            format!(
                "the {method} evidence matches several identities ({}); name one with spiffe_id",
                [a, b]
                    .into_iter()
                    .chain(matches)
                    .map(|r| r.spiffe_id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
