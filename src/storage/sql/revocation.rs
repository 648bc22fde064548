//! Revocation: of a token and its descendants, of a family, and of the
//! credentials a leak report names; every revoked credential audited and
//! announced.

use super::{
    AuditEvent, Digest, SqlStore, StorageError, Timestamp, Token, TokenId, audit, commit_change,
    fetch_all,
};
use crate::{
    domain::audit::{EventType, Outcome},
    storage::{
        backend::{Backend, Bind as _, Query},
        rows,
    },
};

/// Revokes a token (recording `$2`) and, if it is its family's live token
/// (not rotated out) or `$3` is 1 (the caller read it as the live token, and
/// a rotation may have landed since), the rest of its family (predecessors
/// still in a rotation's grace period, and successors: the same token under
/// another secret) and every token of every family descended from that
/// family, in one statement. Every statement that revokes sets
/// `revoke_time` only where it is NULL, and compares it with no clock: a
/// revocation holds whatever time it recorded.
pub(super) const REVOKE_TOKEN: &str = concat!(
    "WITH RECURSIVE named(family_id) AS (SELECT p.family_id FROM tokens p \
     WHERE p.token_id = $1 AND (p.replaced_by IS NULL OR $3 = 1)), ",
    descendants_of!("SELECT n.family_id FROM named n"),
    " UPDATE tokens SET revoke_time = $2, live_name = NULL \
     WHERE token_id IN (SELECT CAST($1 AS TEXT) UNION ALL ",
    members_of!("SELECT n.family_id FROM named n UNION SELECT family_id FROM descendants"),
    ") AND revoke_time IS NULL RETURNING ",
    revoked_cols!("token_id = $1")
);

/// Revokes every token of a family and of every family descended from it.
pub(super) const REVOKE_FAMILY: &str = concat!(
    "WITH RECURSIVE ",
    descendants_of!("SELECT CAST($1 AS TEXT)"),
    " UPDATE tokens SET revoke_time = $2, live_name = NULL \
     WHERE token_id IN (",
    members_of!("SELECT CAST($1 AS TEXT) AS family_id UNION SELECT family_id FROM descendants"),
    ") AND revoke_time IS NULL RETURNING ",
    revoked_cols!("family_id = $1")
);

/// Revokes the tokens whose digests `$1` lists (`$match`, the backend's way
/// of matching a bound list) at `$2`, with the whole family of each (a
/// reported secret that was rotated out takes its successors too, as reuse
/// detection does: whoever holds it may have rotated) and every token of the
/// families descended from those families: a whole leak report in one
/// statement.
macro_rules! leak_tokens {
    ($match:expr) => {
        concat!(
            "WITH RECURSIVE leaked AS (SELECT token_id, family_id, replaced_by FROM tokens \
             WHERE ",
            $match,
            " AND revoke_time IS NULL \
             AND (expire_time IS NULL OR expire_time > $2)), ",
            descendants_of!("SELECT l.family_id FROM leaked l"),
            " UPDATE tokens SET revoke_time = $2, live_name = NULL \
             WHERE token_id IN (SELECT token_id FROM leaked UNION ALL ",
            members_of!("SELECT l.family_id FROM leaked l UNION SELECT family_id FROM descendants"),
            ") AND revoke_time IS NULL RETURNING ",
            // Not `token_id IN leaked`: on SQLite the RETURNING clause
            // may see the rows as updated, no longer live.
            revoked_cols!($match)
        )
    };
}

/// The confirming pass of a leak report (see `revoke_until_done`): the
/// members, still live, of the families whose tokens the report revoked (at
/// `$2`, exactly) and of the families descended from them. On PostgreSQL a
/// successor that a rotation committed while the first pass waited for the
/// reported row is invisible to that pass, and found by this one.
macro_rules! leak_descendants {
    ($match:expr) => {
        concat!(
            "WITH RECURSIVE reported AS (SELECT l.family_id FROM tokens l WHERE ",
            $match,
            " AND l.revoke_time = $2), ",
            descendants_of!("SELECT r.family_id FROM reported r"),
            " UPDATE tokens SET revoke_time = $2, live_name = NULL \
             WHERE token_id IN (",
            members_of!(
                "SELECT r.family_id FROM reported r UNION SELECT family_id FROM descendants"
            ),
            ") AND revoke_time IS NULL RETURNING ",
            revoked_cols!("1 = 0")
        )
    };
}

