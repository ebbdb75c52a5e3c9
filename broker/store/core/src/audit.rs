//! The audit log: append-only entries, each chained to the one before by an HMAC keyed from the
//! master key. An entry is written in the same commit as the change it describes; if it cannot
//! be written, the change does not happen.
//!
//! Chaining: `hash = HMAC(audit_key, JSON(entry with hash = ""))`, and each entry carries the
//! previous entry's hash. Editing, removing or reordering entries breaks the chain at the first
//! bad sequence number, and without the master key nobody can re-forge the chain after an edit.
//! Entries carry serials, `jti`s and fingerprints only — never tokens or keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::seal::Sealer;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// The action happened.
    Allow,
    /// The action was refused.
    Deny,
}

/// An audit entry before the store gives it a sequence number and a place in the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditDraft {
    /// Unix nanoseconds.
    pub time: i64,
    /// Who acted: an operator, a SPIFFE ID, `join_token:<fingerprint>`, `broker`.
    pub actor: String,
    /// What was attempted, e.g. `x509.mint`, `identity.create`.
    pub action: String,
    /// What it was done to (an identity id, a serial, a key id).
    pub target: String,
    /// Allow or deny.
    pub decision: Decision,
    /// The gate that decided a denial (`gate1.identity_proof`, ...), or empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gate: String,
    /// Plain-words reason.
    pub reason: String,
    /// Correlates log lines and entries of one request.
    pub request_id: String,
    /// Structured detail (serials, audiences, TTLs, the gate trail).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub detail: BTreeMap<String, Value>,
}

/// Longest text an audit entry keeps from any one field (actor, target, reason, a detail
/// string); longer text is cut, saying how much was dropped. Entries often quote what a caller
/// sent (an OIDC subject, a refused value): the log must not grow with an attacker's input.
pub const MAX_FIELD: usize = 512;
/// Most elements an audit detail list keeps.
pub const MAX_LIST: usize = 64;

/// `s` cut to [`MAX_FIELD`] bytes (at a character boundary), control characters replaced, so
/// nothing an attacker sends reaches the log unbounded or as terminal escapes.
pub fn bounded(s: impl Into<String>) -> String {
    let s: String = s.into();
    let clean = |t: &str| -> String {
        t.chars()
            .map(|c| if c.is_control() { '\u{fffd}' } else { c })
            .collect()
    };
    if s.len() <= MAX_FIELD {
        return if s.chars().any(char::is_control) {
            clean(&s)
        } else {
            s
        };
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[{} more bytes]", clean(&s[..end]), s.len() - end)
}

fn bounded_value(v: Value) -> Value {
    match v {
        Value::String(s) => Value::String(bounded(s)),
        Value::Array(a) => {
            let n = a.len();
            let mut kept: Vec<Value> = a.into_iter().take(MAX_LIST).map(bounded_value).collect();
            if n > MAX_LIST {
                kept.push(Value::String(format!("…[{} more]", n - MAX_LIST)));
            }
            Value::Array(kept)
        }
        Value::Object(m) => Value::Object(
            m.into_iter()
                .take(MAX_LIST)
                .map(|(k, v)| (bounded(k), bounded_value(v)))
                .collect(),
        ),
        other => other,
    }
}

impl AuditDraft {
    /// A draft with the given basics and no detail. Text fields are [`bounded`].
    pub fn new(
        time: i64,
        actor: impl Into<String>,
        action: impl Into<String>,
        target: impl Into<String>,
        decision: Decision,
        reason: impl Into<String>,
        request_id: impl Into<String>,
    ) -> Self {
        AuditDraft {
            time,
            actor: bounded(actor),
            action: bounded(action),
            target: bounded(target),
            decision,
            gate: String::new(),
            reason: bounded(reason),
            request_id: bounded(request_id),
            detail: BTreeMap::new(),
        }
    }

    /// Sets the deciding gate.
    pub fn gate(mut self, gate: impl Into<String>) -> Self {
        self.gate = gate.into();
        self
    }

    /// Adds a detail field (strings and lists [`bounded`]).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.detail
            .insert(key.to_owned(), bounded_value(value.into()));
        self
    }
}

