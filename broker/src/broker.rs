//! [`Broker`]: the state one request flows through (store, registry, keys, gates, clock) and
//! the context a request carries. Workload operations live in [`crate::issue`], operator
//! operations in [`crate::admin`].

use std::net::SocketAddr;
use std::sync::Arc;

use sigil_pki::TrustDomain;

use crate::attest::x509::PeerCert;
use crate::audit::AuditDraft;
use crate::authz::GateChain;
use crate::clock::Clock;
use crate::config::Config;
use crate::keys::Keys;
use crate::registry::Registry;
use crate::seal::Sealer;
use crate::store::{Change, Store};

/// The broker's state. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Broker {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) registry: Registry,
    pub(crate) keys: Keys,
    pub(crate) gates: GateChain,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) cfg: Config,
    pub(crate) td: TrustDomain,
    pub(crate) sealer: Arc<Sealer>,
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
}

impl RequestContext {
    /// A context with a fresh request id.
    pub fn new(remote: Option<SocketAddr>, peer: Option<Arc<PeerCert>>) -> Self {
        RequestContext {
            request_id: sigil_pki::ids::to_hex(&sigil_pki::ids::random_bytes::<8>()),
            remote,
            peer,
        }
    }
}

impl Broker {
    /// Assembles a broker from its parts (see `server::start`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        registry: Registry,
        keys: Keys,
        gates: GateChain,
        clock: Arc<dyn Clock>,
        cfg: Config,
        td: TrustDomain,
        sealer: Arc<Sealer>,
    ) -> Self {
        Broker {
            store,
            registry,
            keys,
            gates,
            clock,
            cfg,
            td,
            sealer,
        }
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
}
