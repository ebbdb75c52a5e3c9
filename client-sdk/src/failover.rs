//! Several broker replicas behind one client: [`Failover`] is a gRPC channel over a list of
//! brokers (`https://a:8443,https://b:8443`, or a DNS name that resolves to several addresses)
//! that moves to the next one when the current one is gone or answers `Unavailable`.
//!
//! Every call of Sigil's APIs is unary or server-streaming, so its request is small and
//! complete: it is buffered, and sent again to the next replica when the current one refused
//! it with `Unavailable` (which a broker answers only for what it did not do: nothing issued,
//! nothing changed) or could not be reached. A stream that breaks later (a replica killed
//! under a `Watch`) is reopened by its owner, and lands on the next replica; `Watch` resumes
//! from the last sequence seen, and a replica that does not know that sequence sends a full
//! snapshot, so no revocation is missed in between.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt as _;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::Channel;
use tower::{Service, ServiceExt as _};

use crate::SdkError;
use crate::transport::{self, BrokerTarget};

/// The brokers a client may use, and which one it uses now (shared by every channel a client
/// makes, so all of them move together).
#[derive(Debug)]
pub struct Targets {
    list: Vec<BrokerTarget>,
    current: AtomicUsize,
}

impl Targets {
    /// Parses one broker URL or several separated by commas. A DNS name that resolves to
    /// several addresses counts as one broker per address.
    pub fn parse(urls: &str) -> Result<Self, SdkError> {
        let mut list = Vec::new();
        for u in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            list.extend(BrokerTarget::parse(u)?.expand());
        }
        if list.is_empty() {
            return Err(SdkError::fatal("no broker URL given"));
        }
        if list.len() > 1 && list.iter().any(BrokerTarget::is_unix) {
            return Err(SdkError::fatal(
                "a Unix socket cannot be one of several brokers: name it alone",
            ));
        }
        Ok(Targets {
            list,
            current: AtomicUsize::new(0),
        })
    }

    /// How many brokers.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are none (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The first broker (the one a Unix socket client uses).
    pub fn first(&self) -> &BrokerTarget {
        &self.list[0]
    }

    /// Whether the broker is the local Unix socket.
    pub fn is_unix(&self) -> bool {
        self.list.iter().any(BrokerTarget::is_unix)
    }

    fn current(&self) -> usize {
        self.current.load(Ordering::SeqCst) % self.list.len()
    }

    /// Moves on from broker `from` (unless another call already did).
    fn fail_over(&self, from: usize) {
        let next = (from + 1) % self.list.len();
        if self
            .current
            .compare_exchange(from, next, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            tracing::info!(
                from = %self.list[from].describe(),
                to = %self.list[next].describe(),
                "broker unavailable; moving to the next one"
            );
        }
    }
}

/// A gRPC channel over several brokers; see the module docs.
#[derive(Debug, Clone)]
pub struct Failover {
    targets: Arc<Targets>,
    channels: Arc<Vec<Channel>>,
}

impl Failover {
    /// One lazily connected channel per broker in `targets`, with `tls`.
    pub fn new(
        targets: Arc<Targets>,
        tls: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> Result<Self, SdkError> {
        let channels = targets
            .list
            .iter()
            .map(|t| transport::channel(t, tls.clone(), timeout))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Failover {
            targets,
            channels: Arc::new(channels),
        })
    }

    /// The brokers.
    pub fn targets(&self) -> &Arc<Targets> {
        &self.targets
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `grpc-status: 14` in the response headers: a trailers-only `Unavailable`.
fn unavailable(resp: &http::Response<Body>) -> bool {
    resp.headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"14")
}

impl Service<http::Request<Body>> for Failover {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call readies the channel it uses.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let n = this.channels.len();
            if n == 1 {
                let mut ch = this.channels[0].clone();
                return Ok(ch.ready().await?.call(req).await?);
            }
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await?.to_bytes();
            let mut last_resp: Option<http::Response<Body>> = None;
            let mut last_err: Option<BoxError> = None;
            for _ in 0..n {
                let at = this.targets.current();
                let mut ch = this.channels[at].clone();
                let body = http_body_util::Full::new(bytes.clone()).map_err(|e| match e {});
                let req = http::Request::from_parts(parts.clone(), Body::new(body));
                let sent = match ch.ready().await {
                    Ok(ready) => ready.call(req).await,
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(resp) if !unavailable(&resp) => return Ok(resp),
                    Ok(resp) => {
                        this.targets.fail_over(at);
                        last_resp = Some(resp);
                    }
                    Err(e) => {
                        this.targets.fail_over(at);
                        last_err = Some(e.into());
                    }
                }
            }
            // Every broker refused or could not be reached: the last refusal stands.
            if let Some(r) = last_resp {
                return Ok(r);
            }
            Err(last_err.unwrap_or_else(|| "every broker is unavailable".into()))
        })
    }
}
