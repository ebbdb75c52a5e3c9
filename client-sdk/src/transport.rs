//! Connections to the broker: gRPC over rustls with the trust bundle as the only roots, and an
//! optional client certificate that can be swapped without rebuilding the config.
//!
//! TLS is always done here, by our connector, never by tonic: tonic is given an `http://`
//! endpoint so no tonic feature set (which an application may change) can skip or double it.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::SdkError;

/// Where the broker is.
#[derive(Debug, Clone)]
pub struct BrokerTarget {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    /// The broker's Unix socket (`unix:///run/sigil/workload.sock`): plain gRPC, the kernel
    /// proves who the caller is.
    unix: Option<std::path::PathBuf>,
}

impl BrokerTarget {
    /// Whether this is the broker's Unix socket (no TLS; the kernel vouches for the caller).
    pub fn is_unix(&self) -> bool {
        self.unix.is_some()
    }

    /// Parses `https://host:port` (or `host:port`). Plain `http://` is refused: the broker
    /// only speaks TLS.
    pub fn parse(url: &str) -> Result<Self, SdkError> {
        let url = url.trim();
        if let Some(path) = url
            .strip_prefix("unix://")
            .or_else(|| url.strip_prefix("unix:"))
        {
            if !path.starts_with('/') {
                return Err(SdkError::fatal(format!(
                    "broker URL {url:?}: a Unix socket needs an absolute path (unix:///run/sigil/workload.sock)"
                )));
            }
            return Ok(BrokerTarget {
                host: "localhost".into(),
                port: 0,
                server_name: ServerName::try_from("localhost")
                    .map_err(|_| SdkError::fatal("localhost"))?,
                unix: Some(path.into()),
            });
        }
        let url = url.trim_end_matches('/');
        let rest = if let Some(r) = url.strip_prefix("https://") {
            r
        } else if url.starts_with("http://") {
            return Err(SdkError::fatal(format!(
                "broker URL {url:?} uses http://; the broker only speaks TLS, use https://"
            )));
        } else {
            url
        };
        let uri: Uri = format!("https://{rest}")
            .parse()
            .map_err(|e| SdkError::fatal(format!("broker URL {url:?} is not valid: {e}")))?;
        let host = uri
            .host()
            .ok_or_else(|| SdkError::fatal(format!("broker URL {url:?} has no host")))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone()).map_err(|_| {
            SdkError::fatal(format!(
                "broker host {host:?} is not a valid DNS name or IP address"
            ))
        })?;
        Ok(BrokerTarget {
            host,
            port,
            server_name,
            unix: None,
        })
    }
}

impl BrokerTarget {
    /// One target per address a DNS name resolves to (each still verified as the name), so
    /// several replicas behind one name are failed over between; the target itself for an IP
    /// address, a Unix socket, or a name that does not resolve now (it is tried again when
    /// connecting).
    pub(crate) fn expand(self) -> Vec<BrokerTarget> {
        if self.unix.is_some() || !matches!(self.server_name, ServerName::DnsName(_)) {
            return vec![self];
        }
        let addrs: Vec<std::net::SocketAddr> =
            match std::net::ToSocketAddrs::to_socket_addrs(&(self.host.as_str(), self.port)) {
                Ok(a) => a.collect(),
                Err(_) => return vec![self],
            };
        if addrs.len() < 2 {
            return vec![self];
        }
        addrs
            .into_iter()
            .map(|a| BrokerTarget {
                host: a.ip().to_string(),
                port: a.port(),
                server_name: self.server_name.clone(),
                unix: None,
            })
            .collect()
    }

    /// How the target is named in messages.
    pub fn describe(&self) -> String {
        match &self.unix {
            Some(p) => format!("unix://{}", p.display()),
            None if self.host.contains(':') => format!("https://[{}]:{}", self.host, self.port),
            None => format!("https://{}:{}", self.host, self.port),
        }
    }
}

/// Roots from PEM text (a `bundle.pem`).
pub fn roots_from_pem(pem: &[u8]) -> Result<Arc<RootCertStore>, SdkError> {
    let certs = sigil_pki::certs_from_pem(pem)
        .map_err(|e| SdkError::fatal(format!("trust bundle: {e}")))?;
    roots_from_der(&certs)
}

