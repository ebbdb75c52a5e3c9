//! The Sigil workload SDK, and the admin client the `sigil` CLI uses.
//!
//! Layout:
//! - [`workload`]: [`WorkloadClient`] — attest with evidence, generate the private key locally,
//!   fetch X.509-SVIDs, JWT-SVIDs and the bundle, renew over mutual TLS.
//! - [`source`]: [`Source`] — credentials that renew themselves, follow the watch stream,
//!   re-attest when they must, and publish changes; [`evidence`]: where re-attestation gets
//!   its evidence.
//! - [`tls`]: rustls configs that always present the current SVID and verify SPIFFE peers
//!   against the current bundle and revocations, with an [`Authorizer`].
//! - [`verifier`]: [`Verifier`] — offline checks of JWT-SVIDs and X.509 peers for resource
//!   servers; [`trust`]: the bundle and revocation state they read.
//! - [`types`]: the credentials handed out ([`X509Svid`], [`JwtSvid`], [`TrustBundle`]).
//! - [`error`]: [`SdkError`], sorted into retryable, re-attest and fatal.
//! - [`transport`]: rustls connections that trust only the bundle; [`failover`]: a channel
//!   over several broker replicas that moves on when one is gone or unavailable.
//! - [`admin`]: the operator client.
//! - [`clock`]: the time every schedule and check above reads (injected in tests).
//!
//! ```no_run
//! # async fn demo() -> Result<(), sigil_sdk::SdkError> {
//! use sigil_sdk::{ClientConfig, Evidence, JwtRequest, SvidOptions, WorkloadClient};
//! let bundle = std::fs::read("bundle.pem").unwrap();
//! let client = WorkloadClient::new(ClientConfig::new("https://127.0.0.1:8443", bundle))?;
//! let token = std::env::var("SIGIL_JOIN_TOKEN").unwrap();
//! let creds = client
//!     .attest(Evidence::JoinToken(token.into()), SvidOptions::default(), &[JwtRequest::audience("demo-api")])
//!     .await?;
//! println!("I am {}", creds.svid.spiffe_id);
//! let more = client.fetch_jwt_svid(&JwtRequest::audience("demo-api")).await?; // over mTLS
//! # let _ = more; Ok(()) }
//! ```

pub mod admin;
pub mod clock;
pub mod error;
pub mod evidence;
pub mod failover;
pub mod source;
pub mod tls;
pub mod transport;
pub mod trust;
pub mod types;
pub mod verifier;
mod watch;
pub mod workload;

pub use admin::{admin_channel, connect_admin};
pub use error::{ErrorKind, SdkError};
pub use evidence::{EvidenceSource, JoinTokenFile, OidcTokenFile, OneTimeEvidence, UnixEvidence};
pub use failover::{Failover, Targets};
pub use source::{Source, SourceConfig, SourceEvent};
pub use tls::Authorizer;
pub use trust::{RevocationView, TrustBundle, TrustState};
pub use types::{Credentials, Grant, JwtSvid, X509Svid};
pub use verifier::{Verifier, VerifyError};
pub use workload::{ClientConfig, Evidence, JwtRequest, SvidOptions, WorkloadClient};
