//! The polled change feed (`IDENTITY_CHANGE_FEED=poll`), for engines
//! without `LISTEN`/`NOTIFY`: each change is a row of the `changes` table
//! (migration 0013), written in the changing transaction, and each replica
//! reads the new rows every poll interval on a connection of its own.
//!
//! # Reading every row exactly once, whatever the commit order
//!
//! `change_id` is assigned when a row is inserted, not when its transaction
//! commits. Two writers can commit in the opposite order: a poller that
//! read row 7 and then asked for `change_id > 7` would never see row 6,
//! committed after it — a lost revocation. So the cursor is not a
//! `change_id` but the previous poll's snapshot (`pg_current_snapshot()`):
//! every row stores its writer's transaction id (`pg_current_xact_id()`),
//! and a poll reads the rows whose writer that snapshot did not yet count
//! as finished (`NOT pg_visible_in_snapshot(writer, previous)`), taking its
//! own snapshot in the same statement, which becomes the next cursor.
//!
//! Why nothing is lost: in PostgreSQL a transaction's rows become visible
//! all at once, at its commit. A row visible to poll *n + 1* but not read by
//! poll *n* was written by a transaction poll *n*'s snapshot saw as still
//! running (in its list of running transactions, or not yet started: at or
//! past its `xmax`), which is exactly what `pg_visible_in_snapshot` is false
//! for; and a row whose writer poll *n*'s snapshot counted finished was
//! visible to poll *n*, which read it (by the same argument, back to the
//! first poll, whose cursor is a snapshot taken before the cache was
//! emptied). Why nothing is read twice: a writer visible to a snapshot
//! stays visible to every later one. The `writer >= pg_snapshot_xmin(...)`
//! term is implied by the other (anything older is visible) and only lets
//! the index find the rows.
//!
//! # Staleness
//!
//! The instant a poll is sent is its proof of currency: its snapshot is
//! taken after that instant, so every change committed before it is
//! applied when the poll returns, and the cache is told so
//! ([`InvalidationSink::current_as_of`]). The cache then bypasses itself
//! once `CHANNEL_MAX_SILENCE` passes without a successful poll, exactly as
//! when the notification channel's heartbeat stops; a failed poll drops the
//! connection and reports the feed down, and a new connection starts from
//! an empty cache ("anything may have changed").
//!
//! # Retention
//!
//! Each row also stores `horizon`, the oldest transaction still running
//! when it was written: every writer older than that had finished by then.
//! The retention job deletes the rows whose writer is older than the
//! newest horizon among rows at least [`CHANGES_KEPT`] old ([`PURGE_CHANGES`]),
//! that is rows that have been visible for at least that long: far past the
//! staleness bound, so a replica whose cache is trusted has read them, and
//! one that has not read them has an untrusted cache it will empty.

use std::{sync::Arc, time::Duration};

use sqlx::{Row as _, postgres::PgPool};

use super::{PgBackend, StorageError, classify, statement_cache_off};
use crate::domain::{
    account::AccountId,
    cache::{Invalidation, InvalidationSink},
    token::TokenId,
};

/// How long a change row is kept at least after it became visible: far
/// longer than the staleness bound (`CHANNEL_MAX_SILENCE`, 1 s) and any
/// clock offset between replicas and the database that a replica serves
/// with.
pub(super) const CHANGES_KEPT: Duration = Duration::from_secs(10 * 60);

/// A poll that has not answered in this long is abandoned with its
/// connection (a connection cut without a reset may never answer). The
/// cache stopped trusting the feed long before, after `CHANNEL_MAX_SILENCE`.
const POLL_TIMEOUT: Duration = Duration::from_secs(5);

/// The writing transaction's id and horizon, and the database's time.
macro_rules! change_stamp {
    () => {
        "pg_current_xact_id(), pg_snapshot_xmin(pg_current_snapshot()), \
         CAST(extract(epoch FROM clock_timestamp()) * 1000000 AS BIGINT)"
    };
}

/// Records one change (`$1` its kind, `$2` its subject's id).
const INSERT_CHANGE: &str = concat!(
    "INSERT INTO changes (writer, horizon, change_time, kind, subject_id) SELECT ",
    change_stamp!(),
    ", $1, $2"
);

/// Records the revocation of each credential of `$1` (a `TEXT[]`): the
/// stamp is computed once, not per row.
const INSERT_CREDENTIAL_CHANGES: &str = concat!(
    "INSERT INTO changes (writer, horizon, change_time, kind, subject_id) \
     SELECT s.writer, s.horizon, s.change_time, 'credential', u.id \
     FROM (SELECT ",
    change_stamp!(),
    ") AS s(writer, horizon, change_time), unnest($1::text[]) AS u(id)"
);

/// The cursor a feed starts from: the current snapshot.
const SNAPSHOT: &str = "SELECT pg_current_snapshot()::text";

/// One poll: this statement's snapshot (the next cursor) on every row, and
/// the changes of the transactions the previous snapshot `$1` did not count
/// finished (none: one row with NULL columns). One statement, so one
/// snapshot: the rows read are exactly those it sees. (To carry more about
/// the moment of the poll, such as `pg_current_wal_lsn()`, add it to `s`.)
const POLL: &str = "WITH s AS MATERIALIZED (SELECT pg_current_snapshot() AS now) \
    SELECT s.now::text AS snapshot, c.change_id, c.kind, c.subject_id \
    FROM s LEFT JOIN changes c \
    ON c.writer >= pg_snapshot_xmin($1::pg_snapshot) \
    AND NOT pg_visible_in_snapshot(c.writer, $1::pg_snapshot) \
    ORDER BY c.change_id";

