//! Aggregation of repeated refusals for the audit log: the first refusal of a kind (same
//! source, method or gate, reason and actor) in an interval is written; identical ones after
//! it are only counted, and when the interval ends one more entry says how many there were
//! (`identical_refusals`). So an attacker repeating a refused request grows the log by at most
//! two entries per interval, not one per attempt.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::audit::AuditDraft;

/// Most kinds tracked at once; beyond that, ended intervals are summarised and dropped first,
/// and then refusals are written unaggregated (the rate limiter still bounds them).
const MAX_KEYS: usize = 4096;

/// Folds repeated refusals per kind and interval.
#[derive(Debug)]
pub struct Throttle {
    window: i64,
    seen: Mutex<HashMap<String, Window>>,
}

#[derive(Debug)]
struct Window {
    start: i64,
    folded: u64,
    /// The entry written at the start, for the summary.
    first: AuditDraft,
}

impl Throttle {
    /// Aggregates over `window` (zero: writes every refusal).
    pub fn new(window: Duration) -> Self {
        Throttle {
            window: window.as_secs() as i64,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// A refusal of kind `key` at `now` (Unix seconds) that would be written as `draft`:
    /// the entries to write now — the draft itself when it opens an interval (after the
    /// summary of the interval before, if that one folded anything), nothing when it is
    /// counted into the current interval.
    pub fn admit(&self, key: &str, now: i64, draft: AuditDraft) -> Vec<AuditDraft> {
        if self.window == 0 {
            return vec![draft];
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        if let Some(w) = seen.get_mut(key) {
            if now < w.start + self.window {
                w.folded += 1;
                return out;
            }
            if let Some(s) = summary(w, now) {
                out.push(s);
            }
            seen.remove(key);
        }
        if seen.len() >= MAX_KEYS {
            out.extend(self.drain_ended(&mut seen, now));
            if seen.len() >= MAX_KEYS {
                out.push(draft);
                return out;
            }
        }
        seen.insert(
            key.to_owned(),
            Window {
                start: now,
                folded: 0,
                first: draft.clone(),
            },
        );
        out.push(draft);
        out
    }

    /// Summaries of the intervals that ended by `now` (all of them when `all`), which are
    /// forgotten: written by a periodic task, and at shutdown.
    pub fn flush(&self, now: i64, all: bool) -> Vec<AuditDraft> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if all {
            let out = seen.values().filter_map(|w| summary(w, now)).collect();
            seen.clear();
            return out;
        }
        self.drain_ended(&mut seen, now)
    }

    fn drain_ended(&self, seen: &mut HashMap<String, Window>, now: i64) -> Vec<AuditDraft> {
        let window = self.window;
        let mut out = Vec::new();
        seen.retain(|_, w| {
            let ended = now >= w.start + window;
            if ended && let Some(s) = summary(w, now) {
                out.push(s);
            }
            !ended
        });
        out
    }
}

/// The entry saying how many refusals an interval folded (none when it folded none).
fn summary(w: &Window, now: i64) -> Option<AuditDraft> {
    (w.folded > 0).then(|| {
        let mut d = w.first.clone();
        d.time = now.saturating_mul(1_000_000_000);
        d.request_id = "aggregated".into();
        d.with("identical_refusals", w.folded)
            .with("since", crate::clock::rfc3339(w.start))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Decision;

    fn d(reason: &str) -> AuditDraft {
        AuditDraft::new(0, "oidc", "attest", "", Decision::Deny, reason, "r")
    }

    #[test]
    fn one_entry_per_interval_then_one_with_the_count_of_the_rest() {
        let t = Throttle::new(Duration::from_secs(60));
        assert_eq!(t.admit("k", 1000, d("unknown issuer")).len(), 1);
        for i in 0..299 {
            assert!(t.admit("k", 1000 + i / 10, d("unknown issuer")).is_empty());
        }
        assert_eq!(t.admit("other", 1001, d("expired")).len(), 1);
        // The interval ends: its summary, then the new first entry.
        let out = t.admit("k", 1060, d("unknown issuer"));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].detail["identical_refusals"], 299);
        assert!(!out[1].detail.contains_key("identical_refusals"));
        // Or a periodic flush writes the summary of an interval nobody reopened.
        assert!(t.admit("k", 1061, d("unknown issuer")).is_empty());
        assert!(t.flush(1100, false).is_empty(), "not ended yet");
        let s = t.flush(1120, false);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].detail["identical_refusals"], 1);
        assert!(t.flush(1200, true).is_empty());
    }

    #[test]
    fn the_tracked_kinds_are_bounded() {
        let t = Throttle::new(Duration::from_secs(60));
        for i in 0..MAX_KEYS {
            assert_eq!(t.admit(&format!("k{i}"), 0, d("x")).len(), 1);
        }
        assert_eq!(t.admit("new", 1, d("x")).len(), 1, "written, not tracked");
        assert_eq!(t.admit("new", 2, d("x")).len(), 1);
        // Once old windows end, room again.
        assert_eq!(t.admit("new", 100, d("x")).len(), 1);
        assert!(t.admit("new", 101, d("x")).is_empty());
        // Zero interval: every refusal written.
        let z = Throttle::new(Duration::ZERO);
        assert_eq!(z.admit("k", 0, d("x")).len(), 1);
        assert_eq!(z.admit("k", 0, d("x")).len(), 1);
    }
}
