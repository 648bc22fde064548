//! The [`Store`] implementation: each method is its area's function, in
//! the sibling modules, with its SQL.

use std::sync::Arc;

use super::{
    PoolUsage, SqlStore, StorageError, Store, TokenFilter, TokenUse, WithAccount, accounts, audit,
    retention, revocation, sessions, throttle, tokens,
};
use crate::{
    domain::{
        account::{Account, AccountId},
        audit::{AuditEvent, AuditFilter},
        cache::InvalidationSink,
        credential::Digest,
        password::PasswordHash,
        retention::{PurgeCutoffs, Purged},
        throttle::{ThrottleClaim, ThrottleCounter},
        time::{Clock, Timestamp},
        token::{Creator, NewToken, Session, Token, TokenId},
    },
    storage::backend::Backend,
};

/// Each method is its area's function: see the modules for the SQL and
/// the transactions.
#[async_trait::async_trait]
impl<B: Backend> Store for SqlStore<B> {
    async fn ping(&self) -> Result<(), StorageError> {
        use crate::storage::rows::SqlRow as _;
        let row = self.fetch_optional(sqlx::query(B::PING)).await?;
        match row.as_ref().map(|r| r.int_at(0)).transpose()? {
            Some(1) => Ok(()),
            _ => Err(StorageError::Unavailable(
                "the database is read-only (a standby): DATABASE_URL must reach the primary".into(),
            )),
        }
    }

    fn shared(&self) -> bool {
        B::SHARED
    }

    fn watch(&self, sink: Arc<dyn InvalidationSink>) {
        self.backend.watch_changes(&self.pool, sink);
    }

    fn pool_usage(&self) -> Option<PoolUsage> {
        Some(PoolUsage {
            size: self.pool.size(),
            idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
            max: self.pool.options().get_max_connections(),
        })
    }

    async fn create_account(
        &self,
        account: &Account,
        event: &AuditEvent,
    ) -> Result<(), StorageError> {
        accounts::create_account(self, account, event).await
    }

    async fn account_by_id(&self, id: &AccountId) -> Result<Option<Account>, StorageError> {
        accounts::account_by_id(self, id).await
    }

    async fn account_by_username(&self, key: &str) -> Result<Option<Account>, StorageError> {
        accounts::account_by_username(self, key).await
    }

    async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Account>, StorageError> {
        accounts::list_accounts(self, after, limit).await
    }

    async fn set_account_disabled(
        &self,
        id: &AccountId,
        at: Option<Timestamp>,
        event: &AuditEvent,
    ) -> Result<Option<Account>, StorageError> {
        self.wrote(accounts::set_account_disabled(self, id, at, event))
            .await
    }

    async fn delete_account(
        &self,
        id: &AccountId,
        event: &AuditEvent,
    ) -> Result<Option<Vec<TokenId>>, StorageError> {
        self.wrote(accounts::delete_account(self, id, event)).await
    }

    async fn set_password(
        &self,
        id: &AccountId,
        hash: &PasswordHash,
        keep: &TokenId,
        at: Timestamp,
        event: &AuditEvent,
    ) -> Result<u64, StorageError> {
        self.wrote(accounts::set_password(self, id, hash, keep, at, event))
            .await
    }

    async fn revoke_sessions(
        &self,
        account: &AccountId,
        at: Timestamp,
        event: &AuditEvent,
    ) -> Result<u64, StorageError> {
        self.wrote(sessions::revoke_sessions(self, account, at, event))
            .await
    }

    async fn create_session(
        &self,
        session: &Session,
        digest: &Digest,
        generation: i64,
        event: &AuditEvent,
    ) -> Result<bool, StorageError> {
        sessions::create_session(self, session, digest, generation, event).await
    }

    async fn session_by_digest(
        &self,
        digest: &Digest,
    ) -> Result<Option<WithAccount<Session>>, StorageError> {
        sessions::session_by_digest(self, digest).await
    }

    async fn session_for_verdict(
        &self,
        digest: &Digest,
    ) -> Result<Option<WithAccount<Session>>, StorageError> {
        sessions::session_for_verdict(self, digest).await
    }

    async fn revoke_session(
        &self,
        id: &TokenId,
        at: Timestamp,
        event: &AuditEvent,
    ) -> Result<(), StorageError> {
        self.wrote(sessions::revoke_session(self, id, at, event))
            .await
    }

    async fn create_token(
        &self,
        new: &NewToken,
        clock: &dyn Clock,
        max_live: u32,
        event: &AuditEvent,
    ) -> Result<(), StorageError> {
        tokens::create_token(self, new, clock, max_live, event).await
    }

    async fn token_by_id(&self, id: &TokenId) -> Result<Option<Token>, StorageError> {
        tokens::token_by_id(self, id).await
    }

    async fn token_by_digest(
        &self,
        digest: &Digest,
    ) -> Result<Option<WithAccount<Token>>, StorageError> {
        tokens::token_by_digest(self, digest).await
    }

