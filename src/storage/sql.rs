//! The queries, written once. Both backends accept the same SQL (numbered
//! `$n` parameters, each first used in order), so [`impl_store!`] expands the
//! same method bodies for each; a backend supplies only its pool and its
//! `classify` function for errors.

/// Account columns, aliased where a join would make them ambiguous.
macro_rules! account_cols {
    () => {
        "a.account_id, a.username, a.email, a.kind, a.role, a.password_hash, \
         a.create_time AS account_create_time, a.disable_time"
    };
}

/// Token columns.
macro_rules! token_cols {
    () => {
        "t.token_id, t.account_id AS token_account_id, t.name, t.scopes, \
         t.create_time, t.expire_time, t.revoke_time"
    };
}

/// Session columns.
macro_rules! session_cols {
    () => {
        "s.session_id, s.account_id AS session_account_id, s.create_time, \
         s.expire_time, s.revoke_time"
    };
}

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

pub(super) const INSERT_SESSION: &str = "INSERT INTO sessions \
    (session_id, account_id, digest, create_time, expire_time, revoke_time) \
    VALUES ($1, $2, $3, $4, $5, $6)";
pub(super) const SESSION_BY_DIGEST: &str = concat!(
    "SELECT ",
    session_cols!(),
    ", ",
    account_cols!(),
    " FROM sessions s JOIN accounts a ON a.account_id = s.account_id WHERE s.digest = $1"
);
pub(super) const REVOKE_SESSION: &str =
    "UPDATE sessions SET revoke_time = $2 WHERE session_id = $1 AND revoke_time IS NULL";

pub(super) const RELEASE_EXPIRED_NAME: &str = "UPDATE tokens SET live_name = NULL \
    WHERE account_id = $1 AND live_name = $2 AND expire_time IS NOT NULL AND expire_time <= $3";
pub(super) const INSERT_TOKEN: &str = "INSERT INTO tokens \
    (token_id, account_id, name, live_name, digest, scopes, create_time, expire_time, revoke_time) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
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
pub(super) const LIST_TOKENS: &str = concat!(
    "SELECT ",
    token_cols!(),
    " FROM tokens t WHERE t.account_id = $1 AND t.token_id > $2 ORDER BY t.token_id LIMIT $3"
);
pub(super) const REVOKE_TOKEN: &str = "UPDATE tokens SET revoke_time = $2, live_name = NULL \
    WHERE token_id = $1 AND revoke_time IS NULL";