/// Signs out the live sessions whose digests `$1` lists (`$match`, as in
/// [`leak_tokens`]) at `$2`, in one statement. Sessions have no children.
macro_rules! leak_sessions {
    ($match:expr) => {
        concat!(
            "UPDATE sessions SET revoke_time = $2 WHERE ",
            $match,
            " AND revoke_time IS NULL AND expire_time > $2 \
             RETURNING session_id AS credential_id, account_id, \
             COALESCE((SELECT a.username FROM accounts a \
             WHERE a.account_id = sessions.account_id), '') AS username, \
             CAST(1 AS BIGINT) AS direct, CAST(1 AS BIGINT) AS live"
        )
    };
}

/// How PostgreSQL matches a digest against the bound list (a `BYTEA[]`).
macro_rules! pg_digest_in_list {
    () => {
        "digest = ANY($1)"
    };
}
/// How SQLite matches a digest against the bound list (a JSON array of hex
/// strings: SQLite binds no arrays). The unique index on `digest` is probed
/// once per element.
macro_rules! sqlite_digest_in_list {
    () => {
        "digest IN (SELECT unhex(value) FROM json_each($1))"
    };
}
pub(in crate::storage) const PG_LEAK_TOKENS: &str = leak_tokens!(pg_digest_in_list!());
pub(in crate::storage) const PG_LEAK_DESCENDANTS: &str = leak_descendants!(pg_digest_in_list!());

pub(in crate::storage) const SQLITE_LEAK_DESCENDANTS: &str =
    leak_descendants!(sqlite_digest_in_list!());

pub(in crate::storage) const PG_LEAK_SESSIONS: &str = leak_sessions!(pg_digest_in_list!());
pub(in crate::storage) const SQLITE_LEAK_TOKENS: &str = leak_tokens!(sqlite_digest_in_list!());
pub(in crate::storage) const SQLITE_LEAK_SESSIONS: &str = leak_sessions!(sqlite_digest_in_list!());

pub(super) async fn revoke_token<B: Backend>(
    store: &SqlStore<B>,
    id: &TokenId,
    seen_live: bool,
    at: Timestamp,
    event: &AuditEvent,
) -> Result<Option<(Token, Vec<TokenId>)>, StorageError> {
    let mut tx = store.begin_cascade().await?;
    let revoke = || {
        sqlx::query(REVOKE_TOKEN)
            .arg(id.as_str())
            .arg(at.as_micros())
            .arg(i64::from(seen_live))
    };
    let mut revoked = revoke_rows(&store.backend, &mut tx, revoke(), event, |_| {
        Some(event.clone())
    })
    .await?;
    // On PostgreSQL, a successor inserted by a rotation that this
    // pass waited for (on the live row's lock) is invisible to
    // its snapshot: the next pass sees it.
    revoke_until_done(&store.backend, &mut tx, revoke, event, &mut revoked).await?;
    // Every revoked credential is audited and announced above.
    let reread = sqlx::query(super::tokens::TOKEN_BY_ID).arg(id.as_str());
    let row = commit_change(&store.backend, tx, None, Some(reread)).await?;
    let token = row.as_ref().map(rows::token).transpose()?;
    Ok(token.map(|token| (token, revoked)))
}

pub(super) async fn revoke_family<B: Backend>(
    store: &SqlStore<B>,
    family: &TokenId,
    at: Timestamp,
    event: &AuditEvent,
) -> Result<Vec<TokenId>, StorageError> {
    let mut tx = store.begin_cascade().await?;
    // One event for the family, written even if it was already
    // revoked; one per descendant.
    audit::insert_event::<B>(&mut tx, event).await?;
    let revoke = || {
        sqlx::query(REVOKE_FAMILY)
            .arg(family.as_str())
            .arg(at.as_micros())
    };
    let mut revoked = revoke_rows(&store.backend, &mut tx, revoke(), event, |_| None).await?;
    revoke_until_done(&store.backend, &mut tx, revoke, event, &mut revoked).await?;
    tx.commit().await.map_err(B::classify)?;
    Ok(revoked)
}

