//! SDK errors, sorted by what the caller should do about them.

use std::fmt;

use tonic::Code;

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Transient (broker unreachable, overloaded, could not commit): keep the current
    /// credential and retry with backoff.
    Retryable,
    /// The broker no longer accepts this workload's proof (certificate expired or revoked,
    /// token used): attest again with fresh evidence.
    Reattest,
    /// Retrying will not help (denied by a gate, bad request, misconfiguration).
    Fatal,
}

/// An SDK error. The message is the broker's (or the SDK's) plain-words explanation.
#[derive(Clone, PartialEq, Eq)]
pub struct SdkError {
    kind: ErrorKind,
    code: Option<Code>,
    message: String,
    gate: Option<String>,
    request_id: Option<String>,
    retry_after: Option<std::time::Duration>,
}

impl SdkError {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        SdkError {
            kind,
            code: None,
            message: message.into(),
            gate: None,
            request_id: None,
            retry_after: None,
        }
    }

    /// How long the broker asked the caller to wait before trying again (a rate limit).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }

    /// What to do about it.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The gRPC code, when the broker answered.
    pub fn code(&self) -> Option<Code> {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Which gate refused (`gate1.identity_proof`, ...), for denials.
    pub fn gate(&self) -> Option<&str> {
        self.gate.as_deref()
    }

    /// The broker's request id (also in its audit log).
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    pub(crate) fn fatal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Fatal, message)
    }
}

impl fmt::Display for SdkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(c) => write!(f, "{}: {}", code_name(c), self.message)?,
            None => f.write_str(&self.message)?,
        }
        if let Some(r) = &self.request_id {
            write!(f, " [request id {r}]")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SdkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SdkError")
            .field("kind", &self.kind)
            .field("code", &self.code)
            .field("message", &self.message)
            .field("gate", &self.gate)
            .finish()
    }
}

impl std::error::Error for SdkError {}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission denied",
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::FailedPrecondition => "failed precondition",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::ResourceExhausted => "resource exhausted",
        Code::Internal => "internal",
        _ => "error",
    }
}

impl From<tonic::Status> for SdkError {
    fn from(s: tonic::Status) -> Self {
        let kind = match s.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled => ErrorKind::Retryable,
            Code::Unauthenticated => ErrorKind::Reattest,
            _ => ErrorKind::Fatal,
        };
        let meta = |k: &str| {
            s.metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        // Transport failures come back as Unavailable/Unknown with the cause in the source.
        let mut message = s.message().to_owned();
        if message.is_empty() {
            message = format!("{s}");
        }
        let (mut kind, mut code) = (kind, Some(s.code()));
        match tls_cause(&s) {
            // A peer that refuses our certificate outright: attest again.
            Some(TlsCause::CertificateRevoked) => {
                kind = ErrorKind::Reattest;
                code = Some(Code::Unauthenticated);
                message = "the broker refused this workload's certificate in the TLS handshake: it was revoked; attest again with fresh evidence".into();
            }
            Some(TlsCause::UnknownIssuer(e)) => {
                // Misconfiguration, not an outage: retrying will not help.
                kind = ErrorKind::Fatal;
                code = None;
                message = format!(
                    "the broker's certificate does not chain to the trust bundle given ({e}): the bundle is another broker's, or out of date; get this broker's current bundle.pem"
                );
            }
            Some(TlsCause::NotTls) => {
                kind = ErrorKind::Fatal;
                code = None;
                message = "the other end does not speak TLS: is this the broker's gRPC port (not its HTTP port)?".into();
            }
            Some(TlsCause::NotGrpc) => {
                kind = ErrorKind::Fatal;
                code = None;
                message = "the other end speaks TLS but not gRPC (no HTTP/2): is this the broker's gRPC port (not its HTTP port)?".into();
            }
            Some(TlsCause::Other(e)) => message = format!("TLS with the broker failed: {e}"),
            None if connection_refused(&s) => {
                message = "nothing is listening there (connection refused): is the broker running, and is this its gRPC address?".into();
            }
            None => {}
        }
        SdkError {
            kind,
            code,
            gate: meta("sigil-gate"),
            request_id: meta("sigil-request-id"),
            retry_after: meta("sigil-retry-after-ms")
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_millis),
            message,
        }
    }
}

/// What a TLS failure behind a transport error was.
enum TlsCause {
    /// The broker sent alert `certificate_revoked`.
    CertificateRevoked,
    /// The broker's certificate does not chain to our roots.
    UnknownIssuer(String),
    /// The other end answered with something that is not TLS.
    NotTls,
    /// The other end speaks TLS but not HTTP/2 (an HTTP/1 server).
    NotGrpc,
    /// Anything else, in words.
    Other(String),
}

/// Whether the transport error behind `s` is a refused connection.
fn connection_refused(s: &tonic::Status) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        cur = e.source();
    }
    false
}

fn classify(e: &rustls::Error) -> TlsCause {
    match e {
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked) => {
            TlsCause::CertificateRevoked
        }
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
        ) => TlsCause::UnknownIssuer(e.to_string()),
        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => {
            TlsCause::NotTls
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol) => {
            TlsCause::NotGrpc
        }
        other => TlsCause::Other(other.to_string()),
    }
}

/// The TLS failure behind a transport error, if that is what it was. tokio-rustls hands
/// rustls errors up as `io::Error`s of kind `InvalidData`, sometimes only as text.
fn tls_cause(s: &tonic::Status) -> Option<TlsCause> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = cur {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(t) = tls {
            return Some(classify(t));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::InvalidData
        {
            let text = io.to_string();
            if text.contains("CertificateRevoked") {
                return Some(TlsCause::CertificateRevoked);
            }
            if text.contains("UnknownIssuer") {
                return Some(TlsCause::UnknownIssuer(text));
            }
            if text.contains("InvalidContentType") {
                return Some(TlsCause::NotTls);
            }
            if text.contains("NoApplicationProtocol") {
                return Some(TlsCause::NotGrpc);
            }
            return Some(TlsCause::Other(text));
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_sort_into_what_to_do() {
        assert_eq!(
            SdkError::from(tonic::Status::unavailable("x")).kind(),
            ErrorKind::Retryable
        );
        assert_eq!(
            SdkError::from(tonic::Status::unauthenticated("x")).kind(),
            ErrorKind::Reattest
        );
        assert_eq!(
            SdkError::from(tonic::Status::permission_denied("x")).kind(),
            ErrorKind::Fatal
        );
        let mut s =
            tonic::Status::permission_denied("denied by gate 2 (entitlement scope): audience");
        s.metadata_mut()
            .insert("sigil-gate", "gate2.entitlement_scope".parse().unwrap());
        let e = SdkError::from(s);
        assert_eq!(e.gate(), Some("gate2.entitlement_scope"));
        assert!(
            e.to_string()
                .starts_with("permission denied: denied by gate 2")
        );
    }
}
