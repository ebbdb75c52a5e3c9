//! The authorization gates every mint passes, in order. Each sees the same identity record;
//! one weak layer does not decide the outcome.
//!
//! 1. **Identity proof**: the evidence was valid (checked by `attest`), the record is active,
//!    not expired, and a presented certificate is of the identity's current generation.
//! 2. **Entitlement scope**: kind, audiences, scopes and DNS names are within the record's
//!    entitlements; a TTL above the maximum is clamped and the reply says so.
//! 3. **Request policy**: just-in-time approvals for approval-gated scopes, then the Cedar
//!    policies ([`crate::policy`]) over the identity, the action, the resource and the
//!    request's context.
//!
//! Every decision, allow or deny, is recorded in the audit entry of the request.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

pub mod operator;

pub use operator::Operator;

use crate::clock::rfc3339;
use crate::model::{CredentialKind, IdentityRecord, IdentityStatus, Selector};
use crate::policy::{MintFacts, PolicyEngine, Principal, Resource};

/// Which gate decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GateId {
    /// Gate 1.
    IdentityProof,
    /// Gate 2.
    EntitlementScope,
    /// Gate 3.
    RequestPolicy,
}

impl GateId {
    /// The stable code used in audit entries and metrics.
    pub fn code(self) -> &'static str {
        match self {
            GateId::IdentityProof => "gate1.identity_proof",
            GateId::EntitlementScope => "gate2.entitlement_scope",
            GateId::RequestPolicy => "gate3.request_policy",
        }
    }
}

impl fmt::Display for GateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GateId::IdentityProof => "gate 1 (identity proof)",
            GateId::EntitlementScope => "gate 2 (entitlement scope)",
            GateId::RequestPolicy => "gate 3 (request policy)",
        })
    }
}

/// What is being asked for.
#[derive(Debug, Clone, Copy)]
pub enum Ask<'a> {
    /// To attest at all (before anything is minted).
    Attest,
    /// An X.509-SVID with these DNS SANs.
    X509 {
        /// DNS names.
        dns_names: &'a [String],
    },
    /// A JWT-SVID.
    Jwt {
        /// Audiences.
        audiences: &'a [String],
        /// Scopes.
        scopes: &'a [String],
    },
}

impl Ask<'_> {
    /// The credential kind (`None` for attestation itself).
    pub fn kind(&self) -> Option<CredentialKind> {
        match self {
            Ask::Attest => None,
            Ask::X509 { .. } => Some(CredentialKind::X509),
            Ask::Jwt { .. } => Some(CredentialKind::Jwt),
        }
    }

    /// The label used in metrics.
    pub fn label(&self) -> &'static str {
        self.kind().map_or("attest", CredentialKind::as_str)
    }
}

/// Everything a gate may look at.
#[derive(Debug)]
pub struct MintContext<'a> {
    /// The identity record.
    pub identity: &'a IdentityRecord,
    /// How the caller attested (`join_token`, `x509`).
    pub method: &'static str,
    /// Generation of the certificate the caller presented (renewal), if any.
    pub presented_generation: Option<u64>,
    /// When fresh evidence was issued (join tokens), if the method has that notion.
    pub evidence_issued_at: Option<i64>,
    /// The commit sequence that created the evidence (join tokens), when known.
    pub evidence_seq: Option<u64>,
    /// What is asked for.
    pub ask: Ask<'a>,
    /// Requested lifetime (`None`: the default).
    pub requested_ttl: Option<Duration>,
    /// The broker's default lifetime for this kind.
    pub default_ttl: Duration,
    /// Unix seconds.
    pub now: i64,
    /// What this attestation's evidence showed (OIDC, Unix); empty otherwise.
    pub selectors: &'a BTreeSet<Selector>,
    /// The caller's address (absent on the Unix socket).
    pub source: Option<IpAddr>,
    /// Approvals in force for this identity: scope → when it ends (Unix seconds).
    pub approvals: &'a BTreeMap<String, i64>,
}

/// What the gates granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Lifetime.
    pub ttl: Duration,
    /// True when the requested lifetime was cut down.
    pub clamped: bool,
    /// Plain-words explanation of any change to the request.
    pub notice: String,
}

