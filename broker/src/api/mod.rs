//! gRPC services over the TLS listener: the workload [`workload::WorkloadApi`] and the
//! operator [`admin::AdminApi`]. [`status`] is the one place a [`BrokerError`] becomes a
//! `tonic::Status`.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::{Code, Request, Status};

use crate::broker::RequestContext;
use crate::error::BrokerError;

pub mod admin;
pub mod limit;
pub mod spiffe;
pub mod tls;
pub mod unix;
pub mod workload;

/// An accepted connection with what the listener learned about its peer (the verified client
/// certificate, or the kernel's peer credentials), which tonic puts in every request's
/// extensions.
#[derive(Debug)]
pub struct Conn<S, I> {
    inner: S,
    info: I,
    /// Its slot in the listener's connection budget, freed when the connection ends.
    _slot: Option<crate::conns::ConnGuard>,
    /// Until the peer sends its first bytes (the HTTP/2 preface): when it fires, the
    /// connection is closed, so a client that connects and stays silent holds no slot (and
    /// does not hold up shutdown) for longer than this.
    first_read: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S, I> Conn<S, I> {
    /// Wraps `inner`, accepted from a peer described by `info`.
    pub fn new(inner: S, info: I) -> Self {
        Conn {
            inner,
            info,
            _slot: None,
            first_read: None,
        }
    }

    /// Closes the connection if the peer has sent nothing `within` from now.
    pub fn with_first_read_deadline(mut self, within: Duration) -> Self {
        self.first_read = Some(Box::pin(tokio::time::sleep(within)));
        self
    }

    /// Holds `slot` for as long as the connection lives.
    pub fn with_slot(mut self, slot: crate::conns::ConnGuard) -> Self {
        self._slot = Some(slot);
        self
    }
}

impl<S, I: Clone + Send + Sync + 'static> tonic::transport::server::Connected for Conn<S, I> {
    type ConnectInfo = I;
    fn connect_info(&self) -> I {
        self.info.clone()
    }
}

impl<S: AsyncRead + Unpin, I: Unpin> AsyncRead for Conn<S, I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Some(deadline) = self.first_read.as_mut() {
            match &polled {
                Poll::Ready(Ok(())) if buf.filled().len() > before => self.first_read = None,
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    metrics::counter!("sigil_silent_connections_closed_total").increment(1);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer sent nothing after connecting",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin, I: Unpin> AsyncWrite for Conn<S, I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

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
        BrokerError::ResourceExhausted(_) => Code::ResourceExhausted,
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
