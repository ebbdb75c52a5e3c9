//! Key rotation: JWT keys, the signing intermediate and the root move through next
//! (published, not signing) → current → previous (published until everything it signed has
//! expired) → retired. A schedule prepares and activates keys; operators can start a rotation,
//! finish one at once, or revoke a key in an emergency.
//!
//! Verifiers see a key before the first credential it signs: a next key is published for
//! `rotation.prepare` before it signs (a root too; an intermediate is vouched for by the root
//! already in the bundle).

use std::time::{Duration, SystemTime};

use serde_json::json;
use sigil_pki::{CaRole, CertificateAuthority, EcKey};

use crate::audit::{AuditDraft, Decision};
use crate::authz::Operator;
use crate::broker::{Broker, RequestContext};
use crate::clock::{unix_nanos, unix_secs};
use crate::config::Rotation;
use crate::error::BrokerError;
use crate::keys::{self, JWT_KEY_VALIDITY, ROOT_VALIDITY};
use crate::model::{KeyKind, KeyRecord, KeyState};
use crate::store::{Change, Op};

/// Which key family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotateKind {
    /// JWT-SVID signing keys.
    Jwt,
    /// The intermediate that signs X.509-SVIDs.
    X509,
    /// The root (trust anchor).
    Root,
}

impl std::str::FromStr for RotateKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "jwt" => Ok(RotateKind::Jwt),
            "x509" | "intermediate" => Ok(RotateKind::X509),
            "root" => Ok(RotateKind::Root),
            other => Err(format!(
                "unknown key kind {other:?} (expected jwt, x509 or root)"
            )),
        }
    }
}

impl RotateKind {
    fn key_kind(self) -> KeyKind {
        match self {
            RotateKind::Jwt => KeyKind::Jwt,
            RotateKind::X509 => KeyKind::IntermediateCa,
            RotateKind::Root => KeyKind::RootCa,
        }
    }
}

/// A step the schedule wants taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create and publish the next key.
    Prepare(RotateKind),
    /// Make the next key current (its id).
    Activate(RotateKind, String),
    /// Take a previous key out of the bundle (its id).
    Retire(String),
}

fn find(records: &[KeyRecord], kind: KeyKind, state: KeyState) -> Option<&KeyRecord> {
    records
        .iter()
        .filter(|r| r.kind == kind && r.state == state)
        .max_by_key(|r| r.changed_at)
}

/// Whether `next` has been in the published bundle for at least `prepare` at `now_nanos`.
/// Measured from its publication instant in nanoseconds: comparing whole seconds would let a
/// key published at x.99 s sign at x+prepare s, up to a second early, before verifiers that
/// follow the bundle have had the promised time to pick it up.
fn published_for(next: &KeyRecord, now_nanos: i64, prepare: Duration) -> bool {
    let published = if next.changed_at > 0 {
        next.changed_at
    } else {
        next.created_at.saturating_mul(1_000_000_000)
    };
    let prepare = i64::try_from(prepare.as_nanos()).unwrap_or(i64::MAX);
    now_nanos >= published.saturating_add(prepare)
}

/// What the schedule wants done at `now_nanos` (Unix nanoseconds). Pure, for testing on any
/// clock.
pub fn plan(
    records: &[KeyRecord],
    now_nanos: i64,
    policy: &Rotation,
    max_ttl: Duration,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let now = now_nanos.div_euclid(1_000_000_000);
    let prepare = policy.prepare.as_secs() as i64;
    for (kind, lifetime) in [
        (RotateKind::Jwt, policy.jwt_key_lifetime),
        (RotateKind::X509, policy.x509_ca_rotate_after),
    ] {
        let Some(cur) = find(records, kind.key_kind(), KeyState::Current) else {
            continue;
        };
        let mut due = cur.activated_at.unwrap_or(cur.created_at) + lifetime.as_secs() as i64;
        if kind == RotateKind::X509 {
            // Never let the signing CA's remaining life fall below the longest leaf.
            due = due.min(cur.not_after - max_ttl.as_secs() as i64 - prepare);
        }
        match find(records, kind.key_kind(), KeyState::Next) {
            None if now >= due - prepare => steps.push(Step::Prepare(kind)),
            // An intermediate is vouched for by the root already in the bundle: nothing to
            // publish ahead, so it takes over as soon as it exists.
            Some(next)
                if kind == RotateKind::X509 || published_for(next, now_nanos, policy.prepare) =>
            {
                steps.push(Step::Activate(kind, next.id.clone()))
            }
            _ => {}
        }
    }
    // A root rotation is started by an operator; the schedule finishes it.
    if let Some(next) = find(records, KeyKind::RootCa, KeyState::Next)
        && published_for(next, now_nanos, policy.prepare)
    {
        steps.push(Step::Activate(RotateKind::Root, next.id.clone()));
    }
    for r in records.iter().filter(|r| r.state == KeyState::Previous) {
        if r.retire_at.is_some_and(|t| now >= t) {
            steps.push(Step::Retire(r.id.clone()));
        }
    }
    steps
}

