//! Accounts: creation, reads, listing, disabling, deletion and passwords.

use super::{
    Account, AccountId, AuditEvent, Invalidation, PasswordHash, SqlStore, StorageError, TokenId,
    audit, commit_change, execute, fetch_all, revocation,
};
use crate::storage::{
    backend::{Backend, Bind as _},
    rows,
};

pub(super) const INSERT_ACCOUNT: &str = "INSERT INTO accounts \
    (account_id, username, username_key, email, kind, role, password_hash, create_time, disable_time) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
pub(super) const ACCOUNT_BY_ID: &str = concat!(
    "SELECT ",
    account_cols!(),
    " FROM accounts a WHERE a.account_id = $1"
);
pub(super) const ACCOUNT_BY_USERNAME: &str = concat!(
    "SELECT ",
    account_cols!(),
    " FROM accounts a WHERE a.username_key = $1"
);
/// Every id is greater than the empty string, so `$1 = ''` lists from the
/// start.
pub(super) const LIST_ACCOUNTS: &str = concat!(
    "SELECT ",
    account_cols!(),
    " FROM accounts a WHERE a.account_id > $1 ORDER BY a.account_id LIMIT $2"
);
/// Disabling ends what the account's credentials could do, so it moves
/// their generation on (see `INSERT_SESSION`).
pub(super) const DISABLE_ACCOUNT: &str = "UPDATE accounts SET disable_time = $2, \
    credentials_generation = credentials_generation + 1 \
    WHERE account_id = $1 AND disable_time IS NULL";
pub(super) const ENABLE_ACCOUNT: &str =
    "UPDATE accounts SET disable_time = NULL WHERE account_id = $1 AND disable_time IS NOT NULL";
/// Takes the account row's write lock within a transaction, changing
/// nothing, and says (by the rows it affects) whether the account exists:
/// on PostgreSQL a row lock that a deletion (`LOCK_ACCOUNT_FOR_DELETE`)
/// and other token creations for the account wait for, on SQLite the
/// database's write lock, taken before anything is read. Statements after
/// it see every token created before it was granted.
///
/// PostgreSQL: `FOR NO KEY UPDATE`, the lock an update that changes no key
/// takes, without writing a new version of the row: a no-op `UPDATE` left
/// one dead version of the account per creation, and under a stream of
/// creations for one account every read of that row (each cache miss
/// joins it) walked the versions autovacuum had not yet removed.
pub(in crate::storage) const PG_LOCK_ACCOUNT: &str =
    "SELECT account_id FROM accounts WHERE account_id = $1 FOR NO KEY UPDATE";
/// SQLite: an update, which takes the database's write lock.
pub(in crate::storage) const SQLITE_LOCK_ACCOUNT: &str = "UPDATE accounts \
    SET credentials_generation = credentials_generation WHERE account_id = $1";

/// A deletion locks the account row first, so that whatever is being
/// created for the account (a token, a session, a rotation's successor)
/// either commits before the deletion's statements run (which then see it)
/// or waits for the deletion and finds the account gone. PostgreSQL:
/// `FOR UPDATE`, the lock that also holds off foreign-key checks; SQLite:
/// the write lock, through `LOCK_ACCOUNT`.
pub(in crate::storage) const PG_LOCK_ACCOUNT_FOR_DELETE: &str =
    "SELECT account_id FROM accounts WHERE account_id = $1 FOR UPDATE";
pub(in crate::storage) const SQLITE_LOCK_ACCOUNT_FOR_DELETE: &str = SQLITE_LOCK_ACCOUNT;
/// ...and then its own credentials' rows, before the cascade into other
/// accounts' tokens: the order a renewal or a creation by one of these
/// credentials takes its locks in (the caller's row, then the target
/// token's). Locked after the cascade, they deadlocked with a renewal of a
/// descendant in another account (found by an attacker: the renewal held
/// its caller's row and waited for the token the cascade had revoked).
/// PostgreSQL only; SQLite's writers take turns.
pub(in crate::storage) const PG_LOCK_CREDENTIALS_FOR_DELETE: &[&str] = &[
    "SELECT token_id FROM tokens WHERE account_id = $1 FOR UPDATE",
    "SELECT session_id FROM sessions WHERE account_id = $1 FOR UPDATE",
];
pub(super) const DELETE_ACCOUNT_SESSIONS: &str = "DELETE FROM sessions WHERE account_id = $1";
pub(super) const DELETE_ACCOUNT_TOKENS: &str = "DELETE FROM tokens WHERE account_id = $1";
pub(super) const DELETE_ACCOUNT: &str = "DELETE FROM accounts WHERE account_id = $1";
/// A new password moves the account's credentials generation on (see
/// `INSERT_SESSION`).
pub(super) const SET_PASSWORD: &str = "UPDATE accounts SET password_hash = $2, \
    credentials_generation = credentials_generation + 1 WHERE account_id = $1";
/// Moves the account's credentials generation on (see `INSERT_SESSION`),
/// before its sessions are ended in the same transaction.
pub(super) const BUMP_CREDENTIALS: &str = "UPDATE accounts \
    SET credentials_generation = credentials_generation + 1 WHERE account_id = $1";

/// When an account is deleted its tokens go, and with them every token
/// descended from their families in other accounts (an operator's tokens
/// may have created tokens for anyone): `$1` the account, `$2` now.
pub(super) const REVOKE_ACCOUNT_DESCENDANTS: &str = concat!(
    "WITH RECURSIVE ",
    descendants_of!("SELECT f.family_id FROM tokens f WHERE f.account_id = $1"),
    " UPDATE tokens SET revoke_time = $2, live_name = NULL \
     WHERE family_id IN (SELECT family_id FROM descendants) AND account_id <> $1 \
     AND revoke_time IS NULL RETURNING ",
    revoked_cols!("1 = 0")
);

