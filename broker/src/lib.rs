//! The Sigil broker library: attestation, the identity registry, the authorization gates,
//! issuance with a durable ledger and audit, revocation, rotation, governance, and the gRPC and
//! HTTP APIs. ARCHITECTURE.md (at the top of the repository) is the map; the `sigil` binary is
//! the `sigil-cli` crate and the store is the `sigil-store` crates.
//!
//! Layout, lowest layer first (a module uses only the layers below it; `tests/layers.rs`
//! checks):
//! - [`clock`], [`config`], [`hub`], [`fsutil`], [`telemetry`]: time, settings, the revocation
//!   set and the watch fan-out, atomic files, metrics and request ids; [`conns`],
//!   [`ratelimit`], [`throttle`]: connection budgets per listener and client, token buckets
//!   per source and identity, and folding repeated refusals in the audit log.
//! - [`registry`]: identity records in memory and the one status [`registry::transition`];
//!   [`keys`]: the key ring; [`policy`]: Cedar; [`baseline`]: behaviour baselines.
//! - [`attest`]: evidence → identity (join tokens, mTLS renewal, OIDC tokens, Unix peers).
//! - [`authz`]: gate 1 (identity proof), gate 2 (entitlement scope), gate 3 (approvals and
//!   Cedar), and who an operator is.
//! - [`broker`]: the state a request reads and the commit observer; [`error`]: the error type.
//! - [`issue`]: attest and mint, and its one durable commit; [`admin`], [`approve`],
//!   [`revoke`], [`rotate`]: operator operations, approvals, revocation and leak response, key
//!   rotation; [`exchange`]: delegated tokens; [`govern`]: reports and anomalies.
//! - [`api`]: the gRPC services, the TLS listener and the Unix socket, and the one place errors
//!   become statuses; [`http`]: health, metrics, bundle, discovery, CRLs.
//! - [`server`]: wiring, start-up and shutdown; [`init`]: creating a data dir.
//! - [`store`], [`model`], [`seal`], [`audit`]: re-exported from `sigil-store`.

/// This build: the version and the commit it was built from (`sigil --version`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SIGIL_COMMIT"),
    ")"
);

pub mod admin;
pub mod api;
pub mod approve;
pub mod attest;
pub mod authz;
pub mod baseline;
pub mod broker;
pub mod clock;
pub mod config;
pub mod conns;
pub mod error;
pub mod exchange;
pub mod fsutil;
pub mod govern;
pub mod http;
pub mod hub;
pub mod init;
pub mod issue;
pub mod keys;
pub mod policy;
pub mod ratelimit;
pub mod registry;
pub mod revoke;
pub mod rotate;
pub mod server;
pub mod telemetry;
pub mod throttle;

pub use sigil_store as store;
pub use sigil_store::{audit, model, seal};

pub use broker::{Broker, RequestContext};
pub use error::BrokerError;