    async fn token_for_verdict(
        &self,
        digest: &Digest,
    ) -> Result<Option<WithAccount<Token>>, StorageError> {
        tokens::token_for_verdict(self, digest).await
    }

    async fn list_tokens(
        &self,
        account: &AccountId,
        filter: &TokenFilter,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Token>, StorageError> {
        tokens::list_tokens(self, account, filter, after, limit).await
    }

    async fn list_all_tokens(
        &self,
        filter: &TokenFilter,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Token>, StorageError> {
        tokens::list_all_tokens(self, filter, after, limit).await
    }

    async fn revoke_token(
        &self,
        id: &TokenId,
        seen_live: bool,
        at: Timestamp,
        event: &AuditEvent,
    ) -> Result<Option<(Token, Vec<TokenId>)>, StorageError> {
        self.wrote(revocation::revoke_token(self, id, seen_live, at, event))
            .await
    }

    async fn rotate_token(
        &self,
        old: &TokenId,
        new: &NewToken,
        retire_old_at: Timestamp,
        clock: &dyn Clock,
        event: &AuditEvent,
    ) -> Result<Option<Token>, StorageError> {
        self.wrote(tokens::rotate_token(
            self,
            old,
            new,
            retire_old_at,
            clock,
            event,
        ))
        .await
    }

    async fn renew_token(
        &self,
        id: &TokenId,
        account: &AccountId,
        expire_time: Option<Timestamp>,
        creator: Option<&Creator>,
        clock: &dyn Clock,
        event: &AuditEvent,
    ) -> Result<Option<Token>, StorageError> {
        self.wrote(tokens::renew_token(
            self,
            id,
            account,
            expire_time,
            creator,
            clock,
            event,
        ))
        .await
    }

    async fn revoke_family(
        &self,
        family: &TokenId,
        at: Timestamp,
        event: &AuditEvent,
    ) -> Result<Vec<TokenId>, StorageError> {
        self.wrote(revocation::revoke_family(self, family, at, event))
            .await
    }

    async fn consume_use(&self, id: &TokenId, now: Timestamp) -> Result<Option<i64>, StorageError> {
        tokens::consume_use(self, id, now).await
    }

    async fn record_uses(
        &self,
        uses: &[TokenUse],
        interval: std::time::Duration,
    ) -> Result<(), StorageError> {
        tokens::record_uses(self, uses, interval).await
    }

    async fn revoke_leaked(
        &self,
        tokens: &[Digest],
        sessions: &[Digest],
        at: Timestamp,
        template: &AuditEvent,
    ) -> Result<Vec<TokenId>, StorageError> {
        self.wrote(revocation::revoke_leaked(
            self, tokens, sessions, at, template,
        ))
        .await
    }

    async fn claim_sign_in(
        &self,
        claims: &[ThrottleClaim],
        now: Timestamp,
    ) -> Result<Option<Vec<ThrottleCounter>>, StorageError> {
        throttle::claim_sign_in(self, claims, now).await
    }

    async fn sign_in_succeeded(
        &self,
        username_key: &str,
        address_key: &str,
    ) -> Result<(), StorageError> {
        throttle::sign_in_succeeded(self, username_key, address_key).await
    }

    async fn give_back_sign_in(
        &self,
        claims: &[ThrottleClaim],
        claimed_at: Timestamp,
    ) -> Result<(), StorageError> {
        throttle::give_back_sign_in(self, claims, claimed_at).await
    }

    async fn reset_sign_in_failures(&self, username_key: &str) -> Result<(), StorageError> {
        throttle::reset_sign_in_failures(self, username_key).await
    }

    async fn record_event(&self, event: &AuditEvent) -> Result<(), StorageError> {
        audit::record_event(self, event).await
    }

    async fn list_events(
        &self,
        filter: &AuditFilter,
        before: Option<(Timestamp, &str)>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StorageError> {
        audit::list_events(self, filter, before, limit).await
    }

    async fn database_time(&self) -> Result<Timestamp, StorageError> {
        self.backend.clock(&self.pool).await
    }

    async fn purge(&self, cutoffs: &PurgeCutoffs) -> Result<Option<Purged>, StorageError> {
        retention::purge(self, cutoffs).await
    }
}

impl<B: Backend> SqlStore<B> {
    /// `outcome`, once the backend has heard that a change of this
    /// process's may have committed (and before the call returns): with a
    /// read replica, the watermark moves past it (`Backend::wrote`), so that
    /// the replica cannot answer from before it here. Called whatever the
    /// outcome: a commit whose acknowledgement was lost is a change too.
    /// Only the changes a verdict can depend on (revocations, rotations,
    /// renewals, account changes) come through here; creations need not
    /// (a credential the replica does not know is read from the primary),
    /// nor spent uses (a token with a use count is never read from it).
    async fn wrote<T>(
        &self,
        outcome: impl std::future::Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        let outcome = outcome.await;
        self.backend.wrote(&self.pool).await;
        outcome
    }
}
