//! Just-in-time approvals, policy reloads and operator credentials: operator actions around
//! gate 3 and admin roles.

use std::time::Duration;

use sigil_pki::{LeafSpec, LeafUsage, VerifiedCsr, ids};

use crate::audit::{AuditDraft, Decision};
use crate::authz::Operator;
use crate::broker::{Broker, RequestContext};
use crate::clock::unix_secs;
use crate::error::BrokerError;
use crate::model::{ApprovalRecord, CredentialKind, LedgerRecord};
use crate::policy::LoadReport;
use crate::store::{Change, Op};

/// Longest approval.
pub const MAX_APPROVAL: Duration = Duration::from_secs(86400);
/// Default and longest lifetimes of an operator credential.
pub const OPERATOR_TTL: Duration = Duration::from_secs(30 * 86400);
const MAX_OPERATOR_TTL: Duration = Duration::from_secs(365 * 86400);

/// A signed operator credential.
#[derive(Debug, Clone)]
pub struct OperatorCredential {
    /// DER: the certificate, then the operator CA.
    pub chain: Vec<Vec<u8>>,
    /// `spiffe://<td>/sigil/operator/<role>/<name>`.
    pub spiffe_id: String,
    /// Serial, hex.
    pub serial: String,
    /// Unix seconds.
    pub expires_at: i64,
}

