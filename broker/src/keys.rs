//! The broker's signing material in memory: the root, the current intermediate, the operator
//! CA and the current JWT key, unsealed at start-up and published as one [`KeyRing`] that is
//! swapped atomically when keys change.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use sigil_pki::{
    CaRole, CertificateAuthority, EcKey, JwtAuthority, JwtKeys, JwtSigner, SpiffeBundle,
    TrustDomain,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::clock::unix_secs;
use crate::model::{KeyKind, KeyRecord, KeyState};
use crate::seal::Sealer;

/// Lifetime of the root CA.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// Lifetime of an intermediate.
pub const INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(365 * 86400);
/// Lifetime of the operator CA.
pub const OPERATOR_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// Lifetime of a JWT signing key.
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

/// Everything needed to sign and to publish trust.
#[derive(Debug)]
pub struct KeyRing {
    /// The trust anchor of workloads.
    pub root: CertificateAuthority,
    /// Signs X.509-SVIDs.
    pub intermediate: CertificateAuthority,
    /// Key id of the intermediate.
    pub intermediate_id: String,
    /// Signs operator credentials.
    pub operator_ca: CertificateAuthority,
    /// Raw subject DN of the operator CA (classifies client certificates).
    pub operator_ca_subject: Vec<u8>,
    /// Signs JWT-SVIDs.
    pub jwt: JwtSigner,
    /// The published bundle.
    pub bundle: SpiffeBundle,
    /// The bundle as SPIFFE bundle JSON.
    pub bundle_json: String,
    /// JWT verification keys of the bundle.
    pub jwt_keys: JwtKeys,
}

impl KeyRing {
    // Private; called from `generate` and `load` only, each with every part by name.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        td: &TrustDomain,
        root: CertificateAuthority,
        intermediate: CertificateAuthority,
        intermediate_id: String,
        operator_ca: CertificateAuthority,
        jwt: JwtSigner,
        published_jwt: Vec<JwtAuthority>,
        sequence: u64,
    ) -> Result<Self, KeyError> {
        let bad = |id: &str, reason: String| KeyError::Bad {
            id: id.into(),
            reason,
        };
        let operator_ca_subject = X509Certificate::from_der(operator_ca.cert())
            .map(|(_, c)| c.tbs_certificate.subject.as_raw().to_vec())
            .map_err(|e| bad("operator_ca", e.to_string()))?;
        let bundle = SpiffeBundle {
            trust_domain: td.clone(),
            x509_authorities: vec![root.cert().clone()],
            jwt_authorities: published_jwt,
            sequence,
            refresh_hint: Some(BUNDLE_REFRESH_HINT_SECS),
        };
        let bundle_json = bundle.to_json().map_err(|e| bad("bundle", e.to_string()))?;
        let jwt_keys = bundle.jwt_keys();
        Ok(KeyRing {
            root,
            intermediate,
            intermediate_id,
            operator_ca,
            operator_ca_subject,
            jwt,
            bundle,
            bundle_json,
            jwt_keys,
        })
    }

    /// The chain a leaf signed now is sent with (intermediates only; the root is in the
    /// bundle).
    pub fn intermediates(&self) -> Vec<sigil_pki::CertificateDer<'static>> {
        vec![self.intermediate.cert().clone()]
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
}

fn record(
    sealer: &Sealer,
    kind: KeyKind,
    key: &EcKey,
    cert: Option<&[u8]>,
    now: SystemTime,
    not_after: SystemTime,
) -> Result<KeyRecord, sigil_pki::PkiError> {
    let id = key.kid().to_owned();
    let private = key.to_pkcs8()?;
    Ok(KeyRecord {
        sealed_private: sealer.seal("keys", &id, private.expose_secret()),
        id,
        kind,
        state: KeyState::Current,
        cert_der: cert.map(<[u8]>::to_vec),
        created_at: unix_secs(now),
        not_after: unix_secs(not_after),
    })
}

