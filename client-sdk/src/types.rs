//! Credentials as the SDK hands them out.

use std::fmt;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use sigil_pki::{SecretBytes, SecretString, SpiffeId, certs_to_pem};

use crate::TrustBundle;

/// What the broker granted, when it differs from the request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// Granted lifetime, seconds.
    pub ttl_seconds: u32,
    /// True when the requested lifetime was cut to the identity's maximum.
    pub ttl_clamped: bool,
    /// Plain-words explanation.
    pub notice: String,
}

/// An X.509-SVID with its private key (generated here; it never left this process).
#[derive(Clone)]
pub struct X509Svid {
    /// The SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Leaf first, then intermediates.
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub(crate) private_key: SecretBytes,
    /// Serial, hex.
    pub serial: String,
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// notAfter, Unix seconds.
    pub expires_at: i64,
    /// Identity generation.
    pub generation: u64,
    /// What was granted.
    pub grant: Grant,
}

impl X509Svid {
    /// The chain as PEM (leaf first).
    pub fn cert_chain_pem(&self) -> String {
        certs_to_pem(self.cert_chain.iter())
    }

    /// The private key, PKCS#8 DER.
    pub fn private_key_der(&self) -> &SecretBytes {
        &self.private_key
    }

    /// The private key as a PEM `PRIVATE KEY` block.
    pub fn private_key_pem(&self) -> SecretBytes {
        sigil_pki::key::pkcs8_to_pem(self.private_key.expose_secret())
    }
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("expires_at", &self.expires_at)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

/// A JWT-SVID.
#[derive(Clone)]
pub struct JwtSvid {
    /// The token. Send it as a bearer credential; never log it.
    pub token: SecretString,
    /// The SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Audiences.
    pub audiences: Vec<String>,
    /// Scopes.
    pub scopes: Vec<String>,
    /// `jti`.
    pub jti: String,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// `iat`, Unix seconds.
    pub issued_at: i64,
    /// What was granted.
    pub grant: Grant,
}

impl fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("audiences", &self.audiences)
            .field("jti", &self.jti)
            .field("expires_at", &self.expires_at)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Everything a workload gets when it attests.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Its X.509-SVID.
    pub svid: Arc<X509Svid>,
    /// The trust bundle.
    pub bundle: Arc<TrustBundle>,
    /// JWT-SVIDs asked for at attestation.
    pub jwts: Vec<JwtSvid>,
}
