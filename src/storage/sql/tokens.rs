//! Personal access tokens: creation, the hot path's lookup by digest,
//! listing, rotation, renewal and uses. Revocation is in `revocation`.

use super::{
    AccountId, AuditEvent, Creator, Digest, Invalidation, NewToken, SqlStore, StorageError,
    Timestamp, Token, TokenFilter, TokenId, TokenUse, WithAccount, audit, commit_change, execute,
    fetch_all, fetch_optional, lookup,
};
use crate::{
    domain::time::Clock,
    storage::{
        backend::{Backend, Bind as _},
        rows::{self, SqlRow as _},
    },
};

pub(super) const RELEASE_DEAD_NAME: &str = "UPDATE tokens SET live_name = NULL \
    WHERE account_id = $1 AND live_name = $2 \
    AND ((expire_time IS NOT NULL AND expire_time <= $3) OR uses_remaining = 0)";
pub(super) const INSERT_TOKEN: &str = "INSERT INTO tokens \
    (token_id, account_id, name, live_name, digest, scopes, create_time, expire_time, revoke_time, \
     family_id, replaced_by, max_uses, uses_remaining, last_used_time, last_used_address, \
     parent_family_id, retire_time, resources) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)";
pub(super) const TOKEN_BY_ID: &str = concat!(
    "SELECT ",
    token_cols!(),
    " FROM tokens t WHERE t.token_id = $1"
);
pub(super) const TOKEN_BY_DIGEST: &str = concat!(
    "SELECT ",
    token_cols!(),
    ", ",
    account_cols!(),
    " FROM tokens t JOIN accounts a ON a.account_id = t.account_id WHERE t.digest = $1"
);
/// The filters of a token listing (`TokenFilter`), given the numbers of its
/// parameters: `,state,state,` or '' for all; now; expire-before or NULL;
/// last-used-before or NULL.
macro_rules! token_filters {
    ($states:literal, $now:literal, $expire:literal, $used:literal) => {
        concat!(
            " AND (",
            $states,
            " = '' OR ",
            $states,
            " LIKE ('%,' || ",
            token_state!($now),
            " || ',%'))",
            " AND (",
            $expire,
            " IS NULL OR (t.expire_time IS NOT NULL AND t.expire_time < ",
            $expire,
            "))",
            " AND (",
            $used,
            " IS NULL OR COALESCE(t.last_used_time, t.create_time) < ",
            $used,
            ")"
        )
    };
}
/// `$1`: the account; `$2`: after this id ('' from the start); `$3`:
/// limit; `$4` to `$7`: the filters (`token_filters!`).
pub(in crate::storage) const LIST_TOKENS: &str = concat!(
    "SELECT ",
    token_cols!(),
    " FROM tokens t WHERE t.account_id = $1 AND t.token_id > $2",
    token_filters!("$4", "$5", "$6", "$7"),
    " ORDER BY t.token_id LIMIT $3"
);
/// Every account's tokens, in the same order as `LIST_TOKENS`: a range
/// scan of the primary key from `$1` (after this id, '' from the start);
/// `$2`: limit; `$3` to `$6`: the filters (`token_filters!`). A separate
/// statement rather than `($1 = '' OR account_id = $1)`, so that neither
/// listing's plan is a compromise for the other's.
pub(in crate::storage) const LIST_ALL_TOKENS: &str = concat!(
    "SELECT ",
    token_cols!(),
    " FROM tokens t WHERE t.token_id > $1",
    token_filters!("$3", "$4", "$5", "$6"),
    " ORDER BY t.token_id LIMIT $2"
);