/// Fresh keys for a new trust domain, with their sealed records.
pub fn generate(
    td: &TrustDomain,
    now: SystemTime,
    sealer: &Sealer,
) -> Result<(KeyRing, Vec<KeyRecord>), KeyError> {
    let fail = |e: sigil_pki::PkiError| KeyError::Bad {
        id: "new".into(),
        reason: e.to_string(),
    };
    let root_key = EcKey::generate().map_err(fail)?;
    let root =
        CertificateAuthority::new_self_signed(CaRole::Root, td, root_key, now, ROOT_VALIDITY)
            .map_err(fail)?;
    let int_key = EcKey::generate().map_err(fail)?;
    let intermediate = root
        .new_intermediate(td, int_key, now, INTERMEDIATE_VALIDITY)
        .map_err(fail)?;
    let op_key = EcKey::generate().map_err(fail)?;
    let operator_ca = CertificateAuthority::new_self_signed(
        CaRole::Operator,
        td,
        op_key,
        now,
        OPERATOR_CA_VALIDITY,
    )
    .map_err(fail)?;
    let jwt_key = EcKey::generate().map_err(fail)?;

    let records = vec![
        record(
            sealer,
            KeyKind::RootCa,
            root.key(),
            Some(root.cert()),
            now,
            root.not_after(),
        )
        .map_err(fail)?,
        record(
            sealer,
            KeyKind::IntermediateCa,
            intermediate.key(),
            Some(intermediate.cert()),
            now,
            intermediate.not_after(),
        )
        .map_err(fail)?,
        record(
            sealer,
            KeyKind::OperatorCa,
            operator_ca.key(),
            Some(operator_ca.cert()),
            now,
            operator_ca.not_after(),
        )
        .map_err(fail)?,
        record(
            sealer,
            KeyKind::Jwt,
            &jwt_key,
            None,
            now,
            now + JWT_KEY_VALIDITY,
        )
        .map_err(fail)?,
    ];
    let intermediate_id = intermediate.key().kid().to_owned();
    let published = vec![JwtAuthority {
        kid: jwt_key.kid().to_owned(),
        public_point: jwt_key.public_point().to_vec(),
    }];
    let ring = KeyRing::assemble(
        td,
        root,
        intermediate,
        intermediate_id,
        operator_ca,
        JwtSigner::new(jwt_key),
        published,
        unix_secs(now) as u64,
    )?;
    Ok((ring, records))
}

fn unseal(sealer: &Sealer, r: &KeyRecord) -> Result<EcKey, KeyError> {
    let bad = |reason: String| KeyError::Bad {
        id: r.id.clone(),
        reason,
    };
    let der = sealer
        .open("keys", &r.id, &r.sealed_private)
        .map_err(|e| bad(e.to_string()))?;
    EcKey::from_pkcs8(der.expose_secret()).map_err(|e| bad(e.to_string()))
}

fn ca(sealer: &Sealer, r: &KeyRecord) -> Result<CertificateAuthority, KeyError> {
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

/// Unseals the current keys from their records.
pub fn load(td: &TrustDomain, records: &[KeyRecord], sealer: &Sealer) -> Result<KeyRing, KeyError> {
    let current = |kind| {
        records
            .iter()
            .find(|r| r.kind == kind && r.state == KeyState::Current)
            .ok_or(KeyError::Missing(kind))
    };
    let root = ca(sealer, current(KeyKind::RootCa)?)?;
    let int_rec = current(KeyKind::IntermediateCa)?;
    let intermediate = ca(sealer, int_rec)?;
    let operator_ca = ca(sealer, current(KeyKind::OperatorCa)?)?;
    let jwt = JwtSigner::new(unseal(sealer, current(KeyKind::Jwt)?)?);
    let mut published = Vec::new();
    let mut sequence = 0u64;
    for r in records
        .iter()
        .filter(|r| r.kind == KeyKind::Jwt && r.state != KeyState::Retired)
    {
        let k = unseal(sealer, r)?;
        published.push(JwtAuthority {
            kid: k.kid().to_owned(),
            public_point: k.public_point().to_vec(),
        });
        sequence = sequence.max(r.created_at as u64);
    }
    KeyRing::assemble(
        td,
        root,
        intermediate,
        int_rec.id.clone(),
        operator_ca,
        jwt,
        published,
        sequence,
    )
}