impl Broker {
    fn fresh_key(&self) -> Result<EcKey, BrokerError> {
        Ok(EcKey::generate()?)
    }

    /// A new key record of `kind` in `state`, signed by the current root when it is an
    /// intermediate (`root` overrides which root).
    fn new_key(
        &self,
        kind: RotateKind,
        state: KeyState,
        root: Option<&CertificateAuthority>,
        now: SystemTime,
    ) -> Result<KeyRecord, BrokerError> {
        let ring = self.keys.current();
        let k = |e: keys::KeyError| BrokerError::Internal(e.to_string());
        match kind {
            RotateKind::Jwt => keys::record(
                &self.sealer,
                KeyKind::Jwt,
                state,
                &self.fresh_key()?,
                None,
                now,
                now + JWT_KEY_VALIDITY,
            )
            .map_err(k),
            RotateKind::X509 => {
                let ca = root.unwrap_or(&ring.root).new_intermediate(
                    &self.td,
                    self.fresh_key()?,
                    now,
                    self.cfg.rotation.x509_ca_ttl,
                )?;
                keys::record(
                    &self.sealer,
                    KeyKind::IntermediateCa,
                    state,
                    ca.key(),
                    Some(ca.cert()),
                    now,
                    ca.not_after(),
                )
                .map_err(k)
            }
            RotateKind::Root => {
                let ca = CertificateAuthority::new_self_signed(
                    CaRole::Root,
                    &self.td,
                    self.fresh_key()?,
                    now,
                    ROOT_VALIDITY,
                )?;
                keys::record(
                    &self.sealer,
                    KeyKind::RootCa,
                    state,
                    ca.key(),
                    Some(ca.cert()),
                    now,
                    ca.not_after(),
                )
                .map_err(k)
            }
        }
    }

    /// How long a previous key must stay published: until everything it signed has expired.
    fn retire_after(&self, r: &KeyRecord, now: i64) -> i64 {
        let longest = self.cfg.issuance.max_ttl_ceiling.as_secs() as i64 + 60;
        (now + longest).min(r.not_after.max(now))
    }

    fn touched(mut r: KeyRecord, state: KeyState, now: SystemTime) -> KeyRecord {
        r.state = state;
        r.changed_at = unix_nanos(now);
        r
    }

    /// The records that make `next_id` current (and the current one previous).
    fn activation(
        &self,
        kind: RotateKind,
        next_id: &str,
        now: SystemTime,
    ) -> Result<Vec<KeyRecord>, BrokerError> {
        let ring = self.keys.current();
        let t = unix_secs(now);
        let mut out = Vec::new();
        let next = ring
            .records
            .iter()
            .find(|r| r.id == next_id)
            .cloned()
            .ok_or_else(|| BrokerError::NotFound(format!("no key {next_id}")))?;
        if let Some(cur) = find(&ring.records, kind.key_kind(), KeyState::Current).cloned() {
            let retire = self.retire_after(&cur, t);
            let mut prev = Self::touched(cur, KeyState::Previous, now);
            prev.retire_at = Some(retire);
            out.push(prev);
        }
        let mut activated = Self::touched(next, KeyState::Current, now);
        activated.activated_at = Some(t);
        if kind == RotateKind::Root {
            // The new root takes over with a new intermediate of its own at once.
            let root = keys::ca(&self.sealer, &activated)
                .map_err(|e| BrokerError::Internal(e.to_string()))?;
            let int = self.new_key(RotateKind::X509, KeyState::Current, Some(&root), now)?;
            if let Some(cur_int) =
                find(&ring.records, KeyKind::IntermediateCa, KeyState::Current).cloned()
            {
                let retire = self.retire_after(&cur_int, t);
                let mut prev = Self::touched(cur_int, KeyState::Previous, now);
                prev.retire_at = Some(retire);
                out.push(prev);
            }
            out.push(int);
        }
        out.push(activated);
        Ok(out)
    }