/// Roots from DER certificates.
pub fn roots_from_der(certs: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, SdkError> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots
            .add(c.clone())
            .map_err(|e| SdkError::fatal(format!("trust bundle certificate refused: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// A client certificate slot; empty until the workload has an SVID.
#[derive(Debug, Default)]
pub struct ClientCertSlot(ArcSwapOption<CertifiedKey>);

impl ClientCertSlot {
    /// Presents `chain` + `pkcs8` from the next handshake on.
    pub fn set(&self, chain: Vec<CertificateDer<'static>>, pkcs8: &[u8]) -> Result<(), SdkError> {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                pkcs8.to_vec(),
            )))
            .map_err(|e| SdkError::fatal(format!("client key: {e}")))?;
        self.0.store(Some(Arc::new(CertifiedKey::new(chain, key))));
        Ok(())
    }
}

impl ResolvesClientCert for ClientCertSlot {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }

    fn has_certs(&self) -> bool {
        self.0.load().is_some()
    }
}

/// A rustls client config trusting only `roots`, presenting whatever `client` holds.
pub fn client_config(
    roots: Arc<RootCertStore>,
    client: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<Arc<rustls::ClientConfig>, SdkError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SdkError::fatal(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some(c) => b.with_client_cert_resolver(c),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // The broker resumes no sessions; do not offer any (and keep no session state around).
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Verifies the broker's certificate (hostname and chain) against whatever roots the trust
/// state holds now, so the connection follows root rotation.
#[derive(Debug)]
struct BrokerVerifier {
    trust: Arc<crate::trust::TrustState>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    cache: std::sync::Mutex<Option<(usize, Arc<rustls::client::WebPkiServerVerifier>)>>,
}

impl BrokerVerifier {
    fn inner(&self) -> Result<Arc<rustls::client::WebPkiServerVerifier>, rustls::Error> {
        let roots = self.trust.current_roots();
        let key = Arc::as_ptr(&roots) as usize;
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| rustls::Error::General("verifier cache poisoned".into()))?;
        if let Some((k, v)) = cache.as_ref()
            && *k == key
        {
            return Ok(v.clone());
        }
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.roots(),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        *cache = Some((key, v.clone()));
        Ok(v)
    }
}

impl rustls::client::danger::ServerCertVerifier for BrokerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner()?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config for the broker that trusts whatever roots `trust` holds now.
pub fn dynamic_client_config(
    trust: Arc<crate::trust::TrustState>,
    client: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<Arc<rustls::ClientConfig>, SdkError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let time = trust.time_provider();
    let verifier = Arc::new(BrokerVerifier {
        trust,
        provider: provider.clone(),
        cache: std::sync::Mutex::new(None),
    });
    let b = rustls::ClientConfig::builder_with_details(provider, time)
        .with_safe_default_protocol_versions()
        .map_err(|e| SdkError::fatal(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match client {
        Some(c) => b.with_client_cert_resolver(c),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A lazily-connecting channel to `target` over `tls`.
pub fn channel(
    target: &BrokerTarget,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Channel, SdkError> {
    let authority = match target.server_name {
        ServerName::IpAddress(rustls_pki_types::IpAddr::V6(_)) => {
            format!("[{}]:{}", target.host, target.port)
        }
        _ => format!("{}:{}", target.host, target.port),
    };
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| SdkError::fatal(format!("broker address {authority}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(path) = target.unix.clone() {
        let connector = tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        });
        return Ok(endpoint.connect_with_connector_lazy(connector));
    }
    let target = target.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let tls = tls.clone();
        let target = target.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(target.server_name.clone(), tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_and_http_is_refused() {
        let t = BrokerTarget::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 8443));
        let t = BrokerTarget::parse("broker.internal:9000").unwrap();
        assert!(matches!(t.server_name, ServerName::DnsName(_)));
        let t = BrokerTarget::parse("https://[::1]:8443/").unwrap();
        assert_eq!(t.host, "::1");
        assert!(
            BrokerTarget::parse("http://127.0.0.1:8443")
                .unwrap_err()
                .to_string()
                .contains("only speaks TLS")
        );
    }
}