/// A stored audit entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// 1, 2, 3, ... with no gaps.
    pub seq: u64,
    /// The draft.
    #[serde(flatten)]
    pub draft: AuditDraft,
    /// Hash of the previous entry (64 zeros for the first).
    pub prev_hash: String,
    /// This entry's chain hash.
    pub hash: String,
}

/// The chain position after the last stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// Last sequence number (0 when empty).
    pub seq: u64,
    /// Last hash (64 zeros when empty).
    pub hash: String,
}

impl Default for ChainHead {
    fn default() -> Self {
        ChainHead {
            seq: 0,
            hash: "0".repeat(64),
        }
    }
}

fn entry_mac(sealer: &Sealer, entry: &AuditEntry) -> String {
    // The MAC covers the entry with an empty `hash`. Serializing plain data with string keys
    // cannot fail.
    let bytes = if entry.hash.is_empty() {
        serde_json::to_vec(entry)
    } else {
        let mut unhashed = entry.clone();
        unhashed.hash = String::new();
        serde_json::to_vec(&unhashed)
    }
    .unwrap_or_default();
    sigil_pki::ids::to_hex(&sealer.audit_mac(&bytes))
}

impl ChainHead {
    /// Appends `draft`: assigns the next sequence number, links and hashes it, and returns the
    /// entry with its JSON encoding. The head moves forward.
    pub fn append(&mut self, sealer: &Sealer, draft: AuditDraft) -> (AuditEntry, Vec<u8>) {
        let mut entry = AuditEntry {
            seq: self.seq + 1,
            draft,
            prev_hash: self.hash.clone(),
            hash: String::new(),
        };
        entry.hash = entry_mac(sealer, &entry);
        self.seq = entry.seq;
        self.hash = entry.hash.clone();
        let bytes = serde_json::to_vec(&entry).unwrap_or_default();
        (entry, bytes)
    }
}

/// Where the kept part of the chain starts once older entries were removed (retention): the
/// last removed entry's sequence number and hash, when it was removed, and a MAC under the
/// chain's key — so the checkpoint cannot be moved or forged without the master key, and
/// verification proves the remaining chain intact from a known point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The last removed entry.
    pub seq: u64,
    /// Its chain hash (the next entry's `prev_hash`).
    pub hash: String,
    /// Unix nanoseconds when the entries were removed.
    pub time: i64,
    /// HMAC of the above under the audit key.
    pub mac: String,
}

impl Checkpoint {
    /// A checkpoint after the entry `seq` with chain hash `hash`.
    pub fn new(sealer: &Sealer, seq: u64, hash: String, time: i64) -> Self {
        let mac = checkpoint_mac(sealer, seq, &hash, time);
        Checkpoint {
            seq,
            hash,
            time,
            mac,
        }
    }

    /// Whether the MAC is this key's.
    pub fn verify(&self, sealer: &Sealer) -> bool {
        checkpoint_mac(sealer, self.seq, &self.hash, self.time) == self.mac
    }

    /// The chain position it stands for.
    pub fn head(&self) -> ChainHead {
        ChainHead {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }
}

fn checkpoint_mac(sealer: &Sealer, seq: u64, hash: &str, time: i64) -> String {
    let data = format!("sigil/audit/checkpoint/v1\0{seq}\0{hash}\0{time}");
    sigil_pki::ids::to_hex(&sealer.audit_mac(data.as_bytes()))
}

/// The chain's end as of the last commit, kept apart from the entries (in the store's metadata,
/// written in the same transaction as every batch of entries) under its own MAC: removing
/// entries from the end of the chain leaves the anchor pointing past what is left, and the
/// anchor cannot be moved back without the master key. (It can be put back to a value it once
/// had, together with the file as it was then: a rollback of the whole store needs a witness
/// outside it — see docs/SECURITY.md.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// The last entry's sequence number.
    pub seq: u64,
    /// Its chain hash.
    pub hash: String,
    /// HMAC of the above under the audit key, in a domain of its own.
    pub mac: String,
}

impl Anchor {
    /// The anchor of the chain ending at `head`.
    pub fn new(sealer: &Sealer, head: &ChainHead) -> Self {
        Anchor {
            seq: head.seq,
            hash: head.hash.clone(),
            mac: anchor_mac(sealer, head.seq, &head.hash),
        }
    }

