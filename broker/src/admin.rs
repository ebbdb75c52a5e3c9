//! Operator operations: identities and join tokens. Every change is one commit with its audit
//! entry; the in-memory registry is updated only after the commit is durable.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sigil_pki::SecretString;

use crate::attest::join_token;
use crate::audit::{AuditDraft, Decision};
use crate::authz::Operator;
use crate::broker::{Broker, RequestContext};
use crate::error::BrokerError;
use crate::model::{IdentityRecord, IdentityStatus, JoinTokenRecord};
use crate::registry::{self, EntitlementSpec, IdentitySpec};
use crate::store::{Change, Op};

/// Changes to an identity; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct IdentityUpdate {
    /// Owner.
    pub owner: Option<String>,
    /// Purpose.
    pub purpose: Option<String>,
    /// Replaces all labels.
    pub labels: Option<BTreeMap<String, String>>,
    /// Replaces all selectors.
    pub selectors: Option<Vec<String>>,
    /// Replaces the entitlements.
    pub entitlements: Option<EntitlementSpec>,
    /// New lifetime, from now.
    pub expires_in: Option<Duration>,
}

/// What an operator may set an identity's status to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// Suspended → active.
    Resume,
    /// Active → suspended.
    Suspend,
    /// Anything → retired (revokes everything it holds).
    Retire,
}

impl Broker {
    /// The operator behind a request, or why there is none.
    pub fn authorize_operator(&self, ctx: &RequestContext) -> Result<Operator, BrokerError> {
        Ok(crate::authz::operator::authenticate(
            ctx.peer.as_deref(),
            &self.revocations,
            self.clock.unix(),
        )?)
    }

    /// The operator behind a request, if its role may perform `action` (a Cedar admin action,
    /// e.g. `credential.revoke`) on `target`. A refusal is audited.
    pub async fn authorize_admin(
        &self,
        ctx: &RequestContext,
        action: &str,
        target: &str,
    ) -> Result<Operator, BrokerError> {
        let op = self.authorize_operator(ctx)?;
        let mut context = vec![("target".to_owned(), crate::policy::ctx::s(target))];
        context.extend(crate::policy::ctx::time(self.clock.unix()));
        let d = self.policy.authorize(
            crate::policy::Principal::Operator {
                name: &op.name,
                role: &op.role,
            },
            action,
            crate::policy::Resource::Broker,
            || context,
        );
        if d.allowed {
            return Ok(op);
        }
        let reason = format!(
            "operator {} (role {}) may not {action}: {}",
            op.name, op.role, d.reason
        );
        let draft = AuditDraft::new(
            self.now_nanos(),
            op.actor(),
            format!("admin.{action}"),
            target,
            Decision::Deny,
            &reason,
            &ctx.request_id,
        )
        .gate(crate::authz::GateId::RequestPolicy.code())
        .with("role", op.role.clone())
        .with("policies", d.policies);
        self.audit_only(vec![draft]).await;
        Err(BrokerError::Denied {
            gate: crate::authz::GateId::RequestPolicy,
            reason,
        })
    }

    /// An identity by id or SPIFFE ID.
    pub async fn find_identity(
        &self,
        id_or_spiffe_id: &str,
    ) -> Result<Arc<IdentityRecord>, BrokerError> {
        let key = id_or_spiffe_id.trim();
        if key.is_empty() {
            return Err(BrokerError::invalid("id_or_spiffe_id", "is required"));
        }
        if let Some(r) = self.registry.find(key) {
            return Ok(r);
        }
        // Created through another replica a moment ago? Catch up once, then look again.
        self.store.sync().await?;
        self.registry
            .find(key)
            .ok_or_else(|| BrokerError::NotFound(format!("no identity {key:?}")))
    }

    /// Creates an identity.
    pub async fn create_identity(
        &self,
        op: &Operator,
        spec: IdentitySpec,
        ctx: &RequestContext,
    ) -> Result<IdentityRecord, BrokerError> {
        let rec = registry::build_record(
            &spec,
            &self.td,
            &self.cfg.issuance,
            &op.actor(),
            self.clock.unix(),
        )?;
        let draft = AuditDraft::new(
            self.now_nanos(),
            op.actor(),
            "identity.create",
            &rec.id,
            Decision::Allow,
            "created",
            &ctx.request_id,
        )
        .with("spiffe_id", rec.spiffe_id.as_str())
        .with("owner", rec.owner.as_str())
        .with(
            "entitlements",
            serde_json::to_value(&rec.entitlements).unwrap_or_default(),
        );
        self.store
            .commit(Change {
                ops: vec![Op::CreateIdentity(rec.clone())],
                audit: vec![draft],
            })
            .await?;
        Ok(rec)
    }