/// A refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Which gate.
    pub gate: GateId,
    /// Why.
    pub reason: String,
}

/// A gate.
pub trait Gate: Send + Sync + fmt::Debug {
    /// Which gate this is.
    fn id(&self) -> GateId;
    /// Allows (possibly adjusting `grant`; `Ok` carries a note for the audit trail, e.g. the
    /// policies that permitted) or refuses with a reason.
    fn check(&self, ctx: &MintContext<'_>, grant: &mut Grant) -> Result<String, String>;
}

/// The gates, in order.
#[derive(Debug)]
pub struct GateChain {
    gates: Vec<Box<dyn Gate>>,
}

/// The outcome of the chain with the trail of decisions for the audit log.
#[derive(Debug)]
pub struct Evaluation {
    /// Allowed with a grant, or denied.
    pub outcome: Result<Grant, Denial>,
    /// `gate: allow|deny[: reason]` for each gate consulted.
    pub trail: Vec<String>,
}

impl Default for GateChain {
    fn default() -> Self {
        GateChain {
            gates: vec![Box::new(IdentityProof), Box::new(EntitlementScope)],
        }
    }
}

impl GateChain {
    /// Gates 1 and 2.
    pub fn standard() -> Self {
        Self::default()
    }

    /// Gates 1, 2 and 3 (approvals and the Cedar policies of `engine`).
    pub fn with_policy(engine: Arc<PolicyEngine>) -> Self {
        Self::default().with(Box::new(RequestPolicy { engine }))
    }

    /// Appends a gate (gate 3 goes here).
    pub fn with(mut self, gate: Box<dyn Gate>) -> Self {
        self.gates.push(gate);
        self
    }

    /// Runs every gate in order; stops at the first refusal.
    pub fn evaluate(&self, ctx: &MintContext<'_>) -> Evaluation {
        let mut grant = Grant {
            ttl: ctx.requested_ttl.unwrap_or(ctx.default_ttl),
            clamped: false,
            notice: String::new(),
        };
        let mut trail = Vec::with_capacity(self.gates.len());
        for g in &self.gates {
            match g.check(ctx, &mut grant) {
                Ok(note) if note.is_empty() => trail.push(format!("{}: allow", g.id().code())),
                Ok(note) => trail.push(format!("{}: allow ({note})", g.id().code())),
                Err(reason) => {
                    trail.push(format!("{}: deny: {reason}", g.id().code()));
                    return Evaluation {
                        outcome: Err(Denial {
                            gate: g.id(),
                            reason,
                        }),
                        trail,
                    };
                }
            }
        }
        Evaluation {
            outcome: Ok(grant),
            trail,
        }
    }
}

/// Gate 1.
#[derive(Debug)]
pub struct IdentityProof;

impl Gate for IdentityProof {
    fn id(&self) -> GateId {
        GateId::IdentityProof
    }

