//! Delegated tokens (RFC 8693 token exchange semantics), for AI agents and other intermediaries
//! acting on behalf of a workload with less authority than it has.
//!
//! The caller (the **actor**) proves itself with its own X.509-SVID over mTLS and presents the
//! **subject**'s JWT-SVID. It receives a JWT-SVID whose `sub` is still the subject, with:
//! - audiences: a non-empty subset of the subject token's; scopes: a subset of its scopes;
//! - a lifetime no longer than what the subject token has left (nor the default JWT TTL,
//!   unless asked for less);
//! - `act`: the caller, nesting any earlier actors (`{"sub": caller, "act": {...}}`), at most
//!   `exchange.max_depth` deep;
//! - `sigil_gen`: the subject identity's generation, so revoking the subject's identity
//!   invalidates every token derived from its credentials.
//!
//! Gates: gate 1 for the actor's own identity; the subject token must verify, be unrevoked and
//! of the subject identity's current generation, and the subject identity must be active;
//! gate 2 is the subset rule; gate 3 is Cedar action `exchange` (principal: the actor,
//! resource: each audience, context: subject, actors, depth, TTL, scopes) — no built-in policy
//! permits it, so an operator must write one.

use std::time::Duration;

use serde_json::json;
use sigil_pki::jwt::VerifyOptions;
use sigil_pki::{JwtSvidClaims, SecretString, SpiffeId, ids};

use crate::audit::{AuditDraft, Decision};
use crate::authz::{Ask, GateId, Grant};
use crate::broker::{Broker, RequestContext};
use crate::clock::unix_secs;
use crate::error::BrokerError;
use crate::issue::IssuedJwt;
use crate::model::{CredentialKind, IdentityStatus, LedgerRecord};
use crate::policy::{Principal, Resource, ctx as cx};
use crate::store::{Change, Conflict, Op, StoreError};

/// What the actor asks for.
#[derive(Debug, Clone)]
pub struct ExchangeAsk {
    /// The subject's JWT-SVID.
    pub subject_token: SecretString,
    /// Subset of its audiences.
    pub audiences: Vec<String>,
    /// Subset of its scopes.
    pub scopes: Vec<String>,
    /// Wanted lifetime.
    pub ttl: Option<Duration>,
}

impl Broker {
    /// Audits a refused exchange (every gate's denial is audited) and returns the refusal.
    async fn refuse_exchange(
        &self,
        actor: &crate::attest::Attested,
        parent_jti: Option<&str>,
        ctx: &RequestContext,
        gate: GateId,
        reason: String,
    ) -> BrokerError {
        let mut draft = AuditDraft::new(
            self.now_nanos(),
            &actor.actor,
            "jwt.exchange",
            &actor.identity.id,
            Decision::Deny,
            &reason,
            &ctx.request_id,
        )
        .gate(gate.code());
        if let Some(jti) = parent_jti {
            draft = draft.with("parent_jti", jti.to_owned());
        }
        self.audit_only(vec![draft]).await;
        metrics::counter!("sigil_issuance_total", "kind" => "jwt", "result" => "denied", "gate" => gate.code()).increment(1);
        BrokerError::Denied { gate, reason }
    }

