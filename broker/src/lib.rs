//! The Sigil broker.
//!
//! Layout, in the order one request flows through it:
//! - [`config`]: settings from `sigil.toml`, the environment and flags.
//! - [`api`]: the TLS listener and the gRPC services (workload `Broker`, operator `Admin`),
//!   the Unix socket with the SPIFFE Workload API; the one place errors become gRPC statuses.
//! - [`attest`]: evidence → identity (join tokens, mTLS renewal, OIDC tokens, Unix peer
//!   credentials).
//! - [`registry`]: the identity records every gate reads.
//! - [`authz`]: gate 1 (identity proof), gate 2 (entitlement scope), gate 3 (approvals and
//!   [`policy`]: Cedar request policy, also admin roles); [`exchange`]: delegated tokens.
//! - [`issue`]: signing and the single durable commit of ledger + audit; [`admin`]: operator
//!   changes to identities and join tokens.
//! - [`revoke`]: revoking credentials and identities, leak response, introspection;
//!   [`hub`]: the revocation set and the fan-out to `Watch` streams.
//! - [`keys`]: CA and JWT keys in memory; [`rotate`]: their rotation schedule;
//!   [`seal`]: the master key and sealing at rest.
//! - [`store`]: the store (the `sigil-store` crate: the [`store::Store`] trait, the records,
//!   the group-committing writer, the backends).
//! - [`audit`]: hash-chained audit entries; [`model`]: the records.
//! - [`http`]: health and bundle over HTTP.
//! - [`server`]: wiring, start-up and shutdown; [`init`]: creating a data dir.
//! - [`cli`], [`dev`], [`bench`]: the `sigil` binary's commands.

pub mod admin;
pub mod api;
pub mod approve;
pub mod attest;
pub mod authz;
pub mod baseline;
pub mod broker;
pub mod clock;
pub mod config;
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
pub mod registry;
pub mod revoke;
pub mod rotate;
pub mod server;
pub mod telemetry;

pub use sigil_store as store;
pub use sigil_store::{audit, model, seal};

pub use broker::{Broker, RequestContext};
pub use error::BrokerError;