/// The live (neither revoked nor expired at `$2`, nor used up) tokens of
/// account `$1` that are their family's current token: a rotation's
/// predecessor in its grace period is the same token under an older
/// secret, not one more. Two ranges of `tokens_account_live_idx` (the
/// unrevoked tokens, and those whose revocation is still to come), so that
/// the count never reads the account's revoked or rotated tokens: it costs
/// the same with 400,000 of them as with none.
pub(super) const COUNT_LIVE_TOKENS: &str = "SELECT \
    (SELECT count(*) FROM tokens \
     WHERE account_id = $1 AND replaced_by IS NULL AND revoke_time IS NULL \
     AND (expire_time IS NULL OR expire_time > $2) \
     AND (uses_remaining IS NULL OR uses_remaining > 0)) \
    + (SELECT count(*) FROM tokens \
     WHERE account_id = $1 AND replaced_by IS NULL AND revoke_time > $2 \
     AND (expire_time IS NULL OR expire_time > $2) \
     AND (uses_remaining IS NULL OR uses_remaining > 0))";

/// `$2`: successor; `$3`: when the old token's grace period ends; `$4`:
/// now. A revoked token is never rotated, whatever time its revocation
/// names (on PostgreSQL the condition is re-checked on the row a concurrent
/// revocation committed, after waiting for its lock); nor is a used-up one
/// (its last use may have been spent since it was read). The rotation sets
/// the grace deadline, never `revoke_time`.
pub(super) const MARK_ROTATED: &str = "UPDATE tokens SET replaced_by = $2, live_name = NULL, \
    retire_time = $3 \
    WHERE token_id = $1 AND replaced_by IS NULL AND revoke_time IS NULL \
    AND (expire_time IS NULL OR expire_time > $4) \
    AND (uses_remaining IS NULL OR uses_remaining > 0)";
/// A rotation moves the uses left, not copies them: the successor (`$1`)
/// takes what its predecessor (`$2`) has left, read after `MARK_ROTATED` has
/// locked the predecessor's row (so no use of it can land in between)...
pub(super) const MOVE_USES_TO_SUCCESSOR: &str = "UPDATE tokens SET uses_remaining = \
    (SELECT o.uses_remaining FROM tokens o WHERE o.token_id = $2) \
    WHERE token_id = $1 AND uses_remaining IS NOT NULL";
/// ...and the predecessor keeps none, so that during a rotation's grace
/// period the old secret cannot spend the uses the successor holds.
pub(super) const SPEND_PREDECESSOR_USES: &str = "UPDATE tokens SET uses_remaining = 0 \
    WHERE token_id = $1 AND uses_remaining IS NOT NULL";
/// `$2`: the token's account; `$3`: the new expiry (NULL: never); `$4`: now.
/// Only a live token is renewed: not rotated, revoked, expired or used up
/// (its last use may have been spent since it was read: a use takes no
/// account lock).
pub(super) const RENEW_TOKEN: &str = "UPDATE tokens SET expire_time = $3 \
    WHERE token_id = $1 AND account_id = $2 AND replaced_by IS NULL AND revoke_time IS NULL \
    AND (expire_time IS NULL OR expire_time > $4) \
    AND (uses_remaining IS NULL OR uses_remaining > 0)";
/// Spends a use of a token that is live at `$2`: neither revoked (a
/// revocation may have landed since the token was read) nor expired.
pub(super) const CONSUME_USE: &str = "UPDATE tokens SET uses_remaining = uses_remaining - 1 \
    WHERE token_id = $1 AND uses_remaining > 0 AND revoke_time IS NULL \
    AND (retire_time IS NULL OR retire_time > $2) \
    AND (expire_time IS NULL OR expire_time > $2) RETURNING uses_remaining";
/// `$4`: the minimum interval between two recorded uses, in microseconds.
pub(in crate::storage) const RECORD_USE: &str = "UPDATE tokens SET last_used_time = $2, last_used_address = $3 \
    WHERE token_id = $1 AND (last_used_time IS NULL OR last_used_time <= $2 - $4)";

/// The live token of the family `$1` a new child names, read before the
/// child is inserted (`$lock`: the backend's row lock, so that a concurrent
/// cascade either sees the child or is seen by this read).
macro_rules! parent_live {
    ($lock:expr) => {
        concat!(
            "SELECT revoke_time FROM tokens WHERE family_id = $1 AND replaced_by IS NULL",
            $lock
        )
    };
}

