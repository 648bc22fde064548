//! Turning result rows into domain values, once for both backends. Column
//! names are the ones [`super::sql`] selects.

use sqlx::Row;

use super::StorageError;
use crate::domain::{
    account::{Account, AccountId, AccountKind, Email, Role, Username},
    audit::{AuditEvent, EventType, Outcome},
    password::PasswordHash,
    resource::Resources,
    scope::Scopes,
    time::Timestamp,
    token::{Session, Token, TokenId, TokenName, TokenState},
};

/// Typed column access with errors already translated; implemented for both
/// backends' row types.
pub trait SqlRow: Row {
    fn text(&self, column: &str) -> Result<String, StorageError>;
    fn opt_text(&self, column: &str) -> Result<Option<String>, StorageError>;
    fn int(&self, column: &str) -> Result<i64, StorageError>;
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StorageError>;
    /// The integer in the `index`th column, for a column with no name of
    /// its own (`count(*)`).
    fn int_at(&self, index: usize) -> Result<i64, StorageError>;
    fn bytes(&self, column: &str) -> Result<Vec<u8>, StorageError>;
}

macro_rules! impl_sql_row {
    ($row:ty) => {
        impl SqlRow for $row {
            fn text(&self, column: &str) -> Result<String, StorageError> {
                self.try_get(column).map_err(corrupt)
            }
            fn opt_text(&self, column: &str) -> Result<Option<String>, StorageError> {
                self.try_get(column).map_err(corrupt)
            }
            fn int(&self, column: &str) -> Result<i64, StorageError> {
                self.try_get(column).map_err(corrupt)
            }
            fn opt_int(&self, column: &str) -> Result<Option<i64>, StorageError> {
                self.try_get(column).map_err(corrupt)
            }
            fn int_at(&self, index: usize) -> Result<i64, StorageError> {
                self.try_get(index).map_err(corrupt)
            }
            fn bytes(&self, column: &str) -> Result<Vec<u8>, StorageError> {
                self.try_get(column).map_err(corrupt)
            }
        }
    };
}

impl_sql_row!(sqlx::postgres::PgRow);
impl_sql_row!(sqlx::sqlite::SqliteRow);

fn corrupt(err: sqlx::Error) -> StorageError {
    StorageError::Corrupt(err.to_string())
}

/// An account from the `account_cols!()` columns.
pub(super) fn account<R: SqlRow>(row: &R) -> Result<Account, StorageError> {
    let kind = row.text("kind")?;
    let role = row.text("role")?;
    Ok(Account {
        id: AccountId::from_stored(row.text("account_id")?),
        username: Username::from_stored(row.text("username")?),
        email: Email::from_stored(row.text("email")?),
        kind: AccountKind::from_stored(&kind)
            .ok_or_else(|| StorageError::Corrupt(format!("unknown account kind {kind:?}")))?,
        role: Role::from_stored(&role)
            .ok_or_else(|| StorageError::Corrupt(format!("unknown account role {role:?}")))?,
        password_hash: row
            .opt_text("password_hash")?
            .map(PasswordHash::from_stored),
        create_time: Timestamp::from_micros(row.int("account_create_time")?),
        disable_time: row.opt_int("disable_time")?.map(Timestamp::from_micros),
        credentials_generation: row.int("credentials_generation")?,
    })
}

