//! The broker's signing material in memory, rebuilt from the key records whenever they change
//! and published as one [`KeyRing`] that is swapped atomically.
//!
//! Every key moves through next (published, not signing) → current (signing) → previous
//! (published until everything it signed has expired) → retired; an emergency takes a key to
//! revoked (unpublished at once, everything it signed invalid). The bundle carries the
//! published roots and JWT keys; its sequence is the time of the newest key change.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use sigil_pki::{
    CaRole, CertificateAuthority, CertificateDer, EcKey, JwtAuthority, JwtKeys, JwtSigner,
    SpiffeBundle, TrustDomain,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::clock::{unix_nanos, unix_secs};
use crate::model::{KeyKind, KeyRecord, KeyState};
use crate::seal::Sealer;

/// Lifetime of the root CA.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// Lifetime of the operator CA.
pub const OPERATOR_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// Default lifetime of a JWT signing key.
pub const JWT_KEY_VALIDITY: Duration = Duration::from_secs(365 * 86400);
/// How often bundle consumers should re-fetch.
pub const BUNDLE_REFRESH_HINT_SECS: u64 = 300;

/// Why keys could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A required key is missing.
    #[error("the store has no current {0:?} key")]
    Missing(KeyKind),
    /// A key does not unseal or parse.
    #[error("key {id}: {reason}")]
    Bad {
        /// Key id.
        id: String,
        /// Why.
        reason: String,
    },
}

/// An intermediate CA the broker has used.
#[derive(Debug)]
pub struct Intermediate {
    /// Key id.
    pub id: String,
    /// Subject key identifier, hex (what leaves carry as their authority key identifier).
    pub ski: String,
    /// Where it is in its rotation.
    pub state: KeyState,
    /// The CA with its key (absent for retired and revoked ones).
    pub ca: Option<CertificateAuthority>,
    /// Its certificate.
    pub cert: CertificateDer<'static>,
}

/// Everything needed to sign and to publish trust.
#[derive(Debug)]
pub struct KeyRing {
    /// The current root: signs intermediates (and its CRL revokes them).
    pub root: CertificateAuthority,
    /// Signs X.509-SVIDs now.
    pub intermediate: CertificateAuthority,
    /// Key id of the current intermediate.
    pub intermediate_id: String,
    /// Every intermediate ever used, newest first.
    pub intermediates: Vec<Intermediate>,
    /// Signs operator credentials.
    pub operator_ca: CertificateAuthority,
    /// Raw subject DN of the operator CA (classifies client certificates).
    pub operator_ca_subject: Vec<u8>,
    /// Signs JWT-SVIDs now.
    pub jwt: JwtSigner,
    /// The published bundle: roots and JWT keys that are next, current or previous.
    pub bundle: SpiffeBundle,
    /// The bundle as SPIFFE bundle JSON.
    pub bundle_json: String,
    /// Published JWT keys (what verifiers trust).
    pub jwt_keys: JwtKeys,
    /// Every JWT key the broker ever held, revoked and retired ones too: to tell whether a
    /// leaked token is genuinely Sigil's.
    pub all_jwt_keys: JwtKeys,
    /// Ids of revoked keys: JWT `kid`s and CA subject key identifiers (hex).
    pub revoked_keys: Vec<String>,
    /// The records it was built from.
    pub records: Vec<KeyRecord>,
}

impl KeyRing {
    /// The chain a leaf signed now is sent with (intermediates only; roots are in the bundle).
    pub fn intermediates(&self) -> Vec<CertificateDer<'static>> {
        vec![self.intermediate.cert().clone()]
    }

    /// The published roots (DER).
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.bundle.x509_authorities
    }

    /// The intermediate whose subject key identifier is `ski` (hex).
    pub fn intermediate_by_ski(&self, ski: &str) -> Option<&Intermediate> {
        self.intermediates.iter().find(|i| i.ski == ski)
    }

    /// Whether a key id (JWT `kid` or CA key identifier) is revoked.
    pub fn is_revoked(&self, key_id: &str) -> bool {
        self.revoked_keys.iter().any(|k| k == key_id)
    }
}

/// The current [`KeyRing`], swapped atomically.
#[derive(Debug)]
pub struct Keys {
    ring: ArcSwap<KeyRing>,
}

impl Keys {
    /// Holds `ring`.
    pub fn new(ring: KeyRing) -> Self {
        Keys {
            ring: ArcSwap::from_pointee(ring),
        }
    }