    /// Changes an identity's fields.
    pub async fn update_identity(
        &self,
        op: &Operator,
        target: &str,
        upd: IdentityUpdate,
        ctx: &RequestContext,
    ) -> Result<IdentityRecord, BrokerError> {
        let cur = self.find_identity(target).await?;
        let mut next = (*cur).clone();
        let mut changed = Vec::new();
        if let Some(o) = &upd.owner {
            next.owner = registry::check_owner(o)?;
            changed.push("owner");
        }
        if let Some(p) = &upd.purpose {
            next.purpose = registry::check_purpose(p)?;
            changed.push("purpose");
        }
        if let Some(l) = &upd.labels {
            next.labels = registry::check_labels(l)?;
            changed.push("labels");
        }
        if let Some(s) = &upd.selectors {
            next.selectors = registry::check_selectors(s)?;
            changed.push("selectors");
        }
        if let Some(e) = &upd.entitlements {
            next.entitlements = registry::check_entitlements(e, &self.cfg.issuance)?;
            changed.push("entitlements");
        }
        if let Some(d) = upd.expires_in {
            next.expires_at = self.clock.unix()
                + registry::check_lifetime(Some(d), &self.cfg.issuance)?.as_secs() as i64;
            changed.push("expires_at");
        }
        if changed.is_empty() {
            return Err(BrokerError::invalid("update", "nothing to change"));
        }
        let draft = AuditDraft::new(
            self.now_nanos(),
            op.actor(),
            "identity.update",
            &cur.id,
            Decision::Allow,
            format!("changed {}", changed.join(", ")),
            &ctx.request_id,
        )
        .with("fields", serde_json::json!(changed));
        self.commit_update(op, &cur, next, draft).await
    }

    /// Suspends, resumes or retires an identity.
    pub async fn set_identity_status(
        &self,
        op: &Operator,
        target: &str,
        change: StatusChange,
        reason: &str,
        ctx: &RequestContext,
    ) -> Result<IdentityRecord, BrokerError> {
        let cur = self.find_identity(target).await?;
        let (to, action) = match change {
            StatusChange::Suspend => {
                match cur.status {
                    IdentityStatus::Active => {}
                    IdentityStatus::Suspended => return Ok((*cur).clone()),
                    s => {
                        return Err(BrokerError::FailedPrecondition(format!(
                            "identity {} is {s}; only an active identity can be suspended",
                            cur.spiffe_id
                        )));
                    }
                }
                (IdentityStatus::Suspended, "identity.suspend")
            }
            StatusChange::Resume => {
                match cur.status {
                    IdentityStatus::Suspended => {}
                    IdentityStatus::Active => return Ok((*cur).clone()),
                    IdentityStatus::Compromised => {
                        return Err(BrokerError::FailedPrecondition(format!(
                            "identity {} is compromised; it is restored only by attesting again with fresh evidence (create a join token)",
                            cur.spiffe_id
                        )));
                    }
                    IdentityStatus::Retired => {
                        return Err(BrokerError::FailedPrecondition(format!(
                            "identity {} is retired for good",
                            cur.spiffe_id
                        )));
                    }
                }
                (IdentityStatus::Active, "identity.resume")
            }
            StatusChange::Retire => {
                if cur.status == IdentityStatus::Retired {
                    return Ok((*cur).clone());
                }
                // Retiring revokes everything the identity holds, each credential listed.
                let reason = if reason.trim().is_empty() {
                    "retired"
                } else {
                    reason.trim()
                };
                let r = self
                    .revoke_all(
                        &op.actor(),
                        &cur.id,
                        reason,
                        Some(IdentityStatus::Retired),
                        None,
                        false,
                        "identity.retire",
                        ctx,
                    )
                    .await?;
                return Ok(r.identity);
            }
        };
        let next =
            crate::registry::transition(&cur, to, reason.trim(), &op.actor(), self.clock.unix());
        let draft = AuditDraft::new(
            self.now_nanos(),
            op.actor(),
            action,
            &cur.id,
            Decision::Allow,
            if reason.is_empty() {
                "no reason given"
            } else {
                reason
            },
            &ctx.request_id,
        )
        .with("from", cur.status.as_str())
        .with("to", next.status.as_str())
        .with("generation", next.generation);
        self.commit_update(op, &cur, next, draft).await
    }

