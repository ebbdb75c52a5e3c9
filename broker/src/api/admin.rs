//! The operator `sigil.v1.Admin` service. Every call first authenticates the operator
//! credential presented over mTLS.

use std::sync::Arc;

use sigil_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{context, status};
use crate::admin::{IdentityUpdate, StatusChange};
use crate::audit::ChainReport;
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::model::{IdentityRecord, IdentityStatus};
use crate::registry::{EntitlementSpec, IdentitySpec};

/// Implements `sigil.v1.Admin`.
#[derive(Debug, Clone)]
pub struct AdminApi {
    broker: Arc<Broker>,
}

impl AdminApi {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        AdminApi { broker }
    }
}

/// The API form of an identity record.
pub fn identity(r: &IdentityRecord) -> pb::Identity {
    pb::Identity {
        id: r.id.clone(),
        spiffe_id: r.spiffe_id.to_string(),
        owner: r.owner.clone(),
        purpose: r.purpose.clone(),
        labels: r.labels.clone().into_iter().collect(),
        selectors: r.selectors.iter().map(ToString::to_string).collect(),
        entitlements: Some(pb::Entitlements {
            kinds: r
                .entitlements
                .kinds
                .iter()
                .map(|k| k.as_str().to_owned())
                .collect(),
            max_ttl_seconds: u32::try_from(r.entitlements.max_ttl_secs).unwrap_or(u32::MAX),
            audiences: r.entitlements.audiences.iter().cloned().collect(),
            scopes: r.entitlements.scopes.iter().cloned().collect(),
            dns_names: r.entitlements.dns_names.iter().cloned().collect(),
            approval_scopes: r.entitlements.approval_scopes.iter().cloned().collect(),
        }),
        status: match r.status {
            IdentityStatus::Active => pb::IdentityStatus::Active,
            IdentityStatus::Suspended => pb::IdentityStatus::Suspended,
            IdentityStatus::Compromised => pb::IdentityStatus::Compromised,
            IdentityStatus::Retired => pb::IdentityStatus::Retired,
        } as i32,
        expires_at: r.expires_at,
        generation: r.generation,
        created_at: r.created_at,
        created_by: r.created_by.clone(),
        updated_at: r.updated_at,
        updated_by: r.updated_by.clone(),
        revision: r.revision,
        status_reason: r.status_reason.clone(),
    }
}

/// The API form of a ledger record.
/// The API form of a ledger record and how it was revoked, if it was.
pub fn credential_with(
    r: crate::model::LedgerRecord,
    rev: Option<crate::revoke::CredentialRevocation>,
) -> pb::Credential {
    pb::Credential {
        revocation: rev.map(|v| pb::CredentialRevocation {
            how: v.how.into(),
            revoked_at: v.revoked_at,
            reason: v.reason,
            revoked_by: v.revoked_by,
        }),
        ..credential(r)
    }
}

/// The API form of a ledger record.
pub fn credential(r: crate::model::LedgerRecord) -> pb::Credential {
    pb::Credential {
        credential_id: r.credential_id,
        kind: r.kind.as_str().into(),
        identity_id: r.identity_id,
        spiffe_id: r.spiffe_id,
        generation: r.generation,
        audiences: r.audiences,
        scopes: r.scopes,
        dns_names: r.dns_names,
        issued_at: r.issued_at,
        expires_at: r.expires_at,
        signing_key_id: r.signing_key_id,
        attestation: r.attestation,
        revocation: None,
    }
}

fn report(r: crate::revoke::RevocationReport) -> pb::RevocationReport {
    pb::RevocationReport {
        identity: Some(identity(&r.identity)),
        leaked: r.leaked.map(credential),
        live_credentials: r.live.into_iter().map(credential).collect(),
        dry_run: r.dry_run,
        audit_sequence: r.audit_seq.unwrap_or(0),
    }
}