    /// Whether the MAC is this key's.
    pub fn verify(&self, sealer: &Sealer) -> bool {
        anchor_mac(sealer, self.seq, &self.hash) == self.mac
    }
}

fn anchor_mac(sealer: &Sealer, seq: u64, hash: &str) -> String {
    let data = format!("sigil/audit/anchor/v1\0{seq}\0{hash}");
    sigil_pki::ids::to_hex(&sealer.audit_mac(data.as_bytes()))
}

/// What a store holds of its audit chain: where retention left it, its anchored end, and the
/// kept entries (sequence number, stored JSON).
#[derive(Debug, Clone, Default)]
pub struct StoredChain {
    /// Where the kept entries start (after retention), if any were removed.
    pub checkpoint: Option<Checkpoint>,
    /// The anchored end.
    pub anchor: Option<Anchor>,
    /// The kept entries in key order.
    pub entries: Vec<(u64, Vec<u8>)>,
}

/// The result of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainReport {
    /// Every entry checks out.
    Intact {
        /// Number of entries.
        entries: u64,
    },
    /// The first entry that does not.
    Broken {
        /// Its sequence number (the store key where the break was found).
        seq: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Walks stored entries in key order and reports the first break. Checks the links and MACs
/// only: [`verify_stored`] also checks the chain's ends.
pub fn verify_chain<I>(sealer: &Sealer, entries: I) -> ChainReport
where
    I: IntoIterator<Item = (u64, Vec<u8>)>,
{
    verify_chain_from(sealer, None, entries)
}

/// Walks stored entries in key order from `checkpoint` (where retention left the chain; none:
/// from the start) and reports the first break. A checkpoint that does not verify under the key
/// is itself the break. Does not check the chain's end: see [`verify_stored`].
pub fn verify_chain_from<I>(
    sealer: &Sealer,
    checkpoint: Option<&Checkpoint>,
    entries: I,
) -> ChainReport
where
    I: IntoIterator<Item = (u64, Vec<u8>)>,
{
    let mut v = ChainVerifier::new(sealer, checkpoint, None);
    for (k, b) in entries {
        if !v.feed(k, &b) {
            break;
        }
    }
    v.finish(End::Unchecked)
}

/// Verifies a whole stored chain read in one snapshot: links and MACs from the checkpoint, and
/// that it ends exactly where its anchor says — so entries removed from the end are found.
pub fn verify_stored(sealer: &Sealer, chain: &StoredChain) -> ChainReport {
    let mut v = ChainVerifier::new(sealer, chain.checkpoint.as_ref(), chain.anchor.as_ref());
    for (k, b) in &chain.entries {
        if !v.feed(*k, b) {
            break;
        }
    }
    v.finish(End::Exact)
}

/// Walks the kept audit chain of a live store with `sealer`'s key, from the retention
/// checkpoint to at least its anchored end, page by page in bounded memory while commits go
/// on (the anchor is read first, so the chain read after it must reach it).
pub async fn verify_store(
    store: &dyn crate::StoreReads,
    sealer: &Sealer,
) -> Result<ChainReport, crate::StoreError> {
    const PAGE: usize = 10_000;
    let anchor = store.audit_anchor().await?;
    let checkpoint = store.audit_checkpoint().await?;
    let mut v = ChainVerifier::new(sealer, checkpoint.as_ref(), anchor.as_ref());
    let mut from = checkpoint.as_ref().map_or(1, |c| c.seq + 1);
    'pages: loop {
        let page = store.audit_entries(from, PAGE).await?;
        let n = page.len();
        for (seq, bytes) in page {
            from = seq + 1;
            if !v.feed(seq, &bytes) {
                break 'pages;
            }
        }
        if n < PAGE {
            break;
        }
    }
    Ok(v.finish(End::AtLeast))
}

/// How [`ChainVerifier::finish`] checks the chain's end against the anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Not at all (the anchor was not read).
    Unchecked,
    /// The chain ends exactly at the anchor (entries and anchor read in one snapshot).
    Exact,
    /// The chain reaches the anchor and may go past it (the anchor was read first, and the
    /// chain read page by page while commits went on).
    AtLeast,
}