    /// Commits `next` as the new revision of `cur` (revision, update time and author set
    /// here), with its audit entry; refused if `cur` changed meanwhile.
    pub(crate) async fn commit_update(
        &self,
        op: &Operator,
        cur: &IdentityRecord,
        next: IdentityRecord,
        draft: AuditDraft,
    ) -> Result<IdentityRecord, BrokerError> {
        // The next revision, whatever the caller changed (registry::transition already made
        // one for status changes; the same values again).
        let next = IdentityRecord {
            revision: cur.revision + 1,
            updated_at: self.clock.unix(),
            updated_by: op.actor(),
            ..next
        };
        self.store
            .commit(Change {
                ops: vec![Op::UpdateIdentity {
                    record: next.clone(),
                    expected_revision: cur.revision,
                }],
                audit: vec![draft],
            })
            .await?;
        Ok(next)
    }

    /// Creates a one-time join token for an identity. The token is returned once and never
    /// stored.
    pub async fn create_join_token(
        &self,
        op: &Operator,
        target: &str,
        ttl: Option<Duration>,
        ctx: &RequestContext,
    ) -> Result<(SecretString, JoinTokenRecord, Arc<IdentityRecord>), BrokerError> {
        let identity = self.find_identity(target).await?;
        if !crate::registry::join_token_allowed(identity.status) {
            return Err(BrokerError::FailedPrecondition(format!(
                "identity {} is retired; it cannot attest again",
                identity.spiffe_id
            )));
        }
        let ttl = ttl.unwrap_or(self.cfg.issuance.join_token_ttl);
        if ttl < Duration::from_secs(1) || ttl > self.cfg.issuance.max_join_token_ttl {
            return Err(BrokerError::invalid(
                "ttl",
                format!(
                    "must be between 1s and {} (issuance.max_join_token_ttl)",
                    crate::config::dur::format(self.cfg.issuance.max_join_token_ttl)
                ),
            ));
        }
        let now = self.clock.unix();
        let (token, hash) = join_token::generate();
        let rec = JoinTokenRecord {
            hash: hash.clone(),
            identity_id: identity.id.clone(),
            created_at: now,
            // Stamped by the store at commit.
            created_seq: 0,
            created_by: op.actor(),
            expires_at: now + ttl.as_secs() as i64,
            consumed_at: None,
        };
        let draft = AuditDraft::new(
            self.now_nanos(),
            op.actor(),
            "join_token.create",
            &identity.id,
            Decision::Allow,
            "created",
            &ctx.request_id,
        )
        .with("token", join_token::fingerprint(&hash))
        .with("expires_at", rec.expires_at);
        self.store
            .commit(Change {
                ops: vec![Op::PutJoinToken(rec.clone())],
                audit: vec![draft],
            })
            .await?;
        Ok((token, rec, identity))
    }

    /// A ledger record by serial (hex) or `jti`.
    pub async fn credential(&self, id: &str) -> Result<crate::model::LedgerRecord, BrokerError> {
        let id = id.trim();
        let keys = [
            crate::model::credential_key(crate::model::CredentialKind::X509, id),
            crate::model::credential_key(crate::model::CredentialKind::Jwt, id),
        ];
        for key in keys.into_iter().flatten() {
            if let Some(r) = self.store.ledger_record(&key).await? {
                return Ok(r);
            }
        }
        Err(BrokerError::NotFound(format!(
            "no credential {id:?} in the ledger (serials are hex; jtis as issued)"
        )))
    }

