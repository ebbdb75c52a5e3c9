//! The rate limit in front of every gRPC service: one token per call from the caller's bucket
//! (its identity when it presents a client certificate or calls over the Unix socket, its
//! source address otherwise), before any work, and a slot in the budget of calls in flight of
//! that workload instance (its certificate, its process on the Unix socket, or its address),
//! held until the call is answered or its stream ends. Health checks and reflection
//! are never limited.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Bytes, Frame, SizeHint};
use tonic::codegen::http;

use crate::attest::unix::UnixPeer;
use crate::ratelimit::{Class, RateLimits, StreamSlot, retry_ms};

use super::tls::ConnInfo;

/// Adds [`RateLimitService`].
#[derive(Debug, Clone)]
pub struct RateLimitLayer(pub Arc<RateLimits>);

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limits: self.0.clone(),
        }
    }
}

/// See [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimitService<S> {
    inner: S,
    limits: Arc<RateLimits>,
}

/// The bucket a request draws from.
fn bucket<B>(req: &http::Request<B>) -> (Class, String) {
    if let Some(u) = req.extensions().get::<UnixPeer>() {
        return (Class::Authenticated, format!("uid:{}", u.uid));
    }
    match req.extensions().get::<ConnInfo>() {
        Some(ConnInfo { peer: Some(p), .. }) => (
            Class::Authenticated,
            p.spiffe_id
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_else(|| format!("serial:{}", p.serial_hex())),
        ),
        Some(c) => (Class::Unauthenticated, c.remote.ip().to_string()),
        None => (Class::Unauthenticated, "unknown".into()),
    }
}

/// The client whose calls in flight are counted: one workload instance — its certificate
/// (replicas sharing an identity each have their own), its process on the Unix socket — or
/// its source address when it presents no credential.
fn instance<B>(req: &http::Request<B>) -> String {
    if let Some(u) = req.extensions().get::<UnixPeer>() {
        return match u.pid {
            Some(pid) => format!("uid:{}/pid:{pid}", u.uid),
            None => format!("uid:{}", u.uid),
        };
    }
    match req.extensions().get::<ConnInfo>() {
        Some(ConnInfo { peer: Some(p), .. }) => format!("serial:{}", p.serial_hex()),
        Some(c) => c.remote.ip().to_string(),
        None => "unknown".into(),
    }
}

impl<S, B> tower::Service<http::Request<B>> for RateLimitService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let exempt = path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.");
        if exempt {
            return Box::pin(self.inner.call(req));
        }
        let (class, key) = bucket(&req);
        // The budget of calls in flight first: a call refused for it takes no token.
        let slot = match self.limits.streams() {
            None => None,
            Some(budget) => match budget.admit(&instance(&req)) {
                Some(slot) => Some(slot),
                None => {
                    let status = tonic::Status::resource_exhausted(format!(
                        "this client already has {} calls in flight \
                         (limits.max_streams_per_client); wait for one to end",
                        budget.max()
                    ));
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            },
        };
        if let Err(wait) = self.limits.check(class, &key) {
            let ms = retry_ms(wait);
            let mut status = tonic::Status::resource_exhausted(format!(
                "rate limit: too many calls from this {} ({}); retry in {ms} ms",
                if class == Class::Authenticated {
                    "identity"
                } else {
                    "address"
                },
                if class == Class::Authenticated {
                    "limits.authenticated_per_second"
                } else {
                    "limits.unauthenticated_per_second"
                }
            ));
            if let Ok(v) = ms.to_string().parse() {
                status.metadata_mut().insert("sigil-retry-after-ms", v);
            }
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let call = self.inner.call(req);
        match slot {
            None => Box::pin(call),
            Some(slot) => Box::pin(async move {
                let response = call.await?;
                Ok(response.map(|body| tonic::body::Body::new(Held { body, _slot: slot })))
            }),
        }
    }
}

/// A response body that holds its call's slot until the body ends or is dropped.
struct Held {
    body: tonic::body::Body,
    _slot: StreamSlot,
}

impl hyper::body::Body for Held {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
