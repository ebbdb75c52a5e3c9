//! Governance: what security teams ask of a non-human identity programme.
//!
//! - [`follow_baselines`]: the task that learns each identity's behaviour baseline from the
//!   committed issuances ([`crate::baseline`]) and acts on anomalies: an audit event, a metric
//!   and a report finding, and — when policy says so — a suspension.
//! - [`Report`]: the inventory (owner, purpose, age, expiry, last use, live credentials,
//!   lifetimes, entitlements granted vs used), findings with severity and the narrower
//!   entitlement to apply, and programme metrics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use crate::admin::AuditQuery;
use crate::audit::{AuditDraft, AuditEntry, Decision};
use crate::authz::Operator;
use crate::baseline::Anomaly;
use crate::broker::{Broker, RequestContext};
use crate::config::OnAnomaly;
use crate::error::BrokerError;
use crate::model::{IdentityRecord, IdentityStatus, LedgerRecord, OwnerRecord};
use crate::store::{Change, Conflict, Op, StoreError};

/// Report thresholds (defaults from `[governance]`).
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Unused this long: orphan / excess privilege.
    pub unused_after: Duration,
    /// Expiring within this.
    pub expiring_within: Duration,
    /// Max TTL above this is reported.
    pub max_ttl_policy: Duration,
}

/// One identity in the inventory.
#[derive(Debug, Clone, Serialize)]
pub struct InventoryItem {
    /// Id.
    pub id: String,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Owner.
    pub owner: String,
    /// Whether the owner is still active.
    pub owner_active: bool,
    /// Purpose.
    pub purpose: String,
    /// Status.
    pub status: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds of the last issuance (0: never).
    pub last_used: i64,
    /// Credentials not yet expired.
    pub live_credentials: u64,
    /// Credentials ever issued.
    pub issued: u64,
    /// Mean granted lifetime, seconds.
    pub mean_lifetime_secs: u64,
    /// Longest granted lifetime, seconds.
    pub max_lifetime_secs: u64,
    /// Entitlements granted.
    pub granted: Entitled,
    /// Entitlements used within the window.
    pub used: Entitled,
}

/// Kinds, audiences and scopes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Entitled {
    /// Credential kinds.
    pub kinds: BTreeSet<String>,
    /// Audiences.
    pub audiences: BTreeSet<String>,
    /// Scopes.
    pub scopes: BTreeSet<String>,
}

/// Something worth an operator's attention.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// `high`, `medium` or `low`.
    pub severity: &'static str,
    /// What kind of finding.
    pub kind: &'static str,
    /// The identity concerned, if any.
    pub identity_id: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Plain words.
    pub message: String,
    /// What to do, machine-readable where possible (e.g. the narrower entitlements).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub recommendation: serde_json::Value,
}

/// Programme-level figures.
#[derive(Debug, Clone, Serialize)]
pub struct Programme {
    /// Identities not retired.
    pub identities: u64,
    /// Share of them with an active named owner (0..1).
    pub ownership_coverage: f64,
    /// Orphan candidates.
    pub orphans: u64,
    /// Retired identities.
    pub retired: u64,
    /// Median lifetime of credentials issued in the live window, seconds.
    pub median_credential_lifetime_secs: u64,
    /// Leak reports in the window.
    pub incidents: u64,
    /// Mean time from a leak report to the revocation being durable and pushed, ms.
    pub mean_leak_to_revocation_ms: Option<f64>,
}

/// The governance report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Unix seconds.
    pub generated_at: i64,
    /// The thresholds used, as text.
    pub thresholds: BTreeMap<&'static str, String>,
    /// Every identity.
    pub identities: Vec<InventoryItem>,
    /// Findings, most severe first.
    pub findings: Vec<Finding>,
    /// Programme metrics.
    pub programme: Programme,
}

fn used_since(m: &BTreeMap<String, i64>, since: i64) -> BTreeSet<String> {
    m.iter()
        .filter(|(_, t)| **t >= since)
        .map(|(k, _)| k.clone())
        .collect()
}