    /// The current ring.
    pub fn current(&self) -> Arc<KeyRing> {
        self.ring.load_full()
    }

    /// Replaces the ring.
    pub fn set(&self, ring: KeyRing) {
        self.ring.store(Arc::new(ring));
    }
}

/// The subject key identifier of a certificate, hex.
pub fn ski_of(cert: &[u8]) -> Option<String> {
    let (_, c) = X509Certificate::from_der(cert).ok()?;
    c.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                Some(sigil_pki::ids::to_hex(k.0))
            }
            _ => None,
        })
}

/// A new sealed key record (`state` as given).
pub fn record(
    sealer: &Sealer,
    kind: KeyKind,
    state: KeyState,
    key: &EcKey,
    cert: Option<&CertificateDer<'_>>,
    now: SystemTime,
    not_after: SystemTime,
) -> Result<KeyRecord, KeyError> {
    let id = key.kid().to_owned();
    let private = key.to_pkcs8().map_err(|e| KeyError::Bad {
        id: id.clone(),
        reason: e.to_string(),
    })?;
    Ok(KeyRecord {
        sealed_private: sealer.seal("keys", &id, private.expose_secret()),
        kind,
        state,
        cert_der: cert.map(|c| c.to_vec()),
        created_at: unix_secs(now),
        not_after: unix_secs(not_after),
        activated_at: (state == KeyState::Current).then(|| unix_secs(now)),
        retire_at: None,
        changed_at: unix_nanos(now),
        ski: cert.and_then(|c| ski_of(c)),
        revoked_reason: String::new(),
        id,
    })
}

/// Fresh keys for a new trust domain, as sealed records; the intermediate lives
/// `intermediate_ttl`.
pub fn generate(
    td: &TrustDomain,
    now: SystemTime,
    sealer: &Sealer,
    intermediate_ttl: Duration,
) -> Result<Vec<KeyRecord>, KeyError> {
    let fail = |e: sigil_pki::PkiError| KeyError::Bad {
        id: "new".into(),
        reason: e.to_string(),
    };
    let root = CertificateAuthority::new_self_signed(
        CaRole::Root,
        td,
        EcKey::generate().map_err(fail)?,
        now,
        ROOT_VALIDITY,
    )
    .map_err(fail)?;
    let intermediate = root
        .new_intermediate(td, EcKey::generate().map_err(fail)?, now, intermediate_ttl)
        .map_err(fail)?;
    let operator_ca = CertificateAuthority::new_self_signed(
        CaRole::Operator,
        td,
        EcKey::generate().map_err(fail)?,
        now,
        OPERATOR_CA_VALIDITY,
    )
    .map_err(fail)?;
    let jwt_key = EcKey::generate().map_err(fail)?;
    Ok(vec![
        record(
            sealer,
            KeyKind::RootCa,
            KeyState::Current,
            root.key(),
            Some(root.cert()),
            now,
            root.not_after(),
        )?,
        record(
            sealer,
            KeyKind::IntermediateCa,
            KeyState::Current,
            intermediate.key(),
            Some(intermediate.cert()),
            now,
            intermediate.not_after(),
        )?,
        record(
            sealer,
            KeyKind::OperatorCa,
            KeyState::Current,
            operator_ca.key(),
            Some(operator_ca.cert()),
            now,
            operator_ca.not_after(),
        )?,
        record(
            sealer,
            KeyKind::Jwt,
            KeyState::Current,
            &jwt_key,
            None,
            now,
            now + JWT_KEY_VALIDITY,
        )?,
    ])
}

/// Unseals a record's private key.
pub fn unseal(sealer: &Sealer, r: &KeyRecord) -> Result<EcKey, KeyError> {
    let bad = |reason: String| KeyError::Bad {
        id: r.id.clone(),
        reason,
    };
    let der = sealer
        .open("keys", &r.id, &r.sealed_private)
        .map_err(|e| bad(e.to_string()))?;
    EcKey::from_pkcs8(der.expose_secret()).map_err(|e| bad(e.to_string()))
}

/// Re-creates a CA from its record.
pub fn ca(sealer: &Sealer, r: &KeyRecord) -> Result<CertificateAuthority, KeyError> {
    let key = unseal(sealer, r)?;
    let cert = r.cert_der.clone().ok_or_else(|| KeyError::Bad {
        id: r.id.clone(),
        reason: "CA key without a certificate".into(),
    })?;
    CertificateAuthority::from_parts(cert.into(), key).map_err(|e| KeyError::Bad {
        id: r.id.clone(),
        reason: e.to_string(),
    })
}