    async fn commit_keys(
        &self,
        records: Vec<KeyRecord>,
        actor: &str,
        action: &str,
        reason: &str,
        request_id: &str,
    ) -> Result<(), BrokerError> {
        let summary: Vec<_> = records
            .iter()
            .map(|r| json!({"id": r.id, "kind": r.kind, "state": r.state.as_str()}))
            .collect();
        let draft = AuditDraft::new(
            self.now_nanos(),
            actor,
            action,
            self.td.as_str(),
            Decision::Allow,
            reason,
            request_id,
        )
        .with("keys", json!(summary));
        self.store
            .commit(Change {
                ops: records.into_iter().map(Op::PutKey).collect(),
                audit: vec![draft],
            })
            .await?;
        Ok(())
    }

    /// Takes the steps the schedule wants now. Returns what it did.
    pub async fn rotation_tick(&self) -> Result<Vec<Step>, BrokerError> {
        let _guard = self.key_lock.lock().await;
        let now = self.clock.now();
        let mut done = Vec::new();
        // Re-plan after each round: preparing an intermediate makes it due for activation.
        for _ in 0..4 {
            let ring = self.keys.current();
            let steps = plan(
                &ring.records,
                unix_nanos(now),
                &self.cfg.rotation,
                self.cfg.issuance.max_ttl_ceiling,
            );
            if steps.is_empty() {
                break;
            }
            self.take_steps(&steps, now).await?;
            done.extend(steps);
        }
        Ok(done)
    }

    async fn take_steps(&self, steps: &[Step], now: SystemTime) -> Result<(), BrokerError> {
        for step in steps {
            let (records, action, reason) = match step {
                Step::Prepare(kind) => (
                    vec![self.new_key(*kind, KeyState::Next, None, now)?],
                    "key.prepare",
                    "scheduled rotation: next key published",
                ),
                Step::Activate(kind, id) => (
                    self.activation(*kind, id, now)?,
                    "key.activate",
                    "scheduled rotation: next key now signs",
                ),
                Step::Retire(id) => {
                    let r = self
                        .keys
                        .current()
                        .records
                        .iter()
                        .find(|r| &r.id == id)
                        .cloned()
                        .ok_or_else(|| BrokerError::NotFound(id.clone()))?;
                    (
                        vec![Self::touched(r, KeyState::Retired, now)],
                        "key.retire",
                        "everything it signed has expired",
                    )
                }
            };
            self.commit_keys(records, "broker", action, reason, "rotation")
                .await?;
        }
        Ok(())
    }

    /// Starts a rotation (publishes the next key; the schedule activates it after
    /// `rotation.prepare`), or with `now` completes it at once.
    pub async fn rotate(
        &self,
        op: &Operator,
        kind: RotateKind,
        now_flag: bool,
        ctx: &RequestContext,
    ) -> Result<(), BrokerError> {
        let _guard = self.key_lock.lock().await;
        let now = self.clock.now();
        let ring = self.keys.current();
        let pending = find(&ring.records, kind.key_kind(), KeyState::Next).cloned();
        let next = match pending {
            Some(n) => n,
            None => {
                let n = self.new_key(kind, KeyState::Next, None, now)?;
                if !now_flag {
                    return self
                        .commit_keys(
                            vec![n],
                            &op.actor(),
                            "key.prepare",
                            "rotation started by an operator",
                            &ctx.request_id,
                        )
                        .await;
                }
                n
            }
        };
        if !now_flag {
            return Err(BrokerError::FailedPrecondition(format!(
                "a rotation is already under way: key {} is published and takes over after rotation.prepare; pass --now to finish it at once",
                next.id
            )));
        }
        // Finishing at once: verifiers may meet the new key before their next bundle refresh;
        // watch streams carry it immediately.
        let mut records = vec![next.clone()];
        self.commit_keys(
            std::mem::take(&mut records),
            &op.actor(),
            "key.prepare",
            "rotation forced by an operator",
            &ctx.request_id,
        )
        .await?;
        let records = self.activation(kind, &next.id, now)?;
        self.commit_keys(
            records,
            &op.actor(),
            "key.activate",
            "rotation forced by an operator",
            &ctx.request_id,
        )
        .await
    }

