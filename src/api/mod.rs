//! The wire layer: the generated protobuf types and tonic services, the
//! reading of credentials from metadata, and the one mapping from domain
//! errors to gRPC statuses ([`status`]). The only module that knows tonic or
//! prost; it holds no business rule of its own.

pub mod accounts;
pub mod audit;
pub mod auth;
pub mod codec;
mod convert;
pub mod deadline;
pub mod forwarded;
/// Pure request-parsing entry points for the fuzz targets in `fuzz/`.
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
pub mod observe;
pub mod ratelimit;
pub mod ready;
mod redact;
pub mod shed;
pub mod status;
pub mod tokens;

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
