//! What a workload trusts right now: the trust bundle and the revocation state, kept current
//! by the watch stream and shared by the broker connection, the rustls verifiers and the
//! [`crate::Verifier`]. Everything is swapped atomically; readers never block.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, TrustAnchor};
use sigil_pki::{JwtKeys, SpiffeBundle};
use sigil_proto::v1 as pb;

use crate::SdkError;

/// A trust bundle with what is derived from it, computed once per bundle.
#[derive(Debug)]
pub struct TrustBundle {
    /// The parsed SPIFFE bundle.
    pub bundle: SpiffeBundle,
    /// The SPIFFE bundle JSON, as served.
    pub json: String,
    jwt_keys: JwtKeys,
    roots: Arc<RootCertStore>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl PartialEq for TrustBundle {
    fn eq(&self, other: &Self) -> bool {
        self.bundle == other.bundle
    }
}

impl TrustBundle {
    /// Wraps a parsed bundle.
    pub fn new(bundle: SpiffeBundle, json: String) -> Result<Self, SdkError> {
        Self::with_roots(bundle.x509_authorities.clone(), bundle, json)
    }

    fn with_roots(
        roots_der: Vec<CertificateDer<'static>>,
        bundle: SpiffeBundle,
        json: String,
    ) -> Result<Self, SdkError> {
        let mut roots = RootCertStore::empty();
        let mut anchors = Vec::new();
        for c in &roots_der {
            roots
                .add(c.clone())
                .map_err(|e| SdkError::fatal(format!("trust bundle certificate refused: {e}")))?;
            let a = webpki::anchor_from_trusted_cert(c)
                .map_err(|e| SdkError::fatal(format!("trust bundle certificate refused: {e}")))?;
            anchors.push(a.to_owned());
        }
        Ok(TrustBundle {
            jwt_keys: bundle.jwt_keys(),
            bundle,
            json,
            roots: Arc::new(roots),
            anchors,
        })
    }

    /// The roots as PEM.
    pub fn x509_pem(&self) -> String {
        self.bundle.x509_pem()
    }

    /// JWT verification keys.
    pub fn jwt_keys(&self) -> &JwtKeys {
        &self.jwt_keys
    }

    /// The roots for rustls.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// The roots for webpki.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

/// Revocation state as pushed by the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationView {
    /// Revoked serials (hex) and jtis.
    pub credentials: HashSet<String>,
    /// SPIFFE ID → lowest valid generation.
    pub floors: HashMap<String, u64>,
    /// Revoked JWT key ids and CA key identifiers (hex).
    pub revoked_keys: HashSet<String>,
}

impl RevocationView {
    fn apply(&self, r: &pb::Revocations) -> RevocationView {
        let mut next = if r.snapshot {
            RevocationView::default()
        } else {
            self.clone()
        };
        next.credentials
            .extend(r.credentials.iter().map(|c| c.credential_id.clone()));
        for id in &r.expired {
            next.credentials.remove(id);
        }
        for f in &r.floors {
            let e = next.floors.entry(f.spiffe_id.clone()).or_insert(0);
            *e = (*e).max(f.min_generation);
        }
        next.revoked_keys.extend(r.revoked_keys.iter().cloned());
        next
    }

    /// Whether a credential id (serial hex or jti) is revoked.
    pub fn is_revoked(&self, id: &str) -> bool {
        self.credentials.contains(&id.to_ascii_lowercase()) || self.credentials.contains(id)
    }
}

/// The trust domain a Sigil root vouches for (its URI SAN, `spiffe://<td>`).
fn trust_domain_of(roots: &[CertificateDer<'static>]) -> Result<sigil_pki::TrustDomain, SdkError> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};
    for r in roots {
        let Ok((_, c)) = X509Certificate::from_der(r) else {
            continue;
        };
        if let Ok(Some(san)) = c.subject_alternative_name() {
            for g in &san.value.general_names {
                if let GeneralName::URI(u) = g
                    && let Ok(td) = u.parse::<sigil_pki::TrustDomain>()
                {
                    return Ok(td);
                }
            }
        }
    }
    Err(SdkError::fatal(
        "the trust bundle has no Sigil root (a CA certificate with a spiffe://<trust domain> URI SAN)",
    ))
}

/// The shared, swappable trust state.
#[derive(Debug)]
pub struct TrustState {
    bootstrap: Arc<TrustBundle>,
    bundle: ArcSwapOption<TrustBundle>,
    revocations: ArcSwap<RevocationView>,
    changed: tokio::sync::watch::Sender<u64>,
    clock: Arc<dyn crate::clock::Clock>,
}

impl TrustState {
    /// Trust state that starts from `bootstrap_roots` (the PEM an operator handed out) until
    /// the broker sends its bundle.
    pub fn new(bootstrap_roots: Vec<CertificateDer<'static>>) -> Result<Self, SdkError> {
        Self::with_clock(bootstrap_roots, Arc::new(crate::clock::SystemClock))
    }

    /// [`TrustState::new`], judging validity by `clock`.
    pub fn with_clock(
        bootstrap_roots: Vec<CertificateDer<'static>>,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Result<Self, SdkError> {
        let td = trust_domain_of(&bootstrap_roots)?;
        let empty = SpiffeBundle {
            trust_domain: td,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: 0,
            refresh_hint: None,
        };
        let bootstrap = Arc::new(TrustBundle::with_roots(
            bootstrap_roots,
            empty,
            String::new(),
        )?);
        Ok(TrustState {
            bootstrap,
            bundle: ArcSwapOption::empty(),
            revocations: ArcSwap::from_pointee(RevocationView::default()),
            changed: tokio::sync::watch::channel(0).0,
            clock,
        })
    }

    /// The clock validity is judged by.
    pub fn clock(&self) -> &Arc<dyn crate::clock::Clock> {
        &self.clock
    }

    /// The clock for rustls.
    pub(crate) fn time_provider(&self) -> Arc<dyn rustls::time_provider::TimeProvider> {
        Arc::new(crate::clock::ClockTime(self.clock.clone()))
    }

    /// The broker's bundle, once received.
    pub fn bundle(&self) -> Option<Arc<TrustBundle>> {
        self.bundle.load_full()
    }

    /// The roots to verify the broker and peers with: the broker's bundle, or the bootstrap
    /// roots before it arrived.
    pub fn current_roots(&self) -> Arc<TrustBundle> {
        self.bundle
            .load_full()
            .unwrap_or_else(|| self.bootstrap.clone())
    }

    /// Installs a bundle; returns whether it changed anything.
    pub fn set_bundle(&self, b: TrustBundle) -> bool {
        let old = self.bundle.load_full();
        if old.as_deref().is_some_and(|o| o == &b) {
            return false;
        }
        // Never go backwards: a replayed older bundle does not replace a newer one.
        if old
            .as_deref()
            .is_some_and(|o| o.bundle.sequence > b.bundle.sequence)
        {
            return false;
        }
        self.bundle.store(Some(Arc::new(b)));
        self.changed.send_modify(|v| *v += 1);
        true
    }

    /// The revocation state.
    pub fn revocations(&self) -> Arc<RevocationView> {
        self.revocations.load_full()
    }

    /// Applies a pushed revocation update.
    pub fn apply_revocations(&self, r: &pb::Revocations) {
        let next = self.revocations.load().apply(r);
        self.revocations.store(Arc::new(next));
        self.changed.send_modify(|v| *v += 1);
    }

    /// Ticks whenever the bundle or revocations change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
