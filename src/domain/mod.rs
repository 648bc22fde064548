//! The domain: what an account, a password, a credential and a scope are, who
//! may do what, and the use cases that tie them together.
//!
//! This layer knows neither tonic nor sqlx, nor any outer layer of the
//! crate (`tests/integration/architecture.rs` keeps it so). It talks to the
//! database only through its own port, the [`store::Store`] trait, which
//! `crate::storage` implements, and reports failures as
//! [`DomainError`], which the wire layer maps to gRPC status codes in one place.

pub mod account;
pub mod audit;
pub mod cache;
pub mod counters;
pub mod credential;
pub mod error;
pub mod page;
pub mod password;
pub mod policy;
pub mod rate;
pub mod resource;
pub mod retention;
pub mod scope;
pub mod service;
pub mod store;
pub mod throttle;
pub mod time;
pub mod token;
pub mod verdict;
pub mod verifier;

pub use error::{DomainError, FieldViolation};
pub use service::{Identity, IdentitySettings};
