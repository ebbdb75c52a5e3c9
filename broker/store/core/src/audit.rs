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

/// The kept audit entries (sequence number, stored JSON) and the checkpoint they start after.
pub type KeptChain = (Option<Checkpoint>, Vec<(u64, Vec<u8>)>);

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

/// Walks stored entries in key order and reports the first break.
pub fn verify_chain<I>(sealer: &Sealer, entries: I) -> ChainReport
where
    I: IntoIterator<Item = (u64, Vec<u8>)>,
{
    verify_chain_from(sealer, None, entries)
}

/// Walks stored entries in key order from `checkpoint` (where retention left the chain; none:
/// from the start) and reports the first break. A checkpoint that does not verify under the key
/// is itself the break.
pub fn verify_chain_from<I>(
    sealer: &Sealer,
    checkpoint: Option<&Checkpoint>,
    entries: I,
) -> ChainReport
where
    I: IntoIterator<Item = (u64, Vec<u8>)>,
{
    let mut head = match checkpoint {
        None => ChainHead::default(),
        Some(c) if c.verify(sealer) => c.head(),
        Some(c) => {
            return ChainReport::Broken {
                seq: c.seq + 1,
                reason: "the retention checkpoint does not verify with this key (forged or moved)"
                    .into(),
            };
        }
    };
    for (key, bytes) in entries {
        let expected = head.seq + 1;
        if key != expected {
            return ChainReport::Broken {
                seq: expected,
                reason: format!("entry {expected} is missing (next stored entry is {key})"),
            };
        }
        let entry: AuditEntry = match serde_json::from_slice(&bytes) {
            Ok(e) => e,
            Err(e) => {
                return ChainReport::Broken {
                    seq: key,
                    reason: format!("entry is not valid JSON: {e}"),
                };
            }
        };
        if entry.seq != key {
            return ChainReport::Broken {
                seq: key,
                reason: format!(
                    "entry stored at {key} says it is {}; entries were reordered",
                    entry.seq
                ),
            };
        }
        if entry.prev_hash != head.hash {
            return ChainReport::Broken { seq: key, reason: "link to the previous entry is broken (an entry before it was removed, replaced or reordered)".into() };
        }
        if entry_mac(sealer, &entry) != entry.hash {
            return ChainReport::Broken {
                seq: key,
                reason: "entry content does not match its hash (edited)".into(),
            };
        }
        head.seq = entry.seq;
        head.hash = entry.hash;
    }
    ChainReport::Intact { entries: head.seq }
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
}
