//! Workload operations: attest and mint, end to end (ARCHITECTURE.md traces one request).
//!
//! evidence → attest → gates 1..n → CSR check → sign → ONE durable commit (join token
//! consumption + ledger records + audit entries) → reply. Nothing is returned unless that
//! commit succeeded; a denial is audited and explained.

use std::time::Duration;

use serde_json::json;
use sigil_pki::{
    CertificateDer, JwtSvidClaims, LeafSpec, LeafUsage, SecretString, SpiffeId, VerifiedCsr, ids,
};

use crate::attest::{self, AttestError, Attested};
use crate::audit::{AuditDraft, Decision};
use crate::authz::{Ask, Denial, Grant, MintContext};
use crate::broker::{Broker, RequestContext};
use crate::clock::unix_secs;
use crate::error::BrokerError;
use crate::keys::KeyRing;
use crate::model::{CredentialKind, IdentityStatus, LedgerRecord};
use crate::store::{Change, Conflict, Op, StoreError};

/// Evidence presented to [`Broker::attest`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Evidence {
    /// A one-time join token.
    JoinToken(SecretString),
    /// A JWT from a configured OIDC issuer.
    Oidc(SecretString),
    /// The caller's Unix peer credentials (only on the Unix socket; taken from the
    /// request context).
    Unix,
}

/// An X.509-SVID request.
#[derive(Debug, Clone, Default)]
pub struct X509Ask {
    /// DER PKCS#10.
    pub csr_der: Vec<u8>,
    /// Wanted lifetime (`None`: default).
    pub ttl: Option<Duration>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
}

/// A JWT-SVID request.
#[derive(Debug, Clone, Default)]
pub struct JwtAsk {
    /// Audiences (at least one).
    pub audiences: Vec<String>,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Wanted lifetime (`None`: default).
    pub ttl: Option<Duration>,
}

/// A minted X.509-SVID.
#[derive(Debug, Clone)]
pub struct IssuedX509 {
    /// The SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Leaf, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// Serial, hex.
    pub serial: String,
    /// notAfter, Unix seconds.
    pub expires_at: i64,
    /// Identity generation.
    pub generation: u64,
    /// What was granted.
    pub grant: Grant,
}

/// A minted JWT-SVID.
#[derive(Debug, Clone)]
pub struct IssuedJwt {
    /// The token.
    pub token: SecretString,
    /// The SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Audiences.
    pub audiences: Vec<String>,
    /// Scopes.
    pub scopes: Vec<String>,
    /// `jti`.
    pub jti: String,
    /// `exp`.
    pub expires_at: i64,
    /// `iat`.
    pub issued_at: i64,
    /// What was granted.
    pub grant: Grant,
}

/// The result of a successful attestation.
#[derive(Debug, Clone)]
pub struct Attestation {
    /// The first X.509-SVID.
    pub x509: IssuedX509,
    /// JWT-SVIDs asked for in the same call.
    pub jwts: Vec<IssuedJwt>,
}

struct Minted<T> {
    issued: T,
    ledger: LedgerRecord,
    audit: AuditDraft,
}

fn ttl_secs(d: Duration) -> u64 {
    d.as_secs()
}

/// An audience or scope as a request names it: 1-256 characters without spaces.
pub(crate) fn name(a: &str) -> Result<String, String> {
    if a.is_empty() || a.len() > 256 || a.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{:?} must be 1-256 characters without spaces",
            a.chars().take(64).collect::<String>()
        ));
    }
    Ok(a.to_owned())
}

