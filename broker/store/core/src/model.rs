//! The records every layer works from: identity records, join tokens, signing keys and the
//! issuance ledger. All are plain data, safe to `Debug` (they hold hashes and ciphertext, never
//! secrets), and serialized as JSON in the store.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sigil_pki::SpiffeId;

/// A credential kind an identity can be entitled to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialKind {
    /// An X.509-SVID.
    X509,
    /// A JWT-SVID.
    Jwt,
}

impl CredentialKind {
    /// The name used in configs, the CLI and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::X509 => "x509",
            CredentialKind::Jwt => "jwt",
        }
    }
}

impl fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CredentialKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "x509" | "x509-svid" => Ok(CredentialKind::X509),
            "jwt" | "jwt-svid" => Ok(CredentialKind::Jwt),
            other => Err(format!(
                "unknown credential kind {other:?} (expected x509 or jwt)"
            )),
        }
    }
}

/// The lifecycle state of an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityStatus {
    /// May be issued credentials.
    Active,
    /// Temporarily refused by an operator (or by anomaly policy); can be resumed.
    Suspended,
    /// A credential leaked; only a fresh attestation restores it.
    Compromised,
    /// Permanently out of service.
    Retired,
}

impl IdentityStatus {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityStatus::Active => "active",
            IdentityStatus::Suspended => "suspended",
            IdentityStatus::Compromised => "compromised",
            IdentityStatus::Retired => "retired",
        }
    }
}

impl fmt::Display for IdentityStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An attestation selector, `type:value`, e.g. `unix:uid:1000` (type `unix`, value `uid:1000`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// The selector type (`unix`, `oidc`, `join_token`, ...).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Everything after the type.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl FromStr for Selector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s.split_once(':').ok_or_else(|| {
            format!("selector {s:?} must look like TYPE:VALUE, e.g. unix:uid:1000")
        })?;
        if kind.is_empty()
            || !kind
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(format!(
                "selector type {kind:?} must be lower-case letters, digits or '_'"
            ));
        }
        if value.is_empty() || value.len() > 1024 || value.chars().any(char::is_control) {
            return Err(format!(
                "selector value in {s:?} must be 1-1024 printable characters"
            ));
        }
        Ok(Selector {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }
}

impl TryFrom<String> for Selector {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.to_string()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// What an identity may be issued. Empty sets grant nothing — never "everything".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entitlements {
    /// Credential kinds.
    pub kinds: BTreeSet<CredentialKind>,
    /// Longest lifetime of any credential, in seconds.
    pub max_ttl_secs: u64,
    /// JWT audiences.
    pub audiences: BTreeSet<String>,
    /// Scopes that may appear in JWT-SVIDs.
    pub scopes: BTreeSet<String>,
    /// DNS names that may appear in X.509-SVIDs.
    pub dns_names: BTreeSet<String>,
    /// Scopes (a subset of `scopes`) minted only while an operator's approval is in force.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub approval_scopes: BTreeSet<String>,
}

/// An identity record: who a workload is, who answers for it, and what it may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    /// Stable id, e.g. `id-3kq7v1...`.
    pub id: String,
    /// The SPIFFE ID its credentials carry.
    pub spiffe_id: SpiffeId,
    /// The person or team that answers for it.
    pub owner: String,
    /// Why it exists.
    pub purpose: String,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Attestation selectors; all must match.
    #[serde(default)]
    pub selectors: BTreeSet<Selector>,
    /// What it may be issued.
    pub entitlements: Entitlements,
    /// Lifecycle state.
    pub status: IdentityStatus,
    /// Why it is in that state (set by whoever changed it).
    #[serde(default)]
    pub status_reason: String,
    /// Unix seconds when it entered that state.
    #[serde(default)]
    pub status_since: i64,
    /// The store's commit sequence when it entered that state (stamped by the store, in
    /// commit order; 0 in records written before it was kept). Evidence created by a later
    /// commit is newer than the state, whatever the clock says.
    #[serde(default)]
    pub status_seq: u64,
    /// Unix seconds after which it stops minting until recertified.
    pub expires_at: i64,
    /// Bumped to revoke every credential minted before.
    pub generation: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// Who created it.
    pub created_by: String,
    /// Unix seconds.
    pub updated_at: i64,
    /// Who last changed it.
    pub updated_by: String,
    /// Bumped on every change; guards against lost updates.
    pub revision: u64,
    /// Unix seconds of the last recertification (0: never).
    #[serde(default)]
    pub recertified_at: i64,
    /// The operator who vouched for it last.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub recertified_by: String,
}

