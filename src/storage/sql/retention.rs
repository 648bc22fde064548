//! Retention: deleting, in bounded batches, what is past its keeping.

use super::{PurgeCutoffs, Purged, SqlStore, StorageError, Timestamp, execute};
use crate::storage::backend::{Backend, Bind as _};

/// Whether token `$x` stopped working at or before `$1`: revoked, expired,
/// or used up (when, is known only to the last recorded use, at most the
/// recording interval early). True or false, never NULL (it is negated for
/// the family's other tokens). Each arm names the condition of a partial
/// index (`uses_remaining = 0` for `tokens_used_up_idx`), so that the
/// search is a union of small index scans, not a scan of the table.
macro_rules! token_dead {
    ($x:literal) => {
        concat!(
            "((",
            $x,
            ".revoke_time IS NOT NULL AND ",
            $x,
            ".revoke_time <= $1) \
             OR (",
            $x,
            ".retire_time IS NOT NULL AND ",
            $x,
            ".retire_time <= $1) \
             OR (",
            $x,
            ".expire_time IS NOT NULL AND ",
            $x,
            ".expire_time <= $1) \
             OR (",
            $x,
            ".uses_remaining IS NOT NULL AND ",
            $x,
            ".uses_remaining = 0 \
                 AND COALESCE(",
            $x,
            ".last_used_time, ",
            $x,
            ".create_time) <= $1))"
        )
    };
}

/// Retention (see `domain::retention`): each statement deletes at most `$2`
/// rows. `$1`: the sessions' cutoff.
pub(super) const PURGE_SESSIONS: &str = "DELETE FROM sessions WHERE session_id IN (\
    SELECT session_id FROM sessions \
    WHERE expire_time <= $1 OR (revoke_time IS NOT NULL AND revoke_time <= $1) LIMIT $2)";
/// Tokens dead before `$1` whose whole rotation family is.
pub(in crate::storage) const PURGE_TOKENS: &str = concat!(
    "DELETE FROM tokens WHERE token_id IN (SELECT t.token_id FROM tokens t WHERE ",
    token_dead!("t"),
    " AND NOT EXISTS (SELECT 1 FROM tokens f WHERE f.family_id = t.family_id AND NOT ",
    token_dead!("f"),
    ") LIMIT $2)"
);
/// `$1`: username counters idle at or before this (NULL: none); `$3`: their
/// lockout; `$4`: address counters idle before this; `$5`: now.
pub(super) const PURGE_SIGN_IN_THROTTLE: &str = "DELETE FROM sign_in_throttle \
    WHERE (scope, subject) IN (SELECT scope, subject FROM sign_in_throttle \
    WHERE blocked_until <= $5 AND ((scope = 'address' AND last_attempt < $4) \
    OR (scope = 'account' AND $1 IS NOT NULL AND last_attempt <= $1 AND failures < $3)) \
    LIMIT $2)";
/// `$1`: events at or before this instant.
pub(super) const PURGE_EVENTS: &str = "DELETE FROM audit_events WHERE event_id IN (\
    SELECT event_id FROM audit_events WHERE event_time <= $1 LIMIT $2)";

pub(super) async fn purge<B: Backend>(
    store: &SqlStore<B>,
    cutoffs: &PurgeCutoffs,
) -> Result<Option<Purged>, StorageError> {
    // The lock is a session's: on a session of its own, never through a
    // transaction-mode pooler (which could run the unlock elsewhere).
    let mut conn = store.session_conn().await?;
    if !B::lock_retention(&mut conn).await? {
        return Ok(None);
    }
    let purged = purge_on::<B>(&mut conn, cutoffs).await;
    if B::unlock_retention(&mut conn).await.is_err() {
        // Closing the connection releases a lock it may hold.
        let _ = conn.close().await;
    }
    purged.map(Some)
}

/// Deletes what `cutoffs` say is past retention, in batches of
/// at most `cutoffs.batch` rows, each its own statement, on
/// `conn` (which holds the retention lock, where there is one).
async fn purge_on<B: Backend>(
    conn: &mut B::Connection,
    cutoffs: &PurgeCutoffs,
) -> Result<Purged, StorageError> {
    let batch = i64::from(cutoffs.batch);
    let mut purged = Purged::default();
    if let Some(cutoff) = cutoffs.credentials {
        for (query, count) in [
            (PURGE_SESSIONS, &mut purged.sessions),
            (PURGE_TOKENS, &mut purged.tokens),
        ] {
            loop {
                let deleted = execute::<B>(
                    &mut *conn,
                    sqlx::query(query).arg(cutoff.as_micros()).arg(batch),
                )
                .await?;
                *count += deleted;
                if deleted < cutoffs.batch.into() {
                    break;
                }
            }
        }
    }
    loop {
        let deleted = execute::<B>(
            &mut *conn,
            sqlx::query(PURGE_SIGN_IN_THROTTLE)
                .arg(cutoffs.username_counters.map(Timestamp::as_micros))
                .arg(batch)
                .arg(cutoffs.lockout)
                .arg(cutoffs.address_counters.as_micros())
                .arg(cutoffs.now.as_micros()),
        )
        .await?;
        purged.sign_in_throttle += deleted;
        if deleted < cutoffs.batch.into() {
            break;
        }
    }
    // The polled feed's rows (PostgreSQL), whatever the other retentions:
    // only as long as a replica could still need them (`postgres/poll.rs`).
    if let Some((query, kept)) = B::PURGE_CHANGES {
        let kept = i64::try_from(kept.as_micros()).unwrap_or(i64::MAX);
        let cutoff = cutoffs.now.as_micros().saturating_sub(kept);
        loop {
            let deleted =
                execute::<B>(&mut *conn, sqlx::query(query).arg(cutoff).arg(batch)).await?;
            purged.changes += deleted;
            if deleted < cutoffs.batch.into() {
                break;
            }
        }
    }
    if let Some(cutoff) = cutoffs.audit {
        loop {
            let deleted = execute::<B>(
                &mut *conn,
                sqlx::query(PURGE_EVENTS).arg(cutoff.as_micros()).arg(batch),
            )
            .await?;
            purged.audit_events += deleted;
            if deleted < cutoffs.batch.into() {
                break;
            }
        }
    }
    Ok(purged)
}