/// Walks a chain entry by entry, in bounded memory: for verifying a large chain page by page.
pub struct ChainVerifier<'a> {
    sealer: &'a Sealer,
    head: ChainHead,
    anchor: Option<Anchor>,
    /// Whether the walk started from a checkpoint (entries were removed before it).
    from_checkpoint: bool,
    /// The anchored entry's hash as found on the walk.
    anchored_hash: Option<String>,
    broken: Option<(u64, String)>,
}

impl std::fmt::Debug for ChainVerifier<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainVerifier")
            .field("head", &self.head)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl<'a> ChainVerifier<'a> {
    /// Starts after `checkpoint` (or at the beginning), checking the end against `anchor`.
    pub fn new(
        sealer: &'a Sealer,
        checkpoint: Option<&Checkpoint>,
        anchor: Option<&Anchor>,
    ) -> Self {
        let mut v = ChainVerifier {
            sealer,
            head: ChainHead::default(),
            anchor: anchor.cloned(),
            from_checkpoint: checkpoint.is_some(),
            anchored_hash: None,
            broken: None,
        };
        match checkpoint {
            None => {}
            Some(c) if c.verify(sealer) => v.head = c.head(),
            Some(c) => {
                v.broken = Some((
                    c.seq + 1,
                    "the retention checkpoint does not verify with this key (forged or moved)"
                        .into(),
                ))
            }
        }
        if let Some(a) = anchor
            && !a.verify(sealer)
            && v.broken.is_none()
        {
            v.broken = Some((
                a.seq,
                "the anchor of the chain's end does not verify with this key (forged or moved)"
                    .into(),
            ));
        }
        v
    }

    /// The next stored entry; `false` once the chain is broken (the report says where), so
    /// the caller can stop reading.
    pub fn feed(&mut self, key: u64, bytes: &[u8]) -> bool {
        if self.broken.is_some() {
            return false;
        }
        match self.check(key, bytes) {
            Ok(()) => true,
            Err(b) => {
                self.broken = Some(b);
                false
            }
        }
    }

    fn check(&mut self, key: u64, bytes: &[u8]) -> Result<(), (u64, String)> {
        let expected = self.head.seq + 1;
        if key != expected {
            return Err((
                expected,
                format!("entry {expected} is missing (next stored entry is {key})"),
            ));
        }
        let entry: AuditEntry = serde_json::from_slice(bytes)
            .map_err(|e| (key, format!("entry is not valid JSON: {e}")))?;
        if entry.seq != key {
            return Err((
                key,
                format!(
                    "entry stored at {key} says it is {}; entries were reordered",
                    entry.seq
                ),
            ));
        }
        if entry.prev_hash != self.head.hash {
            return Err((key, "link to the previous entry is broken (an entry before it was removed, replaced or reordered)".into()));
        }
        if entry_mac(self.sealer, &entry) != entry.hash {
            return Err((key, "entry content does not match its hash (edited)".into()));
        }
        if self.anchor.as_ref().is_some_and(|a| a.seq == key) {
            self.anchored_hash = Some(entry.hash.clone());
        }
        self.head.seq = entry.seq;
        self.head.hash = entry.hash;
        Ok(())
    }

    /// The report: the first break, or — checking the end as `end` says — intact.
    pub fn finish(self, end: End) -> ChainReport {
        if let Some((seq, reason)) = self.broken {
            return ChainReport::Broken { seq, reason };
        }
        let last = self.head.seq;
        let Some(anchor) = self.anchor.filter(|_| end != End::Unchecked) else {
            if end != End::Unchecked && (last > 0 || self.from_checkpoint) {
                return ChainReport::Broken {
                    seq: last + 1,
                    reason: format!(
                        "the anchor of the chain's end is missing (removed?), so entries after {last} may have been removed too"
                    ),
                };
            }
            return ChainReport::Intact { entries: last };
        };
        if anchor.seq > last {
            return ChainReport::Broken {
                seq: last + 1,
                reason: format!(
                    "the chain ends at entry {last} but its end was anchored at entry {}: entries {} to {} were removed",
                    anchor.seq,
                    last + 1,
                    anchor.seq
                ),
            };
        }
        if end == End::Exact && anchor.seq < last {
            return ChainReport::Broken {
                seq: anchor.seq + 1,
                reason: format!(
                    "the chain goes on past its anchor (entry {}): the anchor was put back to an older value",
                    anchor.seq
                ),
            };
        }
        match self.anchored_hash {
            Some(h) if h == anchor.hash => ChainReport::Intact { entries: last },
            // An empty chain is anchored at 0 with the empty hash.
            None if anchor.seq == 0 && last == 0 && anchor.hash == ChainHead::default().hash => {
                ChainReport::Intact { entries: 0 }
            }
            _ => ChainReport::Broken {
                seq: anchor.seq,
                reason: "the entry at the anchored end is not the one that was anchored (the anchor was put back to an older value, or is older than the retention checkpoint)".into(),
            },
        }
    }
}

