//! The integration tests: one binary (so it links once) that drives the real
//! server over TCP against real databases. Every behavioural test runs on
//! both SQLite and PostgreSQL; the PostgreSQL ones use `DATABASE_URL` when it
//! is set and otherwise start a throwaway cluster, and fail, never skip, when
//! PostgreSQL is missing.

mod support;

mod account_lifecycle;
mod account_races;
mod accounts;
mod architecture;
mod authz;
mod binary;
mod browser;
mod cache_flood;
mod change_feed;
mod clients;
mod config_cli;
mod failover;
mod faults;
mod fleet;
mod forwarded;
mod grants;
mod hashing;
mod hierarchy;
mod lifecycle;
mod listeners;
mod lookup_batch;
mod malformed;
mod observability;
mod outage;
mod passwords;
mod poll_feed;
mod pooler;
mod prewarm;
mod read_replica;
mod redaction;
mod replicas;
mod resources;
mod retention;
mod reuse;
mod revocation;
mod soak_bounds;
mod sqlite;
mod storage;
mod throttle;
mod tls;
mod token_limits;
mod tokens;
mod verify;
mod verify_answers;
mod walkthrough;
mod web;
mod web_tls;