/// The session creating a token (`$1`), if it is still live at `$3` and
/// its account's credentials are still those it was authenticated with
/// (`$2`: the generation), and the account is enabled; `$lock` locks the
/// session's row, so that a sign-out either waits for the creation or is
/// seen by this read (a change to the account, such as a new password or a
/// disable, is seen if it committed first; if it commits later, the
/// creation came first).
macro_rules! creator_session_live {
    ($lock:expr) => {
        concat!(
            "SELECT s.session_id FROM sessions s JOIN accounts a ON a.account_id = s.account_id \
             WHERE s.session_id = $1 AND s.revoke_time IS NULL AND s.expire_time > $3 \
             AND a.credentials_generation = $2 AND a.disable_time IS NULL",
            $lock
        )
    };
}

/// The token creating a token (`$1`), if it is still live at `$2` (a
/// predecessor in its rotation's grace period is; a used-up one spent its
/// last use on this call) and its account is enabled; `$lock` as above.
macro_rules! creator_token_live {
    ($lock:expr) => {
        concat!(
            "SELECT t.token_id FROM tokens t JOIN accounts a ON a.account_id = t.account_id \
             WHERE t.token_id = $1 AND t.revoke_time IS NULL \
             AND (t.retire_time IS NULL OR t.retire_time > $2) \
             AND (t.expire_time IS NULL OR t.expire_time > $2) AND a.disable_time IS NULL",
            $lock
        )
    };
}

pub(in crate::storage) const PG_PARENT_LIVE: &str = parent_live!(" FOR SHARE");
/// Only the credential's row is locked, never its account's: the calls
/// that end credentials through the account (SignOutEverywhere,
/// ChangePassword, DeleteAccount) lock the account row first and the
/// credentials' rows second, so locking both here, after the new token's
/// account, deadlocked with them when a credential creates for another
/// account. The account's fields are read as committed.
pub(in crate::storage) const PG_CREATOR_SESSION_LIVE: &str =
    creator_session_live!(" FOR SHARE OF s");
pub(in crate::storage) const PG_CREATOR_TOKEN_LIVE: &str = creator_token_live!(" FOR SHARE OF t");

/// SQLite has no row locks: its writers take turns, and a transaction whose
/// read went stale by the time it writes fails instead of committing.
pub(in crate::storage) const SQLITE_PARENT_LIVE: &str = parent_live!("");
pub(in crate::storage) const SQLITE_CREATOR_SESSION_LIVE: &str = creator_session_live!("");
pub(in crate::storage) const SQLITE_CREATOR_TOKEN_LIVE: &str = creator_token_live!("");

pub(super) async fn create_token<B: Backend>(
    store: &SqlStore<B>,
    new: &NewToken,
    clock: &dyn Clock,
    max_live: u32,
    event: &AuditEvent,
) -> Result<(), StorageError> {
    let token = &new.token;
    let mut tx = store.begin().await?;
    // The account row first: a deletion holds it off (or waits
    // for this creation), and creations for the account take
    // turns, so that their count below is exact.
    let found = execute::<B>(
        &mut tx,
        sqlx::query(B::LOCK_ACCOUNT).arg(token.account_id.as_str()),
    )
    .await?;
    if found == 0 {
        return Err(StorageError::AccountGone);
    }
    // Read after the wait for the lock: the credential asking may have
    // expired meanwhile, and the count and the names judge liveness then.
    let now = clock.now();
    let count = sqlx::query(COUNT_LIVE_TOKENS)
        .arg(token.account_id.as_str())
        .arg(now.as_micros());
    let live = match fetch_optional::<B>(&mut tx, count).await? {
        Some(row) => row.int_at(0)?,
        None => 0,
    };
    if live >= i64::from(max_live) {
        return Err(StorageError::TooManyTokens(max_live));
    }
    execute::<B>(
        &mut tx,
        sqlx::query(RELEASE_DEAD_NAME)
            .arg(token.account_id.as_str())
            .arg(token.name.as_str())
            .arg(now.as_micros()),
    )
    .await?;
    // The creator's row before its family's live one: the order a
    // revocation of a rotated-out creator (a leak report) updates them in.
    require_creator_live::<B>(&mut tx, new, now).await?;
    if let Some(parent) = &token.parent_family_id {
        // A child is never born to a revoked family: the
        // cascade that revoked it could not have seen the child.
        let found =
            fetch_all::<B>(&mut tx, sqlx::query(B::PARENT_LIVE).arg(parent.as_str())).await?;
        let mut live = false;
        for row in &found {
            // Revoked whatever time the revocation names.
            live |= row.opt_int("revoke_time")?.is_none();
        }
        if !live {
            return Err(StorageError::ParentRevoked);
        }
    }
    insert_token::<B>(&mut tx, new).await?;
    audit::insert_event::<B>(&mut tx, event).await?;
    tx.commit().await.map_err(B::classify)
}

