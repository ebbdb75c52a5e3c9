//! Sigil's gRPC protocol, generated at build time from `proto/` (no system `protoc` needed).
//!
//! Layout:
//! - [`v1`]: the `sigil.v1` package: the workload-facing `Broker` service and the operator
//!   `Admin` service.
//! - [`workload`]: the SPIFFE Workload API, served on the broker's Unix socket.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.

#![allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    missing_debug_implementations
)]

/// The `sigil.v1` package.
pub mod v1 {
    tonic::include_proto!("sigil.v1");
}

/// The SPIFFE Workload API (`SpiffeWorkloadAPI`; the specification gives it no protobuf
/// package).
pub mod workload {
    tonic::include_proto!("_");
}

/// Encoded `FileDescriptorSet` of every Sigil proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sigil_descriptor.bin"));
