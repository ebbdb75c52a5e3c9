//! Where a workload gets evidence when it must attest again (its certificate expired or was
//! revoked, or its identity was compromised and restored).
//!
//! Join tokens are one-time: a workload that only ever had one cannot re-attest on its own.
//! Give it a [`JoinTokenFile`] an operator (or a provisioning system) can drop a fresh token
//! into, or platform evidence it always has: an [`OidcTokenFile`] (a Kubernetes projected
//! service-account token, refreshed by the kubelet) or [`UnixEvidence`] (the kernel's word,
//! over the broker's Unix socket).

use std::path::PathBuf;
use std::sync::Mutex;

use async_trait::async_trait;
use sigil_pki::SecretString;

use crate::{ErrorKind, Evidence, SdkError};

/// Produces evidence on demand.
#[async_trait]
pub trait EvidenceSource: Send + Sync + std::fmt::Debug {
    /// Evidence to attest with now.
    async fn evidence(&self) -> Result<Evidence, SdkError>;
}

/// Evidence that works once (a join token handed over at start-up).
#[derive(Debug)]
pub struct OneTimeEvidence(Mutex<Option<Evidence>>);

impl OneTimeEvidence {
    /// Wraps `e`.
    pub fn new(e: Evidence) -> Self {
        OneTimeEvidence(Mutex::new(Some(e)))
    }
}

#[async_trait]
impl EvidenceSource for OneTimeEvidence {
    async fn evidence(&self) -> Result<Evidence, SdkError> {
        self.0.lock().ok().and_then(|mut e| e.take()).ok_or_else(|| {
            SdkError::new(
                ErrorKind::Reattest,
                "re-attestation needs new evidence, and this workload's join token was one-time: give it a JoinTokenFile (or platform evidence) to attest again",
            )
        })
    }
}

/// A file holding a join token, read each time evidence is needed. A token is used once; the
/// file must hold a new one for the next attestation.
#[derive(Debug)]
pub struct JoinTokenFile {
    path: PathBuf,
    /// SHA-256 (hex) of the token last handed out.
    last: Mutex<Option<String>>,
}

impl JoinTokenFile {
    /// Reads tokens from `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        JoinTokenFile {
            path: path.into(),
            last: Mutex::new(None),
        }
    }
}

#[async_trait]
impl EvidenceSource for JoinTokenFile {
    async fn evidence(&self) -> Result<Evidence, SdkError> {
        let text = tokio::fs::read_to_string(&self.path).await.map_err(|e| {
            SdkError::new(
                ErrorKind::Reattest,
                format!("reading join token file {}: {e}", self.path.display()),
            )
        })?;
        let token = SecretString::new(text.trim().to_owned());
        // Remember only a hash of the token used, never the token.
        let digest =
            sigil_pki::ids::to_hex(&sigil_pki::ids::sha256(token.expose_secret().as_bytes()));
        let mut last = self
            .last
            .lock()
            .map_err(|_| SdkError::fatal("join token file state poisoned"))?;
        if last.as_deref() == Some(digest.as_str()) {
            return Err(SdkError::new(
                ErrorKind::Reattest,
                format!(
                    "{} still holds the join token already used; an operator must put a new one there",
                    self.path.display()
                ),
            ));
        }
        *last = Some(digest);
        Ok(Evidence::JoinToken(token))
    }
}

/// An OIDC token in a file, read afresh each time (the kubelet rotates projected
/// service-account tokens in place; a CI runner writes its ID token there).
#[derive(Debug)]
pub struct OidcTokenFile {
    path: PathBuf,
}

impl OidcTokenFile {
    /// Reads tokens from `path` (e.g. `/var/run/secrets/tokens/sigil`).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        OidcTokenFile { path: path.into() }
    }
}

#[async_trait]
impl EvidenceSource for OidcTokenFile {
    async fn evidence(&self) -> Result<Evidence, SdkError> {
        let text = tokio::fs::read_to_string(&self.path).await.map_err(|e| {
            SdkError::new(
                ErrorKind::Reattest,
                format!("reading OIDC token file {}: {e}", self.path.display()),
            )
        })?;
        Ok(Evidence::Oidc(SecretString::new(text.trim().to_owned())))
    }
}

/// The caller's Unix peer credentials: always available to a workload talking to the broker's
/// Unix socket (`unix:///run/sigil/workload.sock`).
#[derive(Debug, Default)]
pub struct UnixEvidence;

#[async_trait]
impl EvidenceSource for UnixEvidence {
    async fn evidence(&self) -> Result<Evidence, SdkError> {
        Ok(Evidence::Unix)
    }
}
