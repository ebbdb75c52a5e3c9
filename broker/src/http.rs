//! The HTTP listener: health and the trust bundle, for load balancers and verifiers that do
//! not speak gRPC.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::broker::Broker;

/// The routes.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/bundle", get(bundle_json))
        .route("/bundle.pem", get(bundle_pem))
        .with_state(broker)
}

/// Ready when the store answers and its last commit did not fail: a broker that cannot
/// record issuance cannot issue.
async fn ready(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    if let Err(reason) = b.store().health() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the store cannot commit ({reason})\n"),
        );
    }
    match b.store().meta().await {
        Ok(_) => (StatusCode::OK, "ready\n".to_owned()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

async fn bundle_json(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        b.keys().current().bundle_json.clone(),
    )
}

async fn bundle_pem(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        b.keys().current().bundle.x509_pem(),
    )
}
