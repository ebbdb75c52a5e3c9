//! The identity registry: the in-memory view of every identity record that every gate reads,
//! kept in step with the store (a record is replaced only by a newer revision), and the
//! validation of what operators ask to create or change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sigil_pki::{SpiffeId, TrustDomain};

use crate::config::Issuance;
use crate::model::{CredentialKind, Entitlements, IdentityRecord, Selector};

/// Path prefix reserved for the broker's own identities (broker, operators).
pub const RESERVED_PATH: &str = "/sigil";

/// The current identity records, by id and by SPIFFE ID.
#[derive(Debug, Default)]
pub struct Registry {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<String, Arc<IdentityRecord>>,
    by_spiffe: HashMap<String, String>,
    /// Identity ids by each of their selectors.
    by_selector: HashMap<Selector, BTreeSet<String>>,
}

impl Registry {
    /// A registry holding `records`.
    pub fn new(records: Vec<IdentityRecord>) -> Self {
        let r = Registry::default();
        for rec in records {
            r.upsert(rec);
        }
        r
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The record with this id.
    pub fn get(&self, id: &str) -> Option<Arc<IdentityRecord>> {
        self.read().by_id.get(id).cloned()
    }

    /// The record with this SPIFFE ID.
    pub fn by_spiffe_id(&self, spiffe_id: &str) -> Option<Arc<IdentityRecord>> {
        let inner = self.read();
        inner
            .by_spiffe
            .get(spiffe_id)
            .and_then(|id| inner.by_id.get(id))
            .cloned()
    }

    /// The record with this id or SPIFFE ID.
    pub fn find(&self, id_or_spiffe_id: &str) -> Option<Arc<IdentityRecord>> {
        if id_or_spiffe_id.starts_with("spiffe://") {
            self.by_spiffe_id(id_or_spiffe_id)
        } else {
            self.get(id_or_spiffe_id)
        }
    }

    /// The identities whose selectors (a non-empty set) are all in `shown`, ordered by SPIFFE
    /// ID: what selector-based evidence (OIDC, Unix) proves.
    pub fn matching(&self, shown: &BTreeSet<Selector>) -> Vec<Arc<IdentityRecord>> {
        let inner = self.read();
        let mut candidates = BTreeSet::new();
        for s in shown {
            if let Some(ids) = inner.by_selector.get(s) {
                candidates.extend(ids.iter());
            }
        }
        let mut out: Vec<Arc<IdentityRecord>> = candidates
            .into_iter()
            .filter_map(|id| inner.by_id.get(id))
            .filter(|r| !r.selectors.is_empty() && r.selectors.is_subset(shown))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        out
    }

    /// Every record, ordered by SPIFFE ID.
    pub fn list(&self) -> Vec<Arc<IdentityRecord>> {
        let mut v: Vec<_> = self.read().by_id.values().cloned().collect();
        v.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        v
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Installs `rec` unless a newer revision is already there (concurrent updates may
    /// finish out of order).
    pub fn upsert(&self, rec: IdentityRecord) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = inner.by_id.get(&rec.id) {
            if old.revision > rec.revision {
                return;
            }
            let old_spiffe = old.spiffe_id.to_string();
            let old_selectors = old.selectors.clone();
            inner.by_spiffe.remove(&old_spiffe);
            for s in old_selectors {
                if let Some(ids) = inner.by_selector.get_mut(&s) {
                    ids.remove(&rec.id);
                    if ids.is_empty() {
                        inner.by_selector.remove(&s);
                    }
                }
            }
        }
        for s in &rec.selectors {
            inner
                .by_selector
                .entry(s.clone())
                .or_default()
                .insert(rec.id.clone());
        }
        inner
            .by_spiffe
            .insert(rec.spiffe_id.to_string(), rec.id.clone());
        inner.by_id.insert(rec.id.clone(), Arc::new(rec));
    }
}

/// A new identity as an operator describes it.
#[derive(Debug, Clone, Default)]
pub struct IdentitySpec {
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Owner (person or team).
    pub owner: String,
    /// Purpose.
    pub purpose: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Selectors as `type:value`.
    pub selectors: Vec<String>,
    /// Entitlements.
    pub entitlements: EntitlementSpec,
    /// Identity lifetime; `None` means the configured default.
    pub expires_in: Option<Duration>,
}

/// Entitlements as an operator describes them.
#[derive(Debug, Clone, Default)]
pub struct EntitlementSpec {
    /// `x509`, `jwt`.
    pub kinds: Vec<String>,
    /// Longest credential lifetime; `None` means the configured default.
    pub max_ttl: Option<Duration>,
    /// JWT audiences.
    pub audiences: Vec<String>,
    /// Scopes.
    pub scopes: Vec<String>,
    /// DNS names.
    pub dns_names: Vec<String>,
    /// Scopes that need an approval (each also in `scopes`).
    pub approval_scopes: Vec<String>,
}

/// A field of an identity spec that is not acceptable: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidField {
    /// The field, as named in the API.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidField {
    InvalidField {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The next revision of `rec`, changed by `actor` at `now` (Unix seconds): what every change
/// to an identity record goes through.
pub fn revise(rec: &IdentityRecord, actor: &str, now: i64) -> IdentityRecord {
    let mut next = rec.clone();
    next.revision = rec.revision + 1;
    next.updated_at = now;
    next.updated_by = actor.to_owned();
    next
}

/// The one way an identity's status changes (an operator's suspend, resume or retire, a leak
/// report, an anomaly, a fresh attestation restoring a compromised identity): the next
/// revision of `rec` in status `to`, saying why. `status_since` moves only when the status
/// does (the store stamps the commit sequence then). Whether the change is allowed is the
/// caller's call.
pub fn transition(
    rec: &IdentityRecord,
    to: crate::model::IdentityStatus,
    reason: &str,
    actor: &str,
    now: i64,
) -> IdentityRecord {
    let mut next = revise(rec, actor, now);
    if next.status != to {
        next.status = to;
        next.status_since = now;
    }
    next.status_reason = reason.to_owned();
    next
}

/// Most selectors on one identity (each must match, so more would only be a typo's worth).
pub const MAX_SELECTORS: usize = 32;

/// True when `status` still allows a join token to be created (anything but retired).
pub fn join_token_allowed(status: crate::model::IdentityStatus) -> bool {
    status != crate::model::IdentityStatus::Retired
}

fn check_text(field: &str, v: &str, max: usize) -> Result<String, InvalidField> {
    let t = v.trim();
    if t.is_empty() {
        return Err(invalid(
            field,
            "is required (every identity needs a named owner and a purpose)",
        ));
    }
    if t.chars().count() > max {
        return Err(invalid(field, format!("is longer than {max} characters")));
    }
    if t.chars().any(char::is_control) {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(t.to_owned())
}

fn check_token_list(
    field: &str,
    items: &[String],
    what: &str,
) -> Result<BTreeSet<String>, InvalidField> {
    let mut out = BTreeSet::new();
    for i in items {
        if i.is_empty() || i.len() > 256 || i.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(
                field,
                format!("{what} {i:?} must be 1-256 characters without spaces"),
            ));
        }
        out.insert(i.clone());
    }
    Ok(out)
}

/// Checks and normalizes entitlements.
pub fn check_entitlements(
    e: &EntitlementSpec,
    cfg: &Issuance,
) -> Result<Entitlements, InvalidField> {
    let mut kinds = BTreeSet::new();
    for k in &e.kinds {
        for part in k.split(',').filter(|p| !p.trim().is_empty()) {
            kinds.insert(
                part.parse::<CredentialKind>()
                    .map_err(|r| invalid("entitlements.kinds", r))?,
            );
        }
    }
    let max_ttl = e.max_ttl.unwrap_or(cfg.default_max_ttl);
    if max_ttl < Duration::from_secs(1) {
        return Err(invalid("entitlements.max_ttl", "must be at least 1s"));
    }
    if max_ttl > cfg.max_ttl_ceiling {
        return Err(invalid(
            "entitlements.max_ttl",
            format!(
                "{} is above the broker's ceiling of {} (issuance.max_ttl_ceiling)",
                crate::config::dur::format(max_ttl),
                crate::config::dur::format(cfg.max_ttl_ceiling)
            ),
        ));
    }
    let mut dns_names = BTreeSet::new();
    for d in &e.dns_names {
        let lower = d.to_ascii_lowercase();
        if rustls_pki_types::DnsName::try_from(lower.as_str()).is_err()
            || lower.parse::<std::net::IpAddr>().is_ok()
        {
            return Err(invalid(
                "entitlements.dns_names",
                format!("{d:?} is not a valid DNS name"),
            ));
        }
        dns_names.insert(lower);
    }
    let scopes = check_token_list("entitlements.scopes", &e.scopes, "scope")?;
    let approval_scopes =
        check_token_list("entitlements.approval_scopes", &e.approval_scopes, "scope")?;
    if let Some(s) = approval_scopes.iter().find(|s| !scopes.contains(*s)) {
        return Err(invalid(
            "entitlements.approval_scopes",
            format!("{s:?} needs approval but is not one of the identity's scopes"),
        ));
    }
    Ok(Entitlements {
        kinds,
        max_ttl_secs: max_ttl.as_secs(),
        audiences: check_token_list("entitlements.audiences", &e.audiences, "audience")?,
        scopes,
        dns_names,
        approval_scopes,
    })
}

/// Checks a SPIFFE ID for a workload identity: valid, in `td`, with a path, not reserved.
pub fn check_spiffe_id(raw: &str, td: &TrustDomain) -> Result<SpiffeId, InvalidField> {
    let id: SpiffeId = raw
        .trim()
        .parse()
        .map_err(|e: sigil_pki::SpiffeIdError| invalid("spiffe_id", e.to_string()))?;
    if !id.is_member_of(td) {
        return Err(invalid(
            "spiffe_id",
            format!("{id} is not in this broker's trust domain {td}"),
        ));
    }
    if id.path().is_empty() {
        return Err(invalid(
            "spiffe_id",
            "needs a path (the trust domain's own ID cannot be a workload)",
        ));
    }
    if id.path() == RESERVED_PATH || id.path().starts_with("/sigil/") {
        return Err(invalid(
            "spiffe_id",
            format!("paths under {RESERVED_PATH}/ are reserved for the broker itself"),
        ));
    }
    Ok(id)
}

/// Checks labels: keys of `[a-z0-9._/-]`, values without control characters.
pub fn check_labels(
    labels: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, InvalidField> {
    for (k, v) in labels {
        if k.is_empty()
            || k.len() > 63
            || !k
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._/-".contains(c))
        {
            return Err(invalid(
                "labels",
                format!("label key {k:?} must be 1-63 of a-z 0-9 . _ / -"),
            ));
        }
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(invalid(
                "labels",
                format!("label {k:?} value must be at most 256 printable characters"),
            ));
        }
    }
    Ok(labels.clone())
}

/// Selector types and the values each takes.
const UNIX_KEYS: &[&str] = &["uid", "gid", "supplementary_gid", "path", "sha256"];
const OIDC_FAMILY: &[&str] = &["oidc", "k8s", "github", "gitlab"];

/// Parses and checks selectors: known types, well-formed values, one attestation method per
/// identity (all selectors must match, so mixing methods could never match), and OIDC-based
/// selectors pinned to an issuer with `oidc:iss:` (so a token from another issuer with the
/// same claims cannot match).
pub fn check_selectors(raw: &[String]) -> Result<BTreeSet<Selector>, InvalidField> {
    let bad = |m: String| invalid("selectors", m);
    if raw.len() > MAX_SELECTORS {
        return Err(bad(format!(
            "at most {MAX_SELECTORS} selectors (got {})",
            raw.len()
        )));
    }
    let set: BTreeSet<Selector> = raw
        .iter()
        .map(|s| {
            if s.len() > 512 {
                return Err(bad(format!(
                    "{:?}... is longer than 512 characters",
                    s.chars().take(40).collect::<String>()
                )));
            }
            s.parse::<Selector>().map_err(bad)
        })
        .collect::<Result<_, _>>()?;
    let mut unix = false;
    let mut oidc = false;
    for s in &set {
        let (kind, value) = (s.kind(), s.value());
        match kind {
            "unix" => {
                unix = true;
                let (key, v) = value.split_once(':').unwrap_or((value, ""));
                if !UNIX_KEYS.contains(&key) || v.is_empty() {
                    return Err(bad(format!(
                        "{s}: unix selectors are unix:uid:N, unix:gid:N, unix:supplementary_gid:N, unix:path:/abs/path or unix:sha256:HEX"
                    )));
                }
                let ok = match key {
                    "uid" | "gid" | "supplementary_gid" => v.parse::<u32>().is_ok(),
                    "path" => v.starts_with('/'),
                    _ => {
                        v.len() == 64
                            && v.bytes()
                                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                    }
                };
                if !ok {
                    return Err(bad(format!(
                        "{s}: {key} must be {}",
                        match key {
                            "path" => "an absolute path",
                            "sha256" => "64 lower-case hex digits",
                            _ => "a number",
                        }
                    )));
                }
            }
            k if OIDC_FAMILY.contains(&k) => {
                oidc = true;
                if k == "oidc"
                    && !(value.starts_with("iss:")
                        || value.starts_with("sub:")
                        || value.starts_with("claim:"))
                {
                    return Err(bad(format!(
                        "{s}: oidc selectors are oidc:iss:URL, oidc:sub:SUBJECT or oidc:claim:NAME:VALUE"
                    )));
                }
            }
            other => {
                return Err(bad(format!(
                    "{s}: unknown selector type {other:?} (known: unix, oidc, k8s, github, gitlab)"
                )));
            }
        }
    }
    if unix && oidc {
        return Err(bad(
            "an identity's selectors must all come from one attestation method (unix or OIDC); all must match, so a mix never could".into(),
        ));
    }
    if oidc
        && !set
            .iter()
            .any(|s| s.kind() == "oidc" && s.value().starts_with("iss:"))
    {
        return Err(bad(
            "OIDC selectors need an oidc:iss:ISSUER selector too, so a token from another issuer with the same claims cannot match".into(),
        ));
    }
    Ok(set)
}

/// Checks an identity lifetime.
pub fn check_lifetime(d: Option<Duration>, cfg: &Issuance) -> Result<Duration, InvalidField> {
    let d = d.unwrap_or(cfg.identity_lifetime);
    if d < Duration::from_secs(60) {
        return Err(invalid("expires_in", "must be at least 1m"));
    }
    if d > Duration::from_secs(5 * 366 * 86400) {
        return Err(invalid(
            "expires_in",
            "must be at most 5 years; identities are recertified, not immortal",
        ));
    }
    Ok(d)
}

/// A fresh identity id: `id-` and 16 base32 characters.
pub fn new_identity_id() -> String {
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let bytes = sigil_pki::ids::random_bytes::<10>();
    let mut bits: u128 = 0;
    for b in bytes {
        bits = (bits << 8) | u128::from(b);
    }
    let mut s = String::from("id-");
    for i in (0..16).rev() {
        s.push(ALPHABET[((bits >> (i * 5)) & 31) as usize] as char);
    }
    s
}

/// Builds a new record from a spec (validated).
pub fn build_record(
    spec: &IdentitySpec,
    td: &TrustDomain,
    cfg: &Issuance,
    actor: &str,
    now: i64,
) -> Result<IdentityRecord, InvalidField> {
    let spiffe_id = check_spiffe_id(&spec.spiffe_id, td)?;
    let owner = check_text("owner", &spec.owner, 200)?;
    let purpose = check_text("purpose", &spec.purpose, 1000)?;
    let lifetime = check_lifetime(spec.expires_in, cfg)?;
    Ok(IdentityRecord {
        id: new_identity_id(),
        spiffe_id,
        owner,
        purpose,
        labels: check_labels(&spec.labels)?,
        selectors: check_selectors(&spec.selectors)?,
        entitlements: check_entitlements(&spec.entitlements, cfg)?,
        status: crate::model::IdentityStatus::Active,
        status_reason: String::new(),
        status_since: now,
        status_seq: 0,
        expires_at: now + lifetime.as_secs() as i64,
        generation: 1,
        created_at: now,
        created_by: actor.to_owned(),
        updated_at: now,
        updated_by: actor.to_owned(),
        revision: 1,
        recertified_at: 0,
        recertified_by: String::new(),
    })
}

/// Checks owner/purpose text (for updates).
pub fn check_owner(v: &str) -> Result<String, InvalidField> {
    check_text("owner", v, 200)
}

/// Checks purpose text (for updates).
pub fn check_purpose(v: &str) -> Result<String, InvalidField> {
    check_text("purpose", v, 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::IdentityStatus;

    fn record(id: &str, spiffe: &str, rev: u64) -> IdentityRecord {
        IdentityRecord {
            id: id.into(),
            spiffe_id: spiffe.parse().unwrap(),
            owner: "team".into(),
            purpose: "p".into(),
            labels: Default::default(),
            selectors: Default::default(),
            entitlements: Default::default(),
            status: IdentityStatus::Active,
            status_reason: String::new(),
            status_since: 0,
            status_seq: 0,
            expires_at: 0,
            generation: 0,
            created_at: 0,
            created_by: "t".into(),
            updated_at: 0,
            updated_by: "t".into(),
            revision: rev,
            recertified_at: 0,
            recertified_by: String::new(),
        }
    }

    #[test]
    fn older_revisions_never_replace_newer_ones() {
        let r = Registry::default();
        r.upsert(record("id-1", "spiffe://td/a", 2));
        r.upsert(record("id-1", "spiffe://td/b", 1));
        assert_eq!(r.get("id-1").unwrap().revision, 2);
        assert!(r.by_spiffe_id("spiffe://td/a").is_some());
        assert!(r.by_spiffe_id("spiffe://td/b").is_none());
        r.upsert(record("id-1", "spiffe://td/c", 3));
        assert!(r.by_spiffe_id("spiffe://td/a").is_none());
        assert_eq!(r.find("spiffe://td/c").unwrap().id, "id-1");
    }

    #[test]
    fn operator_input_is_checked_field_by_field() {
        let td: TrustDomain = "example.org".parse().unwrap();
        assert!(check_spiffe_id("spiffe://example.org/app", &td).is_ok());
        let e = check_spiffe_id("spiffe://other.org/app", &td)
            .unwrap_err()
            .to_string();
        assert!(e.contains("spiffe_id") && e.contains("trust domain"), "{e}");
        assert!(check_spiffe_id("spiffe://example.org/sigil/operator/x", &td).is_err());
        assert!(check_spiffe_id("spiffe://example.org", &td).is_err());
        assert!(
            check_text("owner", "  ", 10)
                .unwrap_err()
                .to_string()
                .contains("owner")
        );
        let cfg = Issuance::default();
        let e = check_entitlements(
            &EntitlementSpec {
                kinds: vec!["x509,jwt".into()],
                ..Default::default()
            },
            &cfg,
        )
        .unwrap();
        assert_eq!(e.kinds.len(), 2);
        assert_eq!(e.max_ttl_secs, 3600);
        assert!(e.audiences.is_empty(), "nothing granted unless listed");
        let bad = EntitlementSpec {
            kinds: vec!["ssh".into()],
            ..Default::default()
        };
        assert!(
            check_entitlements(&bad, &cfg)
                .unwrap_err()
                .to_string()
                .contains("entitlements.kinds")
        );
        let bad = EntitlementSpec {
            max_ttl: Some(Duration::from_secs(30 * 86400)),
            ..Default::default()
        };
        assert!(
            check_entitlements(&bad, &cfg)
                .unwrap_err()
                .to_string()
                .contains("ceiling")
        );
        let bad = EntitlementSpec {
            dns_names: vec!["bad name".into()],
            ..Default::default()
        };
        assert!(check_entitlements(&bad, &cfg).is_err());
        let bad = EntitlementSpec {
            audiences: vec!["two words".into()],
            ..Default::default()
        };
        assert!(check_entitlements(&bad, &cfg).is_err());
    }

    #[test]
    fn identity_ids_look_right() {
        let a = new_identity_id();
        assert!(a.starts_with("id-") && a.len() == 19, "{a}");
        assert_ne!(a, new_identity_id());
    }
}