/// [`StorageError::CreatorEnded`] unless the credential creating `new` is
/// still live, read under a row lock where there are row locks (after the
/// account's, the order every creation takes them in).
async fn require_creator_live<B: Backend>(
    conn: &mut B::Connection,
    new: &NewToken,
    now: Timestamp,
) -> Result<(), StorageError> {
    require_live_creator::<B>(conn, new.creator.as_ref(), now).await
}

/// [`StorageError::CreatorEnded`] unless `creator` (if any) is still live,
/// read as [`require_creator_live`] reads it.
async fn require_live_creator<B: Backend>(
    conn: &mut B::Connection,
    creator: Option<&Creator>,
    now: Timestamp,
) -> Result<(), StorageError> {
    let check = match creator {
        None => return Ok(()),
        Some(Creator::Session {
            id,
            credentials_generation,
        }) => sqlx::query(B::CREATOR_SESSION_LIVE)
            .arg(id.as_str())
            .arg(*credentials_generation)
            .arg(now.as_micros()),
        Some(Creator::Token { id }) => sqlx::query(B::CREATOR_TOKEN_LIVE)
            .arg(id.as_str())
            .arg(now.as_micros()),
    };
    match fetch_optional::<B>(conn, check).await? {
        Some(_) => Ok(()),
        None => Err(StorageError::CreatorEnded),
    }
}

pub(super) async fn token_by_id<B: Backend>(
    store: &SqlStore<B>,
    id: &TokenId,
) -> Result<Option<Token>, StorageError> {
    let row = store
        .fetch_optional(sqlx::query(TOKEN_BY_ID).arg(id.as_str()))
        .await?;
    row.as_ref().map(rows::token).transpose()
}

/// The hot path's one query: the token a presented secret's digest names,
/// with its account. Batched with the other lookups waiting at the same
/// moment (`lookup`), or on the pool where there are no lookup connections.
pub(super) async fn token_by_digest<B: Backend>(
    store: &SqlStore<B>,
    digest: &Digest,
) -> Result<Option<WithAccount<Token>>, StorageError> {
    match store.lookups.lookup(lookup::Kind::Token, *digest).await {
        Some(Ok(lookup::Found::Token(found))) => return Ok(found),
        Some(Ok(lookup::Found::Session(_))) => {
            return Err(StorageError::Other("a token lookup found a session".into()));
        }
        Some(Err(err)) => return Err(err),
        None => {}
    }
    let row = store
        .fetch_optional(sqlx::query(TOKEN_BY_DIGEST).arg(&digest.as_bytes()[..]))
        .await?;
    row.as_ref()
        .map(|r| Ok((rows::token(r)?, rows::account(r)?)))
        .transpose()
}

/// [`token_by_digest`] for a verdict: from the read replica if it is
/// fresh, knows the token and the token has no use count; otherwise from
/// the primary.
pub(super) async fn token_for_verdict<B: Backend>(
    store: &SqlStore<B>,
    digest: &Digest,
) -> Result<Option<WithAccount<Token>>, StorageError> {
    if let Some(found) = store
        .backend
        .replica_lookup(TOKEN_BY_DIGEST, digest, Some("max_uses"))
        .await
        && let Some(row) = found.first()
    {
        return Ok(Some((rows::token(row)?, rows::account(row)?)));
    }
    token_by_digest(store, digest).await
}