impl Broker {
    /// Approves `scopes` (each one of the identity's approval-gated scopes) for `ttl`.
    pub async fn approve(
        &self,
        op: &Operator,
        id_or_spiffe_id: &str,
        scopes: Vec<String>,
        ttl: Duration,
        reason: &str,
        ctx: &RequestContext,
    ) -> Result<ApprovalRecord, BrokerError> {
        let identity = self.find_identity(id_or_spiffe_id).await?;
        if reason.trim().is_empty() {
            return Err(BrokerError::invalid(
                "reason",
                "is required: say why (a ticket, an incident)",
            ));
        }
        if scopes.is_empty() {
            return Err(BrokerError::invalid("scopes", "name at least one scope"));
        }
        if let Some(s) = scopes
            .iter()
            .find(|s| !identity.entitlements.approval_scopes.contains(*s))
        {
            return Err(BrokerError::invalid(
                "scopes",
                format!(
                    "{s:?} is not one of {}'s approval-gated scopes ({})",
                    identity.spiffe_id,
                    identity
                        .entitlements
                        .approval_scopes
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if ttl < Duration::from_secs(1) || ttl > MAX_APPROVAL {
            return Err(BrokerError::invalid(
                "ttl",
                "an approval lasts between 1s and 24h",
            ));
        }
        let now = self.clock.unix();
        let rec = ApprovalRecord {
            id: format!("apr-{}", ids::to_hex(&ids::random_bytes::<8>())),
            identity_id: identity.id.clone(),
            scopes: scopes.into_iter().collect(),
            created_at: now,
            expires_at: now + ttl.as_secs() as i64,
            approved_by: op.name.clone(),
            reason: reason.trim().to_owned(),
            revoked_at: None,
            expiry_audited: false,
        };
        let audit = AuditDraft::new(
            self.now_nanos(),
            op.actor(),
            "approval.grant",
            &identity.id,
            Decision::Allow,
            &rec.reason,
            &ctx.request_id,
        )
        .with("approval", rec.id.clone())
        .with("spiffe_id", identity.spiffe_id.as_str())
        .with("scopes", serde_json::json!(rec.scopes))
        .with("expires_at", rec.expires_at);
        self.store
            .commit(Change {
                ops: vec![Op::PutApproval(rec.clone())],
                audit: vec![audit],
            })
            .await?;
        Ok(rec)
    }

    /// Approvals, newest first: of one identity, or all; only those in force unless `all`.
    pub async fn approvals(
        &self,
        identity: Option<&str>,
        all: bool,
    ) -> Result<Vec<ApprovalRecord>, BrokerError> {
        let now = self.clock.unix();
        let id = match identity {
            Some(i) => Some(self.find_identity(i).await?.id.clone()),
            None => None,
        };
        let m = self.approvals.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<ApprovalRecord> = m
            .iter()
            .filter(|(k, _)| id.as_ref().is_none_or(|i| i == *k))
            .flat_map(|(_, v)| v.iter())
            .filter(|a| all || a.in_force(now))
            .cloned()
            .collect();
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Ends an approval early.
    pub async fn revoke_approval(
        &self,
        op: &Operator,
        approval_id: &str,
        reason: &str,
        ctx: &RequestContext,
    ) -> Result<ApprovalRecord, BrokerError> {
        let now = self.clock.unix();
        let mut rec = self
            .approvals(None, true)
            .await?
            .into_iter()
            .find(|a| a.id == approval_id)
            .ok_or_else(|| BrokerError::NotFound(format!("no approval {approval_id:?}")))?;
        if !rec.in_force(now) {
            return Err(BrokerError::FailedPrecondition(format!(
                "approval {approval_id} is no longer in force"
            )));
        }
        rec.revoked_at = Some(now);
        let audit = AuditDraft::new(
            self.now_nanos(),
            op.actor(),
            "approval.revoke",
            &rec.identity_id,
            Decision::Allow,
            reason,
            &ctx.request_id,
        )
        .with("approval", rec.id.clone());
        self.store
            .commit(Change {
                ops: vec![Op::PutApproval(rec.clone())],
                audit: vec![audit],
            })
            .await?;
        Ok(rec)
    }

    /// Records the expiry of approvals that ran out (run by the schedule).
    pub async fn record_expired_approvals(&self) -> Result<usize, BrokerError> {
        let now = self.clock.unix();
        let due: Vec<ApprovalRecord> = self
            .approvals(None, true)
            .await?
            .into_iter()
            .filter(|a| !a.expiry_audited && a.revoked_at.is_none() && a.expires_at <= now)
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        let mut change = Change::default();
        for mut a in due.iter().cloned() {
            change.audit.push(
                AuditDraft::new(
                    self.now_nanos(),
                    "sigil",
                    "approval.expire",
                    &a.identity_id,
                    Decision::Allow,
                    "approval expired",
                    "schedule",
                )
                .with("approval", a.id.clone())
                .with("scopes", serde_json::json!(a.scopes)),
            );
            a.expiry_audited = true;
            change.ops.push(Op::PutApproval(a));
        }
        self.store.commit(change).await?;
        Ok(due.len())
    }

    /// Reloads the Cedar policies; audited either way. On error the old ones stay.
    pub async fn reload_policy(
        &self,
        actor: &str,
        ctx_request_id: &str,
    ) -> Result<LoadReport, BrokerError> {
        let result = self.policy.reload();
        let draft = match &result {
            Ok(r) => AuditDraft::new(
                self.now_nanos(),
                actor,
                "policy.reload",
                "policy",
                Decision::Allow,
                "policies reloaded",
                ctx_request_id,
            )
            .with("policies", serde_json::json!(r.policy_ids))
            .with("files", serde_json::json!(r.files)),
            Err(e) => AuditDraft::new(
                self.now_nanos(),
                actor,
                "policy.reload",
                "policy",
                Decision::Deny,
                format!("refused; the policies in force stay: {e}"),
                ctx_request_id,
            ),
        };
        if let Err(e) = self.store.commit(Change::audit_only(vec![draft])).await {
            tracing::error!(error = %e, "could not audit a policy reload");
        }
        match result {
            Ok(r) => {
                tracing::info!(policies = r.policy_ids.len(), "policies reloaded");
                Ok(r)
            }
            Err(e) => {
                tracing::warn!(error = %e, "policy reload refused; the policies in force stay");
                Err(BrokerError::FailedPrecondition(format!(
                    "policy reload refused; the policies in force stay: {e}"
                )))
            }
        }
    }

    /// Signs an operator credential with `role` for a CSR.
    pub async fn issue_operator_credential(
        &self,
        op: &Operator,
        name: &str,
        role: &str,
        csr_der: &[u8],
        ttl: Option<Duration>,
        ctx: &RequestContext,
    ) -> Result<OperatorCredential, BrokerError> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(BrokerError::invalid(
                "name",
                "must be 1-64 letters, digits, '.', '_' or '-'",
            ));
        }
        if !crate::policy::ROLES.contains(&role) {
            return Err(BrokerError::invalid(
                "role",
                format!("must be one of {}", crate::policy::ROLES.join(", ")),
            ));
        }
        let ttl = ttl.unwrap_or(OPERATOR_TTL);
        if ttl > MAX_OPERATOR_TTL {
            return Err(BrokerError::invalid("ttl", "at most 365d"));
        }
        let csr = VerifiedCsr::from_der(csr_der)
            .map_err(|e| BrokerError::invalid("csr", e.to_string()))?;
        let spiffe_id = self
            .td
            .id_with_path(&format!("/sigil/operator/{role}/{name}"))
            .map_err(|e| BrokerError::invalid("name", e.to_string()))?;
        let now = self.clock.now();
        let serial = ids::new_serial(now);
        let ring = self.keys.current();
        let leaf = ring.operator_ca.mint_leaf(
            &csr,
            &LeafSpec {
                spiffe_id: &spiffe_id,
                dns_names: &[],
                ip_addresses: &[],
                usage: LeafUsage::ClientOnly,
                now,
                ttl,
                backdate: self.cfg.issuance.backdate,
                serial: &serial,
            },
        )?;
        let serial_hex = ids::to_hex(&serial);
        let expires_at = unix_secs(leaf.not_after);
        let change = Change {
            ops: vec![Op::AppendLedger(LedgerRecord {
                credential_id: serial_hex.clone(),
                kind: CredentialKind::X509,
                identity_id: String::new(),
                spiffe_id: spiffe_id.to_string(),
                generation: 0,
                audiences: Vec::new(),
                scopes: Vec::new(),
                dns_names: Vec::new(),
                issued_at: unix_secs(now),
                expires_at,
                signing_key_id: ring.operator_ca.key().kid().to_owned(),
                attestation: "operator".into(),
                source: ctx.remote.map(|a| a.ip().to_string()).unwrap_or_default(),
            })],
            audit: vec![
                AuditDraft::new(
                    self.now_nanos(),
                    op.actor(),
                    "operator.credential.issue",
                    spiffe_id.as_str(),
                    Decision::Allow,
                    format!("{role} credential for {name}"),
                    &ctx.request_id,
                )
                .with("serial", serial_hex.clone())
                .with("role", role)
                .with("expires_at", expires_at),
            ],
        };
        self.store.commit(change).await?;
        Ok(OperatorCredential {
            chain: vec![leaf.der.to_vec(), ring.operator_ca.cert().to_vec()],
            spiffe_id: spiffe_id.to_string(),
            serial: serial_hex,
            expires_at,
        })
    }
}
