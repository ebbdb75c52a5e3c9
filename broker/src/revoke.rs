//! Revocation: one credential, everything an identity holds, a reported leak; pruning; and
//! RFC 7662-style introspection.
//!
//! Revoking an identity bumps its generation (which the broker checks on every mTLS call and
//! JWT-SVIDs carry) *and* lists each of its live credentials explicitly, so CRLs and offline
//! verifiers that know nothing about generations enforce it too. Live credentials are found in
//! the ledger: anything issued within the longest possible lifetime and not yet expired.

use serde_json::json;
use sigil_pki::{VerifyOptions, ids};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::audit::{AuditDraft, Decision};
use crate::authz::Operator;
use crate::broker::{Broker, RequestContext};
use crate::error::BrokerError;
use crate::model::{
    CredentialKind, IdentityRecord, IdentityStatus, LedgerRecord, RevocationRecord, credential_key,
};
use crate::store::{Change, Op};

/// How a credential was revoked before its expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRevocation {
    /// `credential`, `generation` or `key`.
    pub how: &'static str,
    /// Unix seconds (0 when not known).
    pub revoked_at: i64,
    /// Why.
    pub reason: String,
    /// Who.
    pub revoked_by: String,
}

/// What a revocation or leak report did (or, on a dry run, would do).
#[derive(Debug, Clone)]
pub struct RevocationReport {
    /// The identity after the change (unchanged on a dry run).
    pub identity: IdentityRecord,
    /// The leaked credential, for leak reports.
    pub leaked: Option<LedgerRecord>,
    /// The identity's live credentials: the blast radius.
    pub live: Vec<LedgerRecord>,
    /// Nothing was changed.
    pub dry_run: bool,
    /// The audit sequence of the incident entry.
    pub audit_seq: Option<u64>,
}

/// The result of introspection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Introspection {
    /// Whether the credential is valid right now.
    pub active: bool,
    /// Why not, when not.
    pub reason: String,
    /// `jwt` or `x509`.
    pub kind: String,
    /// SPIFFE ID.
    pub sub: String,
    /// Audiences.
    pub aud: Vec<String>,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Expiry.
    pub exp: i64,
    /// Issue time.
    pub iat: i64,
    /// jti or serial.
    pub id: String,
    /// Identity generation.
    pub generation: u64,
}

/// A credential a leak report names, once its signature checks out.
struct Genuine {
    kind: CredentialKind,
    id: String,
    spiffe_id: String,
    signing_key_id: String,
    expires_at: i64,
}

fn revocation(r: &LedgerRecord, now: i64, reason: &str, by: &str) -> RevocationRecord {
    RevocationRecord {
        credential_id: r.credential_id.clone(),
        kind: r.kind,
        identity_id: r.identity_id.clone(),
        spiffe_id: r.spiffe_id.clone(),
        signing_key_id: r.signing_key_id.clone(),
        expires_at: r.expires_at,
        revoked_at: now,
        reason: reason.to_owned(),
        revoked_by: by.to_owned(),
    }
}

fn ledger_json(r: &LedgerRecord) -> serde_json::Value {
    json!({"id": r.credential_id, "kind": r.kind.as_str(), "audiences": r.audiences, "expires_at": r.expires_at})
}

impl Broker {
    /// Whether the credential with this id is revoked.
    pub fn is_revoked(&self, kind: CredentialKind, id: &str) -> bool {
        credential_key(kind, id).is_some_and(|k| self.revocations.contains(&k))
    }

    /// How a credential was revoked before its expiry, if it was.
    pub fn revocation_of(&self, r: &LedgerRecord) -> Option<CredentialRevocation> {
        if let Some(rev) =
            credential_key(r.kind, &r.credential_id).and_then(|k| self.revocations.get(&k))
        {
            return Some(CredentialRevocation {
                how: "credential",
                revoked_at: rev.revoked_at,
                reason: rev.reason,
                revoked_by: rev.revoked_by,
            });
        }
        if self.keys.current().is_revoked(&r.signing_key_id) {
            return Some(CredentialRevocation {
                how: "key",
                revoked_at: 0,
                reason: format!("the key that signed it ({}) was revoked", r.signing_key_id),
                revoked_by: String::new(),
            });
        }
        let identity = self.registry.get(&r.identity_id)?;
        (r.generation < identity.generation).then(|| CredentialRevocation {
            how: "generation",
            revoked_at: 0,
            reason: format!(
                "everything its identity held was revoked (generation {} -> {})",
                r.generation, identity.generation
            ),
            revoked_by: String::new(),
        })
    }