/// A one-time join token, stored only as the SHA-256 of the token text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Hex SHA-256 of the token.
    pub hash: String,
    /// The identity it attests as.
    pub identity_id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The store's commit sequence that created it (stamped by the store; 0 in records
    /// written before it was kept).
    #[serde(default)]
    pub created_seq: u64,
    /// Who created it.
    pub created_by: String,
    /// Unix seconds; useless after.
    pub expires_at: i64,
    /// Unix seconds when it was used, if it was.
    pub consumed_at: Option<i64>,
}

/// What a signing key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// The root CA (trust anchor of workloads).
    RootCa,
    /// An intermediate that signs X.509-SVIDs.
    IntermediateCa,
    /// The CA of operator credentials.
    OperatorCa,
    /// A JWT-SVID signing key.
    Jwt,
}

/// Where a key is in its rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Published, not yet signing.
    Next,
    /// Signing.
    Current,
    /// Published until everything it signed has expired.
    Previous,
    /// Neither published nor signing: everything it signed has expired.
    Retired,
    /// Withdrawn in an emergency: unpublished, and everything it signed is invalid.
    Revoked,
}

impl KeyState {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Next => "next",
            KeyState::Current => "current",
            KeyState::Previous => "previous",
            KeyState::Retired => "retired",
            KeyState::Revoked => "revoked",
        }
    }

    /// Whether verifiers should see it in the bundle.
    pub fn is_published(self) -> bool {
        matches!(
            self,
            KeyState::Next | KeyState::Current | KeyState::Previous
        )
    }
}

/// A signing key: its public half in the clear, its private half sealed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Key id (the JWT `kid`, or a CA's id).
    pub id: String,
    /// Purpose.
    pub kind: KeyKind,
    /// Rotation state.
    pub state: KeyState,
    /// The CA certificate (DER, base64), for CA keys.
    #[serde(default, with = "b64_opt")]
    pub cert_der: Option<Vec<u8>>,
    /// The PKCS#8 private key sealed under the master key (AAD: `keys`/`id`).
    #[serde(with = "b64")]
    pub sealed_private: Vec<u8>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds after which nothing it signed is valid.
    pub not_after: i64,
    /// Unix seconds when it started signing.
    #[serde(default)]
    pub activated_at: Option<i64>,
    /// Unix seconds when a previous key leaves the bundle (everything it signed has expired).
    #[serde(default)]
    pub retire_at: Option<i64>,
    /// Unix nanoseconds of the last change; the bundle sequence is the newest of these.
    #[serde(default)]
    pub changed_at: i64,
    /// For CA keys: the subject key identifier (hex), which leaves carry as their authority
    /// key identifier.
    #[serde(default)]
    pub ski: Option<String>,
    /// Why it was revoked.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revoked_reason: String,
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("state", &self.state)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// One issued credential. The key in the store is the credential id (serial or `jti` bytes),
/// which starts with the issue time, so the ledger is append-mostly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRecord {
    /// Serial number (X.509, hex) or `jti` (JWT).
    pub credential_id: String,
    /// Kind.
    pub kind: CredentialKind,
    /// The identity it was issued to (empty for broker-internal credentials).
    pub identity_id: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Identity generation at issue.
    pub generation: u64,
    /// JWT audiences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// JWT scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// X.509 DNS SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// The key that signed it.
    pub signing_key_id: String,
    /// How the holder proved what it is (`join_token`, `x509`, `operator`, ...).
    pub attestation: String,
    /// The address the request came from (IP), when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
}

/// A revoked credential. Kept only until the credential would have expired anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRecord {
    /// Serial (hex) or `jti`.
    pub credential_id: String,
    /// Kind.
    pub kind: CredentialKind,
    /// Its identity.
    pub identity_id: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// The key that signed it (the CRL it belongs in).
    pub signing_key_id: String,
    /// When it expires; the revocation is pruned after this.
    pub expires_at: i64,
    /// Unix seconds.
    pub revoked_at: i64,
    /// Why.
    pub reason: String,
    /// Who.
    pub revoked_by: String,
}

/// A person or team that owns identities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The owner's name, as identity records spell it.
    pub name: String,
    /// Unix seconds since it was deactivated (left, moved on), if it was.
    pub deactivated_at: Option<i64>,
    /// Who changed it last.
    pub changed_by: String,
    /// Why.
    pub reason: String,
}

/// How many hours of issuance counts a usage record keeps.
pub const USAGE_HOURS: usize = 48;
/// How many distinct sources a usage record remembers.
pub const USAGE_SOURCES: usize = 64;