    /// Stored audit entries (JSON) that match `q`, and the sequence number to continue from.
    pub async fn audit_entries(
        &self,
        q: &AuditQuery,
    ) -> Result<(Vec<(u64, Vec<u8>)>, u64), BrokerError> {
        const PAGE: usize = 1000;
        let limit = q.limit.clamp(1, 10_000);
        // Match an identity by id and by SPIFFE ID, whichever the operator gave.
        let names: Vec<String> = match q.identity.as_deref().filter(|s| !s.is_empty()) {
            None => Vec::new(),
            Some(i) => match self.registry.find(i) {
                Some(r) => vec![r.id.clone(), r.spiffe_id.to_string()],
                None => vec![i.to_owned()],
            },
        };
        let matches = |bytes: &[u8]| -> bool {
            if q.since_nanos <= 0
                && names.is_empty()
                && q.action.as_deref().is_none_or(str::is_empty)
            {
                return true;
            }
            let Ok(e) = serde_json::from_slice::<crate::audit::AuditEntry>(bytes) else {
                return true;
            };
            let d = &e.draft;
            d.time >= q.since_nanos
                && q.action.as_deref().is_none_or(|a| d.action.starts_with(a))
                && (names.is_empty()
                    || names.iter().any(|n| {
                        &d.target == n
                            || d.detail.get("spiffe_id").and_then(|v| v.as_str())
                                == Some(n.as_str())
                    }))
        };
        if q.last > 0 {
            let want = q.last.min(10_000);
            let head = self.store.audit_head().await?;
            let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut end = head;
            while end > 0 && out.len() < want {
                let from = end.saturating_sub(PAGE as u64 - 1).max(1);
                let page = self
                    .store
                    .audit_entries(from, (end - from + 1) as usize)
                    .await?;
                for (seq, b) in page.into_iter().rev() {
                    if out.len() < want && matches(&b) {
                        out.push((seq, b));
                    }
                }
                end = from - 1;
            }
            out.reverse();
            return Ok((out, head + 1));
        }
        let mut from = q.from_seq.max(1);
        let mut out = Vec::new();
        loop {
            let page = self.store.audit_entries(from, PAGE).await?;
            let n = page.len();
            for (seq, b) in page {
                from = seq + 1;
                if matches(&b) {
                    out.push((seq, b));
                    if out.len() == limit {
                        return Ok((out, from));
                    }
                }
            }
            if n < PAGE {
                return Ok((out, from));
            }
        }
    }
}

/// Which audit entries to read.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// First sequence number (forward reads).
    pub from_seq: u64,
    /// Most entries to return.
    pub limit: usize,
    /// Only entries at or after this time (Unix nanoseconds).
    pub since_nanos: i64,
    /// Only entries about this identity (id or SPIFFE ID).
    pub identity: Option<String>,
    /// Only entries whose action starts with this.
    pub action: Option<String>,
    /// The last N matching entries instead of a forward read.
    pub last: usize,
}

impl Broker {
    /// Walks the kept audit chain with the broker's key, from the retention checkpoint (if
    /// older entries were removed) to at least its anchored end, page by page in bounded
    /// memory while commits go on.
    pub async fn verify_audit(&self) -> Result<crate::audit::ChainReport, BrokerError> {
        Ok(crate::audit::verify_store(&*self.store, &self.sealer).await?)
    }