/// A token from the `token_cols!()` columns.
pub(super) fn token<R: SqlRow>(row: &R) -> Result<Token, StorageError> {
    Ok(Token {
        id: TokenId::from_stored(row.text("token_id")?),
        account_id: AccountId::from_stored(row.text("token_account_id")?),
        name: TokenName::from_stored(row.text("name")?),
        scopes: Scopes::from_stored(&row.text("scopes")?),
        resources: Resources::from_stored(&row.text("resources")?),
        create_time: Timestamp::from_micros(row.int("create_time")?),
        expire_time: row.opt_int("expire_time")?.map(Timestamp::from_micros),
        revoke_time: row.opt_int("revoke_time")?.map(Timestamp::from_micros),
        retire_time: row.opt_int("retire_time")?.map(Timestamp::from_micros),
        max_uses: row.opt_int("max_uses")?,
        uses_remaining: row.opt_int("uses_remaining")?,
        last_used_time: row.opt_int("last_used_time")?.map(Timestamp::from_micros),
        last_used_address: row.text("last_used_address")?,
        family_id: TokenId::from_stored(row.text("family_id")?),
        replaced_by: row.opt_text("replaced_by")?.map(TokenId::from_stored),
        parent_family_id: row.opt_text("parent_family_id")?.map(TokenId::from_stored),
    })
}

/// One credential a revoking statement revoked (see `revoked_cols!` in
/// [`super::sql`]).
pub(super) struct Revoked {
    /// The token's or session's id.
    pub id: TokenId,
    /// Its account.
    pub account: AccountId,
    /// That account's username, for the audit log.
    pub username: String,
    /// Whether the request named it (rather than one of its ancestors).
    pub direct: bool,
    /// Whether it was still working (not past a rotation's grace period).
    pub live: bool,
}

/// A [`Revoked`] from a revoking statement's returned row.
pub(super) fn revoked<R: SqlRow>(row: &R) -> Result<Revoked, StorageError> {
    Ok(Revoked {
        id: TokenId::from_stored(row.text("credential_id")?),
        account: AccountId::from_stored(row.text("account_id")?),
        username: row.text("username")?,
        direct: row.int("direct")? != 0,
        live: row.int("live")? != 0,
    })
}

/// An audit event from the columns [`super::sql::LIST_EVENTS`] selects.
pub(super) fn event<R: SqlRow>(row: &R) -> Result<AuditEvent, StorageError> {
    let kind = row.text("event_type")?;
    let outcome = row.text("outcome")?;
    Ok(AuditEvent {
        id: row.text("event_id")?,
        time: Timestamp::from_micros(row.int("event_time")?),
        kind: EventType::from_stored(&kind)
            .ok_or_else(|| StorageError::Corrupt(format!("unknown event type {kind:?}")))?,
        outcome: Outcome::from_stored(&outcome)
            .ok_or_else(|| StorageError::Corrupt(format!("unknown outcome {outcome:?}")))?,
        actor_account: row
            .opt_text("actor_account_id")?
            .map(AccountId::from_stored),
        actor_credential: row
            .opt_text("actor_credential_id")?
            .map(TokenId::from_stored),
        subject_account: row
            .opt_text("subject_account_id")?
            .map(AccountId::from_stored),
        subject_credential: row
            .opt_text("subject_credential_id")?
            .map(TokenId::from_stored),
        subject_username: row.text("subject_username")?,
        source_address: row.text("source_address")?,
    })
}

/// The token states as `LIST_TOKENS` matches them: `,a,b,` or empty for all.
pub(super) fn states_pattern(states: &[TokenState]) -> String {
    if states.is_empty() {
        return String::new();
    }
    let names: Vec<_> = states
        .iter()
        .map(|state| match state {
            TokenState::Active => "active",
            TokenState::Expired => "expired",
            TokenState::Revoked => "revoked",
            TokenState::Exhausted => "exhausted",
        })
        .collect();
    format!(",{},", names.join(","))
}

/// A session from the `session_cols!()` columns.
pub(super) fn session<R: SqlRow>(row: &R) -> Result<Session, StorageError> {
    Ok(Session {
        id: TokenId::from_stored(row.text("session_id")?),
        account_id: AccountId::from_stored(row.text("session_account_id")?),
        create_time: Timestamp::from_micros(row.int("create_time")?),
        expire_time: Timestamp::from_micros(row.int("expire_time")?),
        revoke_time: row.opt_int("revoke_time")?.map(Timestamp::from_micros),
    })
}