/// Retention: deletes at most `$2` rows whose writer finished before a row
/// written at or before `$1` (the database's time less [`CHANGES_KEPT`]).
pub(super) const PURGE_CHANGES: &str = "DELETE FROM changes WHERE change_id IN (\
    SELECT change_id FROM changes WHERE writer < (\
        SELECT horizon FROM changes WHERE change_time <= $1 ORDER BY horizon DESC LIMIT 1) \
    LIMIT $2)";

/// Writes `what` to the table of changes, within the caller's transaction.
pub(super) async fn record(
    conn: &mut sqlx::PgConnection,
    what: &Invalidation,
) -> Result<(), StorageError> {
    let (kind, id) = match what {
        Invalidation::Credential(id) => ("credential", id.as_str()),
        Invalidation::Account(id) => ("account", id.as_str()),
    };
    sqlx::query(INSERT_CHANGE)
        .bind(kind)
        .bind(id)
        .persistent(!statement_cache_off())
        .execute(conn)
        .await
        .map(drop)
        .map_err(classify)
}

/// Writes the revocation of each of `ids` (not empty), in one statement,
/// within the caller's transaction.
pub(super) async fn record_credentials(
    conn: &mut sqlx::PgConnection,
    ids: &[&str],
) -> Result<(), StorageError> {
    sqlx::query(INSERT_CREDENTIAL_CHANGES)
        .bind(ids)
        .persistent(!statement_cache_off())
        .execute(conn)
        .await
        .map(drop)
        .map_err(classify)
}

impl PgBackend {
    /// Polls the table of changes every `interval` on a connection of its
    /// own (the listen pool's) and hands what it reads to `sink`: up once
    /// a connection has taken the starting snapshot, current as of each
    /// poll's start, down when a poll fails or times out (and up again,
    /// from an empty cache, on a new connection).
    pub(super) fn run_poll_feed(&self, sink: Arc<dyn InvalidationSink>, interval: Duration) {
        let pool = self.listen_pool.clone();
        let losses = Arc::clone(&self.losses);
        let lag = metrics::gauge!("identity_change_feed_lag_seconds");
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match start(&pool).await {
                    Ok((mut conn, mut cursor)) => {
                        backoff = Duration::from_millis(100);
                        // After the starting snapshot: what it counts
                        // finished is in the store for any read from now on.
                        sink.channel_up(true);
                        let mut tick = tokio::time::interval(interval);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        loop {
                            tick.tick().await;
                            let sent = std::time::Instant::now();
                            match tokio::time::timeout(POLL_TIMEOUT, poll(&mut conn, &cursor)).await
                            {
                                Ok(Ok((next, changes))) => {
                                    sink.invalidate_all(&changes);
                                    cursor = next;
                                    lag.set(sent.elapsed().as_secs_f64());
                                    sink.current_as_of(sent);
                                }
                                Ok(Err(err)) => {
                                    tracing::debug!(error = %err, "a poll of the change feed failed");
                                    break;
                                }
                                Err(_) => {
                                    tracing::debug!("a poll of the change feed timed out");
                                    break;
                                }
                            }
                        }
                        // Whatever state the connection is in, it is not
                        // returned to the pool.
                        drop(conn.detach());
                        losses.record();
                        sink.channel_up(false);
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "cannot poll for changes yet");
                    }
                }
                tokio::time::sleep(backoff).await;
                // As for the notification channel: at most a second between
                // attempts, the cache being bypassed meanwhile.
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        });
    }
}

/// A connection of the feed's own and the snapshot its first poll starts
/// from.
async fn start(
    pool: &PgPool,
) -> Result<(sqlx::pool::PoolConnection<sqlx::Postgres>, String), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let cursor: String = sqlx::query_scalar(SNAPSHOT)
        .persistent(!statement_cache_off())
        .fetch_one(&mut *conn)
        .await?;
    Ok((conn, cursor))
}

/// Reads the changes the snapshot `cursor` did not see; returns the next
/// cursor and the changes.
async fn poll(
    conn: &mut sqlx::PgConnection,
    cursor: &str,
) -> Result<(String, Vec<Invalidation>), sqlx::Error> {
    let rows = sqlx::query(POLL)
        .bind(cursor)
        .persistent(!statement_cache_off())
        .fetch_all(conn)
        .await?;
    let mut next = None;
    let mut changes = Vec::with_capacity(rows.len());
    for row in &rows {
        if next.is_none() {
            next = Some(row.try_get::<String, _>("snapshot")?);
        }
        let kind: Option<String> = row.try_get("kind")?;
        let id: Option<String> = row.try_get("subject_id")?;
        let (Some(kind), Some(id)) = (kind, id) else {
            continue;
        };
        match parse(&kind, id) {
            Some(what) => changes.push(what),
            None => tracing::warn!("ignored a malformed row of the change feed"),
        }
    }
    // The statement always returns a row (`s` has one).
    let next = next.ok_or(sqlx::Error::RowNotFound)?;
    Ok((next, changes))
}

/// The change a row names, if it is well formed.
fn parse(kind: &str, id: String) -> Option<Invalidation> {
    uuid::Uuid::try_parse(&id).ok()?;
    match kind {
        "credential" => Some(Invalidation::Credential(TokenId::from_stored(id))),
        "account" => Some(Invalidation::Account(AccountId::from_stored(id))),
        _ => None,
    }
}
