//! Wiring: open the store, load identities and keys, mint the broker's own TLS certificate,
//! start the gRPC and HTTP listeners; and shut it all down in order.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sigil_pki::{EcKey, LeafSpec, LeafUsage, ids};
use sigil_proto::v1::admin_server::AdminServer;
use sigil_proto::v1::broker_server::BrokerServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::admin::AdminApi;
use crate::api::tls::{self, ServerCertResolver};
use crate::api::workload::WorkloadApi;
use crate::audit::{AuditDraft, Decision};
use crate::authz::GateChain;
use crate::broker::Broker;
use crate::clock::{Clock, SystemClock, unix_secs};
use crate::config::{BROKER_URL_FILE, Config, ConfigError};
use crate::keys::{self, KeyError, Keys};
use crate::model::{CredentialKind, LedgerRecord};
use crate::registry::Registry;
use crate::seal::{MasterKey, SealError, Sealer};
use crate::store::{Change, Op, StoreError};

/// Why the broker did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Bad settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The master key.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The keys.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// A listener.
    #[error("cannot listen on {addr}: {cause}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause (part of the message, not a separate `source`, so it is said once).
        cause: std::io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// Options that tests change.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// Makes store writes fail on demand (tests and chaos drills).
    #[cfg(feature = "faults")]
    pub store_faults: Option<crate::store::FaultSwitch>,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            clock: Arc::new(SystemClock),
            #[cfg(feature = "faults")]
            store_faults: None,
        }
    }
}

/// The master key for `cfg`: `SIGIL_MASTER_KEY` if set, else the key file.
pub fn load_master_key(cfg: &Config) -> Result<MasterKey, SealError> {
    match MasterKey::from_env()? {
        Some(k) => Ok(k),
        None => MasterKey::load_file(&cfg.master_key_path()),
    }
}

/// A running broker.
#[derive(Debug)]
pub struct RunningBroker {
    /// The gRPC (TLS) address.
    pub grpc_addr: SocketAddr,
    /// The HTTP address.
    pub http_addr: Option<SocketAddr>,
    broker: Arc<Broker>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningBroker {
    /// The broker state.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// `https://ADDR` of the gRPC listener.
    pub fn url(&self) -> String {
        format!("https://{}", self.grpc_addr)
    }

    /// `https://ADDR` (or `http://` when it serves plain HTTP) of the HTTP listener, if on.
    pub fn http_url(&self) -> Option<String> {
        let scheme = if self.broker.config().http_tls {
            "https"
        } else {
            "http"
        };
        self.http_addr.map(|a| format!("{scheme}://{a}"))
    }

    /// Stops accepting, gives in-flight requests `limits.shutdown_grace` to finish, then
    /// closes what is left (connections that stay open, idle streams), flushes the store.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let grace = self.broker.config().limits.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        let mut late = 0;
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                t.abort();
                late += 1;
            }
        }
        if late > 0 {
            tracing::warn!(
                ?grace,
                late,
                "listeners still had open connections after the shutdown grace period; closed them"
            );
        }
        self.broker.flush_refusals(true).await;
        self.broker.store().close().await;
        let _ = std::fs::remove_file(self.broker.config().data_dir.join(BROKER_URL_FILE));
    }
}