pub(super) async fn revoke_leaked<B: Backend>(
    store: &SqlStore<B>,
    tokens: &[Digest],
    sessions: &[Digest],
    at: Timestamp,
    template: &AuditEvent,
) -> Result<Vec<TokenId>, StorageError> {
    let reported = |hit: &rows::Revoked| {
        Some(
            template
                .another()
                .account(&hit.account, &hit.username)
                .credential(&hit.id),
        )
    };
    let mut tx = store.begin_cascade().await?;
    let mut revoked = Vec::new();
    for (digests, query) in [(tokens, B::LEAK_TOKENS), (sessions, B::LEAK_SESSIONS)] {
        if digests.is_empty() {
            continue;
        }
        let query = B::bind_digests(sqlx::query(query), digests).arg(at.as_micros());
        revoked.extend(revoke_rows(&store.backend, &mut tx, query, template, reported).await?);
    }
    if !tokens.is_empty() {
        let again =
            || B::bind_digests(sqlx::query(B::LEAK_DESCENDANTS), tokens).arg(at.as_micros());
        revoke_until_done(&store.backend, &mut tx, again, template, &mut revoked).await?;
    }
    tx.commit().await.map_err(B::classify)?;
    Ok(revoked)
}

/// Runs a revoking statement (one that returns `revoked_cols!()`) within
/// the caller's transaction; writes `direct(row)` (when it returns an
/// event) for each credential the request named, and a `token.revoked`
/// event by the same actor for each descendant revoked with it; announces
/// every revoked credential to every replica; and returns their ids.
pub(super) async fn revoke_rows<B: Backend>(
    backend: &B,
    conn: &mut B::Connection,
    query: Query<'_, B::Db>,
    cause: &AuditEvent,
    direct: impl Fn(&rows::Revoked) -> Option<AuditEvent>,
) -> Result<Vec<TokenId>, StorageError> {
    let found = fetch_all::<B>(&mut *conn, query).await?;
    let mut ids = Vec::with_capacity(found.len());
    for row in &found {
        let revoked = rows::revoked(row)?;
        let event = if revoked.direct {
            direct(&revoked)
        } else if !revoked.live {
            None
        } else {
            Some(
                AuditEvent {
                    kind: EventType::TokenRevoked,
                    // Took effect, even when its cause was a
                    // refused attempt (reuse detection).
                    outcome: Outcome::Success,
                    ..cause.another()
                }
                .account(&revoked.account, &revoked.username)
                .credential(&revoked.id),
            )
        };
        if let Some(event) = event {
            audit::insert_event::<B>(&mut *conn, &event).await?;
        }
        ids.push(revoked.id);
    }
    backend.announce_credentials(&mut *conn, &ids).await?;
    Ok(ids)
}

/// Runs the confirming passes of a cascading revocation: `again`
/// (which revokes only descendants) until it revokes nothing.
/// On PostgreSQL a child whose creation was in flight when the
/// first pass took its snapshot is invisible to it, but that
/// creation holds a share lock on its parent's live row, which
/// the first pass waited for: the next pass, with a fresh
/// snapshot, sees the child. Usually one empty pass.
pub(super) async fn revoke_until_done<'q, B: Backend>(
    backend: &B,
    conn: &mut B::Connection,
    again: impl Fn() -> Query<'q, B::Db>,
    cause: &AuditEvent,
    revoked: &mut Vec<TokenId>,
) -> Result<(), StorageError> {
    loop {
        let more = revoke_rows(backend, &mut *conn, again(), cause, |_| None).await?;
        if more.is_empty() {
            return Ok(());
        }
        revoked.extend(more);
    }
}
