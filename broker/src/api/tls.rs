//! The TLS listener. The broker drives rustls itself (rather than through tonic) to control
//! client certificates: they are optional (`Attest` needs none), verified against the
//! workload root and the operator CA, and parsed once per connection into [`ConnInfo`].
//! The server certificate comes from a resolver that is swapped atomically on renewal.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::attest::x509::PeerCert;
use crate::broker::Broker;

/// What a handler learns about its connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The verified client certificate, if one was presented.
    pub peer: Option<Arc<PeerCert>>,
}

/// A server-side TLS connection that tells tonic about its peer.
pub type TlsConn = super::Conn<TlsStream<TcpStream>, ConnInfo>;

/// The broker's own certificate, swapped atomically when renewed.
#[derive(Debug)]
pub struct ServerCertResolver(ArcSwap<CertifiedKey>);

impl ServerCertResolver {
    /// Starts with `key`.
    pub fn new(key: CertifiedKey) -> Self {
        ServerCertResolver(ArcSwap::from_pointee(key))
    }

    /// Replaces the certificate for new handshakes.
    pub fn set(&self, key: CertifiedKey) {
        self.0.store(Arc::new(key));
    }
}

impl ResolvesServerCert for ServerCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Builds a rustls certified key from a chain and a PKCS#8 key.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    pkcs8: &[u8],
) -> Result<CertifiedKey, rustls::Error> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            pkcs8.to_vec(),
        )))?;
    Ok(CertifiedKey::new(chain, key))
}

/// The server TLS config: optional client certificates verified against `client_roots`,
/// HTTP/2 only, and no session resumption (neither TLS 1.2 session ids nor TLS 1.3 tickets):
/// every connection verifies its client certificate afresh, so a certificate revoked since an
/// earlier handshake cannot resume its way back in.
///
/// A revoked certificate still completes a full handshake (revocation is checked on every
/// call, where the refusal can say why; a TLS 1.3 client only notices a handshake refused
/// after it has sent its request, as a bare connection reset).
pub fn server_config(
    client_roots: &[CertificateDer<'static>],
    resolver: Arc<ServerCertResolver>,
    clock: Arc<dyn crate::clock::Clock>,
) -> Result<ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for r in client_roots {
        roots.add(r.clone())?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    // Client certificates are judged by the broker's clock, like everything else it decides.
    let mut cfg = ServerConfig::builder_with_details(provider, Arc::new(ClockTime(clock)))
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// The broker's clock as rustls reads time.
#[derive(Debug)]
struct ClockTime(Arc<dyn crate::clock::Clock>);

impl rustls::time_provider::TimeProvider for ClockTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        Some(rustls::pki_types::UnixTime::since_unix_epoch(
            self.0.now().duration_since(std::time::UNIX_EPOCH).ok()?,
        ))
    }
}

/// Accepts TCP connections and runs TLS handshakes concurrently (a slow client never holds up
/// others), yielding finished connections to the gRPC server until `cancel` fires.
///
/// Every connection takes a slot of `budget` (per source address and in total) before its
/// handshake; one over budget is closed at once.
pub fn spawn_acceptor(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    broker: Arc<Broker>,
    handshake_timeout: Duration,
    budget: Arc<crate::conns::ConnLimit>,
    cancel: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(1024);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning, and
                    // say so once per interval, not per attempt.
                    budget.log_once(|| format!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = budget.admit(&remote.ip().to_string()) else {
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let broker = broker.clone();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            metrics::counter!("sigil_tls_handshake_failures_total").increment(1);
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                let peer = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| {
                        PeerCert::parse(leaf, &broker.keys().current().operator_ca_subject)
                    })
                    .map(Arc::new);
                let _ = tx
                    .send(Ok(TlsConn::new(stream, ConnInfo { remote, peer })
                        .with_slot(slot)
                        .with_first_read_deadline(handshake_timeout)))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
