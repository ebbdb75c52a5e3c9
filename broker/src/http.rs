//! The HTTP listener, for load balancers and for verifiers that do not speak gRPC:
//!
//! - `/healthz`, `/readyz`;
//! - `/bundle` (SPIFFE bundle JSON with `spiffe_sequence` and `spiffe_refresh_hint`),
//!   `/bundle.pem`;
//! - `/.well-known/openid-configuration` and `/keys` (a plain JWKS), so any JWT library or a
//!   cloud provider's web-identity federation can verify JWT-SVIDs;
//! - `/crl/root` (revoked intermediates, signed by the root) and `/crl/<intermediate key id>`
//!   (revoked leaves), DER, regenerated when the revocation set changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use sigil_pki::RevokedSerial;

use crate::broker::Broker;
use crate::clock::from_unix;
use crate::model::{CredentialKind, KeyKind, KeyState};

/// How long a CRL is valid; it is regenerated at half of that, and on every revocation.
const CRL_VALIDITY: Duration = Duration::from_secs(600);

#[derive(Clone)]
struct AppState {
    broker: Arc<Broker>,
    crls: Arc<Mutex<HashMap<String, CachedCrl>>>,
}

struct CachedCrl {
    revocations_version: u64,
    bundle_sequence: u64,
    made_at: i64,
    der: Vec<u8>,
}

/// The TLS config of the HTTP listener: the configured certificate and key, or the broker's
/// own certificate (renewed with it). HTTP/1.1, no client certificates, no resumption.
pub fn tls_config(
    cfg: &crate::config::Config,
    own: Arc<crate::api::tls::ServerCertResolver>,
) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("HTTP TLS: {e}"))?
        .with_no_client_auth();
    let mut tls = match (&cfg.http_tls_cert_file, &cfg.http_tls_key_file) {
        (Some(cert), Some(key)) => {
            let chain = std::fs::read(cert)
                .map_err(|e| format!("http_tls_cert_file {}: {e}", cert.display()))
                .and_then(|pem| {
                    sigil_pki::certs_from_pem(&pem)
                        .map_err(|e| format!("http_tls_cert_file {}: {e}", cert.display()))
                })?;
            let key_pem = crate::fsutil::read_secret_file(key)
                .map_err(|e| format!("http_tls_key_file {}: {e}", key.display()))?;
            use rustls_pki_types::pem::PemObject as _;
            let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.expose_secret())
                .map_err(|e| {
                    format!(
                        "http_tls_key_file {}: not a PEM private key ({e})",
                        key.display()
                    )
                })?;
            builder
                .with_single_cert(chain, der)
                .map_err(|e| format!("http_tls_cert_file/http_tls_key_file: {e}"))?
        }
        _ => builder.with_cert_resolver(own),
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Ok(tls)
}

/// What the HTTP listener enforces on every connection and request.
#[derive(Debug, Clone)]
pub struct Guards {
    /// Connection budget (per source address and in total).
    pub budget: Arc<crate::conns::ConnLimit>,
    /// Token buckets (per source address; health checks are never limited).
    pub rate: Arc<crate::ratelimit::RateLimits>,
    /// How long a connection may take to send a request's headers, idle or not.
    pub header_timeout: Duration,
    /// On shutdown, how long open requests get.
    pub grace: Duration,
}

