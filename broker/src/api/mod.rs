//! gRPC services over the TLS listener: the workload [`workload::WorkloadApi`] and the
//! operator [`admin::AdminApi`]. [`status`] is the one place a [`BrokerError`] becomes a
//! `tonic::Status`.

use std::time::Duration;

use tonic::{Code, Request, Status};

use crate::broker::RequestContext;
use crate::error::BrokerError;

pub mod admin;
pub mod spiffe;
pub mod tls;
pub mod unix;
pub mod workload;

/// The request context of a tonic request.
pub fn context<T>(req: &Request<T>) -> RequestContext {
    let mut ctx = match req.extensions().get::<tls::ConnInfo>() {
        Some(info) => RequestContext::new(Some(info.remote), info.peer.clone()),
        None => RequestContext::new(None, None),
    };
    if let Some(id) = req.extensions().get::<crate::telemetry::RequestId>() {
        ctx.request_id = id.0.clone();
    }
    ctx.unix = req
        .extensions()
        .get::<crate::attest::unix::UnixPeer>()
        .copied();
    if ctx.unix.is_some() {
        ctx.spiffe_id_hint = req
            .metadata()
            .get(SPIFFE_ID_HINT)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 2048)
            .map(str::to_owned);
    }
    ctx
}

/// Metadata naming which identity a Unix-socket caller acts as, when its process matches
/// several.
pub const SPIFFE_ID_HINT: &str = "sigil-spiffe-id";

/// Turns a broker error into the status the caller sees. Gate denials carry the gate in
/// `sigil-gate` metadata; every status carries `sigil-request-id`, which is also in the audit
/// log and the broker's logs.
pub fn status(e: BrokerError, ctx: &RequestContext) -> Status {
    let code = match &e {
        BrokerError::AttestationFailed { .. } | BrokerError::Unauthenticated(_) => {
            Code::Unauthenticated
        }
        BrokerError::Denied { .. } => Code::PermissionDenied,
        BrokerError::InvalidArgument { .. } => Code::InvalidArgument,
        BrokerError::NotFound(_) => Code::NotFound,
        BrokerError::AlreadyExists(_) => Code::AlreadyExists,
        BrokerError::FailedPrecondition(_) => Code::FailedPrecondition,
        BrokerError::Unavailable(_) => Code::Unavailable,
        BrokerError::Internal(_) => Code::Internal,
    };
    let message = match &e {
        BrokerError::Internal(detail) => {
            tracing::error!(request_id = %ctx.request_id, %detail, "internal error");
            format!(
                "internal error (request id {}); see the broker's log",
                ctx.request_id
            )
        }
        other => other.to_string(),
    };
    let mut s = Status::new(code, message);
    if let Ok(v) = ctx.request_id.parse() {
        s.metadata_mut().insert("sigil-request-id", v);
    }
    if let BrokerError::Denied { gate, .. } = &e
        && let Ok(v) = gate.code().parse()
    {
        s.metadata_mut().insert("sigil-gate", v);
    }
    s
}

/// `0` means "the default".
pub(crate) fn ttl(secs: u32) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(u64::from(secs)))
}
