//! The domain: what an account, a password, a credential and a scope are, who
//! may do what, and the use cases that tie them together.
//!
//! This layer knows neither tonic nor sqlx. It talks to the database only
//! through the [`crate::storage::Store`] trait, and reports failures as
//! [`DomainError`], which the wire layer maps to gRPC status codes in one place.

pub mod account;
pub mod audit;
pub mod cache;
pub mod credential;
pub mod error;
pub mod page;
pub mod password;
pub mod policy;
pub mod rate;
pub mod retention;
pub mod scope;
pub mod service;
pub mod throttle;
pub mod time;
pub mod token;

pub use error::{DomainError, FieldViolation};
pub use service::{Identity, IdentitySettings};