/// Builds the ring from every key record.
pub fn load(td: &TrustDomain, records: &[KeyRecord], sealer: &Sealer) -> Result<KeyRing, KeyError> {
    let current = |kind| {
        records
            .iter()
            .find(|r| r.kind == kind && r.state == KeyState::Current)
            .ok_or(KeyError::Missing(kind))
    };
    let bad = |id: &str, reason: String| KeyError::Bad {
        id: id.into(),
        reason,
    };
    let root = ca(sealer, current(KeyKind::RootCa)?)?;
    let int_rec = current(KeyKind::IntermediateCa)?;
    let intermediate = ca(sealer, int_rec)?;
    let operator_ca = ca(sealer, current(KeyKind::OperatorCa)?)?;
    let jwt = JwtSigner::new(unseal(sealer, current(KeyKind::Jwt)?)?);

    // Roots: the current one first, then next and previous ones.
    let mut roots = vec![root.cert().clone()];
    for r in records.iter().filter(|r| {
        r.kind == KeyKind::RootCa && r.state.is_published() && r.state != KeyState::Current
    }) {
        if let Some(c) = &r.cert_der {
            roots.push(CertificateDer::from(c.clone()));
        }
    }

    let mut intermediates = Vec::new();
    let mut sorted: Vec<&KeyRecord> = records
        .iter()
        .filter(|r| r.kind == KeyKind::IntermediateCa)
        .collect();
    sorted.sort_by_key(|r| std::cmp::Reverse(r.changed_at));
    for r in sorted {
        let cert = CertificateDer::from(
            r.cert_der
                .clone()
                .ok_or_else(|| bad(&r.id, "intermediate without a certificate".into()))?,
        );
        let ski = r.ski.clone().or_else(|| ski_of(&cert)).unwrap_or_default();
        let ca = match r.state {
            KeyState::Retired | KeyState::Revoked => None,
            _ => Some(ca(sealer, r)?),
        };
        intermediates.push(Intermediate {
            id: r.id.clone(),
            ski,
            state: r.state,
            ca,
            cert,
        });
    }

    let mut published = Vec::new();
    let mut jwt_keys = JwtKeys::default();
    let mut all_jwt_keys = JwtKeys::default();
    for r in records.iter().filter(|r| r.kind == KeyKind::Jwt) {
        let k = unseal(sealer, r)?;
        all_jwt_keys.insert(k.kid(), k.public_point().to_vec());
        if r.state.is_published() {
            jwt_keys.insert(k.kid(), k.public_point().to_vec());
            published.push(JwtAuthority {
                kid: k.kid().to_owned(),
                public_point: k.public_point().to_vec(),
            });
        }
    }
    // Current first, so consumers that take the first key take the signing one.
    published.sort_by_key(|a| a.kid != jwt.kid());

    let revoked_keys = records
        .iter()
        .filter(|r| r.state == KeyState::Revoked)
        .map(|r| {
            if r.kind == KeyKind::Jwt {
                r.id.clone()
            } else {
                r.ski.clone().unwrap_or_else(|| r.id.clone())
            }
        })
        .collect();
    let sequence = records
        .iter()
        .map(|r| r.changed_at.max(r.created_at))
        .max()
        .unwrap_or(0) as u64;
    let bundle = SpiffeBundle {
        trust_domain: td.clone(),
        x509_authorities: roots,
        jwt_authorities: published,
        sequence,
        refresh_hint: Some(BUNDLE_REFRESH_HINT_SECS),
    };
    let bundle_json = bundle.to_json().map_err(|e| bad("bundle", e.to_string()))?;
    let operator_ca_subject = X509Certificate::from_der(operator_ca.cert())
        .map(|(_, c)| c.tbs_certificate.subject.as_raw().to_vec())
        .map_err(|e| bad("operator_ca", e.to_string()))?;
    Ok(KeyRing {
        root,
        intermediate,
        intermediate_id: int_rec.id.clone(),
        intermediates,
        operator_ca,
        operator_ca_subject,
        jwt,
        bundle,
        bundle_json,
        jwt_keys,
        all_jwt_keys,
        revoked_keys,
        records: records.to_vec(),
    })
}