/// What an identity has actually used: derived from the ledger, one record per identity. The
/// basis of excess-privilege findings and behaviour baselines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The identity.
    pub identity_id: String,
    /// Unix seconds of the first issuance.
    pub first_used: i64,
    /// Unix seconds of the last issuance.
    pub last_used: i64,
    /// Credentials issued.
    pub issued: u64,
    /// Kind → last used.
    #[serde(default)]
    pub kinds: BTreeMap<String, i64>,
    /// Audience → last used.
    #[serde(default)]
    pub audiences: BTreeMap<String, i64>,
    /// Scope → last used.
    #[serde(default)]
    pub scopes: BTreeMap<String, i64>,
    /// Attestation method → last used.
    #[serde(default)]
    pub methods: BTreeMap<String, i64>,
    /// Source address → last used (the most recent few).
    #[serde(default)]
    pub sources: BTreeMap<String, i64>,
    /// (hour since the epoch, credentials issued in it), oldest first.
    #[serde(default)]
    pub hourly: Vec<(i64, u64)>,
    /// Sum of granted lifetimes, seconds.
    #[serde(default)]
    pub lifetime_sum: u64,
    /// Longest granted lifetime, seconds.
    #[serde(default)]
    pub lifetime_max: u64,
}

impl UsageRecord {
    /// Folds one issued credential in.
    pub fn apply(&mut self, r: &LedgerRecord) {
        let at = r.issued_at;
        if self.issued == 0 {
            self.first_used = at;
        }
        self.identity_id = r.identity_id.clone();
        self.issued += 1;
        self.last_used = self.last_used.max(at);
        let touch = |m: &mut BTreeMap<String, i64>, k: &str| {
            let e = m.entry(k.to_owned()).or_insert(at);
            *e = (*e).max(at);
        };
        touch(&mut self.kinds, r.kind.as_str());
        for a in &r.audiences {
            touch(&mut self.audiences, a);
        }
        for s in &r.scopes {
            touch(&mut self.scopes, s);
        }
        if !r.attestation.is_empty() {
            touch(&mut self.methods, &r.attestation);
        }
        if !r.source.is_empty() {
            touch(&mut self.sources, &r.source);
            if self.sources.len() > USAGE_SOURCES
                && let Some(oldest) = self
                    .sources
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(k, _)| k.clone())
            {
                self.sources.remove(&oldest);
            }
        }
        let hour = at.div_euclid(3600);
        match self.hourly.last_mut() {
            Some((h, n)) if *h == hour => *n += 1,
            _ => self.hourly.push((hour, 1)),
        }
        if self.hourly.len() > USAGE_HOURS {
            let drop = self.hourly.len() - USAGE_HOURS;
            self.hourly.drain(..drop);
        }
        let life = (r.expires_at - r.issued_at).max(0) as u64;
        self.lifetime_sum += life;
        self.lifetime_max = self.lifetime_max.max(life);
    }
}

/// The store key of a credential: serial bytes (X.509, from hex) or `jti` bytes (JWT, from
/// base64url). `None` when `id` is not in that form.
pub fn credential_key(kind: CredentialKind, id: &str) -> Option<Vec<u8>> {
    match kind {
        CredentialKind::X509 => sigil_pki::ids::from_hex(id),
        CredentialKind::Jwt => sigil_pki::ids::jti_from_str(id),
    }
}

mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

mod b64_opt {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => STANDARD
                .decode(s)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

/// A just-in-time approval: an identity may be issued some of its approval-gated scopes until
/// `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    /// `apr-...`.
    pub id: String,
    /// The identity.
    pub identity_id: String,
    /// The scopes approved.
    pub scopes: BTreeSet<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; not in force from then on.
    pub expires_at: i64,
    /// The operator who approved.
    pub approved_by: String,
    /// Why.
    pub reason: String,
    /// Unix seconds when ended early, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
    /// True once its expiry has been recorded in the audit log.
    #[serde(default)]
    pub expiry_audited: bool,
}

impl ApprovalRecord {
    /// True while it lets scopes be minted.
    pub fn in_force(&self, now: i64) -> bool {
        self.revoked_at.is_none() && now < self.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_and_name_the_problem() {
        let s: Selector = "unix:uid:1000".parse().unwrap();
        assert_eq!((s.kind(), s.value()), ("unix", "uid:1000"));
        assert_eq!(s.to_string(), "unix:uid:1000");
        assert!(
            "nocolon"
                .parse::<Selector>()
                .unwrap_err()
                .contains("TYPE:VALUE")
        );
        assert!("Unix:uid:1".parse::<Selector>().is_err());
        assert!("unix:".parse::<Selector>().is_err());
    }

    #[test]
    fn key_record_debug_hides_the_sealed_key() {
        let k = KeyRecord {
            id: "k1".into(),
            kind: KeyKind::Jwt,
            state: KeyState::Current,
            cert_der: None,
            sealed_private: vec![0xAB; 40],
            created_at: 0,
            not_after: 0,
            activated_at: None,
            retire_at: None,
            changed_at: 0,
            ski: None,
            revoked_reason: String::new(),
        };
        assert!(!format!("{k:?}").contains("171"));
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<KeyRecord>(&json).unwrap(), k);
    }
}
