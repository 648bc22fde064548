//! The storage port: what the domain needs from a database, in the
//! domain's own terms. [`Store`] is the one interface the use cases call;
//! `crate::storage` implements it for PostgreSQL and SQLite (and owns
//! connections, migrations and SQL), so dependencies point inward: this
//! module knows no database, and storage knows the domain.
//!
//! The errors a store reports are classified where the SQL runs: a unique
//! violation becomes [`Conflict`] by constraint name, a lost connection
//! [`StorageError::Unavailable`].

use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::{
    account::{Account, AccountId},
    audit::{AuditEvent, AuditFilter},
    cache::InvalidationSink,
    credential::Digest,
    password::PasswordHash,
    retention::{PurgeCutoffs, Purged},
    throttle::{ThrottleClaim, ThrottleCounter},
    time::{Clock, Timestamp},
    token::{Creator, NewToken, Session, Token, TokenId, TokenState},
};

/// A boxed error source, for the log.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A uniqueness rule was violated.
    #[error("conflict: {0:?} already exists")]
    Conflict(Conflict),
    /// The database cannot be reached, is overloaded, or is shutting down;
    /// the call may succeed if retried later.
    #[error("the database is unavailable")]
    Unavailable(#[source] BoxError),
    /// A row could not be understood (a bug or a hand-edited database).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The database's schema is not the one this build expects (migrated
    /// by a newer release, or not yet migrated); the message says which.
    #[error("{0}")]
    Schema(String),
    /// A new token names a parent family whose live token is revoked (in
    /// a race with its revocation): the creating credential is dead.
    #[error("the creating token's family was revoked")]
    ParentRevoked,
    /// The credential creating a token ([`crate::domain::token::Creator`])
    /// was signed out, revoked, expired or its account's credentials
    /// changed, in a race with the creation.
    #[error("the creating credential was ended")]
    CreatorEnded,
    /// The account a new row belongs to does not exist (any more): deleted
    /// before the creation, or in a race with it (a foreign-key violation).
    #[error("the account no longer exists")]
    AccountGone,
    /// The account already has this many live tokens, the most allowed.
    #[error("the account has {0} live tokens, the most allowed")]
    TooManyTokens(u32),
    /// Anything else.
    #[error("database error")]
    Other(#[source] BoxError),
}

/// Which uniqueness rule was violated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// Another account has this username (case-insensitively).
    Username,
    /// The account has a live token with this name.
    TokenName,
    /// A digest collided: astronomically unlikely, so a bug.
    Digest,
    /// A generated id collided: likewise.
    Id,
}

/// An account together with one of its credentials, as read on the
/// verification path in a single query.
pub type WithAccount<T> = (T, Account);

/// One successful use of a token, for [`Store::record_uses`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenUse {
    /// The token.
    pub id: TokenId,
    /// When.
    pub at: Timestamp,
    /// From where (the client address); empty if unknown.
    pub address: String,
}

/// How a store's connection pool is used, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    /// Connections open (idle or in use).
    pub size: u32,
    /// Connections open and idle.
    pub idle: u32,
    /// Most connections the pool may open.
    pub max: u32,
}

/// Which tokens [`Store::list_tokens`] and [`Store::list_all_tokens`] return.
#[derive(Debug, Clone)]
pub struct TokenFilter {
    /// The instant states are judged at.
    pub now: Timestamp,
    /// Only tokens in these states; empty for all.
    pub states: Vec<TokenState>,
    /// Only tokens expiring before this instant.
    pub expire_before: Option<Timestamp>,
    /// Only tokens last used (or, never used, created) before this instant.
    pub last_used_before: Option<Timestamp>,
}

impl TokenFilter {
    /// Every token, judged at `now`.
    pub fn all(now: Timestamp) -> Self {
        Self {
            now,
            states: Vec::new(),
            expire_before: None,
            last_used_before: None,
        }
    }
}

