//! [`Broker`]: the state one request flows through (store, registry, keys, revocations, gates,
//! clock) and the context a request carries. Workload operations live in [`crate::issue`],
//! operator operations in [`crate::admin`], revocation in [`crate::revoke`], rotation in
//! [`crate::rotate`].
//!
//! The in-memory views (registry, revocation set, key ring) and the watch hub are projections
//! of the store: [`Broker`] is the store's [`CommitObserver`], so they change in commit order,
//! before the committer hears back.

use std::net::SocketAddr;
use std::sync::Arc;

use sigil_pki::TrustDomain;

use crate::attest::x509::PeerCert;
use crate::audit::AuditDraft;
use crate::authz::GateChain;
use crate::clock::Clock;
use crate::config::Config;
use crate::hub::{Hub, HubEvent, RevocationSet, Target};
use crate::keys::Keys;
use crate::model::{CredentialKind, KeyRecord};
use crate::registry::Registry;
use crate::seal::Sealer;
use crate::store::{Change, CommitObserver, Op, Store};

/// The broker's state. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Broker {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) registry: Registry,
    pub(crate) keys: Keys,
    pub(crate) revocations: RevocationSet,
    pub(crate) hub: Hub,
    pub(crate) gates: GateChain,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) cfg: Config,
    pub(crate) td: TrustDomain,
    pub(crate) sealer: Arc<Sealer>,
    /// Serializes key changes (rotation, emergency revocation) on this broker.
    pub(crate) key_lock: tokio::sync::Mutex<()>,
    /// Cancelled at shutdown; long-lived streams end on it.
    pub(crate) shutdown: tokio_util::sync::CancellationToken,
    /// Credentials issued that have not expired (for metrics).
    pub(crate) live: crate::telemetry::LiveCredentials,
    /// Behaviour baselines.
    pub(crate) behaviour: crate::baseline::Behaviour,
    /// Folds repeated refusals into one audit entry per interval.
    pub(crate) refusals: crate::throttle::Throttle,
    /// Token buckets per caller.
    pub(crate) rate_limits: Arc<crate::ratelimit::RateLimits>,
    /// Where committed issuances go for the baselines (never handled in the writer thread).
    observations: crate::baseline::Observations,
    /// Wakes the rotation schedule now (e.g. the signing CA turned out to be expired).
    pub(crate) rotation_kick: tokio::sync::Notify,
    /// Gate 3 policies and admin roles.
    pub(crate) policy: Arc<crate::policy::PolicyEngine>,
    /// Trusted OIDC issuers.
    pub(crate) oidc: crate::attest::oidc::OidcVerifier,
    /// Hashes of workload binaries (Unix attestation).
    pub(crate) unix_hashes: Arc<crate::attest::unix::HashCache>,
    /// Approvals by identity id (every record; expired ones are filtered when read).
    pub(crate) approvals:
        std::sync::RwLock<std::collections::HashMap<String, Vec<crate::model::ApprovalRecord>>>,
}

/// What the transport knows about a request.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// Correlates logs and audit entries.
    pub request_id: String,
    /// The caller's address.
    pub remote: Option<SocketAddr>,
    /// The verified client certificate, when the caller used mTLS.
    pub peer: Option<Arc<PeerCert>>,
    /// The kernel's word on the caller, when it came over the Unix socket.
    pub unix: Option<crate::attest::unix::UnixPeer>,
    /// On the Unix socket: which of the identities the caller's process matches it acts as
    /// (metadata `sigil-spiffe-id`; the SDK sends the SPIFFE ID of the SVID it holds).
    pub spiffe_id_hint: Option<String>,
}

impl RequestContext {
    /// Where the request came from, for logs and aggregation: the peer address, or the uid
    /// on the Unix socket.
    pub fn source(&self) -> String {
        match (&self.remote, &self.unix) {
            (Some(a), _) => a.ip().to_string(),
            (None, Some(u)) => format!("unix:uid={}", u.uid),
            (None, None) => "unknown".into(),
        }
    }

    /// A context with a fresh request id.
    pub fn new(remote: Option<SocketAddr>, peer: Option<Arc<PeerCert>>) -> Self {
        RequestContext {
            request_id: sigil_pki::ids::to_hex(&sigil_pki::ids::random_bytes::<8>()),
            remote,
            peer,
            unix: None,
            spiffe_id_hint: None,
        }
    }
}

/// The parts a [`Broker`] is assembled from.
#[derive(Debug)]
pub struct BrokerParts {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Identity records.
    pub registry: Registry,
    /// Keys.
    pub keys: Keys,
    /// Live revocations.
    pub revocations: RevocationSet,
    /// The gates.
    pub gates: GateChain,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// Settings.
    pub cfg: Config,
    /// Trust domain.
    pub td: TrustDomain,
    /// Sealing.
    pub sealer: Arc<Sealer>,
    /// Cancelled at shutdown.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Usage so far (behaviour baselines).
    pub usage: Vec<crate::model::UsageRecord>,
    /// Gate 3 policies and admin roles.
    pub policy: Arc<crate::policy::PolicyEngine>,
    /// Trusted OIDC issuers.
    pub oidc: crate::attest::oidc::OidcVerifier,
    /// Every stored approval.
    pub approvals: Vec<crate::model::ApprovalRecord>,
    /// Where committed issuances go for the behaviour baselines.
    pub observations: crate::baseline::Observations,
}

