//! The tonic services of `identity.v1`, one per proto service: each handler
//! authenticates the caller, parses its request with [`super::parse`],
//! calls the domain and encodes the answer with `convert`.

pub mod accounts;
pub mod audit;
pub mod tokens;
