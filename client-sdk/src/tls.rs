//! rustls integration for workload-to-workload mTLS.
//!
//! [`crate::Source::server_config`] and [`crate::Source::client_config`] build configs that
//! always present the current SVID (resolved on every handshake, so renewal swaps it without
//! a restart) and verify peers the SPIFFE way: the chain must lead to the current bundle's
//! roots, the peer must have exactly one SPIFFE ID, which the [`Authorizer`] must accept, and
//! neither its certificate nor the CA that signed it may be revoked. Session resumption is off,
//! so a resumed session can never skip the check of a peer revoked since.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sigil_pki::{SpiffeId, TrustDomain};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::clock::Clock as _;
use crate::trust::TrustState;
use crate::{SdkError, X509Svid};

/// Which peers to accept, by SPIFFE ID.
#[derive(Clone)]
pub enum Authorizer {
    /// Any SPIFFE ID that chains to the bundle.
    Any,
    /// Exactly this one.
    Exact(SpiffeId),
    /// One of these.
    OneOf(Vec<SpiffeId>),
    /// Any member of this trust domain.
    MemberOf(TrustDomain),
    /// Decided by a function.
    Custom(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>),
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authorizer::Any => f.write_str("Any"),
            Authorizer::Exact(id) => write!(f, "Exact({id})"),
            Authorizer::OneOf(ids) => write!(f, "OneOf({ids:?})"),
            Authorizer::MemberOf(td) => write!(f, "MemberOf({td})"),
            Authorizer::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

impl Authorizer {
    /// Whether `id` is accepted.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Authorizer::Any => true,
            Authorizer::Exact(x) => x == id,
            Authorizer::OneOf(xs) => xs.contains(id),
            Authorizer::MemberOf(td) => id.is_member_of(td),
            Authorizer::Custom(f) => f(id),
        }
    }
}

/// Why a peer certificate was refused.
fn refuse(why: String) -> rustls::Error {
    rustls::Error::General(why)
}

fn hex(b: &[u8]) -> String {
    sigil_pki::ids::to_hex(b)
}

/// Verifies a peer chain against the trust state; returns the peer's SPIFFE ID.
pub fn verify_peer(
    trust: &TrustState,
    authorizer: &Authorizer,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, rustls::Error> {
    let roots = trust.current_roots();
    let ee = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| refuse(format!("peer certificate does not parse: {e}")))?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        roots.anchors(),
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(|e| {
        refuse(format!(
            "peer certificate does not chain to the trust bundle: {e}"
        ))
    })?;
    let (_, leaf) = X509Certificate::from_der(end_entity)
        .map_err(|_| refuse("peer certificate does not parse".into()))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for g in &san.value.general_names {
            if let GeneralName::URI(u) = g {
                uris.push(*u);
            }
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(refuse(format!(
            "peer certificate must have exactly one URI SAN (a SPIFFE ID), it has {}",
            uris.len()
        )));
    };
    let id: SpiffeId = uri
        .parse()
        .map_err(|e| refuse(format!("peer URI SAN is not a SPIFFE ID: {e}")))?;
    let revs = trust.revocations();
    let serial = hex(leaf.raw_serial());
    if revs.is_revoked(&serial) {
        return Err(refuse(format!(
            "peer certificate {serial} ({id}) is revoked"
        )));
    }
    let aki = leaf
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| hex(k.0))
            }
            _ => None,
        });
    if aki.is_some_and(|k| revs.revoked_keys.contains(&k)) {
        return Err(refuse(format!(
            "the CA that signed {id}'s certificate is revoked"
        )));
    }
    if !authorizer.allows(&id) {
        return Err(refuse(format!(
            "peer {id} is not authorized ({authorizer:?})"
        )));
    }
    Ok(id)
}

/// The server side: verifies client certificates.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    trust: Arc<TrustState>,
    authorizer: Authorizer,
    provider: Arc<CryptoProvider>,
}