/// Serves `app` on `listener` (over TLS when `tls` is given) until `cancel`, then lets open
/// connections finish their requests for up to the grace period.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    guards: Guards,
    cancel: tokio_util::sync::CancellationToken,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (tcp, remote) = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    guards.budget.log_once(|| format!("HTTP accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ip = remote.ip().to_string();
        let Ok(slot) = guards.budget.admit(&ip) else {
            drop(tcp);
            continue;
        };
        let (app, acceptor, cancel, guards) = (
            app.clone(),
            acceptor.clone(),
            cancel.clone(),
            guards.clone(),
        );
        conns.spawn(async move {
            let _slot = slot;
            let service = limited(app, guards.rate.clone(), ip);
            match acceptor {
                Some(a) => match tokio::time::timeout(guards.header_timeout, a.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        serve_conn(hyper_util::rt::TokioIo::new(tls), service, &guards, cancel)
                            .await
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "HTTP TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "HTTP TLS handshake timed out"),
                },
                None => {
                    serve_conn(hyper_util::rt::TokioIo::new(tcp), service, &guards, cancel).await
                }
            }
        });
        // Reap finished connections as we go.
        while conns.try_join_next().is_some() {}
    }
    while conns.join_next().await.is_some() {}
}

type Limited = hyper_util::service::TowerToHyperService<
    tower::util::BoxCloneSyncService<
        axum::http::Request<hyper::body::Incoming>,
        Response,
        std::convert::Infallible,
    >,
>;

/// `app` behind the rate limit of the client at `ip`: 429 with `Retry-After` when its bucket
/// is empty; health checks always pass.
fn limited(app: Router, rate: Arc<crate::ratelimit::RateLimits>, ip: String) -> Limited {
    use tower::ServiceExt as _;
    let svc = tower::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
        let (app, rate, ip) = (app.clone(), rate.clone(), ip.clone());
        async move {
            let health = matches!(req.uri().path(), "/healthz" | "/readyz");
            if !health && let Err(wait) = rate.check(crate::ratelimit::Class::Http, &ip) {
                let ms = crate::ratelimit::retry_ms(wait);
                let secs = ms.div_ceil(1000).to_string();
                return Ok::<_, std::convert::Infallible>(
                    (
                        StatusCode::TOO_MANY_REQUESTS,
                        [(header::RETRY_AFTER, secs)],
                        format!(
                            "rate limit: too many requests from this address (limits.http_per_second); retry in {ms} ms\n"
                        ),
                    )
                        .into_response(),
                );
            }
            Ok(app
                .oneshot(req.map(axum::body::Body::new))
                .await
                .unwrap_or_else(|e| match e {}))
        }
    });
    hyper_util::service::TowerToHyperService::new(tower::util::BoxCloneSyncService::new(svc))
}

async fn serve_conn<I>(
    io: I,
    service: Limited,
    guards: &Guards,
    cancel: tokio_util::sync::CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(guards.header_timeout)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => { let _ = r; }
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(guards.grace, conn).await;
        }
    }
}

/// The routes.
pub fn router(broker: Arc<Broker>) -> Router {
    let state = AppState {
        broker,
        crls: Arc::default(),
    };
    Router::new()
        .route("/healthz", get(live))
        .route("/metrics", get(metrics_text))
        .route("/readyz", get(ready))
        .route("/bundle", get(bundle_json))
        .route("/bundle.pem", get(bundle_pem))
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/keys", get(jwks))
        .route("/crl/{id}", get(crl))
        .with_state(state)
}

/// Ready when the store answers and its last commit did not fail: a broker that cannot
/// record issuance cannot issue.
/// Liveness: fails only when a restart is what helps (a replica too far behind the shared
/// commit log); a store that cannot commit is not-ready, not dead (it recovers by itself).
async fn live(State(s): State<AppState>) -> impl IntoResponse {
    match s.broker.store().fatal() {
        None => (StatusCode::OK, "ok\n".to_owned()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("restart needed: {why}\n"),
        ),
    }
}

async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    if let Err(reason) = s.broker.store().health() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the store cannot commit ({reason})\n"),
        );
    }
    match s.broker.store().meta().await {
        Ok(_) => (StatusCode::OK, "ready\n".to_owned()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    s.broker.update_gauges();
    match crate::telemetry::prometheus() {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are handled by the embedding application's recorder\n",
        )
            .into_response(),
    }
}

async fn bundle_json(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        s.broker.keys().current().bundle_json.clone(),
    )
}