    /// Exchanges a subject's JWT-SVID for a narrower one naming the caller as actor.
    pub async fn exchange_jwt(
        &self,
        ask: ExchangeAsk,
        ctx: &RequestContext,
    ) -> Result<(IssuedJwt, Vec<SpiffeId>), BrokerError> {
        if ask.audiences.is_empty() {
            return Err(BrokerError::invalid(
                "audiences",
                "at least one audience (a subset of the subject token's) is required",
            ));
        }
        // Bounded and deduplicated before anything is compared with them.
        let max = self.cfg.limits.max_audiences;
        let mut ask = ask;
        ask.audiences =
            crate::issue::bounded_list("audiences", ask.audiences, max, crate::issue::name)?;
        ask.scopes = crate::issue::bounded_list("scopes", ask.scopes, max, crate::issue::name)?;
        let actor = self.attest_peer(ctx, "jwt.exchange").await?;
        // Gate 1 for the actor itself.
        self.run_gates_exchange_actor(&actor, ctx).await?;

        let now = self.clock.now();
        let now_s = unix_secs(now);
        let ring = self.keys.current();
        let token = ask.subject_token.expose_secret();
        let parent = sigil_pki::jwt::verify(
            token,
            &ring.jwt_keys,
            &VerifyOptions {
                now,
                skew: Duration::ZERO,
                audience: None,
                trust_domain: Some(&self.td),
            },
        )
        .map_err(|e| BrokerError::invalid("subject_token", format!("does not verify: {e}")))?;
        let kid = raw_kid(token);
        if ring.is_revoked(&kid) {
            return Err(BrokerError::invalid(
                "subject_token",
                "its signing key was revoked",
            ));
        }
        let p = parent.claims;
        if self.is_revoked(CredentialKind::Jwt, &p.jti) {
            return Err(BrokerError::invalid("subject_token", "it was revoked"));
        }
        if let Some(j) = p
            .parents
            .iter()
            .find(|j| self.is_revoked(CredentialKind::Jwt, j))
        {
            return Err(BrokerError::invalid(
                "subject_token",
                format!("it was exchanged from token {j}, which was revoked"),
            ));
        }
        if let Some(why) = self.identity_inactive(p.sub.as_str(), p.generation) {
            return Err(BrokerError::invalid("subject_token", why));
        }
        let subject = self.registry.by_spiffe_id(p.sub.as_str()).ok_or_else(|| {
            BrokerError::invalid("subject_token", "its identity no longer exists")
        })?;
        if subject.status != IdentityStatus::Active || subject.expires_at <= now_s {
            return Err(self
                .refuse_exchange(
                    &actor,
                    Some(&p.jti),
                    ctx,
                    GateId::IdentityProof,
                    format!(
                        "the subject identity {} is {}; nothing can be derived from its tokens",
                        subject.spiffe_id,
                        if subject.expires_at <= now_s {
                            "expired"
                        } else {
                            subject.status.as_str()
                        }
                    ),
                )
                .await);
        }
        // Only narrower.
        let wider = if let Some(a) = ask.audiences.iter().find(|a| !p.aud.contains(a)) {
            Some(format!(
                "audience {a:?} is not among the subject token's ({}); an exchange only narrows",
                p.aud.join(", ")
            ))
        } else {
            ask.scopes.iter().find(|s| !p.scopes.contains(s)).map(|s| {
                format!(
                    "scope {s:?} is not among the subject token's ({}); an exchange only narrows",
                    if p.scopes.is_empty() {
                        "none".to_owned()
                    } else {
                        p.scopes.join(", ")
                    }
                )
            })
        };
        if let Some(reason) = wider {
            return Err(self
                .refuse_exchange(&actor, Some(&p.jti), ctx, GateId::EntitlementScope, reason)
                .await);
        }
        let mut actors = vec![actor.identity.spiffe_id.clone()];
        actors.extend(p.actors.iter().cloned());
        if actors.len() > self.cfg.exchange.max_depth {
            return Err(self
                .refuse_exchange(
                    &actor,
                    Some(&p.jti),
                    ctx,
                    GateId::RequestPolicy,
                    format!(
                        "the actor chain would be {} long; the limit is exchange.max_depth = {}",
                        actors.len(),
                        self.cfg.exchange.max_depth
                    ),
                )
                .await);
        }
        let left = (p.exp - now_s).max(0) as u64;
        let wanted = ask
            .ttl
            .unwrap_or(self.cfg.issuance.default_jwt_ttl)
            .as_secs();
        let ttl = wanted.min(left);
        if ttl == 0 {
            return Err(BrokerError::invalid("subject_token", "it has expired"));
        }
        let mut grant = Grant {
            ttl: Duration::from_secs(ttl),
            clamped: ttl < wanted,
            notice: if ttl < wanted {
                format!("lifetime cut to {ttl}s: the subject token expires then")
            } else {
                String::new()
            },
        };

        // Gate 3: Cedar, action exchange, one decision per audience.
        let mut context = vec![
            ("subject".to_owned(), cx::s(p.sub.as_str())),
            (
                "actors".to_owned(),
                cx::set(p.actors.iter().map(|a| a.to_string())),
            ),
            ("depth".to_owned(), cx::n(actors.len() as i64)),
            ("ttl_secs".to_owned(), cx::n(ttl as i64)),
            ("audiences".to_owned(), cx::set(ask.audiences.clone())),
            ("scopes".to_owned(), cx::set(ask.scopes.clone())),
        ];
        if let Some(r) = ctx.remote {
            context.push(("source".to_owned(), cx::ip(r.ip())));
        }
        context.extend(cx::time(now_s));
        let mut policies = std::collections::BTreeSet::new();
        for a in &ask.audiences {
            let d = self.policy.authorize(
                Principal::Identity(&actor.identity),
                "exchange",
                Resource::Audience(a),
                || context.clone(),
            );
            if !d.allowed {
                let reason = if d.policies.is_empty() {
                    format!(
                        "no policy permits {} to exchange tokens of {} (audience {a:?}); token exchange needs a permit rule for action exchange",
                        actor.identity.spiffe_id, p.sub
                    )
                } else {
                    format!("{} (audience {a:?})", d.reason)
                };
                let draft = AuditDraft::new(
                    self.now_nanos(),
                    &actor.actor,
                    "jwt.exchange",
                    &subject.id,
                    Decision::Deny,
                    &reason,
                    &ctx.request_id,
                )
                .gate(GateId::RequestPolicy.code())
                .with("policies", d.policies)
                .with("parent_jti", p.jti.clone())
                .with("actor", actor.identity.spiffe_id.as_str());
                self.audit_only(vec![draft]).await;
                metrics::counter!("sigil_issuance_total", "kind" => "jwt", "result" => "denied", "gate" => GateId::RequestPolicy.code()).increment(1);
                return Err(BrokerError::Denied {
                    gate: GateId::RequestPolicy,
                    reason,
                });
            }
            policies.extend(d.policies);
        }

        let exp = now_s + grant.ttl.as_secs() as i64;
        let jti = ids::jti_to_string(&ids::new_jti(now));
        let claims = JwtSvidClaims {
            iss: self.cfg.jwt_issuer.clone(),
            sub: p.sub.clone(),
            aud: ask.audiences.clone(),
            exp,
            iat: now_s,
            jti: jti.clone(),
            scopes: ask.scopes.clone(),
            generation: subject.generation,
            actors: actors.clone(),
            parents: std::iter::once(p.jti.clone())
                .chain(p.parents.iter().cloned())
                .collect(),
        };
        let signed = SecretString::new(ring.jwt.sign(&claims)?);
        let ledger = LedgerRecord {
            credential_id: jti.clone(),
            kind: CredentialKind::Jwt,
            identity_id: subject.id.clone(),
            spiffe_id: subject.spiffe_id.to_string(),
            generation: subject.generation,
            audiences: ask.audiences.clone(),
            scopes: ask.scopes.clone(),
            dns_names: Vec::new(),
            issued_at: now_s,
            expires_at: exp,
            signing_key_id: ring.jwt.kid().to_owned(),
            attestation: "exchange".into(),
            source: ctx.remote.map(|a| a.ip().to_string()).unwrap_or_default(),
        };
        let audit = AuditDraft::new(
            self.now_nanos(),
            &actor.actor,
            "jwt.exchange",
            &subject.id,
            Decision::Allow,
            "issued",
            &ctx.request_id,
        )
        .with("jti", jti.clone())
        .with("parent_jti", p.jti.clone())
        .with("spiffe_id", subject.spiffe_id.as_str())
        .with(
            "actors",
            json!(actors.iter().map(|a| a.as_str()).collect::<Vec<_>>()),
        )
        .with("audiences", json!(ask.audiences))
        .with("scopes", json!(ask.scopes))
        .with("expires_at", exp)
        .with("ttl_secs", grant.ttl.as_secs())
        .with("policies", json!(policies))
        .gate(GateId::RequestPolicy.code());
        let change = Change {
            ops: vec![
                Op::AssertIdentityRevision {
                    id: subject.id.clone(),
                    revision: subject.revision,
                },
                Op::AssertIdentityRevision {
                    id: actor.identity.id.clone(),
                    revision: actor.identity.revision,
                },
                Op::AppendLedger(ledger),
            ],
            audit: vec![audit],
        };
        match self.store.commit(change).await {
            Ok(_) => {}
            Err(StoreError::Conflict(Conflict::StaleRevision { .. })) => {
                return Err(BrokerError::Unavailable(
                    "an identity changed while the token was being exchanged; retry".into(),
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, "could not commit an exchange; refusing (fail closed)");
                return Err(BrokerError::from(e));
            }
        }
        metrics::counter!("sigil_issuance_total", "kind" => "jwt", "result" => "issued")
            .increment(1);
        grant.ttl = Duration::from_secs((exp - now_s) as u64);
        Ok((
            IssuedJwt {
                token: signed,
                spiffe_id: subject.spiffe_id.clone(),
                audiences: ask.audiences,
                scopes: ask.scopes,
                jti,
                expires_at: exp,
                issued_at: now_s,
                grant,
            },
            actors,
        ))
    }

    /// Gate 1 on the actor's own identity (its status, expiry and certificate generation).
    async fn run_gates_exchange_actor(
        &self,
        actor: &crate::attest::Attested,
        ctx: &RequestContext,
    ) -> Result<(), BrokerError> {
        let now = self.clock.unix();
        let mc = crate::authz::MintContext {
            identity: &actor.identity,
            method: actor.method.as_str(),
            presented_generation: actor.presented_generation,
            evidence_issued_at: actor.evidence_issued_at,
            evidence_seq: actor.evidence_seq,
            ask: Ask::Attest,
            requested_ttl: None,
            default_ttl: Duration::ZERO,
            now,
            selectors: &actor.selectors,
            source: ctx.remote.map(|a| a.ip()),
            approvals: &Default::default(),
        };
        use crate::authz::Gate as _;
        let mut g = Grant {
            ttl: Duration::ZERO,
            clamped: false,
            notice: String::new(),
        };
        if let Err(reason) = crate::authz::IdentityProof.check(&mc, &mut g) {
            return Err(self
                .refuse_exchange(actor, None, ctx, GateId::IdentityProof, reason)
                .await);
        }
        Ok(())
    }
}

fn raw_kid(token: &str) -> String {
    sigil_pki::jwt::peek_unverified(token)
        .ok()
        .and_then(|(h, _)| h.get("kid").and_then(|k| k.as_str()).map(str::to_owned))
        .unwrap_or_default()
}