fn severity_rank(s: &str) -> u8 {
    match s {
        "high" => 0,
        "medium" => 1,
        _ => 2,
    }
}

/// Learns behaviour baselines from committed issuances, in commit order, and acts on the
/// anomalies they show, until `cancel` (or the broker goes away).
pub async fn follow_baselines(
    broker: std::sync::Weak<Broker>,
    mut committed: tokio::sync::mpsc::Receiver<LedgerRecord>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = committed.recv() => match r {
                Some(r) => r,
                None => return,
            },
        };
        let Some(b) = broker.upgrade() else { return };
        let anomalies = b.behaviour.observe(&r, &b.cfg.governance);
        if !anomalies.is_empty() {
            b.on_anomalies(r.identity_id, anomalies).await;
        }
    }
}

impl Broker {
    /// Handles anomalies of one identity: audit entries and metrics, and a suspension when the
    /// identity's `on_anomaly` label (or `[governance] on_anomaly`) says `suspend`.
    async fn on_anomalies(&self, identity_id: String, anomalies: Vec<Anomaly>) {
        for _ in 0..3 {
            let Some(identity) = self.registry.get(&identity_id) else {
                return;
            };
            let policy = match identity.labels.get("on_anomaly").map(String::as_str) {
                Some("suspend") => OnAnomaly::Suspend,
                Some("alert") => OnAnomaly::Alert,
                _ => self.cfg.governance.on_anomaly,
            };
            let mut change = Change::default();
            for a in &anomalies {
                metrics::counter!("sigil_anomalies_total", "kind" => a.kind).increment(1);
                change.audit.push(
                    AuditDraft::new(
                        self.now_nanos(),
                        "broker",
                        format!("anomaly.{}", a.kind),
                        &identity.id,
                        Decision::Allow,
                        &a.detail,
                        "anomaly",
                    )
                    .with("spiffe_id", identity.spiffe_id.as_str())
                    .with(
                        "policy",
                        if policy == OnAnomaly::Suspend {
                            "suspend"
                        } else {
                            "alert"
                        },
                    ),
                );
            }
            if policy == OnAnomaly::Suspend && identity.status == IdentityStatus::Active {
                let now = self.clock.unix();
                let reason = format!(
                    "anomaly: {}",
                    anomalies
                        .iter()
                        .map(|a| a.detail.clone())
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                let next = crate::registry::transition(
                    &identity,
                    IdentityStatus::Suspended,
                    &reason,
                    "broker",
                    now,
                );
                change.ops.push(Op::UpdateIdentity {
                    record: next,
                    expected_revision: identity.revision,
                });
                change.audit.push(
                    AuditDraft::new(
                        self.now_nanos(),
                        "broker",
                        "identity.suspend",
                        &identity.id,
                        Decision::Allow,
                        &reason,
                        "anomaly",
                    )
                    .with("from", "active")
                    .with("to", "suspended"),
                );
                tracing::warn!(identity = %identity.spiffe_id, %reason, "suspended after an anomaly");
            } else {
                tracing::warn!(identity = %identity.spiffe_id, anomalies = ?anomalies, "behaviour anomaly");
            }
            match self.store.commit(change).await {
                Err(StoreError::Conflict(Conflict::StaleRevision { .. })) => continue,
                Err(e) => tracing::error!(error = %e, "could not record an anomaly"),
                Ok(_) => {}
            }
            return;
        }
    }

    /// Extends an identity's life; records who vouched for it.
    pub async fn recertify(
        &self,
        op: &Operator,
        target: &str,
        lifetime: Option<Duration>,
        reason: &str,
        ctx: &RequestContext,
    ) -> Result<IdentityRecord, BrokerError> {
        let cur = self.find_identity(target).await?;
        if cur.status == IdentityStatus::Retired {
            return Err(BrokerError::FailedPrecondition(format!(
                "identity {} is retired",
                cur.spiffe_id
            )));
        }
        let now = self.clock.unix();
        let life = crate::registry::check_lifetime(lifetime, &self.cfg.issuance)?;
        let mut next = (*cur).clone();
        next.expires_at = now + life.as_secs() as i64;
        next.recertified_at = now;
        next.recertified_by = op.actor();
        let reason = if reason.trim().is_empty() {
            "recertified"
        } else {
            reason.trim()
        };
        let draft = AuditDraft::new(
            self.now_nanos(),
            op.actor(),
            "identity.recertify",
            &cur.id,
            Decision::Allow,
            reason,
            &ctx.request_id,
        )
        .with("spiffe_id", cur.spiffe_id.as_str())
        .with("owner", cur.owner.as_str())
        .with("expires_at", next.expires_at);
        self.commit_update(op, &cur, next, draft).await
    }

    /// Marks an owner as gone (or back). Their identities are reported until reassigned.
    pub async fn set_owner_active(
        &self,
        op: &Operator,
        name: &str,
        active: bool,
        reason: &str,
        ctx: &RequestContext,
    ) -> Result<(OwnerRecord, Vec<String>), BrokerError> {
        let name = name.trim();
        if name.is_empty() {
            return Err(BrokerError::invalid("name", "is required"));
        }
        let rec = OwnerRecord {
            name: name.to_owned(),
            deactivated_at: (!active).then(|| self.clock.unix()),
            changed_by: op.actor(),
            reason: reason.trim().to_owned(),
        };
        let owned: Vec<String> = self
            .registry
            .list()
            .iter()
            .filter(|r| r.owner == name && r.status != IdentityStatus::Retired)
            .map(|r| r.spiffe_id.to_string())
            .collect();
        let draft = AuditDraft::new(
            self.now_nanos(),
            op.actor(),
            if active {
                "owner.activate"
            } else {
                "owner.deactivate"
            },
            name,
            Decision::Allow,
            if reason.trim().is_empty() {
                "no reason given"
            } else {
                reason.trim()
            },
            &ctx.request_id,
        )
        .with("identities", json!(owned));
        self.store
            .commit(Change {
                ops: vec![Op::PutOwner(rec.clone())],
                audit: vec![draft],
            })
            .await?;
        Ok((rec, owned))
    }

    /// The governance report.
    pub async fn report(&self, opts: &ReportOptions) -> Result<Report, BrokerError> {
        let now = self.clock.unix();
        let unused_since = now - opts.unused_after.as_secs() as i64;
        let live_since = now - self.cfg.issuance.max_ttl_ceiling.as_secs() as i64 - 60;
        let owners: HashMap<String, OwnerRecord> = self
            .store
            .owners()
            .await?
            .into_iter()
            .map(|o| (o.name.clone(), o))
            .collect();
        let owner_active = |name: &str| owners.get(name).is_none_or(|o| o.deactivated_at.is_none());
        let recent = self.store.ledger_since(live_since, None).await?;
        let mut live: HashMap<&str, u64> = HashMap::new();
        let mut lifetimes: Vec<u64> = Vec::new();
        for r in &recent {
            if self.is_live(r, now) {
                *live.entry(r.identity_id.as_str()).or_default() += 1;
            }
            if !r.identity_id.is_empty() {
                lifetimes.push((r.expires_at - r.issued_at).max(0) as u64);
            }
        }
        lifetimes.sort_unstable();

        let mut items = Vec::new();
        let mut findings = Vec::new();
        let mut orphans = 0u64;
        let (mut counted, mut owned, mut retired) = (0u64, 0u64, 0u64);
        for id in self.registry.list() {
            let u = self.behaviour.usage(&id.id).unwrap_or_default();
            let granted = Entitled {
                kinds: id
                    .entitlements
                    .kinds
                    .iter()
                    .map(|k| k.as_str().to_owned())
                    .collect(),
                audiences: id.entitlements.audiences.clone(),
                scopes: id.entitlements.scopes.clone(),
            };
            let used = Entitled {
                kinds: used_since(&u.kinds, unused_since),
                audiences: used_since(&u.audiences, unused_since),
                scopes: used_since(&u.scopes, unused_since),
            };
            let finding = |severity, kind, message: String, recommendation| Finding {
                severity,
                kind,
                identity_id: id.id.clone(),
                spiffe_id: id.spiffe_id.to_string(),
                message,
                recommendation,
            };
            let active_owner = owner_active(&id.owner);
            if id.status == IdentityStatus::Retired {
                retired += 1;
            } else {
                counted += 1;
                if active_owner && !id.owner.trim().is_empty() {
                    owned += 1;
                }
                if id.expires_at <= now {
                    findings.push(finding(
                        "high",
                        "expired",
                        format!(
                            "expired at {}; it cannot mint until its owner recertifies it",
                            crate::clock::rfc3339(id.expires_at)
                        ),
                        json!("sigil identity recertify"),
                    ));
                } else if id.expires_at <= now + opts.expiring_within.as_secs() as i64 {
                    findings.push(finding(
                        "medium",
                        "expiring",
                        format!("expires at {}", crate::clock::rfc3339(id.expires_at)),
                        json!("sigil identity recertify"),
                    ));
                }
                if !active_owner {
                    findings.push(finding(
                        "high",
                        "owner_deactivated",
                        format!(
                            "its owner {:?} has been deactivated; assign a new owner or retire it",
                            id.owner
                        ),
                        json!({"owner": null}),
                    ));
                }
                if id.status == IdentityStatus::Compromised {
                    findings.push(finding(
                        "high",
                        "compromised",
                        format!(
                            "compromised since {} and awaiting re-attestation with fresh evidence",
                            crate::clock::rfc3339(id.status_since)
                        ),
                        json!("sigil join-token create"),
                    ));
                }
                let old_enough = id.created_at <= unused_since;
                let unused = u.last_used < unused_since;
                if id.status == IdentityStatus::Active && old_enough && unused {
                    orphans += 1;
                    let last = if u.issued == 0 {
                        "never used".to_owned()
                    } else {
                        format!("last used {}", crate::clock::rfc3339(u.last_used))
                    };
                    findings.push(finding(
                        "medium",
                        "orphan",
                        format!("{last}; retire it, or recertify it if it is still needed"),
                        json!("sigil identity retire"),
                    ));
                } else if old_enough {
                    // Excess privilege: what was granted but not used, and the narrower set.
                    for (kind, g, used_set) in [
                        ("unused_kind", &granted.kinds, &used.kinds),
                        ("unused_audience", &granted.audiences, &used.audiences),
                        ("unused_scope", &granted.scopes, &used.scopes),
                    ] {
                        let idle: Vec<&String> = g.difference(used_set).collect();
                        if !idle.is_empty() {
                            let field = match kind {
                                "unused_kind" => "kinds",
                                "unused_audience" => "audiences",
                                _ => "scopes",
                            };
                            findings.push(finding(
                                "low",
                                kind,
                                format!(
                                    "{field} {} granted but unused for {}",
                                    idle.iter()
                                        .map(|s| s.as_str())
                                        .collect::<Vec<_>>()
                                        .join(", "),
                                    crate::config::dur::format(opts.unused_after)
                                ),
                                json!({ field: used_set }),
                            ));
                        }
                    }
                }
                if id.entitlements.max_ttl_secs > opts.max_ttl_policy.as_secs() {
                    findings.push(finding(
                        "medium",
                        "ttl_above_policy",
                        format!(
                            "max TTL {} is above the policy of {}",
                            crate::config::dur::format(Duration::from_secs(
                                id.entitlements.max_ttl_secs
                            )),
                            crate::config::dur::format(opts.max_ttl_policy)
                        ),
                        json!({"max_ttl_seconds": opts.max_ttl_policy.as_secs()}),
                    ));
                }
            }
            items.push(InventoryItem {
                id: id.id.clone(),
                spiffe_id: id.spiffe_id.to_string(),
                owner: id.owner.clone(),
                owner_active: active_owner,
                purpose: id.purpose.clone(),
                status: id.status.as_str().into(),
                created_at: id.created_at,
                expires_at: id.expires_at,
                last_used: u.last_used,
                live_credentials: live.get(id.id.as_str()).copied().unwrap_or(0),
                issued: u.issued,
                mean_lifetime_secs: u.lifetime_sum.checked_div(u.issued).unwrap_or(0),
                max_lifetime_secs: u.lifetime_max,
                granted,
                used,
            });
        }
        for t in self.store.join_tokens().await? {
            if t.consumed_at.is_none() && t.expires_at > now {
                let id = self.registry.get(&t.identity_id);
                findings.push(Finding {
                    severity: "low",
                    kind: "outstanding_join_token",
                    identity_id: t.identity_id.clone(),
                    spiffe_id: id.map(|i| i.spiffe_id.to_string()).unwrap_or_default(),
                    message: format!(
                        "unused join token {} valid until {}",
                        crate::attest::join_token::fingerprint(&t.hash),
                        crate::clock::rfc3339(t.expires_at)
                    ),
                    recommendation: serde_json::Value::Null,
                });
            }
        }
        let since_nanos = unused_since.saturating_mul(1_000_000_000);
        let anomalies = self
            .audit_entries(&AuditQuery {
                limit: 10_000,
                since_nanos,
                action: Some("anomaly.".into()),
                ..AuditQuery::default()
            })
            .await?
            .0;
        for (_, b) in &anomalies {
            if let Ok(e) = serde_json::from_slice::<AuditEntry>(b) {
                findings.push(Finding {
                    severity: "medium",
                    kind: "anomaly",
                    identity_id: e.draft.target.clone(),
                    spiffe_id: e
                        .draft
                        .detail
                        .get("spiffe_id")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_owned(),
                    message: format!(
                        "{}: {} ({})",
                        e.draft.action.trim_start_matches("anomaly."),
                        e.draft.reason,
                        crate::clock::rfc3339(e.draft.time / 1_000_000_000)
                    ),
                    recommendation: serde_json::Value::Null,
                });
            }
        }
        let enforced = self
            .audit_entries(&AuditQuery {
                limit: 10_000,
                since_nanos,
                action: Some("incident.enforced".into()),
                ..AuditQuery::default()
            })
            .await?
            .0;
        let times: Vec<f64> = enforced
            .iter()
            .filter_map(|(_, b)| serde_json::from_slice::<AuditEntry>(b).ok())
            .filter_map(|e| {
                e.draft
                    .detail
                    .get("enforced_in_ms")
                    .and_then(serde_json::Value::as_f64)
            })
            .collect();
        findings.sort_by_key(|f| (severity_rank(f.severity), f.kind, f.spiffe_id.clone()));
        let thresholds = BTreeMap::from([
            (
                "unused_after",
                crate::config::dur::format(opts.unused_after),
            ),
            (
                "expiring_within",
                crate::config::dur::format(opts.expiring_within),
            ),
            (
                "max_ttl_policy",
                crate::config::dur::format(opts.max_ttl_policy),
            ),
        ]);
        Ok(Report {
            generated_at: now,
            thresholds,
            identities: items,
            findings,
            programme: Programme {
                identities: counted,
                ownership_coverage: if counted == 0 {
                    1.0
                } else {
                    owned as f64 / counted as f64
                },
                orphans,
                retired,
                median_credential_lifetime_secs: lifetimes
                    .get(lifetimes.len() / 2)
                    .copied()
                    .unwrap_or(0),
                incidents: times.len() as u64,
                mean_leak_to_revocation_ms: (!times.is_empty())
                    .then(|| times.iter().sum::<f64>() / times.len() as f64),
            },
        })
    }
}