    /// Whether a ledger record is live at `now`: unexpired, not revoked, and of its
    /// identity's current generation (a generation bump revokes everything minted before).
    pub fn is_live(&self, r: &LedgerRecord, now: i64) -> bool {
        r.expires_at > now
            && !self.is_revoked(r.kind, &r.credential_id)
            && self
                .registry
                .get(&r.identity_id)
                .is_none_or(|i| r.generation >= i.generation)
    }

    /// The live, not yet revoked credentials of an identity, oldest first.
    pub async fn live_credentials(
        &self,
        identity: &IdentityRecord,
    ) -> Result<Vec<LedgerRecord>, BrokerError> {
        let now = self.clock.unix();
        // Nothing issued earlier than the longest allowed lifetime can still be live.
        let since = now - self.cfg.issuance.max_ttl_ceiling.as_secs() as i64 - 60;
        let recs = self
            .store
            .ledger_since(since, Some(identity.id.clone()))
            .await?;
        Ok(recs
            .into_iter()
            .filter(|r| self.is_live(r, now) && r.generation >= identity.generation)
            .collect())
    }

    /// Revokes one credential by serial (hex) or `jti`.
    pub async fn revoke_credential(
        &self,
        op: &Operator,
        id: &str,
        reason: &str,
        ctx: &RequestContext,
    ) -> Result<(LedgerRecord, Option<CredentialRevocation>), BrokerError> {
        let rec = self.credential(id).await?;
        let now = self.clock.unix();
        // Revoking twice changes nothing, and says so (and when).
        if let Some(before) = self.revocation_of(&rec) {
            return Ok((rec, Some(before)));
        }
        if rec.expires_at <= now {
            return Err(BrokerError::FailedPrecondition(format!(
                "credential {} already expired at {}",
                rec.credential_id,
                crate::clock::rfc3339(rec.expires_at)
            )));
        }
        let reason = if reason.trim().is_empty() {
            "revoked by an operator"
        } else {
            reason.trim()
        };
        let draft = AuditDraft::new(
            self.now_nanos(),
            op.actor(),
            "credential.revoke",
            &rec.identity_id,
            Decision::Allow,
            reason,
            &ctx.request_id,
        )
        .with("credential", ledger_json(&rec))
        .with("spiffe_id", rec.spiffe_id.as_str());
        self.store
            .commit(Change {
                ops: vec![Op::PutRevocation(revocation(
                    &rec,
                    now,
                    reason,
                    &op.actor(),
                ))],
                audit: vec![draft],
            })
            .await?;
        Ok((rec, None))
    }

    /// Revokes everything an identity holds: bumps its generation and lists each live
    /// credential; then leaves it active, suspends it, or retires it for good.
    #[allow(clippy::too_many_arguments)]
    pub async fn revoke_identity(
        &self,
        op: &Operator,
        target: &str,
        reason: &str,
        suspend: bool,
        retire: bool,
        dry_run: bool,
        ctx: &RequestContext,
    ) -> Result<RevocationReport, BrokerError> {
        let (status, action, default_reason) = if retire {
            (Some(IdentityStatus::Retired), "identity.retire", "retired")
        } else if suspend {
            (
                Some(IdentityStatus::Suspended),
                "identity.revoke",
                "revoked by an operator",
            )
        } else {
            (None, "identity.revoke", "revoked by an operator")
        };
        let reason = if reason.trim().is_empty() {
            default_reason
        } else {
            reason.trim()
        };
        self.revoke_all(
            &op.actor(),
            target,
            reason,
            status,
            None,
            dry_run,
            action,
            ctx,
        )
        .await
    }