    /// Emergency: withdraws a JWT key or intermediate (by id or subject key identifier). A
    /// replacement takes over at once; everything the old key signed is invalid.
    pub async fn revoke_key(
        &self,
        op: &Operator,
        key_id: &str,
        reason: &str,
        ctx: &RequestContext,
    ) -> Result<(), BrokerError> {
        let _guard = self.key_lock.lock().await;
        let now = self.clock.now();
        let ring = self.keys.current();
        let rec = ring
            .records
            .iter()
            .find(|r| r.id == key_id || r.ski.as_deref() == Some(key_id))
            .cloned()
            .ok_or_else(|| {
                BrokerError::NotFound(format!("no key {key_id:?} (see `sigil keys`)"))
            })?;
        let kind = match rec.kind {
            KeyKind::Jwt => RotateKind::Jwt,
            KeyKind::IntermediateCa => RotateKind::X509,
            KeyKind::RootCa => {
                return Err(BrokerError::FailedPrecondition(
                    "a root CA is not revoked: replace it with `sigil rotate root`, which publishes the new root beside the old one first"
                        .into(),
                ));
            }
            KeyKind::OperatorCa => {
                return Err(BrokerError::FailedPrecondition(
                    "the operator CA can be neither revoked nor rotated through the broker (yet); keep operator credentials short-lived (`sigil operator create --for`)"
                        .into(),
                ));
            }
        };
        if matches!(rec.state, KeyState::Revoked | KeyState::Retired) {
            return Err(BrokerError::FailedPrecondition(format!(
                "key {} is already {}",
                rec.id,
                rec.state.as_str()
            )));
        }
        let reason = if reason.trim().is_empty() {
            "emergency revocation"
        } else {
            reason.trim()
        };
        let was_current = rec.state == KeyState::Current;
        let mut revoked = Self::touched(rec, KeyState::Revoked, now);
        revoked.revoked_reason = reason.to_owned();
        let mut records = vec![revoked];
        if was_current {
            let mut replacement = match find(&ring.records, kind.key_kind(), KeyState::Next) {
                Some(n) => Self::touched(n.clone(), KeyState::Current, now),
                None => self.new_key(kind, KeyState::Current, None, now)?,
            };
            replacement.activated_at = Some(unix_secs(now));
            records.push(replacement);
        }
        self.commit_keys(records, &op.actor(), "key.revoke", reason, &ctx.request_id)
            .await
    }
}

