//! The audit trail: events appended within a change's transaction, and
//! their listing.

use super::{
    AccountId, AuditEvent, AuditFilter, Invalidation, SqlStore, StorageError, Timestamp, TokenId,
    execute,
};
use crate::storage::{
    backend::{Backend, Bind as _},
    rows,
};

pub(super) const INSERT_EVENT: &str = "INSERT INTO audit_events \
    (event_id, event_time, event_type, outcome, actor_account_id, actor_credential_id, \
     subject_account_id, subject_credential_id, subject_username, source_address) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
/// `$1`: account id or '' for all; `$2`: `,type,type,` or '' for all;
/// `$3`, `$4`: list events before this time and id (newest first, by time
/// then id); `$5`: limit; `$6`: the range's start (inclusive) and `$7` its
/// end (exclusive), both always bound. The first page starts before (end,
/// ''): every id sorts after the empty string, under any collation.
///
/// The keyset and the range are plain comparisons (a row comparison for the
/// keyset), never `$n IS NULL OR ...`, so that a generic plan on PostgreSQL
/// can still use them as bounds of a backward range scan of
/// `audit_events_time_id_idx`, and a deep page costs what the first does.
pub(in crate::storage) const LIST_EVENTS: &str = "SELECT event_id, event_time, event_type, outcome, \
    actor_account_id, actor_credential_id, subject_account_id, subject_credential_id, \
    subject_username, source_address FROM audit_events \
    WHERE ($1 = '' OR actor_account_id = $1 OR subject_account_id = $1) \
    AND ($2 = '' OR $2 LIKE ('%,' || event_type || ',%')) \
    AND (event_time, event_id) < ($3, $4) \
    AND event_time >= $6 AND event_time < $7 \
    ORDER BY event_time DESC, event_id DESC LIMIT $5";

/// Appends `event` within the caller's transaction.
pub(super) async fn insert_event<B: Backend>(
    conn: &mut B::Connection,
    event: &AuditEvent,
) -> Result<(), StorageError> {
    let insert = sqlx::query(INSERT_EVENT)
        .arg(event.id.as_str())
        .arg(event.time.as_micros())
        .arg(event.kind.as_str())
        .arg(event.outcome.as_str())
        .arg(event.actor_account.as_ref().map(AccountId::as_str))
        .arg(event.actor_credential.as_ref().map(TokenId::as_str))
        .arg(event.subject_account.as_ref().map(AccountId::as_str))
        .arg(event.subject_credential.as_ref().map(TokenId::as_str))
        .arg(event.subject_username.as_str())
        .arg(event.source_address.as_str());
    execute::<B>(conn, insert).await.map(drop)
}

/// Appends `event` and announces `what` to every replica, within
/// the caller's transaction: both take effect when it commits.
pub(super) async fn record<B: Backend>(
    backend: &B,
    conn: &mut B::Connection,
    event: &AuditEvent,
    what: &Invalidation,
) -> Result<(), StorageError> {
    insert_event::<B>(conn, event).await?;
    backend.announce(conn, what).await
}

pub(super) async fn record_event<B: Backend>(
    store: &SqlStore<B>,
    event: &AuditEvent,
) -> Result<(), StorageError> {
    if B::alone_in_transaction() {
        let mut tx = store.begin().await?;
        insert_event::<B>(&mut tx, event).await?;
        return tx.commit().await.map_err(B::classify);
    }
    let mut conn = store.conn().await?;
    insert_event::<B>(&mut conn, event).await
}

pub(super) async fn list_events<B: Backend>(
    store: &SqlStore<B>,
    filter: &AuditFilter,
    before: Option<(Timestamp, &str)>,
    limit: u32,
) -> Result<Vec<AuditEvent>, StorageError> {
    // No bound is a bound past every stored time (which the
    // domain keeps within Timestamp::MIN..=MAX).
    let start = filter.start_time.map_or(i64::MIN, Timestamp::as_micros);
    let end = filter.end_time.map_or(i64::MAX, Timestamp::as_micros);
    let (before_time, before_id) = before.map_or((end, ""), |(time, id)| (time.as_micros(), id));
    let found = store
        .fetch_all(
            sqlx::query(LIST_EVENTS)
                .arg(filter.account.as_ref().map_or("", AccountId::as_str))
                .arg(filter.types_pattern())
                .arg(before_time)
                .arg(before_id)
                .arg(i64::from(limit))
                .arg(start)
                .arg(end),
        )
        .await?;
    found.iter().map(rows::event).collect()
}