/// A list from a request, bounded before any work on its elements: more than `max` entries is
/// refused outright (duplicates count, so a list cannot be padded past the check); then each
/// entry is checked (and normalised) by `each`, and repeats are dropped, keeping the first.
/// Linear in the list's length.
pub(crate) fn bounded_list(
    field: &str,
    list: Vec<String>,
    max: usize,
    each: impl Fn(&str) -> Result<String, String>,
) -> Result<Vec<String>, BrokerError> {
    if list.len() > max {
        return Err(BrokerError::invalid(
            field,
            format!("at most {max} entries (got {})", list.len()),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(list.len());
    let mut out = Vec::with_capacity(list.len());
    for item in &list {
        let v = each(item).map_err(|reason| BrokerError::invalid(field, reason))?;
        if seen.insert(v.clone()) {
            out.push(v);
        }
    }
    Ok(out)
}

/// How often an issuance is re-run when its identity changed between the gates and the commit.
const STALE_RETRIES: usize = 3;

impl Broker {
    /// Attests with `evidence` and mints the first X.509-SVID (and any JWT-SVIDs asked for).
    pub async fn attest(
        &self,
        evidence: Evidence,
        x509: X509Ask,
        jwts: Vec<JwtAsk>,
        ctx: &RequestContext,
    ) -> Result<Attestation, BrokerError> {
        let (x, jwts) = self
            .attest_as(&evidence, None, Some(x509), jwts, ctx)
            .await?;
        let x509 = x.ok_or_else(|| BrokerError::Internal("no certificate minted".into()))?;
        Ok(Attestation { x509, jwts })
    }

    /// Attests with `evidence` as `spiffe_id` (needed when selector-based evidence matches
    /// several identities) and mints an X.509-SVID if asked, and the JWT-SVIDs asked for.
    pub async fn attest_as(
        &self,
        evidence: &Evidence,
        spiffe_id: Option<&str>,
        x509: Option<X509Ask>,
        jwts: Vec<JwtAsk>,
        ctx: &RequestContext,
    ) -> Result<(Option<IssuedX509>, Vec<IssuedJwt>), BrokerError> {
        let x509 = x509.map(|x| self.check_x509_ask(x)).transpose()?;
        if jwts.len() > self.cfg.limits.max_jwts_per_request {
            return Err(BrokerError::invalid(
                "jwts",
                format!(
                    "at most {} JWT-SVIDs per call",
                    self.cfg.limits.max_jwts_per_request
                ),
            ));
        }
        let jwts = jwts
            .into_iter()
            .enumerate()
            .map(|(i, j)| self.check_jwt_ask(j, &format!("jwts[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let csr = match &x509 {
            Some(x) => Some(
                VerifiedCsr::from_der(&x.csr_der)
                    .map_err(|e| BrokerError::invalid("csr", e.to_string()))?,
            ),
            None => None,
        };
        for _ in 0..STALE_RETRIES {
            let now = self.clock.now();
            let now_s = unix_secs(now);
            let attested = match evidence {
                Evidence::JoinToken(t) => {
                    attest::join_token::attest(self.store.as_ref(), &self.registry, t, now_s).await
                }
                Evidence::Oidc(t) => {
                    attest::oidc::attest(&self.oidc, &self.registry, t, spiffe_id, now_s).await
                }
                Evidence::Unix => {
                    attest::unix::attest(
                        &self.unix_hashes,
                        &self.registry,
                        ctx.unix,
                        spiffe_id,
                        now_s,
                    )
                    .await
                }
            };
            let attested = match attested {
                Ok(a) => a,
                Err(e) => return Err(self.attestation_failed(e, "attest", ctx).await),
            };
            if let Some(want) = spiffe_id
                && attested.identity.spiffe_id.as_str() != want
            {
                return Err(BrokerError::invalid(
                    "spiffe_id",
                    format!(
                        "the evidence is for {}, not {want}",
                        attested.identity.spiffe_id
                    ),
                ));
            }
            self.run_gates(&attested, Ask::Attest, None, Duration::ZERO, "attest", ctx)
                .await?;
            let x509_grant = match &x509 {
                Some(x) => Some(
                    self.run_gates(
                        &attested,
                        Ask::X509 {
                            dns_names: &x.dns_names,
                        },
                        x.ttl,
                        self.cfg.issuance.default_x509_ttl,
                        "x509.mint",
                        ctx,
                    )
                    .await?,
                ),
                None => None,
            };
            let mut jwt_grants = Vec::with_capacity(jwts.len());
            for j in &jwts {
                let g = self
                    .run_gates(
                        &attested,
                        Ask::Jwt {
                            audiences: &j.audiences,
                            scopes: &j.scopes,
                        },
                        j.ttl,
                        self.cfg.issuance.default_jwt_ttl,
                        "jwt.mint",
                        ctx,
                    )
                    .await?;
                jwt_grants.push(g);
            }

            let ring = self.keys.current();
            let x = match (&x509, &csr, x509_grant) {
                (Some(ask), Some(csr), Some(grant)) => {
                    Some(self.sign_x509(&ring, &attested, csr, &ask.dns_names, grant, ctx, now)?)
                }
                _ => None,
            };
            let mut minted_jwts = Vec::with_capacity(jwts.len());
            for (j, (grant, trail)) in jwts.iter().zip(jwt_grants) {
                minted_jwts.push(self.sign_jwt(&ring, &attested, j, (grant, trail), ctx, now)?);
            }

            let mut change = Change::default();
            if let Some(h) = &attested.consume_join_token {
                change.ops.push(Op::ConsumeJoinToken {
                    hash: h.clone(),
                    now: now_s,
                });
            }
            let id = &attested.identity;
            if id.status == IdentityStatus::Compromised {
                // Fresh evidence (gate 1 checked it postdates the compromise) restores it.
                let restored = crate::registry::transition(
                    id,
                    IdentityStatus::Active,
                    &format!("restored by a fresh {} attestation", attested.method),
                    &attested.actor,
                    now_s,
                );
                change.ops.push(Op::UpdateIdentity {
                    record: restored,
                    expected_revision: id.revision,
                });
                change.audit.push(
                    AuditDraft::new(
                        self.now_nanos(),
                        &attested.actor,
                        "identity.restore",
                        &id.id,
                        Decision::Allow,
                        "compromised identity restored by fresh attestation",
                        &ctx.request_id,
                    )
                    .with("method", attested.method),
                );
            } else {
                change.ops.push(Op::AssertIdentityRevision {
                    id: id.id.clone(),
                    revision: id.revision,
                });
            }
            change.audit.push(
                AuditDraft::new(
                    self.now_nanos(),
                    &attested.actor,
                    "attest",
                    &id.id,
                    Decision::Allow,
                    "evidence accepted",
                    &ctx.request_id,
                )
                .with("method", attested.method)
                .with("spiffe_id", id.spiffe_id.as_str()),
            );
            let mut issued_x509 = None;
            if let Some(x) = x {
                change.ops.push(Op::AppendLedger(x.ledger));
                change.audit.push(x.audit);
                issued_x509 = Some(x.issued);
            }
            let mut issued_jwts = Vec::with_capacity(minted_jwts.len());
            for m in minted_jwts {
                change.ops.push(Op::AppendLedger(m.ledger));
                change.audit.push(m.audit);
                issued_jwts.push(m.issued);
            }
            match self.store.commit(change).await {
                Ok(_) => {
                    if issued_x509.is_some() {
                        metrics::counter!("sigil_issuance_total", "kind" => "x509", "result" => "issued").increment(1);
                    }
                    metrics::counter!("sigil_issuance_total", "kind" => "jwt", "result" => "issued").increment(issued_jwts.len() as u64);
                    return Ok((issued_x509, issued_jwts));
                }
                Err(StoreError::Conflict(Conflict::StaleRevision { .. })) => continue,
                // A concurrent use of the same join token won the race: nothing was issued here.
                Err(StoreError::Conflict(c)) => {
                    let reason = match c {
                        Conflict::JoinTokenUsed => attest::Reason::Used,
                        Conflict::JoinTokenExpired => attest::Reason::Expired,
                        _ => attest::Reason::Unknown,
                    };
                    let e = AttestError::Failed {
                        public: None,
                        method: attested.method,
                        reason,
                        actor: attested.actor.clone(),
                        identity_id: Some(id.id.clone()),
                        detail: c.to_string(),
                    };
                    return Err(self.attestation_failed(e, "attest", ctx).await);
                }
                Err(e) => return Err(self.commit_failed(e, "attest")),
            }
        }
        Err(self.kept_changing())
    }

    /// Renews the caller's X.509-SVID; the caller proves itself with its current one (mTLS).
    pub async fn mint_x509(
        &self,
        ask: X509Ask,
        ctx: &RequestContext,
    ) -> Result<IssuedX509, BrokerError> {
        let ask = self.check_x509_ask(ask)?;
        let csr = VerifiedCsr::from_der(&ask.csr_der)
            .map_err(|e| BrokerError::invalid("csr", e.to_string()))?;
        for _ in 0..STALE_RETRIES {
            let now = self.clock.now();
            let attested = self.attest_peer(ctx, "x509.mint").await?;
            let grant = self
                .run_gates(
                    &attested,
                    Ask::X509 {
                        dns_names: &ask.dns_names,
                    },
                    ask.ttl,
                    self.cfg.issuance.default_x509_ttl,
                    "x509.mint",
                    ctx,
                )
                .await?;
            let ring = self.keys.current();
            let m = self.sign_x509(&ring, &attested, &csr, &ask.dns_names, grant, ctx, now)?;
            if self
                .commit_issuance(&attested, m.ledger, m.audit, "x509.mint")
                .await?
            {
                metrics::counter!("sigil_issuance_total", "kind" => "x509", "result" => "issued")
                    .increment(1);
                return Ok(m.issued);
            }
        }
        Err(self.kept_changing())
    }

    /// Mints a JWT-SVID for the caller (mTLS).
    pub async fn mint_jwt(
        &self,
        ask: JwtAsk,
        ctx: &RequestContext,
    ) -> Result<IssuedJwt, BrokerError> {
        let ask = self.check_jwt_ask(ask, "request")?;
        for _ in 0..STALE_RETRIES {
            let now = self.clock.now();
            let attested = self.attest_peer(ctx, "jwt.mint").await?;
            let grant = self
                .run_gates(
                    &attested,
                    Ask::Jwt {
                        audiences: &ask.audiences,
                        scopes: &ask.scopes,
                    },
                    ask.ttl,
                    self.cfg.issuance.default_jwt_ttl,
                    "jwt.mint",
                    ctx,
                )
                .await?;
            let ring = self.keys.current();
            let m = self.sign_jwt(&ring, &attested, &ask, grant, ctx, now)?;
            if self
                .commit_issuance(&attested, m.ledger, m.audit, "jwt.mint")
                .await?
            {
                metrics::counter!("sigil_issuance_total", "kind" => "jwt", "result" => "issued")
                    .increment(1);
                return Ok(m.issued);
            }
        }
        Err(self.kept_changing())
    }

    /// Commits one issuance with its audit entry, asserting the identity is as the gates saw
    /// it. `Ok(false)`: it changed meanwhile; run the gates again.
    async fn commit_issuance(
        &self,
        attested: &Attested,
        ledger: LedgerRecord,
        audit: AuditDraft,
        action: &str,
    ) -> Result<bool, BrokerError> {
        let id = &attested.identity;
        let change = Change {
            ops: vec![
                Op::AssertIdentityRevision {
                    id: id.id.clone(),
                    revision: id.revision,
                },
                Op::AppendLedger(ledger),
            ],
            audit: vec![audit],
        };
        match self.store.commit(change).await {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict(Conflict::StaleRevision { .. })) => Ok(false),
            Err(e) => Err(self.commit_failed(e, action)),
        }
    }

    fn kept_changing(&self) -> BrokerError {
        BrokerError::Unavailable(
            "the identity kept changing while this credential was being issued; retry".into(),
        )
    }

    /// The X.509 request, checked: a CSR, and at most `limits.max_dns_names` valid DNS names
    /// (lower-cased, each once).
    fn check_x509_ask(&self, mut ask: X509Ask) -> Result<X509Ask, BrokerError> {
        if ask.csr_der.is_empty() {
            return Err(BrokerError::invalid(
                "csr",
                "is required (a DER PKCS#10 request; the private key stays with the workload)",
            ));
        }
        ask.dns_names = bounded_list(
            "dns_names",
            ask.dns_names,
            self.cfg.limits.max_dns_names,
            |d| {
                rustls_pki_types::DnsName::try_from(d)
                    .map(|_| d.to_ascii_lowercase())
                    .map_err(|_| format!("{d:?} is not a valid DNS name"))
            },
        )?;
        Ok(ask)
    }

    /// A JWT request, checked: at least one audience, and at most `limits.max_audiences`
    /// audiences and scopes, each once.
    fn check_jwt_ask(&self, mut ask: JwtAsk, field: &str) -> Result<JwtAsk, BrokerError> {
        if ask.audiences.is_empty() {
            return Err(BrokerError::invalid(
                format!("{field}.audiences"),
                "at least one audience is required",
            ));
        }
        let max = self.cfg.limits.max_audiences;
        ask.audiences = bounded_list(&format!("{field}.audiences"), ask.audiences, max, name)?;
        ask.scopes = bounded_list(&format!("{field}.scopes"), ask.scopes, max, name)?;
        Ok(ask)
    }

    pub(crate) async fn attest_peer(
        &self,
        ctx: &RequestContext,
        action: &str,
    ) -> Result<Attested, BrokerError> {
        let Some(peer) = &ctx.peer else {
            // On the Unix socket the kernel vouches for the caller on every call, as on the
            // SPIFFE Workload API: there is no client certificate to present there.
            if ctx.unix.is_some() {
                return match attest::unix::attest(
                    &self.unix_hashes,
                    &self.registry,
                    ctx.unix,
                    ctx.spiffe_id_hint.as_deref(),
                    self.clock.unix(),
                )
                .await
                {
                    Ok(a) => Ok(a),
                    Err(e) => Err(self.attestation_failed(e, action, ctx).await),
                };
            }
            return Err(BrokerError::Unauthenticated(
                "this call needs mutual TLS with your current X.509-SVID; attest first to get one"
                    .into(),
            ));
        };
        let ring = self.keys.current();
        let attested = attest::x509::attest(
            peer,
            &self.registry,
            &self.revocations,
            &ring,
            self.store.as_ref(),
            self.clock.unix(),
        )
        .await;
        match attested {
            Ok(a) => Ok(a),
            Err(e) => Err(self.attestation_failed(e, action, ctx).await),
        }
    }

    /// Who may follow the `Watch` feed: an operator; a workload presenting an unexpired
    /// certificate from this broker's workload CA (the TLS layer has checked the chain and the
    /// revocation set); on the Unix socket, a process that attests as an identity. A workload
    /// whose identity was bumped or whose CA was revoked keeps its feed — it must hear about
    /// revocations most of all — until its certificate expires. Returns the key its streams are
    /// counted under: the certificate's serial, or the process.
    pub(crate) async fn authorize_watch(
        &self,
        ctx: &RequestContext,
    ) -> Result<String, BrokerError> {
        if let Some(p) = &ctx.peer {
            if p.not_after <= self.clock.unix() {
                return Err(BrokerError::Unauthenticated(format!(
                    "the client certificate expired at {}; attest again",
                    crate::clock::rfc3339(p.not_after)
                )));
            }
            if p.issuer == crate::attest::x509::PeerIssuer::Operator {
                self.authorize_operator(ctx)?;
            }
            return Ok(format!("x509:{}", p.serial_hex()));
        }
        if let Some(u) = &ctx.unix {
            self.attest_peer(ctx, "watch").await?;
            return Ok(format!(
                "unix:{}:{}",
                u.pid.unwrap_or(0),
                u.start_time.unwrap_or(0)
            ));
        }
        Err(BrokerError::Unauthenticated(
            "Watch needs a credential: connect with mutual TLS using your current X.509-SVID (a verifier that is not a workload gets an identity of its own for this), or an operator credential"
                .into(),
        ))
    }

    async fn attestation_failed(
        &self,
        e: AttestError,
        action: &str,
        ctx: &RequestContext,
    ) -> BrokerError {
        match e {
            AttestError::Store(se) => self.commit_failed(se, action),
            AttestError::Failed {
                method,
                reason,
                actor,
                identity_id,
                detail,
                public,
            } => {
                tracing::info!(request_id = %ctx.request_id, %method, %reason, %actor, %detail, "attestation failed");
                metrics::counter!("sigil_attestation_failures_total", "method" => method.as_str(), "reason" => reason.code())
                    .increment(1);
                let key = format!("{}/{method}/{reason}/{actor}", ctx.source());
                let draft = AuditDraft::new(
                    self.now_nanos(),
                    actor,
                    action,
                    identity_id.unwrap_or_default(),
                    Decision::Deny,
                    detail,
                    &ctx.request_id,
                )
                .gate(crate::authz::GateId::IdentityProof.code())
                .with("method", method)
                .with("source", ctx.source());
                let write = self.refusals.admit(&key, self.clock.unix(), draft);
                if !write.is_empty() {
                    self.audit_only(write).await;
                }
                let hint = match (method, reason) {
                    (attest::Method::JoinToken, _) => attest::join_token::HINT,
                    // The holder may know its own certificate is revoked (the CRL says so too).
                    (_, attest::Reason::Revoked) => {
                        "the client certificate has been revoked; attest again with fresh evidence"
                    }
                    _ => {
                        "the client certificate is not a current Sigil credential of a known identity"
                    }
                };
                BrokerError::AttestationFailed {
                    method: method.as_str(),
                    hint: public.unwrap_or_else(|| hint.to_owned()),
                }
            }
        }
    }

    async fn run_gates(
        &self,
        attested: &Attested,
        ask: Ask<'_>,
        ttl: Option<Duration>,
        default_ttl: Duration,
        action: &str,
        ctx: &RequestContext,
    ) -> Result<(Grant, Vec<String>), BrokerError> {
        let now = self.clock.unix();
        let approvals = self.approvals_in_force(&attested.identity.id, now);
        let mc = MintContext {
            identity: &attested.identity,
            method: attested.method.as_str(),
            presented_generation: attested.presented_generation,
            evidence_issued_at: attested.evidence_issued_at,
            evidence_seq: attested.evidence_seq,
            ask,
            requested_ttl: ttl,
            default_ttl,
            now,
            selectors: &attested.selectors,
            source: ctx.remote.map(|a| a.ip()),
            approvals: &approvals,
        };
        let ev = self.gates.evaluate(&mc);
        match ev.outcome {
            Ok(g) => Ok((g, ev.trail)),
            Err(Denial { gate, reason }) => {
                metrics::counter!("sigil_issuance_total", "kind" => ask.label(), "result" => "denied", "gate" => gate.code()).increment(1);
                let key = format!(
                    "{}/{action}/{}/{reason}/{}",
                    attested.identity.id,
                    gate.code(),
                    attested.actor
                );
                let draft = AuditDraft::new(
                    self.now_nanos(),
                    &attested.actor,
                    action,
                    &attested.identity.id,
                    Decision::Deny,
                    &reason,
                    &ctx.request_id,
                )
                .gate(gate.code())
                .with("gates", ev.trail)
                .with("method", attested.method);
                let write = self.refusals.admit(&key, now, draft);
                if !write.is_empty() {
                    self.audit_only(write).await;
                }
                Err(BrokerError::Denied { gate, reason })
            }
        }
    }

    fn commit_failed(&self, e: StoreError, action: &str) -> BrokerError {
        // Every request fails alike while the store cannot commit: one line per 5 s.
        static LOG: crate::telemetry::LogEvery = crate::telemetry::LogEvery::new(5);
        if let Some(suppressed) = LOG.due() {
            tracing::error!(error = %e, action, suppressed, "could not commit; refusing to issue (fail closed)");
        }
        metrics::counter!("sigil_commit_failures_total").increment(1);
        BrokerError::from(e)
    }

    #[allow(clippy::too_many_arguments)]
    fn sign_x509(
        &self,
        ring: &KeyRing,
        attested: &Attested,
        csr: &VerifiedCsr,
        dns_names: &[String],
        (mut grant, trail): (Grant, Vec<String>),
        ctx: &RequestContext,
        now: std::time::SystemTime,
    ) -> Result<Minted<IssuedX509>, BrokerError> {
        let id = &attested.identity;
        let serial = ids::new_serial(now);
        let dns: Vec<String> = dns_names.iter().map(|d| d.to_ascii_lowercase()).collect();
        let leaf = ring.intermediate.mint_leaf(
            csr,
            &LeafSpec {
                spiffe_id: &id.spiffe_id,
                dns_names: &dns,
                ip_addresses: &[],
                usage: LeafUsage::ServerAndClient,
                now,
                ttl: grant.ttl,
                backdate: self.cfg.issuance.backdate,
                serial: &serial,
            },
        );
        let leaf = match leaf {
            Ok(l) => l,
            Err(sigil_pki::PkiError::CaExpired) => {
                // The schedule should have replaced it; do it now and let the caller retry.
                self.rotation_kick.notify_one();
                return Err(BrokerError::Unavailable(
                    "the signing CA has expired and is being replaced; retry in a moment".into(),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let expires_at = unix_secs(leaf.not_after);
        if leaf.cut_to_issuer {
            let cut = (expires_at - unix_secs(now)).max(0) as u64;
            let note = format!("lifetime cut to {cut}s by the signing CA's expiry");
            grant.notice = if grant.notice.is_empty() {
                note
            } else {
                format!("{}; {note}", grant.notice)
            };
            grant.ttl = Duration::from_secs(cut);
        }
        let serial_hex = ids::to_hex(&serial);
        let mut chain = vec![leaf.der];
        chain.extend(ring.intermediates());
        let ledger = LedgerRecord {
            credential_id: serial_hex.clone(),
            kind: CredentialKind::X509,
            identity_id: id.id.clone(),
            spiffe_id: id.spiffe_id.to_string(),
            generation: id.generation,
            audiences: Vec::new(),
            scopes: Vec::new(),
            dns_names: dns.clone(),
            issued_at: unix_secs(now),
            expires_at,
            signing_key_id: ring.intermediate_id.clone(),
            attestation: attested.method.as_str().into(),
            source: ctx.remote.map(|a| a.ip().to_string()).unwrap_or_default(),
        };
        let audit = AuditDraft::new(
            self.now_nanos(),
            &attested.actor,
            "x509.mint",
            &id.id,
            Decision::Allow,
            "issued",
            &ctx.request_id,
        )
        .with("serial", serial_hex.clone())
        .with("spiffe_id", id.spiffe_id.as_str())
        .with("expires_at", expires_at)
        .with("ttl_secs", ttl_secs(grant.ttl))
        .with("ttl_clamped", grant.clamped)
        .with("dns_names", dns)
        .with("method", attested.method)
        .with("gates", trail);
        Ok(Minted {
            issued: IssuedX509 {
                spiffe_id: id.spiffe_id.clone(),
                chain,
                serial: serial_hex,
                expires_at,
                generation: id.generation,
                grant,
            },
            ledger,
            audit,
        })
    }

    fn sign_jwt(
        &self,
        ring: &KeyRing,
        attested: &Attested,
        ask: &JwtAsk,
        (grant, trail): (Grant, Vec<String>),
        ctx: &RequestContext,
        now: std::time::SystemTime,
    ) -> Result<Minted<IssuedJwt>, BrokerError> {
        let id = &attested.identity;
        let iat = unix_secs(now);
        let exp = iat + grant.ttl.as_secs() as i64;
        let jti = ids::jti_to_string(&ids::new_jti(now));
        let claims = JwtSvidClaims {
            iss: self.cfg.jwt_issuer.clone(),
            sub: id.spiffe_id.clone(),
            aud: ask.audiences.clone(),
            exp,
            iat,
            jti: jti.clone(),
            scopes: ask.scopes.clone(),
            generation: id.generation,
            actors: Vec::new(),
            parents: Vec::new(),
        };
        let token = SecretString::new(ring.jwt.sign(&claims)?);
        let ledger = LedgerRecord {
            credential_id: jti.clone(),
            kind: CredentialKind::Jwt,
            identity_id: id.id.clone(),
            spiffe_id: id.spiffe_id.to_string(),
            generation: id.generation,
            audiences: ask.audiences.clone(),
            scopes: ask.scopes.clone(),
            dns_names: Vec::new(),
            issued_at: iat,
            expires_at: exp,
            signing_key_id: ring.jwt.kid().to_owned(),
            attestation: attested.method.as_str().into(),
            source: ctx.remote.map(|a| a.ip().to_string()).unwrap_or_default(),
        };
        let audit = AuditDraft::new(
            self.now_nanos(),
            &attested.actor,
            "jwt.mint",
            &id.id,
            Decision::Allow,
            "issued",
            &ctx.request_id,
        )
        .with("jti", jti.clone())
        .with("spiffe_id", id.spiffe_id.as_str())
        .with("audiences", json!(ask.audiences))
        .with("scopes", json!(ask.scopes))
        .with("expires_at", exp)
        .with("ttl_secs", ttl_secs(grant.ttl))
        .with("ttl_clamped", grant.clamped)
        .with("method", attested.method)
        .with("gates", trail);
        Ok(Minted {
            issued: IssuedJwt {
                token,
                spiffe_id: id.spiffe_id.clone(),
                audiences: ask.audiences.clone(),
                scopes: ask.scopes.clone(),
                jti,
                expires_at: exp,
                issued_at: iat,
                grant,
            },
            ledger,
            audit,
        })
    }
}

impl Broker {
    /// Approval-gated scopes with an approval in force for `identity_id` at `now`, each with
    /// when its (latest-ending) approval ends.
    pub(crate) fn approvals_in_force(
        &self,
        identity_id: &str,
        now: i64,
    ) -> std::collections::BTreeMap<String, i64> {
        let mut out = std::collections::BTreeMap::new();
        let m = self.approvals.read().unwrap_or_else(|p| p.into_inner());
        for a in m.get(identity_id).into_iter().flatten() {
            if a.in_force(now) {
                for s in &a.scopes {
                    let e = out.entry(s.clone()).or_insert(a.expires_at);
                    *e = (*e).max(a.expires_at);
                }
            }
        }
        out
    }
}