/// Runs the rotation schedule and revocation pruning until cancelled.
pub async fn schedule_loop(
    broker: std::sync::Arc<Broker>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let every = broker.config().rotation.check_interval;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = broker.rotation_kick.notified() => {}
        }
        // Replicas on one database: only the leader runs the schedule (its changes reach
        // the others through the commit log).
        if !broker.store().is_leader() {
            broker.flush_refusals(false).await;
            broker.rate_limits().prune();
            continue;
        }
        match broker.rotation_tick().await {
            Ok(steps) if !steps.is_empty() => tracing::info!(?steps, "key rotation"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "key rotation step failed; will retry"),
        }
        match broker.prune_revocations().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "dropped revocations of expired credentials"),
            Err(e) => tracing::warn!(error = %e, "pruning revocations failed; will retry"),
        }
        match broker.prune_ledger().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "dropped ledger records past their retention"),
            Err(e) => tracing::warn!(error = %e, "pruning the ledger failed; will retry"),
        }
        if let Err(e) = broker.record_expired_approvals().await {
            tracing::warn!(error = %e, "recording expired approvals failed; will retry");
        }
        match broker.prune_audit(10_000).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, "removed audit entries past audit.retention"),
            Err(e) => tracing::warn!(error = %e, "pruning the audit log failed; will retry"),
        }
        broker.flush_refusals(false).await;
        broker.rate_limits().prune();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, kind: KeyKind, state: KeyState, created: i64) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            kind,
            state,
            cert_der: None,
            sealed_private: Vec::new(),
            created_at: created,
            not_after: created + 100 * 86400,
            activated_at: (state == KeyState::Current).then_some(created),
            retire_at: None,
            changed_at: created * 1_000_000_000,
            ski: None,
            revoked_reason: String::new(),
        }
    }

    const S: i64 = 1_000_000_000;

    fn policy() -> Rotation {
        Rotation {
            jwt_key_lifetime: Duration::from_secs(1000),
            x509_ca_ttl: Duration::from_secs(4000),
            x509_ca_rotate_after: Duration::from_secs(2000),
            prepare: Duration::from_secs(100),
            check_interval: Duration::from_secs(1),
            ledger_retention: Duration::from_secs(30 * 86400),
        }
    }

    #[test]
    fn keys_are_prepared_then_activated_then_retired_on_schedule() {
        let max = Duration::from_secs(60);
        let mut recs = vec![
            rec("j1", KeyKind::Jwt, KeyState::Current, 0),
            rec("i1", KeyKind::IntermediateCa, KeyState::Current, 0),
        ];
        assert!(plan(&recs, 899 * S, &policy(), max).is_empty());
        assert_eq!(
            plan(&recs, 900 * S, &policy(), max),
            vec![Step::Prepare(RotateKind::Jwt)]
        );
        recs.push(rec("j2", KeyKind::Jwt, KeyState::Next, 900));
        assert!(
            plan(&recs, 999 * S, &policy(), max).is_empty(),
            "published, not yet long enough"
        );
        assert_eq!(
            plan(&recs, 1000 * S, &policy(), max),
            vec![Step::Activate(RotateKind::Jwt, "j2".into())]
        );
        recs[0].state = KeyState::Previous;
        recs[0].retire_at = Some(1500);
        recs[2].state = KeyState::Current;
        recs[2].activated_at = Some(1000);
        assert!(plan(&recs, 1499 * S, &policy(), max).is_empty());
        assert_eq!(
            plan(&recs, 1500 * S, &policy(), max),
            vec![Step::Retire("j1".into())]
        );
        assert!(plan(&recs, 1900 * S, &policy(), max).contains(&Step::Prepare(RotateKind::X509)));
        recs.push(rec("i2", KeyKind::IntermediateCa, KeyState::Next, 1900));
        assert!(
            plan(&recs, 1900 * S, &policy(), max)
                .contains(&Step::Activate(RotateKind::X509, "i2".into())),
            "an intermediate needs no publication ahead: the root vouches for it"
        );
    }

    #[test]
    fn a_key_signs_only_after_a_full_prepare_period_in_the_bundle() {
        let max = Duration::from_secs(60);
        let mut next = rec("j2", KeyKind::Jwt, KeyState::Next, 900);
        // Published at 900.9 s: 1000.0 s is only 99.1 s later.
        next.changed_at = 900 * S + 900_000_000;
        let recs = vec![rec("j1", KeyKind::Jwt, KeyState::Current, 0), next];
        assert!(plan(&recs, 1000 * S, &policy(), max).is_empty());
        assert!(plan(&recs, 1000 * S + 899_999_999, &policy(), max).is_empty());
        assert_eq!(
            plan(&recs, 1000 * S + 900_000_000, &policy(), max),
            vec![Step::Activate(RotateKind::Jwt, "j2".into())]
        );
    }

    #[test]
    fn an_intermediate_rotates_early_when_its_remaining_life_is_short() {
        let mut i = rec("i1", KeyKind::IntermediateCa, KeyState::Current, 0);
        i.not_after = 1000;
        let steps = plan(&[i], 600 * S, &policy(), Duration::from_secs(300));
        assert_eq!(steps, vec![Step::Prepare(RotateKind::X509)]);
    }
}