    fn check(&self, ctx: &MintContext<'_>, _grant: &mut Grant) -> Result<String, String> {
        let rec = ctx.identity;
        let why = |r: &str| {
            if r.is_empty() {
                String::new()
            } else {
                format!(" ({r})")
            }
        };
        match rec.status {
            IdentityStatus::Active => {}
            IdentityStatus::Suspended => {
                return Err(format!(
                    "identity {} is suspended{}; an operator must resume it",
                    rec.spiffe_id,
                    why(&rec.status_reason)
                ));
            }
            // Only fresh evidence, issued after the compromise, restores the identity.
            IdentityStatus::Compromised if evidence_after_compromise(ctx, rec) => {}
            IdentityStatus::Compromised => {
                return Err(format!(
                    "identity {} is marked compromised{}; it must attest again with evidence issued after the compromise (e.g. a new join token)",
                    rec.spiffe_id,
                    why(&rec.status_reason)
                ));
            }
            IdentityStatus::Retired => {
                return Err(format!(
                    "identity {} is retired{}",
                    rec.spiffe_id,
                    why(&rec.status_reason)
                ));
            }
        }
        if rec.expires_at <= ctx.now {
            return Err(format!(
                "identity {} expired at {}; its owner ({}) must recertify it",
                rec.spiffe_id,
                rfc3339(rec.expires_at),
                rec.owner
            ));
        }
        if let Some(g) = ctx.presented_generation
            && g != rec.generation
        {
            return Err(format!(
                "the presented certificate is from generation {g} but identity {} is at generation {} (its credentials were revoked); attest again",
                rec.spiffe_id, rec.generation
            ));
        }
        Ok(String::new())
    }
}

/// Gate 2.
#[derive(Debug)]
pub struct EntitlementScope;

fn list(set: &std::collections::BTreeSet<String>) -> String {
    if set.is_empty() {
        "none".into()
    } else {
        set.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

impl Gate for EntitlementScope {
    fn id(&self) -> GateId {
        GateId::EntitlementScope
    }

    fn check(&self, ctx: &MintContext<'_>, grant: &mut Grant) -> Result<String, String> {
        let e = &ctx.identity.entitlements;
        let Some(kind) = ctx.ask.kind() else {
            // Attesting grants nothing by itself; what is minted is checked on its own.
            return Ok(String::new());
        };
        if !e.kinds.contains(&kind) {
            let have: Vec<_> = e.kinds.iter().map(|k| k.as_str()).collect();
            return Err(format!(
                "identity {} is not entitled to {kind} credentials (entitled kinds: {})",
                ctx.identity.spiffe_id,
                if have.is_empty() {
                    "none".into()
                } else {
                    have.join(", ")
                }
            ));
        }
        match ctx.ask {
            Ask::Attest => {}
            Ask::X509 { dns_names } => {
                if let Some(d) = dns_names
                    .iter()
                    .find(|d| !e.dns_names.contains(&d.to_ascii_lowercase()))
                {
                    return Err(format!(
                        "DNS name {d:?} is not in the identity's entitlements (allowed: {})",
                        list(&e.dns_names)
                    ));
                }
            }
            Ask::Jwt { audiences, scopes } => {
                if let Some(a) = audiences.iter().find(|a| !e.audiences.contains(*a)) {
                    return Err(format!(
                        "audience {a:?} is not in the identity's entitlements (allowed: {})",
                        list(&e.audiences)
                    ));
                }
                if let Some(s) = scopes.iter().find(|s| !e.scopes.contains(*s)) {
                    return Err(format!(
                        "scope {s:?} is not in the identity's entitlements (allowed: {})",
                        list(&e.scopes)
                    ));
                }
            }
        }
        let max = Duration::from_secs(e.max_ttl_secs);
        if grant.ttl > max {
            if ctx.requested_ttl.is_some() {
                grant.clamped = true;
                grant.notice = format!(
                    "requested ttl {}s is above the identity's max {}s; granted {}s",
                    grant.ttl.as_secs(),
                    max.as_secs(),
                    max.as_secs()
                );
            }
            grant.ttl = max;
        }
        Ok(String::new())
    }
}

/// Gate 3: just-in-time approvals, then Cedar.
#[derive(Debug)]
pub struct RequestPolicy {
    engine: Arc<PolicyEngine>,
}

impl Gate for RequestPolicy {
    fn id(&self) -> GateId {
        GateId::RequestPolicy
    }

    fn check(&self, ctx: &MintContext<'_>, grant: &mut Grant) -> Result<String, String> {
        let e = &ctx.identity.entitlements;
        let (audiences, scopes, dns): (&[String], &[String], &[String]) = match ctx.ask {
            Ask::Attest => (&[], &[], &[]),
            Ask::X509 { dns_names } => (&[], &[], dns_names),
            Ask::Jwt { audiences, scopes } => (audiences, scopes, &[]),
        };
        // Approval-gated scopes: only while an approval is in force, and never beyond it.
        let mut until: Option<i64> = None;
        for s in scopes.iter().filter(|s| e.approval_scopes.contains(*s)) {
            match ctx.approvals.get(s) {
                Some(end) if *end > ctx.now => {
                    until = Some(until.map_or(*end, |u: i64| u.min(*end)));
                }
                _ => {
                    return Err(format!(
                        "scope {s:?} needs an approval and none is in force for {}; an operator can grant one: sigil approve {} --scope {s} --for 15m --reason TEXT",
                        ctx.identity.spiffe_id, ctx.identity.spiffe_id
                    ));
                }
            }
        }
        if let Some(end) = until {
            let left = Duration::from_secs((end - ctx.now).max(1) as u64);
            if grant.ttl > left {
                grant.ttl = left;
                let note = format!(
                    "lifetime cut to {}s: the approval ends at {}",
                    left.as_secs(),
                    rfc3339(end)
                );
                grant.notice = if grant.notice.is_empty() {
                    note
                } else {
                    format!("{}; {note}", grant.notice)
                };
            }
        }
        let ttl_secs = grant.ttl.as_secs();
        let facts = || MintFacts {
            method: ctx.method,
            selectors: ctx.selectors.iter().map(ToString::to_string).collect(),
            source: ctx.source,
            ttl_secs,
            audiences: audiences.to_vec(),
            scopes: scopes.to_vec(),
            dns_names: dns.to_vec(),
            approvals: ctx
                .approvals
                .iter()
                .filter(|(_, end)| **end > ctx.now)
                .map(|(s, _)| s.clone())
                .collect(),
            now: ctx.now,
        };
        let principal = Principal::Identity(ctx.identity);
        let checks: Vec<(&str, Resource<'_>)> = match ctx.ask {
            Ask::Attest => vec![("attest", Resource::Broker)],
            Ask::X509 { .. } => vec![("mint_x509", Resource::Kind("x509"))],
            Ask::Jwt { audiences, .. } => audiences
                .iter()
                .map(|a| ("mint_jwt", Resource::Audience(a)))
                .collect(),
        };
        let mut permitted_by = BTreeSet::new();
        for (action, resource) in checks {
            let d = self
                .engine
                .authorize(principal, action, resource, || facts().context());
            if !d.allowed {
                return Err(match resource {
                    Resource::Audience(a) => format!("{} (audience {a:?})", d.reason),
                    _ => d.reason,
                });
            }
            permitted_by.extend(d.policies);
        }
        Ok(format!(
            "permitted by {}",
            permitted_by.into_iter().collect::<Vec<_>>().join(", ")
        ))
    }
}

/// Whether the caller's evidence was created after `rec` was marked compromised. By commit
/// order when both carry it (a join token created in the same second as a leak report, but
/// before it, does not restore the identity); otherwise by the clock, which is all an OIDC
/// token's `iat` or the kernel's word offers.
fn evidence_after_compromise(ctx: &MintContext<'_>, rec: &IdentityRecord) -> bool {
    match (ctx.evidence_seq, rec.status_seq) {
        (Some(evidence), compromised) if compromised > 0 => evidence > compromised,
        _ => ctx
            .evidence_issued_at
            .is_some_and(|t| t >= rec.status_since),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Entitlements;

    fn rec() -> IdentityRecord {
        IdentityRecord {
            id: "id-1".into(),
            spiffe_id: "spiffe://example.org/app".parse().unwrap(),
            owner: "payments-team".into(),
            purpose: "p".into(),
            labels: Default::default(),
            selectors: Default::default(),
            entitlements: Entitlements {
                kinds: [CredentialKind::X509, CredentialKind::Jwt].into(),
                max_ttl_secs: 3600,
                audiences: ["db".to_string()].into(),
                scopes: ["read".to_string()].into(),
                dns_names: ["app.internal".to_string()].into(),
                approval_scopes: Default::default(),
            },
            status: IdentityStatus::Active,
            status_reason: String::new(),
            status_since: 0,
            status_seq: 0,
            expires_at: 2_000,
            generation: 4,
            created_at: 0,
            created_by: "t".into(),
            updated_at: 0,
            updated_by: "t".into(),
            revision: 1,
            recertified_at: 0,
            recertified_by: String::new(),
        }
    }

    fn ctx<'a>(r: &'a IdentityRecord, ask: Ask<'a>, ttl: Option<u64>) -> MintContext<'a> {
        MintContext {
            identity: r,
            method: "join_token",
            presented_generation: None,
            evidence_issued_at: None,
            evidence_seq: None,
            ask,
            requested_ttl: ttl.map(Duration::from_secs),
            default_ttl: Duration::from_secs(300),
            now: 1_000,
            selectors: &NO_SELECTORS,
            source: None,
            approvals: &NO_APPROVALS,
        }
    }

    static NO_SELECTORS: BTreeSet<Selector> = BTreeSet::new();
    static NO_APPROVALS: BTreeMap<String, i64> = BTreeMap::new();

    #[test]
    fn allowed_requests_pass_every_gate_and_say_so() {
        let r = rec();
        let aud = vec!["db".to_string()];
        let ev = GateChain::standard().evaluate(&ctx(
            &r,
            Ask::Jwt {
                audiences: &aud,
                scopes: &[],
            },
            None,
        ));
        assert_eq!(ev.outcome.unwrap().ttl, Duration::from_secs(300));
        assert_eq!(
            ev.trail,
            vec![
                "gate1.identity_proof: allow",
                "gate2.entitlement_scope: allow"
            ]
        );
    }

    #[test]
    fn ttl_above_max_is_clamped_and_reported() {
        let r = rec();
        let ev = GateChain::standard().evaluate(&ctx(&r, Ask::X509 { dns_names: &[] }, Some(7200)));
        let g = ev.outcome.unwrap();
        assert_eq!(g.ttl, Duration::from_secs(3600));
        assert!(g.clamped);
        assert_eq!(
            g.notice,
            "requested ttl 7200s is above the identity's max 3600s; granted 3600s"
        );
    }

    #[test]
    fn each_gate_names_itself_and_the_reason() {
        let mut r = rec();
        let aud = vec!["prod-db".to_string()];
        let d = GateChain::standard()
            .evaluate(&ctx(
                &r,
                Ask::Jwt {
                    audiences: &aud,
                    scopes: &[],
                },
                None,
            ))
            .outcome
            .unwrap_err();
        assert_eq!(d.gate, GateId::EntitlementScope);
        assert!(d.reason.contains("audience \"prod-db\""), "{}", d.reason);

        let dns = vec!["evil.example".to_string()];
        let d = GateChain::standard()
            .evaluate(&ctx(&r, Ask::X509 { dns_names: &dns }, None))
            .outcome
            .unwrap_err();
        assert!(
            d.reason.contains("DNS name \"evil.example\""),
            "{}",
            d.reason
        );

        let scopes = vec!["admin".to_string()];
        let aud = vec!["db".to_string()];
        let d = GateChain::standard()
            .evaluate(&ctx(
                &r,
                Ask::Jwt {
                    audiences: &aud,
                    scopes: &scopes,
                },
                None,
            ))
            .outcome
            .unwrap_err();
        assert!(d.reason.contains("scope \"admin\""));

        r.entitlements.kinds.remove(&CredentialKind::Jwt);
        let d = GateChain::standard()
            .evaluate(&ctx(
                &r,
                Ask::Jwt {
                    audiences: &aud,
                    scopes: &[],
                },
                None,
            ))
            .outcome
            .unwrap_err();
        assert!(d.reason.contains("not entitled to jwt"), "{}", d.reason);

        for (status, word) in [
            (IdentityStatus::Suspended, "suspended"),
            (IdentityStatus::Retired, "retired"),
            (IdentityStatus::Compromised, "compromised"),
        ] {
            let mut r = rec();
            r.status = status;
            let d = GateChain::standard()
                .evaluate(&ctx(&r, Ask::X509 { dns_names: &[] }, None))
                .outcome
                .unwrap_err();
            assert_eq!(d.gate, GateId::IdentityProof);
            assert!(d.reason.contains(word));
        }
        let mut r = rec();
        r.expires_at = 1_000;
        let d = GateChain::standard()
            .evaluate(&ctx(&r, Ask::X509 { dns_names: &[] }, None))
            .outcome
            .unwrap_err();
        assert!(
            d.reason.contains("expired") && d.reason.contains("payments-team"),
            "{}",
            d.reason
        );

        let r = rec();
        let mut c = ctx(&r, Ask::X509 { dns_names: &[] }, None);
        c.presented_generation = Some(3);
        let d = GateChain::standard().evaluate(&c).outcome.unwrap_err();
        assert!(d.reason.contains("generation 3") && d.reason.contains("generation 4"));
    }
}
