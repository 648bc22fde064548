//! Sessions: sign-in, the hot path's lookup by digest, and sign-out.

use super::{
    AccountId, AuditEvent, Digest, Invalidation, Session, SqlStore, StorageError, Timestamp,
    TokenId, WithAccount, accounts, audit, commit_change, execute, lookup,
};
use crate::storage::{
    backend::{Backend, Bind as _},
    rows,
};

/// Inserts a session for account `$2` only if the account still has the
/// credentials generation `$7` (the one the sign-in read before it checked
/// the password) and is not disabled: one statement, which inserts no row
/// otherwise. `$lock` is the backend's row lock on the account. On
/// PostgreSQL (READ COMMITTED) a plain `WHERE EXISTS` would not do: a
/// password change could commit between this statement's snapshot and its
/// commit, and its session revocation would not see the new row. With `FOR
/// SHARE` either this statement waits for the change to commit and then
/// re-checks the row's new version (and inserts nothing), or the change's
/// update of the account waits for this insert to commit, and its
/// revocation, a later statement, sees the session. On SQLite the
/// statement runs under the database's write lock, so nothing commits
/// between its check and its insert.
macro_rules! insert_session {
    ($lock:expr) => {
        concat!(
            "WITH live_account AS (SELECT account_id FROM accounts \
             WHERE account_id = $2 AND credentials_generation = $7 AND disable_time IS NULL",
            $lock,
            ") INSERT INTO sessions \
             (session_id, account_id, digest, create_time, expire_time, revoke_time) \
             SELECT $1, account_id, $3, $4, $5, $6 FROM live_account"
        )
    };
}
pub(in crate::storage) const PG_INSERT_SESSION: &str = insert_session!(" FOR SHARE");
pub(in crate::storage) const SQLITE_INSERT_SESSION: &str = insert_session!("");
pub(super) const SESSION_BY_DIGEST: &str = concat!(
    "SELECT ",
    session_cols!(),
    ", ",
    account_cols!(),
    " FROM sessions s JOIN accounts a ON a.account_id = s.account_id WHERE s.digest = $1"
);
pub(super) const REVOKE_SESSION: &str =
    "UPDATE sessions SET revoke_time = $2 WHERE session_id = $1 AND revoke_time IS NULL";
/// Ends an account's live sessions except `$2` ('' to keep none).
pub(super) const REVOKE_ACCOUNT_SESSIONS: &str = "UPDATE sessions SET revoke_time = $3 \
    WHERE account_id = $1 AND session_id <> $2 AND revoke_time IS NULL AND expire_time > $3";

pub(super) async fn revoke_sessions<B: Backend>(
    store: &SqlStore<B>,
    account: &AccountId,
    at: Timestamp,
    event: &AuditEvent,
) -> Result<u64, StorageError> {
    let mut tx = store.begin().await?;
    // The generation first: a sign-in that locks the account
    // after this waits for the commit and finds it moved on; one
    // that locked it before has committed its session by the
    // time the revocation below runs.
    execute::<B>(
        &mut tx,
        sqlx::query(accounts::BUMP_CREDENTIALS).arg(account.as_str()),
    )
    .await?;
    let ended = execute::<B>(
        &mut tx,
        sqlx::query(REVOKE_ACCOUNT_SESSIONS)
            .arg(account.as_str())
            .arg("")
            .arg(at.as_micros()),
    )
    .await?;
    let what = Invalidation::Account(account.clone());
    commit_change(&store.backend, tx, Some((event, &what)), None).await?;
    Ok(ended)
}

pub(super) async fn create_session<B: Backend>(
    store: &SqlStore<B>,
    session: &Session,
    digest: &Digest,
    generation: i64,
    event: &AuditEvent,
) -> Result<bool, StorageError> {
    let mut tx = store.begin().await?;
    let insert = sqlx::query(B::INSERT_SESSION)
        .arg(session.id.as_str())
        .arg(session.account_id.as_str())
        .arg(&digest.as_bytes()[..])
        .arg(session.create_time.as_micros())
        .arg(session.expire_time.as_micros())
        .arg(session.revoke_time.map(Timestamp::as_micros))
        .arg(generation);
    if execute::<B>(&mut tx, insert).await? == 0 {
        return Ok(false);
    }
    audit::insert_event::<B>(&mut tx, event).await?;
    tx.commit().await.map_err(B::classify)?;
    Ok(true)
}

/// The session a presented token's digest names, with its account:
/// batched as `tokens::token_by_digest` is.
pub(super) async fn session_by_digest<B: Backend>(
    store: &SqlStore<B>,
    digest: &Digest,
) -> Result<Option<WithAccount<Session>>, StorageError> {
    match store.lookups.lookup(lookup::Kind::Session, *digest).await {
        Some(Ok(lookup::Found::Session(found))) => return Ok(found),
        Some(Ok(lookup::Found::Token(_))) => {
            return Err(StorageError::Other("a session lookup found a token".into()));
        }
        Some(Err(err)) => return Err(err),
        None => {}
    }
    let row = store
        .fetch_optional(sqlx::query(SESSION_BY_DIGEST).arg(&digest.as_bytes()[..]))
        .await?;
    row.as_ref()
        .map(|r| Ok((rows::session(r)?, rows::account(r)?)))
        .transpose()
}

/// [`session_by_digest`] for a verdict: from the read replica if it is
/// fresh and knows the session; otherwise from the primary.
pub(super) async fn session_for_verdict<B: Backend>(
    store: &SqlStore<B>,
    digest: &Digest,
) -> Result<Option<WithAccount<Session>>, StorageError> {
    if let Some(found) = store
        .backend
        .replica_lookup(SESSION_BY_DIGEST, digest, None)
        .await
        && let Some(row) = found.first()
    {
        return Ok(Some((rows::session(row)?, rows::account(row)?)));
    }
    session_by_digest(store, digest).await
}

pub(super) async fn revoke_session<B: Backend>(
    store: &SqlStore<B>,
    id: &TokenId,
    at: Timestamp,
    event: &AuditEvent,
) -> Result<(), StorageError> {
    let mut tx = store.begin().await?;
    let change = sqlx::query(REVOKE_SESSION)
        .arg(id.as_str())
        .arg(at.as_micros());
    let changed = execute::<B>(&mut tx, change).await? > 0;
    let what = Invalidation::Credential(id.clone());
    commit_change(&store.backend, tx, changed.then_some((event, &what)), None).await?;
    Ok(())
}
