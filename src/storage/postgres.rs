//! The production store: PostgreSQL through a sqlx connection pool.
//!
//! Many stateless replicas share one database. Migrations take an advisory
//! lock, so replicas that start together apply them once.

use std::str::FromStr as _;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::{Conflict, PoolOptions, StorageError, TokenFilter, WithAccount, rows, sql};
use crate::domain::{
    account::{Account, AccountId},
    audit::{AuditEvent, AuditFilter},
    cache::{Invalidation, InvalidationSink},
    credential::Digest,
    password::PasswordHash,
    time::Timestamp,
    token::{NewToken, Session, Token, TokenId},
};

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "lifecycle",
        include_str!("../../migrations/postgres/0002_lifecycle.sql"),
    ),
    (
        3,
        "tokens fillfactor",
        include_str!("../../migrations/postgres/0003_tokens_fillfactor.sql"),
    ),
];

/// A [`super::Store`] on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Prepares a pool for `url`. Connections are opened lazily, so the
    /// service can start (and report NOT_SERVING) while the database is
    /// still coming up; a malformed URL fails here.
    pub async fn connect(url: &str, options: &PoolOptions) -> Result<Self, StorageError> {
        let connect =
            PgConnectOptions::from_str(url).map_err(|e| StorageError::Other(Box::new(e)))?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            // No ping before each query: it would double the round trips of
            // the hot path. A dead connection fails its query, which is
            // reported as unavailable, and the pool replaces it.
            .test_before_acquire(false)
            .connect_lazy_with(connect);
        Ok(Self { pool })
    }

    /// Translates a sqlx error by SQLSTATE and constraint name.
    fn classify(err: sqlx::Error) -> StorageError {
        match &err {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if code == "23505" {
                    let conflict = match db.constraint() {
                        Some("accounts_username_key_unique") => Some(Conflict::Username),
                        Some("tokens_live_name_unique") => Some(Conflict::TokenName),
                        Some("tokens_digest_unique" | "sessions_digest_unique") => {
                            Some(Conflict::Digest)
                        }
                        Some("accounts_pkey" | "tokens_pkey" | "sessions_pkey") => {
                            Some(Conflict::Id)
                        }
                        _ => None,
                    };
                    if let Some(conflict) = conflict {
                        return StorageError::Conflict(conflict);
                    }
                }
                // Class 08: connection exceptions; 53: insufficient resources;
                // 57P0x: the server is shutting down or restarting; 40001 and
                // 40P01: serialization failure and deadlock, both retryable.
                if code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57P0")
                    || code == "40001"
                    || code == "40P01"
                {
                    StorageError::Unavailable(Box::new(err))
                } else {
                    StorageError::Other(Box::new(err))
                }
            }
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StorageError::Unavailable(Box::new(err)),
            _ => StorageError::Other(Box::new(err)),
        }
    }
}

/// The channel replicas announce changes on.
const CHANNEL: &str = "identity_invalidation";
/// The payload that only proves the channel works.
const HEARTBEAT: &str = "heartbeat";
/// How often each replica sends the heartbeat (every replica hears every
/// replica's, so the channel is proven more often than this).
const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

impl PgStore {
    /// Many replicas share one database.
    const SHARED: bool = true;

    /// Announces a change to every replica, delivered when (and only if)
    /// the caller's transaction commits.
    async fn announce(
        conn: &mut sqlx::PgConnection,
        what: &Invalidation,
    ) -> Result<(), StorageError> {
        let payload = match what {
            Invalidation::Credential(id) => format!("credential:{}", id.as_str()),
            Invalidation::Account(id) => format!("account:{}", id.as_str()),
        };
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(conn)
            .await
            .map(drop)
            .map_err(Self::classify)
    }

    /// Listens for announcements on a dedicated connection and hands them to
    /// `sink`. Whenever the connection is lost the sink hears the channel is
    /// down, and up again once a new connection listens.
    fn watch_changes(&self, sink: std::sync::Arc<dyn InvalidationSink>) {
        // The heartbeat proves the channel delivers: a listener whose
        // connection died silently stops hearing it, and its cache is
        // bypassed after CHANNEL_MAX_SILENCE.
        let heartbeat_pool = self.pool.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let sent = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(HEARTBEAT)
                    .execute(&heartbeat_pool)
                    .await;
                if let Err(err) = sent {
                    tracing::debug!(error = %err, "cannot send the change channel's heartbeat");
                }
            }
        });
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let mut backoff = std::time::Duration::from_millis(100);
            loop {
                match listen(&pool).await {
                    Ok(mut listener) => {
                        backoff = std::time::Duration::from_millis(100);
                        sink.channel_up(true);
                        // Ok(None) or an error: the connection is gone.
                        while let Ok(Some(notification)) = listener.try_recv().await {
                            sink.heard();
                            match notification.payload() {
                                HEARTBEAT => {}
                                payload => match parse_payload(payload) {
                                    Some(what) => sink.invalidate(&what),
                                    None => {
                                        tracing::warn!("ignored a malformed change notification")
                                    }
                                },
                            }
                        }
                        sink.channel_up(false);
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "cannot listen for changes yet");
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
        });
    }
}

/// Records a batch of uses in one statement. The rows are locked first, in
/// `token_id` order: replicas flush the uses they saw in arrival order, and
/// two batches locking the same rows in different orders deadlock
/// (PostgreSQL then aborts one after `deadlock_timeout`, and a revocation of
/// those tokens waits meanwhile). A row is only updated once the
/// materialised, ordered `locked` has locked it.
const RECORD_USES: &str = "WITH u AS (\
        SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[]) AS u(token_id, at, address)), \
    locked AS MATERIALIZED (\
        SELECT t.token_id FROM tokens t JOIN u ON u.token_id = t.token_id \
        WHERE t.last_used_time IS NULL OR t.last_used_time <= u.at - $4 \
        ORDER BY t.token_id FOR UPDATE OF t) \
    UPDATE tokens t SET last_used_time = u.at, last_used_address = u.address \
    FROM u WHERE t.token_id = u.token_id AND t.token_id IN (SELECT token_id FROM locked) \
    AND (t.last_used_time IS NULL OR t.last_used_time <= u.at - $4)";

impl PgStore {
    async fn write_uses(
        &self,
        uses: &[super::TokenUse],
        interval_micros: i64,
    ) -> Result<(), StorageError> {
        let ids: Vec<&str> = uses.iter().map(|u| u.id.as_str()).collect();
        let times: Vec<i64> = uses.iter().map(|u| u.at.as_micros()).collect();
        let addresses: Vec<&str> = uses.iter().map(|u| u.address.as_str()).collect();
        sqlx::query(RECORD_USES)
            .bind(ids)
            .bind(times)
            .bind(addresses)
            .bind(interval_micros)
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(Self::classify)
    }
}

async fn listen(pool: &PgPool) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

fn parse_payload(payload: &str) -> Option<Invalidation> {
    let (kind, id) = payload.split_once(':')?;
    uuid::Uuid::try_parse(id).ok()?;
    match kind {
        "credential" => Some(Invalidation::Credential(TokenId::from_stored(
            id.to_owned(),
        ))),
        "account" => Some(Invalidation::Account(AccountId::from_stored(id.to_owned()))),
        _ => None,
    }
}

sql::impl_store!(PgStore, sqlx::Postgres);