/// Opens the store of `cfg` with `master` and starts serving.
pub async fn start(
    mut cfg: Config,
    master: MasterKey,
    opts: StartOptions,
) -> Result<RunningBroker, StartError> {
    cfg.validate()?;
    // Listeners first: the issuer names the HTTP port, and a port in use is better said now.
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|cause| StartError::Listen {
            addr: cfg.listen,
            cause,
        })?;
    let grpc_addr = listener.local_addr().map_err(|cause| StartError::Listen {
        addr: cfg.listen,
        cause,
    })?;
    let http_listener = match cfg.http_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|cause| StartError::Listen { addr, cause })?;
            let bound = l
                .local_addr()
                .map_err(|cause| StartError::Listen { addr, cause })?;
            Some((l, bound))
        }
        None => None,
    };
    let http_addr = http_listener.as_ref().map(|(_, a)| *a);
    // Every JWT-SVID's `iss`, and discovery's issuer, from configuration alone.
    cfg.jwt_issuer = Some(cfg.jwt_issuer_for(http_addr));
    if cfg.http_listen.is_some() && !cfg.http_tls {
        tracing::warn!(issuer = ?cfg.jwt_issuer, "the HTTP listener serves plain HTTP, so OIDC discovery is reachable at the https issuer only through a TLS-terminating proxy; set http_tls = true to serve it directly");
    }
    // Every listener's connections within a budget that fits the descriptor limit.
    let budgets = crate::conns::Budgets::new(&cfg.limits, crate::conns::raise_fd_limit());
    let sealer = Arc::new(Sealer::new(&master));
    drop(master);
    let store = crate::store::open(
        &cfg.store()?,
        sealer.clone(),
        crate::store::OpenOptions {
            writer_queue: Some(cfg.limits.store_queue),
            #[cfg(feature = "faults")]
            faults: opts.store_faults.clone(),
        },
    )
    .await?;
    let td = store.meta().await?.trust_domain;
    let registry = Registry::new(store.identities().await?);
    let ring = keys::load(&td, &store.keys().await?, &sealer)?;
    let revocations = crate::hub::RevocationSet::new(store.revocations().await?);
    let usage = store.usage().await?;
    let approvals = store.approvals().await?;
    let policy_path = cfg.policy.path.as_ref().map(|p| {
        if p.is_absolute() {
            p.clone()
        } else {
            cfg.data_dir.join(p)
        }
    });
    let policy = crate::policy::PolicyEngine::load(policy_path, cfg.policy.default)
        .map_err(|e| StartError::Other(format!("policy: {e}")))?;
    let oidc = crate::attest::oidc::OidcVerifier::new(&cfg.oidc)
        .map_err(|e| StartError::Other(format!("oidc: {e:#}")))?;
    let cancel = CancellationToken::new();
    let (observations, committed) = crate::baseline::Observations::channel();
    let broker = Broker::new(crate::broker::BrokerParts {
        store,
        registry,
        keys: Keys::new(ring),
        revocations,
        gates: GateChain::with_policy(policy.clone()),
        clock: opts.clock,
        cfg: cfg.clone(),
        td,
        sealer,
        shutdown: cancel.clone(),
        usage,
        policy,
        oidc,
        approvals,
        observations,
    });
    let mut tasks = vec![tokio::spawn(crate::govern::follow_baselines(
        Arc::downgrade(&broker),
        committed,
        cancel.clone(),
    ))];

    let resolver = Arc::new(ServerCertResolver::new(
        server_cert(&broker, grpc_addr).await?,
    ));
    let ring = broker.keys().current();
    let tls_config = tls::server_config(
        &[ring.root.cert().clone(), ring.operator_ca.cert().clone()],
        resolver.clone(),
        broker.clock().clone(),
    )
    .map_err(|e| StartError::Other(format!("TLS setup: {e}")))?;

    crate::telemetry::prometheus();
    // The store's writer updates it on every leadership check; this covers the one made
    // before /metrics existed (and a store with one writer, which always leads).
    metrics::gauge!("sigil_schedule_leader").set(if broker.store().is_leader() {
        1.0
    } else {
        0.0
    });
    let limit = cfg.limits.max_request_bytes;
    // gRPC health (grpc.health.v1) and server reflection, so grpcurl and load balancers work.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<BrokerServer<WorkloadApi>>().await;
    health.set_serving::<AdminServer<AdminApi>>().await;
    tasks.push(tokio::spawn(watch_health(
        broker.clone(),
        health,
        cancel.clone(),
    )));
    // Reflection in both versions grpcurl and friends speak (v1alpha is what grpcurl 1.8
    // asks for), listing what this listener serves: the SPIFFE Workload API lives on the Unix
    // socket only, so it is not offered here.
    let reflected = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(sigil_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("sigil.v1.Broker")
            .with_service_name("sigil.v1.Admin")
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    let reflection = reflected(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| StartError::Other(format!("reflection: {e}")))?;
    let reflection_alpha = reflected(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| StartError::Other(format!("reflection: {e}")))?;
    let router = tonic::transport::Server::builder()
        .timeout(cfg.limits.request_timeout)
        .max_concurrent_streams(cfg.limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(crate::telemetry::RequestLayer)
        .layer(crate::api::limit::RateLimitLayer(
            broker.rate_limits().clone(),
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            BrokerServer::new(WorkloadApi::new(broker.clone())).max_decoding_message_size(limit),
        )
        .add_service(
            AdminServer::new(AdminApi::new(broker.clone())).max_decoding_message_size(limit),
        );
    let incoming = tls::spawn_acceptor(
        listener,
        Arc::new(tls_config),
        broker.clone(),
        cfg.limits.handshake_timeout,
        budgets.grpc.clone(),
        cancel.clone(),
    );
    let c = cancel.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, c.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    }));

    // The Unix socket: Unix attestation, the SPIFFE Workload API and the Sigil Broker API.
    if let Some(path) = cfg.workload_socket.clone() {
        let (listener, guard) = crate::api::unix::bind(&path, cfg.workload_socket_mode)
            .map_err(|e| StartError::Other(format!("workload socket {}: {e}", path.display())))?;
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<BrokerServer<WorkloadApi>>().await;
        let router = tonic::transport::Server::builder()
            .timeout(cfg.limits.request_timeout)
            .max_concurrent_streams(cfg.limits.max_concurrent_streams)
            .layer(crate::telemetry::RequestLayer)
            .layer(crate::api::limit::RateLimitLayer(
                broker.rate_limits().clone(),
            ))
            .add_service(health_service)
            .add_service(
                sigil_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(
                    crate::api::spiffe::SpiffeApi::new(broker.clone()),
                )
                .max_decoding_message_size(limit),
            )
            .add_service(
                BrokerServer::new(WorkloadApi::new(broker.clone()))
                    .max_decoding_message_size(limit),
            );
        let incoming = crate::api::unix::incoming(
            listener,
            budgets.unix.clone(),
            cfg.limits.handshake_timeout,
            cancel.clone(),
        );
        let c = cancel.clone();
        tracing::info!(socket = %path.display(), "serving the Workload API on the Unix socket");
        tasks.push(tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, c.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "Unix socket server stopped");
            }
        }));
    }
    // SIGHUP reloads the Cedar policies (a bad file is refused; the old policies stay).
    {
        let b = broker.clone();
        let c = cancel.clone();
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = c.cancelled() => return,
                        s = hup.recv() => {
                            if s.is_none() {
                                return;
                            }
                            let _ = b.reload_policy("signal:SIGHUP", "sighup").await;
                        }
                    }
                }
            }));
        }
    }

    if let Some((l, _)) = http_listener {
        let tls = if cfg.http_tls {
            Some(Arc::new(
                crate::http::tls_config(&cfg, resolver.clone()).map_err(StartError::Other)?,
            ))
        } else {
            None
        };
        let app = crate::http::router(broker.clone());
        let guards = crate::http::Guards {
            budget: budgets.http.clone(),
            rate: broker.rate_limits().clone(),
            header_timeout: cfg.limits.http_header_timeout,
            grace: cfg.limits.shutdown_grace,
        };
        tasks.push(tokio::spawn(crate::http::serve(
            l,
            app,
            tls,
            guards,
            cancel.clone(),
        )));
    }

    tasks.push(tokio::spawn(renew_server_cert(
        broker.clone(),
        resolver,
        grpc_addr,
        cancel.clone(),
    )));
    {
        let b = broker.clone();
        tokio::spawn(async move { b.seed_live_credentials().await });
    }
    // Key rotation on its schedule, and pruning of revocations that expired anyway.
    tasks.push(tokio::spawn(crate::rotate::schedule_loop(
        broker.clone(),
        cancel.clone(),
    )));

    // Listening on every address (0.0.0.0, ::): commands on this host dial loopback, which
    // the broker's certificate names.
    let mut dial = grpc_addr;
    if dial.ip().is_unspecified() {
        dial.set_ip(match dial.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("https://{dial}\n");
    if let Err(e) =
        crate::fsutil::write_atomic(&cfg.data_dir.join(BROKER_URL_FILE), url.as_bytes(), 0o644)
    {
        tracing::warn!(error = %e, "could not write {BROKER_URL_FILE}; operator commands need --broker");
    }
    tracing::info!(%grpc_addr, ?http_addr, trust_domain = %broker.trust_domain(), identities = broker.registry().len(), "sigil broker ready");
    Ok(RunningBroker {
        grpc_addr,
        http_addr,
        broker,
        cancel,
        tasks,
    })
}

/// Starts, waits for `shutdown`, then shuts down cleanly.
pub async fn run(
    cfg: Config,
    master: MasterKey,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let running = start(cfg, master, StartOptions::default()).await?;
    shutdown.await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// Reports NOT_SERVING through gRPC health while the store cannot commit.
async fn watch_health(
    broker: Arc<Broker>,
    health: tonic_health::server::HealthReporter,
    cancel: CancellationToken,
) {
    let mut serving = true;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let ok = broker.store().health().is_ok();
        if ok != serving {
            serving = ok;
            let status = if ok {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            health.set_service_status("sigil.v1.Broker", status).await;
            health.set_service_status("sigil.v1.Admin", status).await;
        }
    }
}

/// Mints the broker's own TLS certificate (SPIFFE ID `spiffe://<td>/sigil/broker`), recorded
/// in the ledger and audit log like any other credential.
async fn server_cert(
    broker: &Broker,
    listen: SocketAddr,
) -> Result<rustls::sign::CertifiedKey, StartError> {
    let cfg = broker.config();
    let ring = broker.keys().current();
    let now = broker.clock().now();
    let other = |e: String| StartError::Other(format!("broker certificate: {e}"));
    let key = EcKey::generate().map_err(|e| other(e.to_string()))?;
    let id = broker
        .trust_domain()
        .id_with_path("/sigil/broker")
        .map_err(|e| other(e.to_string()))?;
    let mut ips = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    if !listen.ip().is_unspecified() && !ips.contains(&listen.ip()) {
        ips.push(listen.ip());
    }
    let serial = ids::new_serial(now);
    let leaf = ring
        .intermediate
        .mint_leaf(
            &key,
            &LeafSpec {
                spiffe_id: &id,
                dns_names: &cfg.server_names,
                ip_addresses: &ips,
                usage: LeafUsage::ServerAndClient,
                now,
                ttl: cfg.issuance.server_cert_ttl,
                backdate: cfg.issuance.backdate,
                serial: &serial,
            },
        )
        .map_err(|e| other(e.to_string()))?;
    let serial_hex = ids::to_hex(&serial);
    let ledger = LedgerRecord {
        credential_id: serial_hex.clone(),
        kind: CredentialKind::X509,
        identity_id: String::new(),
        spiffe_id: id.to_string(),
        generation: 0,
        audiences: Vec::new(),
        scopes: Vec::new(),
        dns_names: cfg.server_names.clone(),
        issued_at: unix_secs(now),
        expires_at: unix_secs(leaf.not_after),
        signing_key_id: ring.intermediate_id.clone(),
        attestation: "broker".into(),
        source: String::new(),
    };
    let audit = AuditDraft::new(
        crate::clock::unix_nanos(now),
        "broker",
        "broker.server_cert",
        id.as_str(),
        Decision::Allow,
        "issued",
        "startup",
    )
    .with("serial", serial_hex)
    .with("expires_at", unix_secs(leaf.not_after));
    match broker
        .store()
        .commit(Change {
            ops: vec![Op::AppendLedger(ledger)],
            audit: vec![audit],
        })
        .await
    {
        Ok(_) => {}
        // A store whose audit chain was cut refuses every change; the broker still starts,
        // not ready and issuing nothing, so operators can read what is there (`audit verify`
        // names the cut). Its own serving certificate is the one thing not on record.
        Err(crate::store::StoreError::Tampered(why)) => {
            tracing::error!(%why, "serving read-only: nothing will be issued or changed until the store is restored");
        }
        Err(e) => return Err(e.into()),
    }
    let pkcs8 = key.to_pkcs8().map_err(|e| other(e.to_string()))?;
    tls::certified_key(
        vec![leaf.der, ring.intermediate.cert().clone()],
        pkcs8.expose_secret(),
    )
    .map_err(|e| other(e.to_string()))
}

async fn renew_server_cert(
    broker: Arc<Broker>,
    resolver: Arc<ServerCertResolver>,
    listen: SocketAddr,
    cancel: CancellationToken,
) {
    let every = broker.config().issuance.server_cert_ttl / 2;
    let mut wait = every;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match server_cert(&broker, listen).await {
            Ok(k) => {
                resolver.set(k);
                wait = every;
            }
            // Keep serving the current certificate (it has half its life left) and retry soon.
            Err(e) => {
                tracing::error!(error = %e, "renewing the broker's certificate failed; retrying in 30s");
                wait = Duration::from_secs(30).min(every);
            }
        }
    }
}
