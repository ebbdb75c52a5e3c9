//! Behaviour baselines: per identity, what it was issued (audiences, scopes, attestation
//! methods, source addresses, hourly rate). Once an identity has a baseline, a deviation (a
//! new audience, source or method, or a rate spike) is an [`Anomaly`]; [`crate::govern`]
//! audits it and, when policy says so, suspends the identity.
//!
//! The commit observer hands every committed ledger record to [`Observations`] (a bounded
//! queue; it never waits); one task ([`crate::govern::follow_baselines`]) learns from them in
//! commit order and acts on anomalies — never the store's writer thread.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use tokio::sync::mpsc;

use crate::config::Governance;
use crate::model::{LedgerRecord, UsageRecord};

/// How many committed issuances may wait for the baseline task before new ones are dropped
/// (and counted): under overload, learning lags rather than memory growing.
pub const QUEUE: usize = 65_536;

/// The sending half of the queue of committed issuances.
#[derive(Debug, Clone)]
pub struct Observations(mpsc::Sender<LedgerRecord>);

impl Observations {
    /// A queue and its receiving end.
    pub fn channel() -> (Self, mpsc::Receiver<LedgerRecord>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Observations(tx), rx)
    }

    /// Queues a committed issuance; drops it (counted) when the queue is full.
    pub fn push(&self, r: &LedgerRecord) {
        if r.identity_id.is_empty() {
            return;
        }
        if self.0.try_send(r.clone()).is_err() {
            metrics::counter!("sigil_baseline_dropped_total").increment(1);
        }
    }
}

/// A deviation from an identity's baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    /// `new_audience`, `new_source`, `new_method` or `rate_spike`.
    pub kind: &'static str,
    /// What exactly.
    pub detail: String,
}

/// Per-identity usage in memory: the baselines anomalies are judged against. Follows the
/// store through the commit observer.
#[derive(Debug, Default)]
pub struct Behaviour {
    usage: RwLock<HashMap<String, UsageRecord>>,
    spike_alerted: Mutex<HashMap<String, i64>>,
}

impl Behaviour {
    /// Starts from the stored usage records.
    pub fn new(records: Vec<UsageRecord>) -> Self {
        let b = Behaviour::default();
        if let Ok(mut m) = b.usage.write() {
            for r in records {
                m.insert(r.identity_id.clone(), r);
            }
        }
        b
    }

    /// The usage of one identity.
    pub fn usage(&self, identity_id: &str) -> Option<UsageRecord> {
        self.usage
            .read()
            .ok()
            .and_then(|m| m.get(identity_id).cloned())
    }

    /// Judges a just-committed issuance against the identity's baseline, then learns from it.
    pub fn observe(&self, r: &LedgerRecord, cfg: &Governance) -> Vec<Anomaly> {
        if r.identity_id.is_empty() {
            return Vec::new();
        }
        let Ok(mut m) = self.usage.write() else {
            return Vec::new();
        };
        let u = m.entry(r.identity_id.clone()).or_default();
        let mut found = Vec::new();
        let learned = u.issued >= cfg.baseline_min_issued
            && r.issued_at - u.first_used >= cfg.baseline_learning.as_secs() as i64;
        if learned {
            for a in r.audiences.iter().filter(|a| !u.audiences.contains_key(*a)) {
                found.push(Anomaly {
                    kind: "new_audience",
                    detail: format!("first credential for audience {a:?}"),
                });
            }
            if !r.source.is_empty() && !u.sources.contains_key(&r.source) {
                found.push(Anomaly {
                    kind: "new_source",
                    detail: format!("first request from {}", r.source),
                });
            }
            if !r.attestation.is_empty() && !u.methods.contains_key(&r.attestation) {
                found.push(Anomaly {
                    kind: "new_method",
                    detail: format!("first attestation by {}", r.attestation),
                });
            }
        }
        u.apply(r);
        if learned {
            let hour = r.issued_at.div_euclid(3600);
            let current = u
                .hourly
                .last()
                .filter(|(h, _)| *h == hour)
                .map_or(0, |(_, n)| *n);
            // The usual rate: issuances per hour over the hours before this one (quiet hours
            // count as zero), within the kept window.
            let first_hour =
                (u.first_used.div_euclid(3600)).max(hour - crate::model::USAGE_HOURS as i64 + 1);
            let hours = (hour - first_hour).max(1) as f64;
            let before: u64 = u
                .hourly
                .iter()
                .filter(|(h, _)| *h < hour)
                .map(|(_, n)| n)
                .sum();
            let usual = before as f64 / hours;
            let threshold = (usual * cfg.rate_spike_factor).max(cfg.rate_spike_floor as f64);
            if current as f64 > threshold {
                let mut alerted = self.spike_alerted.lock().unwrap_or_else(|p| p.into_inner());
                if alerted.get(&r.identity_id) != Some(&hour) {
                    alerted.insert(r.identity_id.clone(), hour);
                    found.push(Anomaly {
                        kind: "rate_spike",
                        detail: format!(
                            "{current} credentials this hour; usually {usual:.1} an hour"
                        ),
                    });
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::CredentialKind;

    fn rec(at: i64, aud: &str, source: &str) -> LedgerRecord {
        LedgerRecord {
            credential_id: "x".into(),
            kind: CredentialKind::Jwt,
            identity_id: "id-1".into(),
            spiffe_id: "spiffe://td/a".into(),
            generation: 1,
            audiences: vec![aud.into()],
            scopes: vec![],
            dns_names: vec![],
            issued_at: at,
            expires_at: at + 300,
            signing_key_id: "k".into(),
            attestation: "x509".into(),
            source: source.into(),
        }
    }

    fn cfg() -> Governance {
        Governance {
            baseline_min_issued: 5,
            baseline_learning: Duration::from_secs(3600),
            rate_spike_factor: 5.0,
            rate_spike_floor: 20,
            ..Governance::default()
        }
    }

    #[test]
    fn nothing_is_anomalous_while_learning() {
        let b = Behaviour::default();
        for i in 0..4 {
            assert!(
                b.observe(&rec(i * 60, &format!("aud-{i}"), "10.0.0.1"), &cfg())
                    .is_empty()
            );
        }
    }

    #[test]
    fn new_audiences_sources_and_spikes_are_flagged_once_learned() {
        let b = Behaviour::default();
        // Two hours of a steady 3 an hour.
        for i in 0..6 {
            assert!(
                b.observe(&rec(i * 1200, "db", "10.0.0.1"), &cfg())
                    .is_empty()
            );
        }
        let a = b.observe(&rec(7300, "prod-db", "10.0.0.1"), &cfg());
        assert_eq!(
            a.iter().map(|a| a.kind).collect::<Vec<_>>(),
            vec!["new_audience"]
        );
        assert!(
            b.observe(&rec(7310, "prod-db", "10.0.0.1"), &cfg())
                .is_empty(),
            "learned now"
        );
        let a = b.observe(&rec(7320, "db", "192.0.2.9"), &cfg());
        assert_eq!(a[0].kind, "new_source");
        // A burst: far above the usual rate and the floor, reported once per hour.
        let mut spikes = 0;
        for i in 0..40 {
            spikes += b
                .observe(&rec(7400 + i, "db", "10.0.0.1"), &cfg())
                .iter()
                .filter(|a| a.kind == "rate_spike")
                .count();
        }
        assert_eq!(spikes, 1);
    }
}