/// The persistence port of the domain.
///
/// Implementations must be safe to share between tasks and must keep every
/// method atomic: a method either takes full effect or none. Methods that
/// take an [`AuditEvent`] write it in the same transaction as the change, and
/// only when the change happened.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StorageError>;

    /// Whether other processes (replicas) may change the data, so that a
    /// cache of it is safe only while [`Store::watch`] delivers their
    /// changes.
    fn shared(&self) -> bool;

    /// Delivers every committed change that can turn an active credential
    /// inactive (or back) to `sink`, from a background task, and tells it
    /// whenever the delivery channel goes down or comes up. Call once.
    fn watch(&self, sink: Arc<dyn InvalidationSink>);

    /// How the connection pool is used right now, if the store has one.
    fn pool_usage(&self) -> Option<PoolUsage> {
        None
    }

    /// Inserts a new account. [`Conflict::Username`] if the username key is
    /// taken.
    async fn create_account(
        &self,
        account: &Account,
        event: &AuditEvent,
    ) -> Result<(), StorageError>;

    /// Reads an account by id.
    async fn account_by_id(&self, id: &AccountId) -> Result<Option<Account>, StorageError>;

    /// Reads an account by its username key (ASCII lowercase).
    async fn account_by_username(
        &self,
        username_key: &str,
    ) -> Result<Option<Account>, StorageError>;

    /// Lists accounts in id order, starting after `after`.
    async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Account>, StorageError>;

    /// Disables an account at `at` (keeping an earlier disable time, and
    /// moving its credentials generation on: see [`Store::create_session`])
    /// or, with `None`, enables it. Returns the account afterwards; `None` if there is
    /// no such account. The event is written only if the state changed.
    async fn set_account_disabled(
        &self,
        id: &AccountId,
        at: Option<Timestamp>,
        event: &AuditEvent,
    ) -> Result<Option<Account>, StorageError>;

    /// Deletes an account with its sessions and tokens, and revokes (at
    /// `event`'s time) every token of another account descended from its
    /// tokens' families. Returns the ids revoked (each announced to every
    /// replica), or `None` if there was no such account.
    async fn delete_account(
        &self,
        id: &AccountId,
        event: &AuditEvent,
    ) -> Result<Option<Vec<TokenId>>, StorageError>;

    /// Replaces an account's password hash, moves its credentials
    /// generation on (see [`Store::create_session`]) and ends every session
    /// of it except `keep`. Returns how many sessions ended.
    async fn set_password(
        &self,
        id: &AccountId,
        hash: &PasswordHash,
        keep: &TokenId,
        at: Timestamp,
        event: &AuditEvent,
    ) -> Result<u64, StorageError>;

    /// Moves an account's credentials generation on (see
    /// [`Store::create_session`]) and ends every live session of it.
    /// Returns how many ended.
    async fn revoke_sessions(
        &self,
        account: &AccountId,
        at: Timestamp,
        event: &AuditEvent,
    ) -> Result<u64, StorageError>;

    /// Inserts a new session with the digest of its token, if its account
    /// still has the credentials generation `generation` (the
    /// [`Account::credentials_generation`] read before its password was
    /// checked) and is not disabled, atomically with that check: a
    /// concurrent change of the generation either commits first (and no
    /// session is created) or sees the session when it ends the account's
    /// sessions. Returns whether the session was created (`false`: the
    /// credentials changed, the account was disabled or deleted).
    async fn create_session(
        &self,
        session: &Session,
        digest: &Digest,
        generation: i64,
        event: &AuditEvent,
    ) -> Result<bool, StorageError>;

    /// Reads a session and its account by the digest of its token.
    async fn session_by_digest(
        &self,
        digest: &Digest,
    ) -> Result<Option<WithAccount<Session>>, StorageError>;

    /// [`Self::session_by_digest`] for a verdict (the hot path's cache
    /// miss): a store with a read replica may answer it from the replica
    /// if the replica has replayed every change this process knows of, its
    /// own included (README, "Read replicas"); a session the replica does
    /// not know is read from the primary. Anything that must see the latest
    /// state calls `session_by_digest`.
    async fn session_for_verdict(
        &self,
        digest: &Digest,
    ) -> Result<Option<WithAccount<Session>>, StorageError> {
        self.session_by_digest(digest).await
    }

    /// Marks a session signed out at `at`, unless it already is.
    async fn revoke_session(
        &self,
        id: &TokenId,
        at: Timestamp,
        event: &AuditEvent,
    ) -> Result<(), StorageError>;

    /// Inserts a new token. Expired and exhausted tokens of the same account
    /// and name give their name up first, in the same transaction, so a name
    /// is unique only among live tokens. [`Conflict::TokenName`] if a live
    /// token has it; [`StorageError::ParentRevoked`] if the token names a
    /// parent family whose live token is revoked (read under a
    /// row lock, so that a concurrent cascading revocation cannot miss it);
    /// [`StorageError::CreatorEnded`] if the token's creator is no longer
    /// live (read under a row lock likewise).
    /// [`StorageError::AccountGone`] if the account does not exist (it is
    /// locked first, so a concurrent deletion either waits for the new
    /// token or is waited for); [`StorageError::TooManyTokens`] if it
    /// already has `max_live` live tokens (counted under that lock, so
    /// concurrent creations cannot exceed it; a rotation's predecessor in
    /// its grace period does not count). Liveness (of the creator, the
    /// parent family, the tokens counted and the names given up) is judged
    /// at `clock`'s time once the account's row is locked: the credential
    /// asking may expire while the call waits for that lock.
    async fn create_token(
        &self,
        token: &NewToken,
        clock: &dyn Clock,
        max_live: u32,
        event: &AuditEvent,
    ) -> Result<(), StorageError>;

    /// Reads a token by id.
    async fn token_by_id(&self, id: &TokenId) -> Result<Option<Token>, StorageError>;

    /// Reads a token and its account by the digest of its secret.
    async fn token_by_digest(
        &self,
        digest: &Digest,
    ) -> Result<Option<WithAccount<Token>>, StorageError>;

    /// [`Self::token_by_digest`] for a verdict (the hot path's cache miss),
    /// as [`Self::session_for_verdict`]; a token with a use count is always
    /// read from the primary. Reuse detection, which must see the latest
    /// state, calls `token_by_digest`.
    async fn token_for_verdict(
        &self,
        digest: &Digest,
    ) -> Result<Option<WithAccount<Token>>, StorageError> {
        self.token_by_digest(digest).await
    }

    /// Lists an account's tokens that pass `filter`, in id order, starting
    /// after `after`.
    async fn list_tokens(
        &self,
        account: &AccountId,
        filter: &TokenFilter,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Token>, StorageError>;

    /// Lists every account's tokens that pass `filter`, in id order (oldest
    /// first, as [`Self::list_tokens`]), starting after `after`: a range of
    /// the primary key, whatever the page's depth.
    async fn list_all_tokens(
        &self,
        filter: &TokenFilter,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Token>, StorageError>;

    /// Revokes a token (recording `at`) unless it already is (one in a
    /// rotation's grace period is revoked too) and, if it is its family's
    /// live token (not rotated out) or `seen_live` (the caller read it as
    /// such, and a rotation may have landed since), every other token of its
    /// family, successors included, and every token descended from its
    /// family (see [`Token::parent_family_id`]), whether or not the token
    /// itself was still live. Writes `event` for the token itself, and a
    /// `token.revoked` copy of it for each other token revoked. Returns the
    /// token as stored afterwards, with the ids of every credential revoked
    /// (each announced to every replica); `None` if there is no such token.
    async fn revoke_token(
        &self,
        id: &TokenId,
        seen_live: bool,
        at: Timestamp,
        event: &AuditEvent,
    ) -> Result<Option<(Token, Vec<TokenId>)>, StorageError>;

    /// Replaces `old` by `new` (same family): marks `old` replaced, gives its
    /// name to `new`, ends its grace period at `retire_old_at` (never its
    /// `revoke_time`), and inserts `new`. Returns `old` as stored afterwards,
    /// or `None` (and changes nothing) if `old` does not exist, was already
    /// replaced, is revoked (at whatever time), has expired, or is
    /// used up, judged on the row as written (a use may land after the
    /// caller read it) and at `clock`'s time once the account's row is
    /// locked (the token, or the credential asking, may expire while the
    /// call waits for that lock).
    /// [`StorageError::CreatorEnded`] as [`Self::create_token`].
    async fn rotate_token(
        &self,
        old: &TokenId,
        new: &NewToken,
        retire_old_at: Timestamp,
        clock: &dyn Clock,
        event: &AuditEvent,
    ) -> Result<Option<Token>, StorageError>;

    /// Gives a live token (not revoked, not rotated, not expired, not used
    /// up, judged on the row as written and at `clock`'s time once the
    /// account's row is locked, as [`Self::rotate_token`] does) of
    /// `account` the new expiry `expire_time` (`None`: never), and returns
    /// it as stored afterwards; `None` (and changes nothing) if there is no
    /// such live token. Like a creation, it locks the account's row first
    /// and fails with [`StorageError::CreatorEnded`] if `creator` (the
    /// credential asking) is no longer live: a renewal never lands after
    /// the end of the credential that asked for it was acknowledged, and
    /// with [`StorageError::AccountGone`] if the account no longer exists.
    async fn renew_token(
        &self,
        id: &TokenId,
        account: &AccountId,
        expire_time: Option<Timestamp>,
        creator: Option<&Creator>,
        clock: &dyn Clock,
        event: &AuditEvent,
    ) -> Result<Option<Token>, StorageError>;

    /// Revokes every token of a rotation family, and of every family
    /// descended from it, that is not yet revoked at `at`. Writes `event`,
    /// and a `token.revoked` copy of it for each descendant revoked.
    /// Returns the ids of the tokens revoked (each announced to every
    /// replica).
    async fn revoke_family(
        &self,
        family: &TokenId,
        at: Timestamp,
        event: &AuditEvent,
    ) -> Result<Vec<TokenId>, StorageError>;

    /// Spends one use of a limited-use token that is live at `now` (neither
    /// revoked nor expired), atomically. Returns the uses left afterwards,
    /// or `None` if none were left, the token is not live, or it has no
    /// limit.
    async fn consume_use(&self, id: &TokenId, now: Timestamp) -> Result<Option<i64>, StorageError>;

    /// Records a batch of successful uses, each unless a use of the same
    /// token was recorded less than `interval` before it.
    async fn record_uses(
        &self,
        uses: &[TokenUse],
        interval: std::time::Duration,
    ) -> Result<(), StorageError>;

    /// Revokes the live tokens and sessions with these digests at `at` (one
    /// statement for the tokens, one for the sessions) and, as
    /// [`Store::revoke_token`] does, the descendants of each token that is
    /// its family's live token. Writes one copy of `template` (with its
    /// subject filled in) for each credential reported, and a
    /// `token.revoked` copy for each descendant. Returns the ids of every
    /// credential revoked (each announced to every replica).
    async fn revoke_leaked(
        &self,
        tokens: &[Digest],
        sessions: &[Digest],
        at: Timestamp,
        template: &AuditEvent,
    ) -> Result<Vec<TokenId>, StorageError>;

    /// Claims one sign-in attempt against every counter of `claims`, at
    /// `now`, atomically: if no counter is in backoff or locked, each counts
    /// the attempt (as [`ThrottleClaim`] describes) and `None` is returned.
    /// Otherwise none counts it, and the counters are returned as stored,
    /// each refusing one marked as the first refusal of its block if it is.
    /// Concurrent claims are serialised per counter, so every one counts.
    async fn claim_sign_in(
        &self,
        claims: &[ThrottleClaim],
        now: Timestamp,
    ) -> Result<Option<Vec<ThrottleCounter>>, StorageError>;

    /// Takes a successful attempt back: clears the username key's counter,
    /// and removes the attempt from the address key's counter (whose block,
    /// if any, stands).
    async fn sign_in_succeeded(
        &self,
        username_key: &str,
        address_key: &str,
    ) -> Result<(), StorageError>;

    /// Takes back an attempt whose password was never checked (the hashing
    /// queue refused it, or its call ended before a thread took it):
    /// removes it from every counter of `claims` whose current count it
    /// was counted in (claimed at `claimed_at`, the `now` of its
    /// [`Self::claim_sign_in`]): a count reset or restarted since began
    /// after it and holds only later attempts, which stay counted. A block
    /// its claim armed stands.
    async fn give_back_sign_in(
        &self,
        claims: &[ThrottleClaim],
        claimed_at: Timestamp,
    ) -> Result<(), StorageError>;

    /// Clears the username key's counter (and with it any lock).
    async fn reset_sign_in_failures(&self, username_key: &str) -> Result<(), StorageError>;

    /// Appends an event that records no change (such as a failed sign-in).
    async fn record_event(&self, event: &AuditEvent) -> Result<(), StorageError>;

    /// Lists events that pass `filter`, newest first (by time, then id),
    /// starting after the event `before` names by its time and id.
    async fn list_events(
        &self,
        filter: &AuditFilter,
        before: Option<(Timestamp, &str)>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StorageError>;

    /// Deletes what is past retention by `cutoffs` (see
    /// [`crate::domain::retention`]), in batches of at most `cutoffs.batch`
    /// rows, each its own statement. Runs on one replica at a time: `None`
    /// (nothing deleted) while another holds the retention lock.
    async fn purge(&self, cutoffs: &PurgeCutoffs) -> Result<Option<Purged>, StorageError>;

    /// The time by the database's clock: what retention judges ages by, so
    /// that a replica whose clock is off deletes nothing still alive
    /// (SQLite: this machine's clock, the only one).
    async fn database_time(&self) -> Result<Timestamp, StorageError>;
}
