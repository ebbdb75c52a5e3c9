//! Who an operator is: the operator credential a request presented, checked against the
//! operator CA's naming, the revocation set and the clock. What an operator may do is the
//! Cedar policy's call ([`crate::policy`], admin actions).

use crate::attest::x509::{PeerCert, PeerIssuer};
use crate::hub::RevocationSet;

/// An authenticated operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// The operator's name (last segment of `spiffe://<td>/sigil/operator/[<role>/]<name>`).
    pub name: String,
    /// `admin`, `operator`, `auditor` or `revoker` (a credential without a role segment, like
    /// the first one `sigil init` writes, is an admin's).
    pub role: String,
}

impl Operator {
    /// The actor string in audit entries.
    pub fn actor(&self) -> String {
        format!("operator:{}", self.name)
    }
}

/// Why a request has no operator behind it, in words the caller may hear.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotAnOperator(pub String);

/// The operator behind a client certificate (`None`: the request presented none), at `now`.
pub fn authenticate(
    peer: Option<&PeerCert>,
    revocations: &RevocationSet,
    now: i64,
) -> Result<Operator, NotAnOperator> {
    let no = |m: &str| NotAnOperator(m.to_owned());
    let peer = peer.ok_or_else(|| {
        no("the admin API needs mutual TLS with an operator credential (see `sigil init`)")
    })?;
    if peer.issuer != PeerIssuer::Operator {
        return Err(no(
            "the admin API needs an operator credential; a workload SVID is not one",
        ));
    }
    if let Some(r) = revocations.get(&peer.serial) {
        return Err(NotAnOperator(format!(
            "operator credential was revoked: {}",
            r.reason
        )));
    }
    if peer.not_after <= now {
        return Err(NotAnOperator(format!(
            "operator credential expired at {}",
            crate::clock::rfc3339(peer.not_after)
        )));
    }
    let rest = peer
        .spiffe_id
        .as_ref()
        .and_then(|id| {
            id.path()
                .strip_prefix("/sigil/operator/")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let (role, name) = match rest.split_once('/') {
        None => ("admin".to_owned(), rest.clone()),
        Some((role, name)) => (role.to_owned(), name.to_owned()),
    };
    if name.is_empty() || name.contains('/') || !crate::policy::ROLES.contains(&role.as_str()) {
        return Err(no("operator credential has no valid operator SPIFFE ID"));
    }
    Ok(Operator { name, role })
}