/// The client side: verifies server certificates (by SPIFFE ID, not host name).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: Arc<TrustState>,
    authorizer: Authorizer,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_peer(
            &self.trust,
            &self.authorizer,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )
        .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_peer(
            &self.trust,
            &self.authorizer,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )
        .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The current SVID as a rustls certified key, swapped when the SVID changes and withdrawn
/// when it expires.
#[derive(Debug, Default)]
pub struct SvidResolver {
    key: ArcSwapOption<(CertifiedKey, i64)>,
    /// Expiry is judged by this clock (the system's when `None`).
    clock: Option<Arc<dyn crate::clock::Clock>>,
}

impl SvidResolver {
    /// A resolver that judges expiry by `clock`.
    pub fn with_clock(clock: Arc<dyn crate::clock::Clock>) -> Self {
        SvidResolver {
            key: ArcSwapOption::empty(),
            clock: Some(clock),
        }
    }

    /// Presents `svid` from the next handshake on.
    pub fn set(&self, svid: &X509Svid) -> Result<(), SdkError> {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let key = provider
            .key_provider
            .load_private_key(rustls_pki_types::PrivateKeyDer::Pkcs8(
                rustls_pki_types::PrivatePkcs8KeyDer::from(
                    svid.private_key_der().expose_secret().to_vec(),
                ),
            ))
            .map_err(|e| SdkError::fatal(format!("SVID key: {e}")))?;
        self.key.store(Some(Arc::new((
            CertifiedKey::new(svid.cert_chain.clone(), key),
            svid.expires_at,
        ))));
        Ok(())
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let k = self.key.load_full()?;
        let now = match &self.clock {
            Some(c) => c.unix(),
            None => crate::clock::SystemClock.unix(),
        };
        // An expired certificate is not presented: the handshake fails with a clear cause
        // instead of the peer rejecting a stale one.
        (k.1 > now).then(|| Arc::new(k.0.clone()))
    }
}

impl rustls::server::ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.key.load().is_some()
    }
}

/// A server config presenting `resolver`'s SVID and requiring client SVIDs `authorizer`
/// accepts. No session resumption.
pub fn server_config(
    trust: Arc<TrustState>,
    resolver: Arc<SvidResolver>,
    authorizer: Authorizer,
) -> Result<Arc<rustls::ServerConfig>, SdkError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let time = trust.time_provider();
    let verifier = Arc::new(SpiffeClientVerifier {
        trust,
        authorizer,
        provider: provider.clone(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_details(provider, time)
        .with_safe_default_protocol_versions()
        .map_err(|e| SdkError::fatal(format!("TLS setup: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// A client config presenting `resolver`'s SVID and accepting servers `authorizer` accepts.
/// No session resumption.
pub fn client_config(
    trust: Arc<TrustState>,
    resolver: Arc<SvidResolver>,
    authorizer: Authorizer,
) -> Result<Arc<rustls::ClientConfig>, SdkError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let time = trust.time_provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        trust,
        authorizer,
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_details(provider, time)
        .with_safe_default_protocol_versions()
        .map_err(|e| SdkError::fatal(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorizers_match_as_named() {
        let a: SpiffeId = "spiffe://example.org/a".parse().unwrap();
        let b: SpiffeId = "spiffe://example.org/b".parse().unwrap();
        let c: SpiffeId = "spiffe://other.org/a".parse().unwrap();
        assert!(Authorizer::Any.allows(&c));
        assert!(
            Authorizer::Exact(a.clone()).allows(&a) && !Authorizer::Exact(a.clone()).allows(&b)
        );
        assert!(Authorizer::OneOf(vec![a.clone(), b.clone()]).allows(&b));
        let td: TrustDomain = "example.org".parse().unwrap();
        assert!(
            Authorizer::MemberOf(td.clone()).allows(&b) && !Authorizer::MemberOf(td).allows(&c)
        );
        assert!(Authorizer::Custom(Arc::new(|id: &SpiffeId| id.path() == "/a")).allows(&c));
    }
}
