//! `identity`: a gRPC identity service for personal accounts, sessions and
//! personal access tokens.
//!
//! The crate is layered, and dependencies point inward:
//!
//! - [`api`] is the wire layer: generated protobuf code, the tonic services,
//!   authentication of the caller's metadata, and the one mapping from domain
//!   errors to `tonic::Status`. It is the only module that knows tonic/prost.
//! - [`domain`] holds the rules: accounts, passwords, credentials, scopes, the
//!   authorization policy and the use cases. It knows neither tonic nor sqlx.
//! - [`storage`] is the only module with SQL: the [`storage::Store`] trait
//!   and its Postgres and SQLite implementations.
//! - [`app`] and [`config`] wire the layers into a server, and
//!   [`observability`] exports metrics and sets up logs; `main.rs` is a thin
//!   command-line front end.
//!
//! See `ARCHITECTURE.md` for the invariants.

#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod config;
pub mod domain;
pub mod observability;
pub mod storage;
pub mod web;