/// Implements [`super::Store`] for a backend type with a `pool` field and a
/// `fn classify(sqlx::Error) -> StorageError`.
macro_rules! impl_store {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::storage::Store for $store {
            async fn ping(&self) -> Result<(), StorageError> {
                sqlx::query("SELECT 1")
                    .execute(&self.pool)
                    .await
                    .map(drop)
                    .map_err(Self::classify)
            }

            async fn create_account(&self, account: &Account) -> Result<(), StorageError> {
                sqlx::query(sql::INSERT_ACCOUNT)
                    .bind(account.id.as_str())
                    .bind(account.username.as_str())
                    .bind(account.username.key())
                    .bind(account.email.as_str())
                    .bind(account.kind.as_str())
                    .bind(account.role.as_str())
                    .bind(account.password_hash.as_ref().map(|h| h.as_str()))
                    .bind(account.create_time.as_micros())
                    .bind(account.disable_time.map(Timestamp::as_micros))
                    .execute(&self.pool)
                    .await
                    .map(drop)
                    .map_err(Self::classify)
            }

            async fn account_by_id(&self, id: &AccountId) -> Result<Option<Account>, StorageError> {
                let row = sqlx::query(sql::ACCOUNT_BY_ID)
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                row.as_ref().map(rows::account).transpose()
            }

            async fn account_by_username(
                &self,
                key: &str,
            ) -> Result<Option<Account>, StorageError> {
                let row = sqlx::query(sql::ACCOUNT_BY_USERNAME)
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                row.as_ref().map(rows::account).transpose()
            }

            async fn list_accounts(
                &self,
                after: Option<&str>,
                limit: u32,
            ) -> Result<Vec<Account>, StorageError> {
                let found = sqlx::query(sql::LIST_ACCOUNTS)
                    .bind(after.unwrap_or(""))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                found.iter().map(rows::account).collect()
            }

            async fn create_session(
                &self,
                session: &Session,
                digest: &Digest,
            ) -> Result<(), StorageError> {
                sqlx::query(sql::INSERT_SESSION)
                    .bind(session.id.as_str())
                    .bind(session.account_id.as_str())
                    .bind(&digest.as_bytes()[..])
                    .bind(session.create_time.as_micros())
                    .bind(session.expire_time.as_micros())
                    .bind(session.revoke_time.map(Timestamp::as_micros))
                    .execute(&self.pool)
                    .await
                    .map(drop)
                    .map_err(Self::classify)
            }

            async fn session_by_digest(
                &self,
                digest: &Digest,
            ) -> Result<Option<WithAccount<Session>>, StorageError> {
                let row = sqlx::query(sql::SESSION_BY_DIGEST)
                    .bind(&digest.as_bytes()[..])
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                row.as_ref()
                    .map(|r| Ok((rows::session(r)?, rows::account(r)?)))
                    .transpose()
            }

            async fn revoke_session(
                &self,
                id: &TokenId,
                at: Timestamp,
            ) -> Result<(), StorageError> {
                sqlx::query(sql::REVOKE_SESSION)
                    .bind(id.as_str())
                    .bind(at.as_micros())
                    .execute(&self.pool)
                    .await
                    .map(drop)
                    .map_err(Self::classify)
            }

            async fn create_token(
                &self,
                new: &NewToken,
                now: Timestamp,
            ) -> Result<(), StorageError> {
                let token = &new.token;
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                sqlx::query(sql::RELEASE_EXPIRED_NAME)
                    .bind(token.account_id.as_str())
                    .bind(token.name.as_str())
                    .bind(now.as_micros())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                sqlx::query(sql::INSERT_TOKEN)
                    .bind(token.id.as_str())
                    .bind(token.account_id.as_str())
                    .bind(token.name.as_str())
                    .bind(token.revoke_time.is_none().then(|| token.name.as_str()))
                    .bind(&new.digest.as_bytes()[..])
                    .bind(token.scopes.to_stored())
                    .bind(token.create_time.as_micros())
                    .bind(token.expire_time.map(Timestamp::as_micros))
                    .bind(token.revoke_time.map(Timestamp::as_micros))
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                tx.commit().await.map_err(Self::classify)
            }

            async fn token_by_id(&self, id: &TokenId) -> Result<Option<Token>, StorageError> {
                let row = sqlx::query(sql::TOKEN_BY_ID)
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                row.as_ref().map(rows::token).transpose()
            }

            async fn token_by_digest(
                &self,
                digest: &Digest,
            ) -> Result<Option<WithAccount<Token>>, StorageError> {
                let row = sqlx::query(sql::TOKEN_BY_DIGEST)
                    .bind(&digest.as_bytes()[..])
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                row.as_ref()
                    .map(|r| Ok((rows::token(r)?, rows::account(r)?)))
                    .transpose()
            }

            async fn list_tokens(
                &self,
                account: &AccountId,
                after: Option<&str>,
                limit: u32,
            ) -> Result<Vec<Token>, StorageError> {
                let found = sqlx::query(sql::LIST_TOKENS)
                    .bind(account.as_str())
                    .bind(after.unwrap_or(""))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                found.iter().map(rows::token).collect()
            }

            async fn revoke_token(
                &self,
                id: &TokenId,
                at: Timestamp,
            ) -> Result<Option<Token>, StorageError> {
                sqlx::query(sql::REVOKE_TOKEN)
                    .bind(id.as_str())
                    .bind(at.as_micros())
                    .execute(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                self.token_by_id(id).await
            }
        }
    };
}

pub(super) use impl_store;