pub(super) async fn create_account<B: Backend>(
    store: &SqlStore<B>,
    account: &Account,
    event: &AuditEvent,
) -> Result<(), StorageError> {
    let mut tx = store.begin().await?;
    let insert = sqlx::query(INSERT_ACCOUNT)
        .arg(account.id.as_str())
        .arg(account.username.as_str())
        .arg(account.username.key())
        .arg(account.email.as_str())
        .arg(account.kind.as_str())
        .arg(account.role.as_str())
        .arg(account.password_hash.as_ref().map(|h| h.as_str()))
        .arg(account.create_time.as_micros())
        .arg(
            account
                .disable_time
                .map(crate::domain::time::Timestamp::as_micros),
        );
    execute::<B>(&mut tx, insert).await?;
    audit::insert_event::<B>(&mut tx, event).await?;
    tx.commit().await.map_err(B::classify)
}

pub(super) async fn account_by_id<B: Backend>(
    store: &SqlStore<B>,
    id: &AccountId,
) -> Result<Option<Account>, StorageError> {
    let row = store
        .fetch_optional(sqlx::query(ACCOUNT_BY_ID).arg(id.as_str()))
        .await?;
    row.as_ref().map(rows::account).transpose()
}

pub(super) async fn account_by_username<B: Backend>(
    store: &SqlStore<B>,
    key: &str,
) -> Result<Option<Account>, StorageError> {
    let row = store
        .fetch_optional(sqlx::query(ACCOUNT_BY_USERNAME).arg(key))
        .await?;
    row.as_ref().map(rows::account).transpose()
}

pub(super) async fn list_accounts<B: Backend>(
    store: &SqlStore<B>,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<Account>, StorageError> {
    let found = store
        .fetch_all(
            sqlx::query(LIST_ACCOUNTS)
                .arg(after.unwrap_or(""))
                .arg(i64::from(limit)),
        )
        .await?;
    found.iter().map(rows::account).collect()
}

pub(super) async fn set_account_disabled<B: Backend>(
    store: &SqlStore<B>,
    id: &AccountId,
    at: Option<crate::domain::time::Timestamp>,
    event: &AuditEvent,
) -> Result<Option<Account>, StorageError> {
    let mut tx = store.begin().await?;
    let change = match at {
        Some(at) => sqlx::query(DISABLE_ACCOUNT)
            .arg(id.as_str())
            .arg(at.as_micros()),
        None => sqlx::query(ENABLE_ACCOUNT).arg(id.as_str()),
    };
    let changed = execute::<B>(&mut tx, change).await? > 0;
    let what = Invalidation::Account(id.clone());
    let reread = sqlx::query(ACCOUNT_BY_ID).arg(id.as_str());
    let row = commit_change(
        &store.backend,
        tx,
        changed.then_some((event, &what)),
        Some(reread),
    )
    .await?;
    row.as_ref().map(rows::account).transpose()
}

pub(super) async fn delete_account<B: Backend>(
    store: &SqlStore<B>,
    id: &AccountId,
    event: &AuditEvent,
) -> Result<Option<Vec<TokenId>>, StorageError> {
    let mut tx = store.begin_cascade().await?;
    // First the account row, so that nothing is created for it
    // between the statements below (see the query).
    let found = execute::<B>(
        &mut tx,
        sqlx::query(B::LOCK_ACCOUNT_FOR_DELETE).arg(id.as_str()),
    )
    .await?;
    if found == 0 {
        return Ok(None);
    }
    for lock in B::LOCK_CREDENTIALS_FOR_DELETE {
        fetch_all::<B>(&mut tx, sqlx::query(lock).arg(id.as_str())).await?;
    }
    let at = event.time.as_micros();
    let query = sqlx::query(REVOKE_ACCOUNT_DESCENDANTS)
        .arg(id.as_str())
        .arg(at);
    let mut revoked =
        revocation::revoke_rows(&store.backend, &mut tx, query, event, |_| None).await?;
    let again = || {
        sqlx::query(REVOKE_ACCOUNT_DESCENDANTS)
            .arg(id.as_str())
            .arg(at)
    };
    revocation::revoke_until_done(&store.backend, &mut tx, again, event, &mut revoked).await?;
    for query in [DELETE_ACCOUNT_SESSIONS, DELETE_ACCOUNT_TOKENS] {
        execute::<B>(&mut tx, sqlx::query(query).arg(id.as_str())).await?;
    }
    let deleted = execute::<B>(&mut tx, sqlx::query(DELETE_ACCOUNT).arg(id.as_str())).await?;
    if deleted == 0 {
        return Ok(None);
    }
    let what = Invalidation::Account(id.clone());
    commit_change(&store.backend, tx, Some((event, &what)), None).await?;
    Ok(Some(revoked))
}

pub(super) async fn set_password<B: Backend>(
    store: &SqlStore<B>,
    id: &AccountId,
    hash: &PasswordHash,
    keep: &TokenId,
    at: crate::domain::time::Timestamp,
    event: &AuditEvent,
) -> Result<u64, StorageError> {
    let mut tx = store.begin().await?;
    execute::<B>(
        &mut tx,
        sqlx::query(SET_PASSWORD)
            .arg(id.as_str())
            .arg(hash.as_str()),
    )
    .await?;
    let ended = execute::<B>(
        &mut tx,
        sqlx::query(super::sessions::REVOKE_ACCOUNT_SESSIONS)
            .arg(id.as_str())
            .arg(keep.as_str())
            .arg(at.as_micros()),
    )
    .await?;
    let what = Invalidation::Account(id.clone());
    commit_change(&store.backend, tx, Some((event, &what)), None).await?;
    Ok(ended)
}
