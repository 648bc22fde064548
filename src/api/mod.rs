//! The wire layer: the generated protobuf types and tonic services, the
//! reading of credentials from metadata, and the one mapping from domain
//! errors to gRPC statuses ([`status`]). The only module that knows tonic or
//! prost; it holds no business rule of its own.
//!
//! - [`services`]: the tonic service impls, one per proto service;
//! - [`layers`]: the tower layers wrapped around every call;
//! - the translation between the wire and the domain: [`auth`] (who is
//!   calling), [`codec`] (bytes to messages), [`parse`] (one parser per
//!   request message, which the fuzz targets call too), `convert` (domain
//!   values to messages), [`status`] (domain errors to statuses) and `redact` (`Debug`
//!   without secrets).

pub mod auth;
pub mod codec;
mod convert;
pub mod layers;
pub mod parse;
pub mod ratelimit;
mod redact;
pub mod services;
pub mod status;

/// The generated protobuf types, clients and servers of `identity.v1`.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("identity.v1");
}

/// The encoded descriptor set of every served proto file (with its imports),
/// for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("identity_descriptor");

/// The `domain` field of every `google.rpc.ErrorInfo` this service sends.
pub const ERROR_DOMAIN: &str = "identity.v1";
