//! Sigil's PKI: everything that makes or checks a credential, with no I/O and no async.
//! Functions take the current time as an argument, so callers can inject a clock.
//!
//! Layout, in the order a request uses it:
//! - [`spiffe`]: [`SpiffeId`] and [`TrustDomain`], parsed per the SPIFFE ID spec.
//! - [`csr`]: [`VerifiedCsr`], a PKCS#10 request whose signature verified; only its key is kept.
//! - [`key`]: [`EcKey`], the P-256 keys of CAs and JWT signers.
//! - [`ca`]: [`CertificateAuthority`] (root, intermediates, operator CA) and leaf minting.
//! - [`jwt`]: JWT-SVID signing ([`JwtSigner`]) and strict verification.
//! - [`bundle`]: [`SpiffeBundle`], the SPIFFE bundle JSON and PEM forms.
//! - [`ids`]: serial numbers and `jti`s that sort by issue time.
//! - [`secret`]: [`SecretBytes`]/[`SecretString`], zeroized and never printed.

pub mod bundle;
pub mod ca;
pub mod csr;
pub mod ids;
pub mod jwt;
pub mod key;
pub mod secret;
pub mod spiffe;

pub use bundle::{JwtAuthority, SpiffeBundle};
pub use ca::{
    CaRole, CertificateAuthority, LeafSpec, LeafUsage, MintedLeaf, RevokedSerial, certs_from_pem,
    certs_to_pem,
};
pub use csr::{CsrError, VerifiedCsr};
pub use jwt::{JwtError, JwtKeys, JwtSigner, JwtSvidClaims, VerifiedJwt, VerifyOptions};
pub use key::EcKey;
pub use rustls_pki_types::CertificateDer;
pub use secret::{SecretBytes, SecretString};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// Errors from this crate. Messages say what is wrong in plain words and never carry secrets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A SPIFFE ID or trust domain was refused.
    #[error(transparent)]
    SpiffeId(#[from] SpiffeIdError),
    /// A CSR was refused.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// A JWT did not verify.
    #[error(transparent)]
    Jwt(#[from] JwtError),
    /// A key could not be loaded or does not fit.
    #[error("bad key: {0}")]
    BadKey(&'static str),
    /// A certificate could not be parsed or is not what was expected.
    #[error("bad certificate: {0}")]
    BadCertificate(&'static str),
    /// A trust bundle document is malformed.
    #[error("bad trust bundle: {0}")]
    BadBundle(String),
    /// A DNS name is not syntactically valid.
    #[error("dns name {0:?} is not a valid DNS name")]
    BadDnsName(String),
    /// The issuing CA has expired.
    #[error("the signing CA has expired")]
    CaExpired,
    /// A cryptographic operation failed.
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
    /// rcgen refused to build a certificate.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A bug.
    #[error("internal error: {0}")]
    Internal(&'static str),
}