/// How many entries a report of [`verify_chain_from`] covers, given where it started.
pub fn kept(report: &ChainReport, checkpoint: Option<&Checkpoint>) -> u64 {
    match report {
        ChainReport::Intact { entries } => entries - checkpoint.map_or(0, |c| c.seq),
        ChainReport::Broken { .. } => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::MasterKey;

    fn chain(sealer: &Sealer, n: u64) -> Vec<(u64, Vec<u8>)> {
        let mut head = ChainHead::default();
        (0..n)
            .map(|i| {
                let d = AuditDraft::new(
                    i as i64,
                    "op",
                    "identity.create",
                    format!("id-{i}"),
                    Decision::Allow,
                    "ok",
                    "r",
                );
                let (e, b) = head.append(sealer, d);
                (e.seq, b)
            })
            .collect()
    }

    #[test]
    fn what_a_caller_sent_is_bounded_and_cannot_inject_lines() {
        let huge = "i".repeat(12 * 1024);
        let d = AuditDraft::new(0, &huge, "attest", &huge, Decision::Deny, &huge, "r")
            .with("iss", huge.as_str())
            .with("list", vec![huge.clone(); 1000]);
        for f in [&d.actor, &d.target, &d.reason] {
            assert!(f.len() < MAX_FIELD + 40, "{}", f.len());
            assert!(f.ends_with("more bytes]"), "{f}");
        }
        assert!(d.detail["iss"].as_str().unwrap().len() < MAX_FIELD + 40);
        let list = d.detail["list"].as_array().unwrap();
        assert_eq!(list.len(), MAX_LIST + 1);
        assert_eq!(list[MAX_LIST], "…[936 more]");
        let bytes = serde_json::to_vec(&d).unwrap();
        assert!(bytes.len() < 64 * 1024, "{} bytes", bytes.len());
        // Control characters (newlines, terminal escapes) are replaced.
        let d = AuditDraft::new(0, "a\nb\u{1b}[2J", "x", "t", Decision::Deny, "ok", "r");
        assert_eq!(d.actor, "a\u{fffd}b\u{fffd}[2J");
        // Multi-byte text is cut at a character boundary.
        let s = bounded("é".repeat(600));
        assert!(s.starts_with("éé") && s.contains("more bytes"), "{s}");
    }

    #[test]
    fn entries_with_fractional_numbers_verify() {
        // Timings such as `enforced_in_ms` are floats: read back, each must be the same
        // number, or an untouched entry reads as edited (serde_json's `float_roundtrip`).
        let s = Sealer::new(&MasterKey::generate());
        let mut head = ChainHead::default();
        let mut stored = Vec::new();
        let mut x = 0.123_456_789_f64;
        for i in 0..2000u64 {
            x = (x * 7.31 + 0.017).fract() * 1000.0;
            let d = AuditDraft::new(0, "op", "incident.enforced", "t", Decision::Allow, "", "r")
                .with("enforced_in_ms", x)
                .with("tiny", x * 1e-9);
            let (e, b) = head.append(&s, d);
            stored.push((e.seq, b));
            assert_eq!(e.seq, i + 1);
        }
        assert_eq!(
            verify_chain(&s, stored),
            ChainReport::Intact { entries: 2000 }
        );
    }

    #[test]
    fn intact_chain_verifies() {
        let s = Sealer::new(&MasterKey::generate());
        assert_eq!(
            verify_chain(&s, chain(&s, 5)),
            ChainReport::Intact { entries: 5 }
        );
        assert_eq!(
            verify_chain(&s, Vec::new()),
            ChainReport::Intact { entries: 0 }
        );
    }

    #[test]
    fn edits_removals_and_reorders_name_the_first_bad_entry() {
        let s = Sealer::new(&MasterKey::generate());
        let good = chain(&s, 6);

        let mut edited = good.clone();
        let text = String::from_utf8(edited[2].1.clone())
            .unwrap()
            .replace("id-2", "id-X");
        edited[2].1 = text.into_bytes();
        assert!(matches!(
            verify_chain(&s, edited),
            ChainReport::Broken { seq: 3, .. }
        ));

        let mut removed = good.clone();
        removed.remove(3);
        assert!(matches!(
            verify_chain(&s, removed),
            ChainReport::Broken { seq: 4, .. }
        ));

        // Removing the tail and renumbering is caught by the links.
        let mut reordered = good.clone();
        let (a, b) = (reordered[1].1.clone(), reordered[4].1.clone());
        reordered[1].1 = b;
        reordered[4].1 = a;
        assert!(matches!(
            verify_chain(&s, reordered),
            ChainReport::Broken { seq: 2, .. }
        ));

        // Another master key cannot verify (or forge) the chain.
        let other = Sealer::new(&MasterKey::generate());
        assert!(matches!(
            verify_chain(&other, good),
            ChainReport::Broken { seq: 1, .. }
        ));
    }

    #[test]
    fn the_anchor_finds_a_cut_end_a_rolled_back_anchor_and_a_forged_one() {
        let s = Sealer::new(&MasterKey::generate());
        let entries = chain(&s, 8);
        let head_at = |n: usize| {
            let e: AuditEntry = serde_json::from_slice(&entries[n - 1].1).unwrap();
            ChainHead {
                seq: e.seq,
                hash: e.hash,
            }
        };
        let whole = StoredChain {
            checkpoint: None,
            anchor: Some(Anchor::new(&s, &head_at(8))),
            entries: entries.clone(),
        };
        assert_eq!(
            verify_stored(&s, &whole),
            ChainReport::Intact { entries: 8 }
        );

        // The last three removed: the chain itself is fine, the anchor says it was longer.
        let mut cut = whole.clone();
        cut.entries.truncate(5);
        match verify_stored(&s, &cut) {
            ChainReport::Broken { seq: 6, reason } => {
                assert!(reason.contains("entries 6 to 8 were removed"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            verify_chain(&s, cut.entries.clone()),
            ChainReport::Intact { entries: 5 },
            "without the anchor the cut is invisible"
        );
        // ... and the anchor removed with them.
        let mut no_anchor = cut.clone();
        no_anchor.anchor = None;
        assert!(matches!(
            verify_stored(&s, &no_anchor),
            ChainReport::Broken { seq: 6, .. }
        ));
        // ... or moved back to where the cut left the chain: needs the key.
        let mut moved = cut.clone();
        let mut forged = Anchor::new(&s, &head_at(5));
        forged.mac = whole.anchor.as_ref().unwrap().mac.clone();
        moved.anchor = Some(forged);
        assert!(matches!(
            verify_stored(&s, &moved),
            ChainReport::Broken { .. }
        ));
        let other = Sealer::new(&MasterKey::generate());
        moved.anchor = Some(Anchor::new(&other, &head_at(5)));
        assert!(matches!(
            verify_stored(&s, &moved),
            ChainReport::Broken { .. }
        ));
        // An anchor put back to an older value (kept from before) with the chain intact after
        // it: the chain goes past its anchor, which a consistent snapshot never shows.
        let mut old = whole.clone();
        old.anchor = Some(Anchor::new(&s, &head_at(6)));
        assert!(matches!(
            verify_stored(&s, &old),
            ChainReport::Broken { seq: 7, .. }
        ));
        // Read page by page while commits go on, going past the anchor is fine.
        let mut v = ChainVerifier::new(&s, None, old.anchor.as_ref());
        for (k, b) in &entries {
            assert!(v.feed(*k, b));
        }
        assert_eq!(v.finish(End::AtLeast), ChainReport::Intact { entries: 8 });
        // An empty store has nothing to anchor.
        assert_eq!(
            verify_stored(&s, &StoredChain::default()),
            ChainReport::Intact { entries: 0 }
        );
    }
}