impl Broker {
    /// Assembles a broker and registers it as the store's commit observer.
    pub fn new(p: BrokerParts) -> Arc<Self> {
        let start = u64::try_from(crate::clock::unix_nanos(p.clock.now()) / 1000).unwrap_or(0);
        let refusals = crate::throttle::Throttle::new(p.cfg.audit.aggregate_interval);
        let rate_limits = Arc::new(crate::ratelimit::RateLimits::new(&p.cfg.limits));
        let broker = Arc::new(Broker {
            store: p.store,
            registry: p.registry,
            keys: p.keys,
            revocations: p.revocations,
            hub: Hub::new(start),
            gates: p.gates,
            clock: p.clock,
            cfg: p.cfg,
            td: p.td,
            sealer: p.sealer,
            key_lock: tokio::sync::Mutex::new(()),
            shutdown: p.shutdown,
            live: crate::telemetry::LiveCredentials::default(),
            behaviour: crate::baseline::Behaviour::new(p.usage),
            refusals,
            rate_limits,
            observations: p.observations,
            rotation_kick: tokio::sync::Notify::new(),
            policy: p.policy,
            oidc: p.oidc,
            unix_hashes: Default::default(),
            approvals: std::sync::RwLock::new({
                let mut m: std::collections::HashMap<String, Vec<_>> = Default::default();
                for a in p.approvals {
                    m.entry(a.identity_id.clone()).or_default().push(a);
                }
                m
            }),
        });
        let weak: std::sync::Weak<dyn CommitObserver> =
            Arc::downgrade(&broker) as std::sync::Weak<Broker>;
        broker.store.set_observer(weak);
        broker
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The key ring.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Live revocations.
    pub fn revocations(&self) -> &RevocationSet {
        &self.revocations
    }

    /// Cancelled when the broker shuts down.
    pub fn shutdown_token(&self) -> &tokio_util::sync::CancellationToken {
        &self.shutdown
    }

    /// The watch hub.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Now, in Unix nanoseconds (audit time).
    pub(crate) fn now_nanos(&self) -> i64 {
        crate::clock::unix_nanos(self.clock.now())
    }

    /// Records audit entries of something that did not change state (a denial). A failure is
    /// logged: the denial stands either way.
    pub(crate) async fn audit_only(&self, drafts: Vec<AuditDraft>) {
        if let Err(e) = self.store.commit(Change::audit_only(drafts)).await {
            tracing::error!(error = %e, "could not record a denial in the audit log");
        }
    }

    /// The token buckets of callers.
    pub fn rate_limits(&self) -> &Arc<crate::ratelimit::RateLimits> {
        &self.rate_limits
    }

    /// Writes the summaries of folded refusals whose interval ended (all of them at shutdown).
    pub async fn flush_refusals(&self, all: bool) {
        let summaries = self.refusals.flush(self.clock.unix(), all);
        if !summaries.is_empty() {
            self.audit_only(summaries).await;
        }
    }

    /// Counts the live credentials already in the ledger (run once at start, in the
    /// background: it does not hold up readiness).
    pub async fn seed_live_credentials(&self) {
        let now = self.clock.unix();
        let since = now - self.cfg.issuance.max_ttl_ceiling.as_secs() as i64 - 60;
        match self.store.ledger_since(since, None).await {
            Ok(recs) => self.live.seed(
                recs.into_iter()
                    .filter(|r| self.is_live(r, now))
                    .map(|r| (r.identity_id, r.credential_id, r.expires_at)),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not count live credentials");
                self.live.seed(Vec::new());
            }
        }
    }

    /// Refreshes the gauges that are cheaper to compute on demand than to track.
    pub fn update_gauges(&self) {
        crate::telemetry::update_process_metrics();
        let now = self.clock.unix();
        metrics::gauge!("sigil_live_credentials").set(self.live.live(now) as f64);
        metrics::gauge!("sigil_revoked_credentials").set(self.revocations.len() as f64);
        let mut by_status: std::collections::BTreeMap<&str, u64> =
            ["active", "suspended", "compromised", "retired"]
                .into_iter()
                .map(|s| (s, 0))
                .collect();
        for r in self.registry.list() {
            *by_status.entry(r.status.as_str()).or_default() += 1;
        }
        for (status, n) in by_status {
            metrics::gauge!("sigil_identities", "status" => status).set(n as f64);
        }
        let ring = self.keys.current();
        for r in ring.records.iter().filter(|r| r.state.is_published()) {
            let kind = serde_json::to_value(r.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            metrics::gauge!("sigil_key_age_seconds", "kind" => kind, "state" => r.state.as_str())
                .set((now - r.created_at) as f64);
        }
        let rot = &self.cfg.rotation;
        for (kind, key_kind, lifetime) in [
            ("jwt", crate::model::KeyKind::Jwt, rot.jwt_key_lifetime),
            (
                "x509",
                crate::model::KeyKind::IntermediateCa,
                rot.x509_ca_rotate_after,
            ),
        ] {
            if let Some(cur) = ring
                .records
                .iter()
                .find(|r| r.kind == key_kind && r.state == crate::model::KeyState::Current)
            {
                let due =
                    cur.activated_at.unwrap_or(cur.created_at) + lifetime.as_secs() as i64 - now;
                metrics::gauge!("sigil_key_rotation_due_seconds", "kind" => kind).set(due as f64);
            }
        }
    }

    fn keys_changed(&self, changed: Vec<KeyRecord>) {
        let old = self.keys.current();
        let mut records = old.records.clone();
        for k in changed {
            match records.iter_mut().find(|r| r.id == k.id) {
                Some(r) => *r = k,
                None => records.push(k),
            }
        }
        match crate::keys::load(&self.td, &records, &self.sealer) {
            Ok(ring) => {
                let newly_revoked: Vec<String> = ring
                    .revoked_keys
                    .iter()
                    .filter(|k| !old.revoked_keys.contains(k))
                    .cloned()
                    .collect();
                let bundle_changed = ring.bundle != old.bundle;
                self.keys.set(ring);
                if bundle_changed {
                    self.hub.publish(HubEvent::Bundle);
                }
                if !newly_revoked.is_empty() {
                    self.hub.publish(HubEvent::KeysRevoked(newly_revoked));
                    self.hub.publish(HubEvent::RenewNow {
                        target: Target::All,
                        reason: "a signing key was revoked".into(),
                    });
                }
            }
            // The records are durable; a restart rebuilds the ring. Keep serving the old one.
            Err(e) => {
                tracing::error!(error = %e, "could not rebuild the key ring after a key change")
            }
        }
    }
}

impl CommitObserver for Broker {
    fn committed(&self, ops: &[&Op]) {
        let mut revoked = Vec::new();
        let mut floors = Vec::new();
        let mut keys = Vec::new();
        for op in ops {
            match op {
                Op::CreateIdentity(r) => self.registry.upsert(r.clone()),
                Op::UpdateIdentity { record, .. } => {
                    let before = self.registry.get(&record.id).map(|r| r.generation);
                    self.registry.upsert(record.clone());
                    if before.is_some_and(|g| g < record.generation) {
                        floors.push((record.spiffe_id.to_string(), record.generation));
                        // Everything it held so far is revoked.
                        self.live.clear(&record.id);
                    }
                }
                Op::PutRevocation(r) => {
                    if !self.revocations.contains_record(r) {
                        self.live.revoke(&r.identity_id, r.expires_at);
                    }
                    self.revocations.insert(r.clone());
                    revoked.push(r.clone());
                }
                Op::PruneRevocations { expired_before } => {
                    let gone = self.revocations.prune(*expired_before);
                    if !gone.is_empty() {
                        self.hub.publish(HubEvent::Expired(gone));
                    }
                }
                Op::PutKey(k) => keys.push(k.clone()),
                Op::PutApproval(a) => {
                    let mut m = self.approvals.write().unwrap_or_else(|p| p.into_inner());
                    let list = m.entry(a.identity_id.clone()).or_default();
                    list.retain(|x| x.id != a.id);
                    list.push(a.clone());
                }
                Op::AppendLedger(r) => {
                    self.live
                        .add(&r.identity_id, &r.credential_id, r.expires_at);
                    self.observations.push(r);
                }
                _ => {}
            }
        }
        if !keys.is_empty() {
            self.keys_changed(keys);
        }
        if !revoked.is_empty() {
            let serials: Vec<String> = revoked
                .iter()
                .filter(|r| r.kind == CredentialKind::X509)
                .map(|r| r.credential_id.clone())
                .collect();
            metrics::counter!("sigil_revocations_total").increment(revoked.len() as u64);
            self.hub.publish(HubEvent::Revoked(revoked));
            for s in serials {
                self.hub.publish(HubEvent::RenewNow {
                    target: Target::Serial(s),
                    reason: "your certificate was revoked".into(),
                });
            }
        }
        if !floors.is_empty() {
            let ids: Vec<String> = floors.iter().map(|(id, _)| id.clone()).collect();
            self.hub.publish(HubEvent::Floors(floors));
            for id in ids {
                self.hub.publish(HubEvent::RenewNow {
                    target: Target::SpiffeId(id),
                    reason: "your identity's credentials were revoked".into(),
                });
            }
        }
    }
}
