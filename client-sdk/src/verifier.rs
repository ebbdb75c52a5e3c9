//! [`Verifier`]: offline checks for resource servers. JWT-SVIDs are checked against the
//! bundle's keys, the pushed revocation set (by `jti`, by revoked signing key, and by identity
//! generation); X.509 peers against the bundle's roots and the revocation set. Kept current by
//! the watch stream of the [`crate::Source`] it came from (or by whoever feeds the
//! [`TrustState`] it was built on).

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use sigil_pki::{JwtError, SpiffeId, VerifiedJwt, VerifyOptions};

use crate::tls::Authorizer;
use crate::trust::TrustState;

/// Why a credential was refused. Messages never include the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// No bundle yet.
    #[error("no trust bundle yet (the verifier has not heard from the broker)")]
    NoBundle,
    /// The token failed a JWT-SVID rule.
    #[error(transparent)]
    Jwt(#[from] JwtError),
    /// Listed as revoked.
    #[error("credential {0} has been revoked")]
    Revoked(String),
    /// Exchanged (RFC 8693) from a token that was revoked.
    #[error("credential was exchanged from credential {0}, which has been revoked")]
    ParentRevoked(String),
    /// Signed by a key that was revoked.
    #[error("credential was signed by revoked key {0}")]
    KeyRevoked(String),
    /// Older than its identity's current generation.
    #[error(
        "credentials of {sub} below generation {floor} are revoked (this one is generation {generation})"
    )]
    GenerationRevoked {
        /// The SPIFFE ID.
        sub: String,
        /// The token's generation.
        generation: u64,
        /// The lowest valid one.
        floor: u64,
    },
    /// An X.509 peer did not verify.
    #[error("peer certificate refused: {0}")]
    Peer(String),
}

/// Verifies credentials against the trust state it shares.
#[derive(Debug, Clone)]
pub struct Verifier {
    trust: Arc<TrustState>,
    skew: Duration,
}

impl Verifier {
    /// A verifier over `trust` with 30 s of clock skew allowed.
    pub fn new(trust: Arc<TrustState>) -> Self {
        Verifier {
            trust,
            skew: Duration::from_secs(30),
        }
    }

    /// Checks a JWT-SVID for `audience`: signature by a key in the current bundle, `exp`, the
    /// audience, and the revocation state.
    pub fn verify_jwt(&self, token: &str, audience: &str) -> Result<VerifiedJwt, VerifyError> {
        let bundle = self.trust.bundle().ok_or(VerifyError::NoBundle)?;
        let revs = self.trust.revocations();
        if let Ok((header, _)) = sigil_pki::jwt::peek_unverified(token)
            && let Some(kid) = header.get("kid").and_then(|k| k.as_str())
            && revs.revoked_keys.contains(kid)
        {
            return Err(VerifyError::KeyRevoked(kid.to_owned()));
        }
        let opts = VerifyOptions {
            now: self.trust.clock().now(),
            skew: self.skew,
            audience: Some(audience),
            trust_domain: Some(&bundle.bundle.trust_domain),
        };
        let v = sigil_pki::jwt::verify(token, bundle.jwt_keys(), &opts)?;
        if !v.claims.jti.is_empty() && revs.is_revoked(&v.claims.jti) {
            return Err(VerifyError::Revoked(v.claims.jti.clone()));
        }
        if let Some(j) = v.claims.parents.iter().find(|j| revs.is_revoked(j)) {
            return Err(VerifyError::ParentRevoked(j.clone()));
        }
        if let Some(floor) = revs.floors.get(v.claims.sub.as_str())
            && v.claims.generation < *floor
        {
            return Err(VerifyError::GenerationRevoked {
                sub: v.claims.sub.to_string(),
                generation: v.claims.generation,
                floor: *floor,
            });
        }
        Ok(v)
    }

    /// Checks an X.509 peer chain (leaf first) and returns its SPIFFE ID.
    pub fn verify_x509(
        &self,
        chain: &[CertificateDer<'_>],
        authorizer: &Authorizer,
    ) -> Result<SpiffeId, VerifyError> {
        let (leaf, rest) = chain
            .split_first()
            .ok_or_else(|| VerifyError::Peer("empty chain".into()))?;
        crate::tls::verify_peer(
            &self.trust,
            authorizer,
            leaf,
            rest,
            crate::clock::unix_time(self.trust.clock().now()),
            webpki::KeyUsage::client_auth(),
        )
        .map_err(|e| VerifyError::Peer(e.to_string()))
    }
}