    /// Removes audit entries older than `audit.retention` (at most `limit` per call), exporting
    /// them first to `audit.export_dir` as JSON lines when it is set, and leaves a checkpoint the
    /// kept chain verifies from. The newest entry always stays. Returns how many went.
    pub async fn prune_audit(&self, limit: usize) -> Result<u64, BrokerError> {
        let cutoff = self.now_nanos()
            - i64::try_from(self.cfg.audit.retention.as_nanos()).unwrap_or(i64::MAX);
        let head = self.store.audit_head().await?;
        let first = self
            .store
            .audit_checkpoint()
            .await?
            .map_or(1, |c| c.seq + 1);
        let page = self.store.audit_entries(first, limit).await?;
        let mut doomed = Vec::new();
        for (seq, bytes) in page {
            if seq >= head {
                break;
            }
            let e: crate::audit::AuditEntry = serde_json::from_slice(&bytes)
                .map_err(|e| BrokerError::Internal(format!("audit entry {seq}: {e}")))?;
            if e.draft.time >= cutoff {
                break;
            }
            doomed.push((e, bytes));
        }
        let Some((last, _)) = doomed.last() else {
            return Ok(0);
        };
        let (from, through, hash) = (doomed[0].0.seq, last.seq, last.hash.clone());
        let exported = match &self.cfg.audit.export_dir {
            Some(dir) => {
                let path = dir.join(format!("audit-{from:012}-{through:012}.jsonl"));
                let mut text = Vec::new();
                for (_, b) in &doomed {
                    text.extend_from_slice(b);
                    text.push(b'\n');
                }
                std::fs::create_dir_all(dir)
                    .and_then(|()| crate::fsutil::write_atomic(&path, &text, 0o600))
                    .map_err(|e| {
                        BrokerError::Unavailable(format!(
                            "exporting audit entries to {} failed, so none were removed: {e}",
                            path.display()
                        ))
                    })?;
                path.display().to_string()
            }
            None => String::new(),
        };
        let checkpoint =
            crate::audit::Checkpoint::new(&self.sealer, through, hash, self.now_nanos());
        let n = doomed.len() as u64;
        let draft = AuditDraft::new(
            self.now_nanos(),
            "broker",
            "audit.prune",
            "audit",
            Decision::Allow,
            "entries older than audit.retention removed; the chain verifies from the checkpoint",
            "schedule",
        )
        .with("from", from)
        .with("through", through)
        .with("exported_to", exported);
        self.store
            .commit(Change {
                ops: vec![Op::PruneAudit { checkpoint }],
                audit: vec![draft],
            })
            .await?;
        Ok(n)
    }
}

/// Bytes per chunk of a streamed backup.
const BACKUP_CHUNK: usize = 64 * 1024;

/// Chunks of a backup on their way to the caller, in order; an error ends the stream.
pub type BackupStream = tokio::sync::mpsc::Receiver<Result<Vec<u8>, BrokerError>>;

impl Broker {
    /// A backup of the whole store (see `sigil_store::dump`): one consistent snapshot read while
    /// the broker keeps serving, streamed in chunks as the caller takes them (a slow caller
    /// slows the copy; one that goes away ends it). The request is audited before the
    /// snapshot is taken, so the backup holds its own audit entry; if that entry cannot be
    /// written, there is no backup.
    pub async fn backup(&self, ctx: &RequestContext) -> Result<BackupStream, BrokerError> {
        let op = self.authorize_admin(ctx, "store.backup", "store").await?;
        let draft = AuditDraft::new(
            self.now_nanos(),
            op.actor(),
            "store.backup",
            "store",
            Decision::Allow,
            "backup of the whole store",
            &ctx.request_id,
        )
        .with("source", ctx.source());
        self.store.commit(Change::audit_only(vec![draft])).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (chunks, from_export) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let store = self.store.clone();
        let failed = tx.clone();
        // The export runs on a thread of its own (a backend may read synchronously), writing
        // into a bounded channel a second thread forwards to the caller's stream.
        let spawned = std::thread::Builder::new()
            .name("sigil-backup".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = failed.blocking_send(Err(BrokerError::Internal(format!(
                            "backup runtime: {e}"
                        ))));
                        return;
                    }
                };
                let sink = ChunkSink {
                    buf: Vec::with_capacity(BACKUP_CHUNK),
                    to: chunks,
                };
                let forward = std::thread::spawn(move || {
                    for c in from_export {
                        if tx.blocking_send(Ok(c)).is_err() {
                            // The caller went away: dropping the receiver fails the export.
                            break;
                        }
                    }
                });
                let result = rt.block_on(store.export(Box::new(sink)));
                let _ = forward.join();
                match result {
                    Ok(summary) => tracing::info!(
                        ledger = summary.ledger,
                        audit_head = summary.audit_head,
                        "backup streamed"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "backup failed");
                        let _ = failed.blocking_send(Err(e.into()));
                    }
                }
            });
        if let Err(e) = spawned {
            return Err(BrokerError::Internal(format!("backup thread: {e}")));
        }
        Ok(rx)
    }
}

/// A `Write` that hands the backup on in chunks, blocking while the caller is behind.
struct ChunkSink {
    buf: Vec<u8>,
    to: std::sync::mpsc::SyncSender<Vec<u8>>,
}

impl ChunkSink {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(BACKUP_CHUNK));
        self.to.send(full).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the caller stopped reading the backup",
            )
        })
    }
}

impl std::io::Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = BACKUP_CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == BACKUP_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}
