//! Join tokens: 256 random bits, shown once, stored only as a SHA-256 hash, bound to one
//! identity, short-lived, and consumed in the same commit as the credential they buy (so of
//! any number of concurrent uses exactly one succeeds).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use sigil_pki::{SecretString, ids};

use super::{AttestError, Attested, Method, Reason};
use crate::registry::Registry;
use crate::store::Store;

/// Every token starts with this, so secret scanners can find leaked ones.
pub const PREFIX: &str = "sigil_jt_";
/// What a caller is told when a token does not work.
pub const HINT: &str = "the token is unknown, expired or already used";
const TOKEN_BYTES: usize = 32;

/// A new token and its hash.
pub fn generate() -> (SecretString, String) {
    let raw = ids::random_bytes::<TOKEN_BYTES>();
    let token = SecretString::new(format!("{PREFIX}{}", B64URL.encode(raw)));
    let h = hash(token.expose_secret());
    (token, h)
}

/// Hex SHA-256 of the token text.
pub fn hash(token: &str) -> String {
    ids::to_hex(&ids::sha256(token.as_bytes()))
}

/// A short, non-secret name for a token in logs and the audit trail.
pub fn fingerprint(hash: &str) -> String {
    format!("join_token:{}", &hash[..hash.len().min(12)])
}

fn well_formed(token: &str) -> bool {
    token.len() == PREFIX.len() + 43
        && token.starts_with(PREFIX)
        && token[PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Finds the identity a token is for. Does not consume it: the issuance commit does, so a
/// token is only spent when a credential is really issued.
pub async fn attest(
    store: &dyn Store,
    registry: &Registry,
    token: &SecretString,
    now: i64,
) -> Result<Attested, AttestError> {
    let fail = |reason: Reason, actor: String, identity_id: Option<String>, detail: String| {
        AttestError::Failed {
            public: None,
            method: Method::JoinToken,
            reason,
            actor,
            identity_id,
            detail,
        }
    };
    let t = token.expose_secret().trim();
    if !well_formed(t) {
        return Err(fail(
            Reason::Malformed,
            "join_token:malformed".into(),
            None,
            "malformed join token".into(),
        ));
    }
    let h = hash(t);
    let actor = fingerprint(&h);
    let Some(rec) = store.join_token(&h).await? else {
        return Err(fail(
            Reason::Unknown,
            actor,
            None,
            "unknown join token".into(),
        ));
    };
    if let Some(at) = rec.consumed_at {
        return Err(fail(
            Reason::Used,
            actor,
            Some(rec.identity_id),
            format!("join token already used at {}", crate::clock::rfc3339(at)),
        ));
    }
    if rec.expires_at <= now {
        return Err(fail(
            Reason::Expired,
            actor,
            Some(rec.identity_id),
            format!(
                "join token expired at {}",
                crate::clock::rfc3339(rec.expires_at)
            ),
        ));
    }
    // An identity created through another replica a moment ago may not be in this one's
    // registry yet: catch up once before saying it does not exist.
    let identity = match registry.get(&rec.identity_id) {
        Some(i) => Some(i),
        None => {
            store.sync().await?;
            registry.get(&rec.identity_id)
        }
    };
    let Some(identity) = identity else {
        return Err(fail(
            Reason::IdentityMissing,
            actor,
            Some(rec.identity_id.clone()),
            format!(
                "join token is for identity {} which no longer exists",
                rec.identity_id
            ),
        ));
    };
    Ok(Attested {
        identity,
        method: Method::JoinToken,
        actor,
        consume_join_token: Some(h),
        presented_generation: None,
        evidence_issued_at: Some(rec.created_at),
        evidence_seq: (rec.created_seq > 0).then_some(rec.created_seq),
        selectors: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_recognisable() {
        let (t, h) = generate();
        assert!(well_formed(t.expose_secret()));
        assert_eq!(hash(t.expose_secret()), h);
        assert_eq!(h.len(), 64);
        let (t2, _) = generate();
        assert_ne!(t.expose_secret(), t2.expose_secret());
        assert!(!well_formed("sigil_jt_short"));
        assert!(!well_formed(&format!("other_{}", &t.expose_secret()[6..])));
        assert!(!fingerprint(&h).contains(t.expose_secret()));
    }
}
