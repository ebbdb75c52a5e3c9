//! Renewal over mutual TLS: the caller's client certificate, already chain-verified by the TLS
//! layer, names the identity; the ledger says which generation it belongs to.

use std::sync::Arc;

use sigil_pki::SpiffeId;
use tokio::sync::OnceCell;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{AttestError, Attested, Method, Reason};
use crate::hub::RevocationSet;
use crate::keys::KeyRing;
use crate::model::CredentialKind;
use crate::registry::Registry;
use crate::store::StoreReads;

/// Which of the broker's anchors issued a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerIssuer {
    /// The workload hierarchy (root → intermediate).
    Workload,
    /// The operator CA.
    Operator,
}

/// What the broker needs from a verified client certificate, parsed once per connection.
#[derive(Debug)]
pub struct PeerCert {
    /// The URI SAN, when it is a SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Serial number bytes.
    pub serial: Vec<u8>,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// Which anchor.
    pub issuer: PeerIssuer,
    /// The issuing CA's key identifier (the leaf's authority key identifier), hex.
    pub issuer_key_id: Option<String>,
    ledger: OnceCell<Option<(String, u64)>>,
}

impl PeerCert {
    /// Parses a leaf the TLS layer has verified. `operator_ca_subject` is the raw subject DN of
    /// the operator CA: a leaf whose issuer is that DN chains to it (names chain, and the TLS
    /// layer checked the signatures).
    pub fn parse(leaf_der: &[u8], operator_ca_subject: &[u8]) -> Option<PeerCert> {
        let (_, c) = X509Certificate::from_der(leaf_der).ok()?;
        let spiffe_id = c.subject_alternative_name().ok().flatten().and_then(|san| {
            let mut uris = san.value.general_names.iter().filter_map(|g| match g {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            });
            let first = uris.next()?;
            if uris.next().is_some() {
                return None; // an SVID has exactly one URI SAN
            }
            first.parse().ok()
        });
        let issuer = if c.tbs_certificate.issuer.as_raw() == operator_ca_subject {
            PeerIssuer::Operator
        } else {
            PeerIssuer::Workload
        };
        let issuer_key_id = c
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => a
                    .key_identifier
                    .as_ref()
                    .map(|k| sigil_pki::ids::to_hex(k.0)),
                _ => None,
            });
        Some(PeerCert {
            spiffe_id,
            serial: c.raw_serial().to_vec(),
            not_after: c.validity().not_after.timestamp(),
            issuer,
            issuer_key_id,
            ledger: OnceCell::new(),
        })
    }

    /// Serial as hex.
    pub fn serial_hex(&self) -> String {
        sigil_pki::ids::to_hex(&self.serial)
    }

    /// The (identity id, generation) the ledger recorded for this certificate; looked up once
    /// per connection.
    pub async fn ledger_entry(
        &self,
        store: &dyn StoreReads,
    ) -> Result<Option<(String, u64)>, crate::store::StoreError> {
        self.ledger
            .get_or_try_init(|| async {
                Ok(store
                    .ledger_record(&self.serial)
                    .await?
                    .filter(|r| r.kind == CredentialKind::X509)
                    .map(|r| (r.identity_id, r.generation)))
            })
            .await
            .cloned()
    }
}

/// Attests the caller of an mTLS request by its certificate: a current Sigil certificate,
/// not revoked, from a CA that is not revoked, of a known identity.
///
/// Reads: the registry (the identity), the revocation set (the certificate), the key ring (its
/// CA) and the ledger (its generation, once per connection).
pub async fn attest(
    peer: &Arc<PeerCert>,
    registry: &Registry,
    revocations: &RevocationSet,
    ring: &KeyRing,
    ledger: &dyn StoreReads,
    now: i64,
) -> Result<Attested, AttestError> {
    let actor = peer
        .spiffe_id
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| format!("x509:{}", peer.serial_hex()));
    let fail = |reason: Reason, identity_id: Option<String>, detail: String| AttestError::Failed {
        public: None,
        method: Method::X509,
        reason,
        actor: actor.clone(),
        identity_id,
        detail,
    };
    if peer.issuer != PeerIssuer::Workload {
        return Err(fail(
            Reason::OperatorCredential,
            None,
            "an operator credential cannot act as a workload".into(),
        ));
    }
    if peer.not_after <= now {
        return Err(fail(
            Reason::Expired,
            None,
            format!(
                "client certificate expired at {}",
                crate::clock::rfc3339(peer.not_after)
            ),
        ));
    }
    if let Some(r) = revocations.get(&peer.serial) {
        return Err(fail(
            Reason::Revoked,
            Some(r.identity_id),
            format!(
                "certificate {} was revoked: {}",
                peer.serial_hex(),
                r.reason
            ),
        ));
    }
    if peer
        .issuer_key_id
        .as_deref()
        .is_some_and(|k| ring.is_revoked(k))
    {
        return Err(fail(
            Reason::CaRevoked,
            None,
            "the CA that signed the certificate was revoked".into(),
        ));
    }
    let Some(id) = &peer.spiffe_id else {
        return Err(fail(
            Reason::NoSpiffeId,
            None,
            "client certificate has no single SPIFFE ID URI SAN".into(),
        ));
    };
    let Some(identity) = registry.by_spiffe_id(id.as_str()) else {
        return Err(fail(
            Reason::UnknownIdentity,
            None,
            format!("no identity has SPIFFE ID {id}"),
        ));
    };
    let Some((identity_id, generation)) = peer.ledger_entry(ledger).await? else {
        return Err(fail(
            Reason::NotInLedger,
            Some(identity.id.clone()),
            format!(
                "certificate {} is not in the issuance ledger",
                peer.serial_hex()
            ),
        ));
    };
    if identity_id != identity.id {
        return Err(fail(
            Reason::WrongIdentity,
            Some(identity.id.clone()),
            format!(
                "certificate {} was issued to another identity ({identity_id})",
                peer.serial_hex()
            ),
        ));
    }
    Ok(Attested {
        identity,
        method: Method::X509,
        actor,
        consume_join_token: None,
        presented_generation: Some(generation),
        evidence_issued_at: None,
        evidence_seq: None,
        selectors: Default::default(),
    })
}