    /// Handles a leaked JWT-SVID or certificate: checks it is genuinely Sigil's, revokes it and
    /// everything its identity holds, marks the identity compromised (renewal refused; only a
    /// fresh attestation restores it) and records an incident naming the blast radius.
    pub async fn report_leak(
        &self,
        op: &Operator,
        material: &str,
        reason: &str,
        dry_run: bool,
        ctx: &RequestContext,
    ) -> Result<RevocationReport, BrokerError> {
        let received = std::time::Instant::now();
        let g = self.genuine(material)?;
        let ledger = match credential_key(g.kind, &g.id) {
            Some(k) => self.store.ledger_record(&k).await?,
            None => None,
        };
        let identity_id = match &ledger {
            Some(l) => l.identity_id.clone(),
            None => self
                .registry
                .by_spiffe_id(&g.spiffe_id)
                .map(|r| r.id.clone())
                .ok_or_else(|| {
                    BrokerError::NotFound(format!(
                        "the credential is Sigil's, but no identity has SPIFFE ID {} any more",
                        g.spiffe_id
                    ))
                })?,
        };
        let leaked = ledger.unwrap_or_else(|| LedgerRecord {
            credential_id: g.id.clone(),
            kind: g.kind,
            identity_id: identity_id.clone(),
            spiffe_id: g.spiffe_id.clone(),
            generation: 0,
            audiences: Vec::new(),
            scopes: Vec::new(),
            dns_names: Vec::new(),
            issued_at: 0,
            expires_at: g.expires_at,
            signing_key_id: g.signing_key_id.clone(),
            attestation: String::new(),
            source: String::new(),
        });
        let reason = if reason.trim().is_empty() {
            "credential leaked"
        } else {
            reason.trim()
        };
        let report = self
            .revoke_all(
                &op.actor(),
                &identity_id,
                reason,
                Some(IdentityStatus::Compromised),
                Some(leaked),
                dry_run,
                "incident.leak",
                ctx,
            )
            .await?;
        if !dry_run {
            // The revocation is durable and has been pushed to watchers (the commit observer
            // runs before the commit returns): record how long that took from the report.
            let ms = received.elapsed().as_secs_f64() * 1000.0;
            let draft = AuditDraft::new(
                self.now_nanos(),
                op.actor(),
                "incident.enforced",
                &identity_id,
                Decision::Allow,
                "revocation durable and pushed",
                &ctx.request_id,
            )
            .with("enforced_in_ms", ms)
            .with("incident", report.audit_seq.unwrap_or(0));
            self.audit_only(vec![draft]).await;
        }
        Ok(report)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn revoke_all(
        &self,
        actor: &str,
        target: &str,
        reason: &str,
        status: Option<IdentityStatus>,
        leaked: Option<LedgerRecord>,
        dry_run: bool,
        action: &str,
        ctx: &RequestContext,
    ) -> Result<RevocationReport, BrokerError> {
        // A concurrent mint may land between reading the live set and committing; the revision
        // assertion below makes that mint fail instead (it re-runs against the new record).
        for _ in 0..5 {
            let identity = self.find_identity(target).await?;
            if identity.status == IdentityStatus::Retired {
                return Err(BrokerError::FailedPrecondition(format!(
                    "identity {} is retired; everything it held is already revoked",
                    identity.spiffe_id
                )));
            }
            let mut live = self.live_credentials(&identity).await?;
            if let Some(l) = &leaked {
                live.retain(|r| r.credential_id != l.credential_id);
            }
            if dry_run {
                return Ok(RevocationReport {
                    identity: (*identity).clone(),
                    leaked,
                    live,
                    dry_run: true,
                    audit_seq: None,
                });
            }
            let now = self.clock.unix();
            let mut next = match status {
                Some(s) => crate::registry::transition(&identity, s, reason, actor, now),
                None => crate::registry::revise(&identity, actor, now),
            };
            next.generation += 1;
            let mut ops = vec![Op::UpdateIdentity {
                record: next.clone(),
                expected_revision: identity.revision,
            }];
            let mut revoked = Vec::new();
            if let Some(l) = &leaked
                && l.expires_at > now
                && !self.is_revoked(l.kind, &l.credential_id)
            {
                ops.push(Op::PutRevocation(revocation(l, now, reason, actor)));
            }
            for r in &live {
                ops.push(Op::PutRevocation(revocation(r, now, reason, actor)));
                revoked.push(ledger_json(r));
            }
            let mut draft = AuditDraft::new(
                self.now_nanos(),
                actor,
                action,
                &identity.id,
                Decision::Allow,
                reason,
                &ctx.request_id,
            )
            .with("spiffe_id", identity.spiffe_id.as_str())
            .with("generation", next.generation)
            .with("status", next.status.as_str())
            .with("blast_radius", json!(revoked))
            .with(
                "audiences",
                json!(
                    live.iter()
                        .flat_map(|r| r.audiences.clone())
                        .collect::<std::collections::BTreeSet<_>>()
                ),
            );
            if let Some(l) = &leaked {
                draft = draft.with("leaked", ledger_json(l));
            }
            match self
                .store
                .commit(Change {
                    ops,
                    audit: vec![draft],
                })
                .await
            {
                Ok(c) => {
                    tracing::warn!(identity = %identity.spiffe_id, action, credentials = live.len(), "revoked everything an identity held");
                    return Ok(RevocationReport {
                        identity: next,
                        leaked,
                        live,
                        dry_run: false,
                        audit_seq: c.audit_seqs.first().copied(),
                    });
                }
                Err(crate::store::StoreError::Conflict(
                    crate::store::Conflict::StaleRevision { .. },
                )) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(BrokerError::Unavailable(
            "the identity kept changing while revoking; retry".into(),
        ))
    }

    /// Checks that `material` (a JWT or PEM certificate) was signed by one of this broker's
    /// keys, past or present.
    fn genuine(&self, material: &str) -> Result<Genuine, BrokerError> {
        let m = material.trim();
        let ring = self.keys.current();
        let foreign = |why: String| {
            BrokerError::invalid("material", format!("not issued by this broker: {why}"))
        };
        if m.starts_with("-----BEGIN") {
            let certs = sigil_pki::certs_from_pem(m.as_bytes())
                .map_err(|e| BrokerError::invalid("material", e.to_string()))?;
            let (_, leaf) = X509Certificate::from_der(&certs[0]).map_err(|_| {
                BrokerError::invalid(
                    "material",
                    "the first PEM block is not an X.509 certificate",
                )
            })?;
            let issuer = ring
                .intermediates
                .iter()
                .find(|i| {
                    X509Certificate::from_der(&i.cert)
                        .ok()
                        .is_some_and(|(_, ca)| leaf.verify_signature(Some(ca.public_key())).is_ok())
                })
                .ok_or_else(|| foreign("no Sigil signing CA signed this certificate".into()))?;
            let spiffe_id =
                crate::attest::x509::PeerCert::parse(&certs[0], &ring.operator_ca_subject)
                    .and_then(|p| p.spiffe_id.clone())
                    .ok_or_else(|| {
                        BrokerError::invalid("material", "the certificate has no SPIFFE ID")
                    })?;
            return Ok(Genuine {
                kind: CredentialKind::X509,
                id: ids::to_hex(leaf.raw_serial()),
                spiffe_id: spiffe_id.to_string(),
                signing_key_id: issuer.id.clone(),
                expires_at: leaf.validity().not_after.timestamp(),
            });
        }
        if m.split('.').count() == 3 {
            let (header, claims) = sigil_pki::jwt::peek_unverified(m)
                .map_err(|e| BrokerError::invalid("material", e.to_string()))?;
            let iat = claims
                .get("iat")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(0);
            // Check the signature at the token's own issue time: a leaked token is still
            // evidence after it expired.
            let at = crate::clock::from_unix(iat);
            let v = sigil_pki::jwt::verify(
                m,
                &ring.all_jwt_keys,
                &VerifyOptions {
                    now: at,
                    skew: std::time::Duration::from_secs(60),
                    audience: None,
                    trust_domain: Some(&self.td),
                },
            )
            .map_err(|e| foreign(e.to_string()))?;
            let kid = header
                .get("kid")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned();
            return Ok(Genuine {
                kind: CredentialKind::Jwt,
                id: v.claims.jti,
                spiffe_id: v.claims.sub.to_string(),
                signing_key_id: kid,
                expires_at: v.claims.exp,
            });
        }
        Err(BrokerError::invalid(
            "material",
            "expected a JWT or a PEM certificate",
        ))
    }

    /// Drops revocations of credentials that have expired anyway.
    pub async fn prune_revocations(&self) -> Result<usize, BrokerError> {
        let now = self.clock.unix();
        // Keep a minute past expiry for verifiers with slow clocks.
        let before = now - 60;
        let n = self
            .revocations
            .snapshot()
            .iter()
            .filter(|r| r.expires_at < before)
            .count();
        if n > 0 {
            self.store
                .commit(Change {
                    ops: vec![Op::PruneRevocations {
                        expired_before: before,
                    }],
                    audit: Vec::new(),
                })
                .await?;
        }
        Ok(n)
    }

    /// Drops ledger records past `rotation.ledger_retention`, a batch per commit so that
    /// issuance commits interleave. Returns how many went.
    pub async fn prune_ledger(&self) -> Result<usize, BrokerError> {
        const BATCH: usize = 2000;
        let before = self.clock.unix() - self.cfg.rotation.ledger_retention.as_secs() as i64;
        let mut total = 0;
        loop {
            let n = self.store.ledger_count_before(before, BATCH).await?;
            if n == 0 {
                return Ok(total);
            }
            self.store
                .commit(Change {
                    ops: vec![Op::PruneLedger {
                        issued_before: before,
                        limit: BATCH,
                    }],
                    audit: vec![
                        crate::audit::AuditDraft::new(
                            self.now_nanos(),
                            "sigil",
                            "ledger.prune",
                            "ledger",
                            crate::audit::Decision::Allow,
                            "ledger records past rotation.ledger_retention dropped",
                            "schedule",
                        )
                        .with("rows", n as u64)
                        .with("issued_before", before),
                    ],
                })
                .await?;
            total += n;
            if n < BATCH {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Introspects a JWT-SVID.
    pub fn introspect_token(&self, token: &str) -> Introspection {
        let ring = self.keys.current();
        let inactive = |reason: &str| Introspection {
            reason: reason.to_owned(),
            kind: "jwt".into(),
            ..Default::default()
        };
        let header = match sigil_pki::jwt::peek_unverified(token) {
            Ok((h, _)) => h,
            Err(e) => return inactive(&format!("not a JWT-SVID: {e}")),
        };
        let kid = header
            .get("kid")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        if ring.is_revoked(kid) {
            return inactive("its signing key was revoked");
        }
        let v = match sigil_pki::jwt::verify(
            token,
            &ring.jwt_keys,
            &VerifyOptions {
                now: self.clock.now(),
                skew: std::time::Duration::ZERO,
                audience: None,
                trust_domain: Some(&self.td),
            },
        ) {
            Ok(v) => v,
            Err(e) => return inactive(&e.to_string()),
        };
        let c = v.claims;
        if self.is_revoked(CredentialKind::Jwt, &c.jti) {
            return inactive("revoked");
        }
        if let Some(j) = c
            .parents
            .iter()
            .find(|j| self.is_revoked(CredentialKind::Jwt, j))
        {
            return inactive(&format!("exchanged from token {j}, which was revoked"));
        }
        if let Some(why) = self.identity_inactive(c.sub.as_str(), c.generation) {
            return inactive(&why);
        }
        Introspection {
            active: true,
            reason: String::new(),
            kind: "jwt".into(),
            sub: c.sub.to_string(),
            aud: c.aud,
            scopes: c.scopes,
            exp: c.exp,
            iat: c.iat,
            id: c.jti,
            generation: c.generation,
        }
    }

    /// Introspects an X.509-SVID (DER leaf).
    pub async fn introspect_certificate(&self, der: &[u8]) -> Introspection {
        let inactive = |reason: &str| Introspection {
            reason: reason.to_owned(),
            kind: "x509".into(),
            ..Default::default()
        };
        let ring = self.keys.current();
        let Ok((_, leaf)) = X509Certificate::from_der(der) else {
            return inactive("not an X.509 certificate");
        };
        let Some(issuer) = ring.intermediates.iter().find(|i| {
            X509Certificate::from_der(&i.cert)
                .ok()
                .is_some_and(|(_, ca)| leaf.verify_signature(Some(ca.public_key())).is_ok())
        }) else {
            return inactive("not issued by this broker");
        };
        if ring.is_revoked(&issuer.ski) {
            return inactive("its signing CA was revoked");
        }
        let now = self.clock.unix();
        if leaf.validity().not_after.timestamp() <= now
            || leaf.validity().not_before.timestamp() > now
        {
            return inactive("outside its validity period");
        }
        let serial = ids::to_hex(leaf.raw_serial());
        if self.is_revoked(CredentialKind::X509, &serial) {
            return inactive("revoked");
        }
        let Ok(Some(rec)) = self.store.ledger_record(leaf.raw_serial()).await else {
            return inactive("not in the issuance ledger");
        };
        if let Some(why) = self.identity_inactive(&rec.spiffe_id, rec.generation) {
            return inactive(&why);
        }
        Introspection {
            active: true,
            reason: String::new(),
            kind: "x509".into(),
            sub: rec.spiffe_id,
            aud: Vec::new(),
            scopes: Vec::new(),
            exp: rec.expires_at,
            iat: rec.issued_at,
            id: serial,
            generation: rec.generation,
        }
    }

    pub(crate) fn identity_inactive(&self, spiffe_id: &str, generation: u64) -> Option<String> {
        let Some(id) = self.registry.by_spiffe_id(spiffe_id) else {
            return Some("its identity no longer exists".into());
        };
        if generation < id.generation {
            return Some(format!(
                "its identity's credentials were revoked (generation {generation} < {})",
                id.generation
            ));
        }
        if id.status != IdentityStatus::Active {
            return Some(format!("its identity is {}", id.status));
        }
        None
    }
}