async fn bundle_pem(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        s.broker.keys().current().bundle.x509_pem(),
    )
}

/// The issuer, from configuration (set at start); never from the request, so a cache in
/// front of the broker cannot be made to serve a document naming another host.
fn issuer(s: &AppState) -> String {
    s.broker
        .config()
        .jwt_issuer
        .clone()
        .unwrap_or_else(|| s.broker.config().jwt_issuer_for(None))
}

async fn discovery(State(s): State<AppState>) -> impl IntoResponse {
    let iss = issuer(&s);
    let doc = json!({
        "issuer": iss,
        "jwks_uri": format!("{iss}/keys"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "claims_supported": ["sub", "aud", "exp", "iat", "jti", "iss", "scope"],
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.to_string(),
    )
}

async fn jwks(State(s): State<AppState>) -> Response {
    match s.broker.keys().current().bundle.oidc_jwks() {
        Ok(j) => ([(header::CONTENT_TYPE, "application/jwk-set+json")], j).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn crl(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let id = id.trim_end_matches(".crl").to_owned();
    let b = &s.broker;
    let now = b.clock().unix();
    let version = b.revocations().version();
    let ring = b.keys().current();
    let sequence = ring.bundle.sequence;
    if let Ok(cache) = s.crls.lock()
        && let Some(c) = cache.get(&id)
        && c.revocations_version == version
        && c.bundle_sequence == sequence
        && now < c.made_at + CRL_VALIDITY.as_secs() as i64 / 2
    {
        return (
            [(header::CONTENT_TYPE, "application/pkix-crl")],
            c.der.clone(),
        )
            .into_response();
    }
    // The root's CRL lists revoked intermediates; an intermediate's lists revoked leaves.
    let (ca, revoked): (&sigil_pki::CertificateAuthority, Vec<RevokedSerial>) = if id == "root" {
        let revoked = ring
            .records
            .iter()
            .filter(|r| r.kind == KeyKind::IntermediateCa && r.state == KeyState::Revoked)
            .filter_map(|r| {
                let cert = r.cert_der.as_ref()?;
                let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
                Some(RevokedSerial {
                    serial: c.raw_serial().to_vec(),
                    revoked_at: from_unix(r.changed_at / 1_000_000_000),
                })
            })
            .collect();
        (&ring.root, revoked)
    } else {
        let Some(int) = ring
            .intermediates
            .iter()
            .find(|i| i.id == id || i.ski == id)
        else {
            return (
                StatusCode::NOT_FOUND,
                format!("no CRL {id:?}: use /crl/root or /crl/<intermediate key id>\n"),
            )
                .into_response();
        };
        let Some(ca) = int.ca.as_ref() else {
            return (
                StatusCode::GONE,
                "that intermediate is retired or revoked; see /crl/root\n",
            )
                .into_response();
        };
        let revoked = b
            .revocations()
            .snapshot()
            .into_iter()
            .filter(|r| r.kind == CredentialKind::X509 && r.signing_key_id == int.id)
            .filter_map(|r| {
                Some(RevokedSerial {
                    serial: sigil_pki::ids::from_hex(&r.credential_id)?,
                    revoked_at: from_unix(r.revoked_at),
                })
            })
            .collect();
        (ca, revoked)
    };
    let number = u64::try_from(crate::clock::unix_nanos(b.clock().now())).unwrap_or(0);
    match ca.crl(
        &revoked,
        b.clock().now(),
        b.clock().now() + CRL_VALIDITY,
        number,
    ) {
        Ok(der) => {
            if let Ok(mut cache) = s.crls.lock() {
                cache.insert(
                    id,
                    CachedCrl {
                        revocations_version: version,
                        bundle_sequence: sequence,
                        made_at: now,
                        der: der.clone(),
                    },
                );
            }
            ([(header::CONTENT_TYPE, "application/pkix-crl")], der).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("CRL: {e}\n")).into_response(),
    }
}