pub(super) async fn list_tokens<B: Backend>(
    store: &SqlStore<B>,
    account: &AccountId,
    filter: &TokenFilter,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<Token>, StorageError> {
    let found = store
        .fetch_all(
            sqlx::query(LIST_TOKENS)
                .arg(account.as_str())
                .arg(after.unwrap_or(""))
                .arg(i64::from(limit))
                .arg(rows::states_pattern(&filter.states))
                .arg(filter.now.as_micros())
                .arg(filter.expire_before.map(Timestamp::as_micros))
                .arg(filter.last_used_before.map(Timestamp::as_micros)),
        )
        .await?;
    found.iter().map(rows::token).collect()
}

pub(super) async fn list_all_tokens<B: Backend>(
    store: &SqlStore<B>,
    filter: &TokenFilter,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<Token>, StorageError> {
    let found = store
        .fetch_all(
            sqlx::query(LIST_ALL_TOKENS)
                .arg(after.unwrap_or(""))
                .arg(i64::from(limit))
                .arg(rows::states_pattern(&filter.states))
                .arg(filter.now.as_micros())
                .arg(filter.expire_before.map(Timestamp::as_micros))
                .arg(filter.last_used_before.map(Timestamp::as_micros)),
        )
        .await?;
    found.iter().map(rows::token).collect()
}

pub(super) async fn rotate_token<B: Backend>(
    store: &SqlStore<B>,
    old: &TokenId,
    new: &NewToken,
    retire_old_at: Timestamp,
    clock: &dyn Clock,
    event: &AuditEvent,
) -> Result<Option<Token>, StorageError> {
    let mut tx = store.begin().await?;
    // The account row first, as creation and deletion take it:
    // locked after the token row (the successor's foreign key
    // waits for it), a deletion holding it and waiting for the
    // token rows would deadlock with this rotation.
    let found = execute::<B>(
        &mut tx,
        sqlx::query(B::LOCK_ACCOUNT).arg(new.token.account_id.as_str()),
    )
    .await?;
    if found == 0 {
        return Err(StorageError::AccountGone);
    }
    // Read after the wait for the lock: a token (or the credential
    // asking) that expired meanwhile is not rotated.
    let now = clock.now();
    // Before the old token is marked: a token rotating itself is then
    // still as it was authenticated (and the mark re-checks it anyway).
    require_creator_live::<B>(&mut tx, new, now).await?;
    let marked = execute::<B>(
        &mut tx,
        sqlx::query(MARK_ROTATED)
            .arg(old.as_str())
            .arg(new.token.id.as_str())
            .arg(retire_old_at.as_micros())
            .arg(now.as_micros()),
    )
    .await?;
    if marked == 0 {
        return Ok(None);
    }
    insert_token::<B>(&mut tx, new).await?;
    execute::<B>(
        &mut tx,
        sqlx::query(MOVE_USES_TO_SUCCESSOR)
            .arg(new.token.id.as_str())
            .arg(old.as_str()),
    )
    .await?;
    execute::<B>(
        &mut tx,
        sqlx::query(SPEND_PREDECESSOR_USES).arg(old.as_str()),
    )
    .await?;
    let what = Invalidation::Credential(old.clone());
    let reread = sqlx::query(TOKEN_BY_ID).arg(old.as_str());
    let row = commit_change(&store.backend, tx, Some((event, &what)), Some(reread)).await?;
    row.as_ref().map(rows::token).transpose()
}

pub(super) async fn renew_token<B: Backend>(
    store: &SqlStore<B>,
    id: &TokenId,
    account: &AccountId,
    expire_time: Option<Timestamp>,
    creator: Option<&Creator>,
    clock: &dyn Clock,
    event: &AuditEvent,
) -> Result<Option<Token>, StorageError> {
    let mut tx = store.begin().await?;
    // The order a creation takes its locks in (account, creator, token),
    // and the one the calls ending credentials through the account take
    // theirs in (account first).
    let found = execute::<B>(&mut tx, sqlx::query(B::LOCK_ACCOUNT).arg(account.as_str())).await?;
    if found == 0 {
        // Deleted since the caller read it (its tokens with it): as a
        // creation or a rotation answers.
        return Err(StorageError::AccountGone);
    }
    // Read after the wait for the lock: a token (or the credential
    // asking) that expired meanwhile is not renewed.
    let now = clock.now();
    require_live_creator::<B>(&mut tx, creator, now).await?;
    let renewed = execute::<B>(
        &mut tx,
        sqlx::query(RENEW_TOKEN)
            .arg(id.as_str())
            .arg(account.as_str())
            .arg(expire_time.map(Timestamp::as_micros))
            .arg(now.as_micros()),
    )
    .await?;
    if renewed == 0 {
        return Ok(None);
    }
    let what = Invalidation::Credential(id.clone());
    let reread = sqlx::query(TOKEN_BY_ID).arg(id.as_str());
    let row = commit_change(&store.backend, tx, Some((event, &what)), Some(reread)).await?;
    row.as_ref().map(rows::token).transpose()
}

pub(super) async fn consume_use<B: Backend>(
    store: &SqlStore<B>,
    id: &TokenId,
    now: Timestamp,
) -> Result<Option<i64>, StorageError> {
    let row = store
        .fetch_optional(
            sqlx::query(CONSUME_USE)
                .arg(id.as_str())
                .arg(now.as_micros()),
        )
        .await?;
    row.map(|row| row.int("uses_remaining")).transpose()
}

pub(super) async fn record_uses<B: Backend>(
    store: &SqlStore<B>,
    uses: &[TokenUse],
    interval: std::time::Duration,
) -> Result<(), StorageError> {
    if uses.is_empty() {
        return Ok(());
    }
    store
        .backend
        .write_uses(
            &store.pool,
            uses,
            i64::try_from(interval.as_micros()).unwrap_or(i64::MAX),
        )
        .await
}

/// Inserts a token row within the caller's transaction.
async fn insert_token<B: Backend>(
    conn: &mut B::Connection,
    new: &NewToken,
) -> Result<(), StorageError> {
    let token = &new.token;
    let insert = sqlx::query(INSERT_TOKEN)
        .arg(token.id.as_str())
        .arg(token.account_id.as_str())
        .arg(token.name.as_str())
        .arg(token.revoke_time.is_none().then(|| token.name.as_str()))
        .arg(&new.digest.as_bytes()[..])
        .arg(token.scopes.to_stored())
        .arg(token.create_time.as_micros())
        .arg(token.expire_time.map(Timestamp::as_micros))
        .arg(token.revoke_time.map(Timestamp::as_micros))
        .arg(token.family_id.as_str())
        .arg(token.replaced_by.as_ref().map(TokenId::as_str))
        .arg(token.max_uses)
        .arg(token.uses_remaining)
        .arg(token.last_used_time.map(Timestamp::as_micros))
        .arg(token.last_used_address.as_str())
        .arg(token.parent_family_id.as_ref().map(TokenId::as_str))
        .arg(token.retire_time.map(Timestamp::as_micros))
        .arg(token.resources.to_stored());
    execute::<B>(conn, insert).await.map(drop)
}

#[cfg(test)]
mod tests {
    /// The read replica's lookup (`postgres/replica.rs`) binds the digest
    /// as these statements' one parameter, and nothing else.
    #[test]
    fn the_lookups_by_digest_take_one_parameter() {
        for statement in [
            super::TOKEN_BY_DIGEST,
            super::super::sessions::SESSION_BY_DIGEST,
        ] {
            assert_eq!(statement.matches('$').count(), 1, "{statement}");
        }
    }
}