fn keys(broker: &Broker) -> pb::ListKeysResponse {
    let ring = broker.keys().current();
    let mut recs = ring.records.clone();
    recs.sort_by_key(|r| (format!("{:?}", r.kind), std::cmp::Reverse(r.changed_at)));
    pb::ListKeysResponse {
        keys: recs
            .into_iter()
            .map(|r| pb::Key {
                kind: serde_json::to_value(r.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                state: r.state.as_str().into(),
                created_at: r.created_at,
                not_after: r.not_after,
                activated_at: r.activated_at.unwrap_or(0),
                retire_at: r.retire_at.unwrap_or(0),
                ski: r.ski.unwrap_or_default(),
                id: r.id,
            })
            .collect(),
        bundle_sequence: ring.bundle.sequence,
    }
}

fn entitlements(e: pb::Entitlements) -> EntitlementSpec {
    EntitlementSpec {
        kinds: e.kinds,
        max_ttl: super::ttl(e.max_ttl_seconds),
        audiences: e.audiences,
        scopes: e.scopes,
        dns_names: e.dns_names,
        approval_scopes: e.approval_scopes,
    }
}

fn secs(s: u64) -> Option<std::time::Duration> {
    (s > 0).then(|| std::time::Duration::from_secs(s))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    async fn create_identity(
        &self,
        req: Request<pb::CreateIdentityRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(&ctx, "identity.create", &req.get_ref().spiffe_id)
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let spec = IdentitySpec {
            spiffe_id: r.spiffe_id,
            owner: r.owner,
            purpose: r.purpose,
            labels: r.labels.into_iter().collect(),
            selectors: r.selectors,
            entitlements: r.entitlements.map(entitlements).unwrap_or_default(),
            expires_in: secs(r.expires_in_seconds),
        };
        let rec = self
            .broker
            .create_identity(&op, spec, &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(identity(&rec)))
    }

    async fn get_identity(
        &self,
        req: Request<pb::GetIdentityRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        let ctx = context(&req);
        self.broker
            .authorize_admin(&ctx, "identity.read", &req.get_ref().id_or_spiffe_id)
            .await
            .map_err(|e| status(e, &ctx))?;
        let rec = self
            .broker
            .find_identity(&req.get_ref().id_or_spiffe_id)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(identity(&rec)))
    }

    async fn list_identities(
        &self,
        req: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        let ctx = context(&req);
        self.broker
            .authorize_admin(&ctx, "identity.read", "")
            .await
            .map_err(|e| status(e, &ctx))?;
        let identities = self
            .broker
            .registry()
            .list()
            .iter()
            .map(|r| identity(r))
            .collect();
        Ok(Response::new(pb::ListIdentitiesResponse { identities }))
    }

    async fn update_identity(
        &self,
        req: Request<pb::UpdateIdentityRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(&ctx, "identity.update", &req.get_ref().id_or_spiffe_id)
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let upd = IdentityUpdate {
            owner: r.owner,
            purpose: r.purpose,
            labels: r.set_labels.then(|| r.labels.into_iter().collect()),
            selectors: r.set_selectors.then_some(r.selectors),
            entitlements: r.entitlements.map(entitlements),
            expires_in: r.expires_in_seconds.and_then(secs),
        };
        let rec = self
            .broker
            .update_identity(&op, &r.id_or_spiffe_id, upd, &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(identity(&rec)))
    }

    async fn set_identity_status(
        &self,
        req: Request<pb::SetIdentityStatusRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(
                &ctx,
                if req.get_ref().status == pb::IdentityStatus::Suspended as i32 {
                    "identity.suspend"
                } else {
                    "identity.status"
                },
                &req.get_ref().id_or_spiffe_id,
            )
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let change = match pb::IdentityStatus::try_from(r.status) {
            Ok(pb::IdentityStatus::Active) => StatusChange::Resume,
            Ok(pb::IdentityStatus::Suspended) => StatusChange::Suspend,
            Ok(pb::IdentityStatus::Retired) => StatusChange::Retire,
            _ => {
                return Err(status(
                    BrokerError::invalid(
                        "status",
                        "must be ACTIVE (resume), SUSPENDED or RETIRED; compromise is reported with `sigil leak`",
                    ),
                    &ctx,
                ));
            }
        };
        let rec = self
            .broker
            .set_identity_status(&op, &r.id_or_spiffe_id, change, &r.reason, &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(identity(&rec)))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(&ctx, "join_token.create", &req.get_ref().id_or_spiffe_id)
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let (token, rec, id) = self
            .broker
            .create_join_token(&op, &r.id_or_spiffe_id, super::ttl(r.ttl_seconds), &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token: token.expose_secret().to_owned(),
            identity_id: id.id.clone(),
            spiffe_id: id.spiffe_id.to_string(),
            expires_at: rec.expires_at,
        }))
    }

    async fn get_credential(
        &self,
        req: Request<pb::GetCredentialRequest>,
    ) -> Result<Response<pb::Credential>, Status> {
        let ctx = context(&req);
        self.broker
            .authorize_admin(&ctx, "credential.read", "")
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = self
            .broker
            .credential(&req.get_ref().credential_id)
            .await
            .map_err(|e| status(e, &ctx))?;
        let rev = self.broker.revocation_of(&r);
        Ok(Response::new(credential_with(r, rev)))
    }

    async fn revoke_credential(
        &self,
        req: Request<pb::RevokeCredentialRequest>,
    ) -> Result<Response<pb::RevokeCredentialResponse>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(&ctx, "credential.revoke", &req.get_ref().credential_id)
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let (rec, before) = self
            .broker
            .revoke_credential(&op, &r.credential_id, &r.reason, &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        let already_revoked = before.is_some();
        let rev = before.or_else(|| self.broker.revocation_of(&rec));
        Ok(Response::new(pb::RevokeCredentialResponse {
            credential: Some(credential_with(rec, rev)),
            already_revoked,
        }))
    }

    async fn revoke_identity(
        &self,
        req: Request<pb::RevokeIdentityRequest>,
    ) -> Result<Response<pb::RevocationReport>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(
                &ctx,
                if req.get_ref().retire {
                    "identity.status"
                } else {
                    "identity.revoke"
                },
                &req.get_ref().id_or_spiffe_id,
            )
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let rep = self
            .broker
            .revoke_identity(
                &op,
                &r.id_or_spiffe_id,
                &r.reason,
                r.suspend,
                r.retire,
                r.dry_run,
                &ctx,
            )
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(report(rep)))
    }

    async fn report_leak(
        &self,
        req: Request<pb::ReportLeakRequest>,
    ) -> Result<Response<pb::RevocationReport>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(&ctx, "leak.report", "")
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let rep = self
            .broker
            .report_leak(&op, &r.material, &r.reason, r.dry_run, &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(report(rep)))
    }

    async fn revoke_key(
        &self,
        req: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(&ctx, "keys.revoke", &req.get_ref().key_id)
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        self.broker
            .revoke_key(&op, &r.key_id, &r.reason, &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(keys(&self.broker)))
    }

    async fn rotate(
        &self,
        req: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(&ctx, "keys.rotate", "")
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let kind = r
            .kind
            .parse()
            .map_err(|e: String| status(BrokerError::invalid("kind", e), &ctx))?;
        self.broker
            .rotate(&op, kind, r.now, &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(keys(&self.broker)))
    }

    async fn recertify(
        &self,
        req: Request<pb::RecertifyRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(&ctx, "identity.recertify", &req.get_ref().id_or_spiffe_id)
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let rec = self
            .broker
            .recertify(
                &op,
                &r.id_or_spiffe_id,
                secs(r.expires_in_seconds),
                &r.reason,
                &ctx,
            )
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(identity(&rec)))
    }

    async fn set_owner_active(
        &self,
        req: Request<pb::SetOwnerActiveRequest>,
    ) -> Result<Response<pb::Owner>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(&ctx, "owner.update", &req.get_ref().name)
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let (o, ids) = self
            .broker
            .set_owner_active(&op, &r.name, r.active, &r.reason, &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(pb::Owner {
            active: o.deactivated_at.is_none(),
            deactivated_at: o.deactivated_at.unwrap_or(0),
            name: o.name,
            changed_by: o.changed_by,
            reason: o.reason,
            identities: ids,
        }))
    }

    async fn list_owners(
        &self,
        req: Request<pb::ListOwnersRequest>,
    ) -> Result<Response<pb::ListOwnersResponse>, Status> {
        let ctx = context(&req);
        self.broker
            .authorize_admin(&ctx, "owner.read", "")
            .await
            .map_err(|e| status(e, &ctx))?;
        let records: std::collections::HashMap<String, crate::model::OwnerRecord> = self
            .broker
            .store()
            .owners()
            .await
            .map_err(|e| status(e.into(), &ctx))?
            .into_iter()
            .map(|o| (o.name.clone(), o))
            .collect();
        let mut owners: std::collections::BTreeMap<String, pb::Owner> =
            std::collections::BTreeMap::new();
        for id in self
            .broker
            .registry()
            .list()
            .iter()
            .filter(|r| r.status != IdentityStatus::Retired)
        {
            owners
                .entry(id.owner.clone())
                .or_insert_with(|| pb::Owner {
                    name: id.owner.clone(),
                    active: true,
                    ..Default::default()
                })
                .identities
                .push(id.spiffe_id.to_string());
        }
        for (name, o) in records {
            let e = owners.entry(name.clone()).or_insert_with(|| pb::Owner {
                name,
                ..Default::default()
            });
            e.active = o.deactivated_at.is_none();
            e.deactivated_at = o.deactivated_at.unwrap_or(0);
            e.changed_by = o.changed_by;
            e.reason = o.reason;
        }
        Ok(Response::new(pb::ListOwnersResponse {
            owners: owners.into_values().collect(),
        }))
    }

    async fn report(
        &self,
        req: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let ctx = context(&req);
        self.broker
            .authorize_admin(&ctx, "report.read", "")
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let g = &self.broker.config().governance;
        let opts = crate::govern::ReportOptions {
            unused_after: secs(r.unused_after_seconds).unwrap_or(g.unused_after),
            expiring_within: secs(r.expiring_within_seconds).unwrap_or(g.expiring_within),
            max_ttl_policy: secs(r.max_ttl_policy_seconds).unwrap_or(g.max_ttl_policy),
        };
        let report = self
            .broker
            .report(&opts)
            .await
            .map_err(|e| status(e, &ctx))?;
        let json = serde_json::to_string(&report)
            .map_err(|e| status(BrokerError::Internal(e.to_string()), &ctx))?;
        Ok(Response::new(pb::ReportResponse { json }))
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let ctx = context(&req);
        self.broker
            .authorize_admin(&ctx, "keys.read", "")
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(keys(&self.broker)))
    }

    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let ctx = context(&req);
        self.broker
            .authorize_admin(&ctx, "audit.read", "")
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let q = crate::admin::AuditQuery {
            from_seq: r.from_sequence,
            limit: if r.limit == 0 { 1000 } else { r.limit as usize },
            since_nanos: r.since_unix_nanos,
            identity: Some(r.identity).filter(|s| !s.is_empty()),
            action: Some(r.action).filter(|s| !s.is_empty()),
            last: r.last as usize,
        };
        let (entries, next) = self
            .broker
            .audit_entries(&q)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(pb::ListAuditResponse {
            entries: entries
                .into_iter()
                .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
                .collect(),
            next_sequence: next,
        }))
    }

    type BackupStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

    async fn backup(
        &self,
        req: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let ctx = context(&req);
        let rx = self
            .broker
            .backup(&ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        let out = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            move |chunk| {
                chunk
                    .map(|data| pb::BackupChunk { data })
                    .map_err(|e| status(e, &ctx))
            },
        );
        Ok(Response::new(Box::pin(out)))
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let ctx = context(&req);
        self.broker
            .authorize_admin(&ctx, "audit.read", "")
            .await
            .map_err(|e| status(e, &ctx))?;
        let report = self
            .broker
            .verify_audit()
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(match report {
            ChainReport::Intact { entries } => pb::VerifyAuditResponse {
                intact: true,
                entries,
                first_bad_sequence: 0,
                reason: String::new(),
            },
            ChainReport::Broken { seq, reason } => pb::VerifyAuditResponse {
                intact: false,
                entries: 0,
                first_bad_sequence: seq,
                reason,
            },
        }))
    }

    async fn approve(
        &self,
        req: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(&ctx, "approval.grant", &req.get_ref().id_or_spiffe_id)
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let rec = self
            .broker
            .approve(
                &op,
                &r.id_or_spiffe_id,
                r.scopes,
                std::time::Duration::from_secs(u64::from(r.ttl_seconds)),
                &r.reason,
                &ctx,
            )
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(approval(&self.broker, rec)))
    }

    async fn list_approvals(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        let ctx = context(&req);
        self.broker
            .authorize_admin(&ctx, "approval.read", &req.get_ref().id_or_spiffe_id)
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let list = self
            .broker
            .approvals(
                (!r.id_or_spiffe_id.is_empty()).then_some(r.id_or_spiffe_id.as_str()),
                r.all,
            )
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(pb::ListApprovalsResponse {
            approvals: list
                .into_iter()
                .map(|a| approval(&self.broker, a))
                .collect(),
        }))
    }

    async fn revoke_approval(
        &self,
        req: Request<pb::RevokeApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(&ctx, "approval.revoke", &req.get_ref().id)
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let rec = self
            .broker
            .revoke_approval(&op, &r.id, &r.reason, &ctx)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(approval(&self.broker, rec)))
    }

    async fn reload_policy(
        &self,
        req: Request<pb::ReloadPolicyRequest>,
    ) -> Result<Response<pb::ReloadPolicyResponse>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(&ctx, "policy.reload", "")
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = self
            .broker
            .reload_policy(&op.actor(), &ctx.request_id)
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(pb::ReloadPolicyResponse {
            policy_ids: r.policy_ids,
            files: r.files,
        }))
    }

    async fn issue_operator_credential(
        &self,
        req: Request<pb::IssueOperatorCredentialRequest>,
    ) -> Result<Response<pb::IssueOperatorCredentialResponse>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_admin(&ctx, "operator.issue", &req.get_ref().name)
            .await
            .map_err(|e| status(e, &ctx))?;
        let r = req.into_inner();
        let c = self
            .broker
            .issue_operator_credential(
                &op,
                &r.name,
                &r.role,
                &r.csr,
                secs(u64::from(r.ttl_seconds)),
                &ctx,
            )
            .await
            .map_err(|e| status(e, &ctx))?;
        Ok(Response::new(pb::IssueOperatorCredentialResponse {
            cert_chain: c.chain,
            spiffe_id: c.spiffe_id,
            serial: c.serial,
            expires_at: c.expires_at,
        }))
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let ctx = context(&req);
        let op = self
            .broker
            .authorize_operator(&ctx)
            .map_err(|e| status(e, &ctx))?;
        let spiffe_id = ctx
            .peer
            .as_ref()
            .and_then(|p| p.spiffe_id.as_ref())
            .map(ToString::to_string)
            .unwrap_or_default();
        Ok(Response::new(pb::WhoAmIResponse {
            name: op.name,
            role: op.role,
            spiffe_id,
        }))
    }
}

fn approval(broker: &Broker, a: crate::model::ApprovalRecord) -> pb::Approval {
    pb::Approval {
        spiffe_id: broker
            .registry()
            .get(&a.identity_id)
            .map(|r| r.spiffe_id.to_string())
            .unwrap_or_default(),
        id: a.id,
        identity_id: a.identity_id,
        scopes: a.scopes.into_iter().collect(),
        created_at: a.created_at,
        expires_at: a.expires_at,
        approved_by: a.approved_by,
        reason: a.reason,
        revoked_at: a.revoked_at.unwrap_or(0),
    }
}
