//! The use cases: one method per thing a caller can ask of the service. Each
//! takes the authenticated caller (a [`Principal`]), where the request came
//! from (an [`Origin`], for the audit log) and validated inputs, checks the
//! policy, and talks to the store.
//!
//! - this module: the shared types, and credential checking (authentication
//!   and `VerifyToken`), the hot path;
//! - [`accounts`]: accounts, passwords and sessions;
//! - [`tokens`]: personal access tokens;
//! - [`audit`]: reading the audit log;
//! - [`verifiers`]: the expiry of the credentials verifiers call with.

use std::{collections::HashMap, sync::Arc, time::Duration};

use super::{
    DomainError,
    account::{Account, AccountKind, Email, Role, Username},
    audit::Origin,
    cache::{Cached, InvalidationSink, VerificationCache},
    credential::{self, CredentialKind, ParsedCredential},
    error::Violations,
    password::{PasswordHasher, PasswordPolicy},
    policy::{self, Action, Principal, Verifier},
    rate::KeyedBuckets,
    resource::Resources,
    scope::Scopes,
    throttle::{SignInRates, ThrottleSettings},
    time::Timestamp,
    token::{Session, Token, TokenId, TokenName, TokenState},
};
use crate::domain::store::{Store, TokenUse};

mod accounts;
mod audit;
mod caller;
mod retention;
mod tokens;
mod verifiers;

pub use accounts::{AccountLookup, NewAccount, SignedIn};
pub use audit::audit_listing;
pub use tokens::{IssuedToken, MAX_LEAKED_SECRETS, Rotated, TokenRequest};
pub use verifiers::EXPIRY_GAUGE as VERIFIER_EXPIRY_GAUGE;

pub use crate::domain::verdict::{InactiveReason, Verdict, Verification};

/// Tunable rules of the domain.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// How long a session lasts after sign-in.
    pub session_ttl: Duration,
    /// What a new password must satisfy.
    pub password_policy: PasswordPolicy,
    /// Lifetime of a new token whose request gives no expiry.
    pub token_default_ttl: Duration,
    /// Longest lifetime a new token may have.
    pub token_max_ttl: Duration,
    /// Whether robot accounts may have tokens that never expire.
    pub allow_non_expiring_robot_tokens: bool,
    /// How long a rotated token keeps working after its rotation.
    pub rotation_grace: Duration,
    /// Verdicts the verification cache holds at most (0 turns it off).
    pub cache_entries: usize,
    /// How long a cached verdict is trusted at most, whatever notifications
    /// say: the bound on staleness should a change notification be lost
    /// without the channel noticing.
    pub cache_ttl: Duration,
    /// How failed sign-ins are limited.
    pub sign_in_throttle: ThrottleSettings,
    /// How many password checks, right or wrong, each replica starts per
    /// username and per address.
    pub sign_in_rates: SignInRates,
    /// Most live tokens one account may have (`CreateToken` beyond it is
    /// refused; rotation replaces a token and is not).
    pub max_tokens_per_account: u32,
    /// Tokens each replica creates per account per minute, in bursts up to
    /// that many.
    pub token_creations_per_minute: u32,
}

impl IdentitySettings {
    /// The default of [`Self::max_tokens_per_account`]: far more than any
    /// account needs (one token per integration, plus the children its
    /// tokens create), and small enough that one account's tokens stay a
    /// bounded cost: a leak report or an account deletion revokes at most
    /// this many at once (one notification each), and a listing is a few
    /// pages.
    pub const DEFAULT_MAX_TOKENS_PER_ACCOUNT: u32 = 1000;
    /// The default of [`Self::token_creations_per_minute`]: one a second
    /// sustained, ample for any provisioning script, while a stolen
    /// credential looping `CreateToken` makes at most that many rows (and
    /// reaches the cap in no less than a quarter of an hour).
    pub const DEFAULT_TOKEN_CREATIONS_PER_MINUTE: u32 = 60;
}

impl Default for IdentitySettings {
    fn default() -> Self {
        const DAY: u64 = 24 * 60 * 60;
        Self {
            session_ttl: Duration::from_secs(12 * 60 * 60),
            password_policy: PasswordPolicy::default(),
            token_default_ttl: Duration::from_secs(90 * DAY),
            token_max_ttl: Duration::from_secs(365 * DAY),
            allow_non_expiring_robot_tokens: false,
            rotation_grace: Duration::ZERO,
            cache_entries: 100_000,
            cache_ttl: Duration::from_secs(30),
            sign_in_throttle: ThrottleSettings::default(),
            sign_in_rates: SignInRates::default(),
            max_tokens_per_account: Self::DEFAULT_MAX_TOKENS_PER_ACCOUNT,
            token_creations_per_minute: Self::DEFAULT_TOKEN_CREATIONS_PER_MINUTE,
        }
    }
}

/// The identity service's use cases over a store.
#[derive(Clone)]
pub struct Identity {
    store: Arc<dyn Store>,
    hasher: PasswordHasher,
    settings: Arc<IdentitySettings>,
    uses: Arc<UseRecorder>,
    cache: Arc<VerificationCache>,
    verdicts: Arc<VerdictCounters>,
    /// The credentials `VerifyToken` was called with recently, and when
    /// they expire.
    verifier_credentials: Arc<verifiers::VerifierCredentials>,
    /// The buckets of [`SignInRates`], keyed `account:<username key>` and
    /// `address:<address key>`.
    password_checks: Arc<KeyedBuckets>,
    /// The buckets of [`IdentitySettings::token_creations_per_minute`],
    /// keyed by account id.
    token_creations: Arc<KeyedBuckets>,
    /// Password checks in flight on this replica, per username key: an
    /// attempt the throttle refuses while some are waits for them (see
    /// `throttle::InFlight`).
    in_flight: Arc<super::throttle::InFlight>,
}

/// `identity_verify_token_verdicts_total` by verdict, registered once so
/// that counting a `VerifyToken` answer is one atomic increment.
struct VerdictCounters {
    active: metrics::Counter,
    /// Indexed by [`InactiveReason::index`].
    inactive: [metrics::Counter; InactiveReason::ALL.len()],
}

impl VerdictCounters {
    const NAME: &str = "identity_verify_token_verdicts_total";

    fn new() -> Self {
        Self {
            active: metrics::counter!(Self::NAME, "verdict" => "active"),
            inactive: InactiveReason::ALL
                .map(|reason| metrics::counter!(Self::NAME, "verdict" => reason.label())),
        }
    }

    fn count(&self, verification: &Verification) {
        match verification.reason() {
            None => self.active.increment(1),
            Some(reason) => self.inactive[reason.index()].increment(1),
        }
    }
}

/// How long the change channel may stay silent (it carries a heartbeat)
/// before the cache is bypassed: the staleness bound should the channel die
/// without its connection noticing.
pub const CHANNEL_MAX_SILENCE: Duration = Duration::from_secs(1);

/// Accounts whose token creations each replica tracks at most (the least
/// recently used is forgotten first; see [`KeyedBuckets`]).
const TOKEN_CREATORS_TRACKED: usize = 50_000;

/// How often buffered token uses are written.
const LAST_USE_FLUSH: Duration = Duration::from_secs(1);

/// How often a token's last use is written: at most once per interval.
const LAST_USE_INTERVAL: Duration = Duration::from_secs(60);

impl Identity {
    /// The use cases over `store`, hashing passwords with `hasher`.
    ///
    /// On a store that other replicas share, the verification cache stays
    /// off until [`Self::watch_changes`] has subscribed to the store's change
    /// notifications.
    pub fn new(store: Arc<dyn Store>, hasher: PasswordHasher, settings: IdentitySettings) -> Self {
        let cache = Arc::new(VerificationCache::new(
            settings.cache_entries,
            settings.cache_ttl,
        ));
        if store.shared() {
            cache.set_enabled(false);
        }
        Self {
            store,
            hasher,
            settings: Arc::new(settings),
            uses: Arc::new(UseRecorder::default()),
            cache,
            verdicts: Arc::new(VerdictCounters::new()),
            verifier_credentials: Arc::default(),
            password_checks: Arc::new(KeyedBuckets::new(2 * SignInRates::TRACKED)),
            token_creations: Arc::new(KeyedBuckets::new(TOKEN_CREATORS_TRACKED)),
            in_flight: Arc::new(super::throttle::InFlight::default()),
        }
    }

    /// Subscribes the verification cache to the store's change
    /// notifications (for as long as the runtime lives). The cache is used
    /// only while the subscription is up.
    pub fn watch_changes(&self) {
        if self.store.shared() {
            self.cache.require_heartbeat(CHANNEL_MAX_SILENCE);
            self.store
                .watch(Arc::clone(&self.cache) as Arc<dyn InvalidationSink>);
        }
    }

    /// Writes buffered token uses to the store every `LAST_USE_FLUSH`, from a
    /// background task (for as long as the runtime lives).
    pub fn record_uses_in_background(&self) {
        let uses = Arc::clone(&self.uses);
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LAST_USE_FLUSH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let batch = uses.take();
                if let Err(err) = store.record_uses(&batch, LAST_USE_INTERVAL).await {
                    tracing::debug!(error = %err, dropped = batch.len(), "could not record token uses");
                }
            }
        });
    }

    /// Sets the gauge of the soonest expiry among the credentials that
    /// called `VerifyToken` recently (for the metrics listener, at each
    /// scrape).
    pub fn sample_verifier_credentials(&self) {
        self.verifier_credentials.publish(Timestamp::now());
    }

    /// The verification cache, for inspection.
    pub fn cache(&self) -> &VerificationCache {
        &self.cache
    }

    /// Runs `write`, a store call that commits a change, and then `evict`s
    /// what the change affects from this replica's cache, in a task of its
    /// own that the caller awaits. A call that ends while its commit is in
    /// flight (the client cancelled it, or its deadline passed: either drops
    /// the handler) drops only its wait, so a commit once made is always
    /// followed by its eviction. On PostgreSQL the store's notification
    /// would evict it too; on SQLite nothing else would, and the cache would
    /// answer the revoked credential active until its entry expired.
    pub(super) async fn commit_then_evict<T, W, E>(
        &self,
        write: W,
        evict: E,
    ) -> Result<T, DomainError>
    where
        T: Send + 'static,
        W: Future<Output = Result<T, crate::domain::store::StorageError>> + Send + 'static,
        E: FnOnce(&VerificationCache, &T) + Send + 'static,
    {
        let cache = Arc::clone(&self.cache);
        tokio::spawn(async move {
            let done = write.await?;
            evict(&cache, &done);
            Ok(done)
        })
        .await
        .map_err(|e| DomainError::Internal(Box::new(e)))?
    }

    /// How many password verifications this replica has started (each one
    /// an argon2 hash), for tests and metrics.
    pub fn password_verifications(&self) -> u64 {
        self.hasher.verifications()
    }

    /// How the store's connection pool is used right now, if it has one
    /// (for tests: a call waiting for the database holds a connection).
    pub fn pool_usage(&self) -> Option<crate::domain::store::PoolUsage> {
        self.store.pool_usage()
    }

    /// The domain's settings.
    pub fn settings(&self) -> &IdentitySettings {
        &self.settings
    }

    /// Checks that the store answers.
    pub async fn ready(&self) -> Result<(), DomainError> {
        Ok(self.store.ping().await?)
    }

    /// Authenticates a caller from the credential it sent, if any. Anything
    /// but an active credential is an error. A successful authentication is a
    /// use of the credential: it spends one use of a limited-use token and
    /// may record the token's last use (from `origin`).
    pub async fn authenticate(
        &self,
        credential: Option<&str>,
        origin: &Origin,
    ) -> Result<Arc<Principal>, DomainError> {
        let raw = credential.ok_or(DomainError::CredentialMissing)?;
        let verdict = match self.inspect(raw).await? {
            Verdict::Active(principal) => self.admit(principal, &origin.address).await?,
            inactive => inactive,
        };
        match verdict {
            Verdict::Active(principal) => Ok(principal),
            Verdict::Inactive(reason) => Err(DomainError::CredentialInvalid(reason.describe())),
        }
    }

    /// `VerifyToken`: the verdict on `credential` for a verifier allowed to
    /// ask, requiring the `required_scopes` and then the
    /// `required_resources` (checked once the verifier is allowed, on every
    /// verification, cached or not). An active verdict is a use of the
    /// credential, from `client_address`.
    pub async fn verify<S: AsRef<str>, R: AsRef<str>>(
        &self,
        verifier: Verifier<'_>,
        credential: &str,
        required_scopes: &[S],
        required_resources: &[R],
        client_address: &str,
    ) -> Result<Verification, DomainError> {
        policy::authorize_verifier(verifier)?;
        // Robots only: a verifier is a service, and robots are made by
        // operators, so no ordinary user can move the gauge or raise the
        // warning with a `tokens:verify` token of their own.
        if let Verifier::Caller(caller) = verifier
            && caller.account.kind == AccountKind::Robot
        {
            self.verifier_credentials.note(
                &caller.credential_id,
                caller.expire_time,
                Timestamp::now(),
            );
        }
        let mut violations = Violations::new();
        let required = violations.check(Scopes::parse("required_scopes", required_scopes));
        let resources = violations.check(Resources::parse_required(
            "required_resources",
            required_resources,
        ));
        let client_address = violations.check(super::audit::parse_client_address(
            "client_address",
            client_address,
        ));
        let ((required, resources), client_address) =
            violations.complete(required.zip(resources).zip(client_address))?;
        let verification = match self.inspect(credential).await? {
            // An empty requirement asks for nothing; each named scope must be
            // allowed (full access allows every scope). What is missing is
            // listed only on this refusal path: an active answer allocates
            // nothing for it.
            Verdict::Active(principal) if !required.names().all(|s| principal.scopes.allows(s)) => {
                Verification::MissingScopes(
                    required
                        .names()
                        .filter(|s| !principal.scopes.allows(s))
                        .map(str::to_owned)
                        .collect(),
                )
            }
            // Then each required resource must be allowed, by the same rule
            // (and as cheaply on the active path).
            Verdict::Active(principal) if !principal.resources.allows_all(&resources) => {
                Verification::MissingResources(
                    resources
                        .names()
                        .filter(|r| !principal.resources.allows(r))
                        .map(str::to_owned)
                        .collect(),
                )
            }
            Verdict::Active(principal) => match self.admit(principal, &client_address).await? {
                Verdict::Active(principal) => Verification::Active(principal),
                Verdict::Inactive(reason) => Verification::Inactive(reason),
            },
            Verdict::Inactive(reason) => Verification::Inactive(reason),
        };
        self.verdicts.count(&verification);
        Ok(verification)
    }

    /// Looks a credential up and judges it: the core of both authentication
    /// and `VerifyToken`. A malformed credential costs no I/O; a cached one
    /// usually costs none either. Changes nothing: see [`Self::admit`].
    async fn inspect(&self, raw: &str) -> Result<Verdict, DomainError> {
        let Ok(ParsedCredential { kind, digest }) = credential::parse(raw) else {
            return Ok(Verdict::Inactive(InactiveReason::Malformed));
        };
        let now = Timestamp::now();
        if let Some(cached) = self.cache.get(&digest) {
            return Ok(judge_cached(cached, now));
        }
        let epoch = self.cache.epoch();
        let found = match kind {
            CredentialKind::PersonalAccessToken => {
                self.store
                    .token_by_digest(&digest)
                    .await?
                    .map(|(token, account)| {
                        (
                            token.state(now),
                            token.retire_time,
                            token_principal(token, account),
                        )
                    })
            }
            CredentialKind::Session => {
                self.store
                    .session_by_digest(&digest)
                    .await?
                    .map(|(session, account)| {
                        (
                            session.state(now),
                            None,
                            session_principal(session, account),
                        )
                    })
            }
        };
        let (verdict, retire_time) = match found {
            None => (Verdict::Inactive(InactiveReason::Unknown), None),
            Some((state, retire_time, principal)) => {
                let verdict = match state {
                    TokenState::Revoked => Verdict::Inactive(InactiveReason::Revoked),
                    TokenState::Expired => Verdict::Inactive(InactiveReason::Expired),
                    TokenState::Exhausted => Verdict::Inactive(InactiveReason::Exhausted),
                    TokenState::Active if principal.account.is_disabled() => {
                        Verdict::Inactive(InactiveReason::AccountDisabled)
                    }
                    TokenState::Active => Verdict::Active(Arc::new(principal)),
                };
                (verdict, retire_time)
            }
        };
        let cached = match &verdict {
            // Each use of a limited-use token must reach the store.
            Verdict::Active(principal) if principal.uses_remaining.is_some() => None,
            Verdict::Active(principal) => Some(Cached::Active {
                principal: Arc::clone(principal),
                retire_time,
            }),
            Verdict::Inactive(reason) => Some(Cached::Inactive(*reason)),
        };
        if let Some(cached) = cached {
            self.cache.put(&digest, cached, epoch);
        }
        Ok(verdict)
    }

    /// Turns an active inspection into a use: spends one use of a
    /// limited-use token (atomically, so N concurrent uses of a token with K
    /// left succeed exactly K times) and records the token's last use in the
    /// background, at most once a minute.
    async fn admit(
        &self,
        mut principal: Arc<Principal>,
        address: &str,
    ) -> Result<Verdict, DomainError> {
        if principal.credential != CredentialKind::PersonalAccessToken {
            return Ok(Verdict::Active(principal));
        }
        if principal.uses_remaining.is_some() {
            let now = Timestamp::now();
            match self
                .store
                .consume_use(&principal.credential_id, now)
                .await?
            {
                Some(left) => Arc::make_mut(&mut principal).uses_remaining = Some(left),
                // No use left, or revoked or expired since it was read:
                // say which (a rare path, worth one more read).
                None => {
                    let reason = match self.store.token_by_id(&principal.credential_id).await? {
                        Some(token) => match token.state(now) {
                            TokenState::Revoked => InactiveReason::Revoked,
                            TokenState::Expired => InactiveReason::Expired,
                            TokenState::Exhausted | TokenState::Active => InactiveReason::Exhausted,
                        },
                        None => InactiveReason::Unknown,
                    };
                    return Ok(Verdict::Inactive(reason));
                }
            }
        }
        let now = Timestamp::now();
        if self
            .uses
            .due(&principal.credential_id, principal.last_used_time, now)
        {
            self.uses.push(TokenUse {
                id: principal.credential_id.clone(),
                at: now,
                address: address.to_owned(),
            });
        }
        Ok(Verdict::Active(principal))
    }

    /// `identity bootstrap-operator`: makes sure an operator robot named
    /// `username` exists and issues it a new full-access token that never
    /// expires (the break-glass credential of whoever runs the server; revoke
    /// it once personal operator tokens exist). Refuses to turn an existing
    /// non-operator into one.
    pub async fn bootstrap_operator(&self, username: Username) -> Result<IssuedToken, DomainError> {
        let origin = Origin::new("bootstrap-operator");
        let account = match self.store.account_by_username(&username.key()).await? {
            // The break-glass case: its tokens would be refused, so say so
            // rather than print one.
            Some(existing) if existing.role == Role::Operator && existing.is_disabled() => {
                return Err(DomainError::NotAllowed(
                    "the operator account with this username is disabled, and would refuse \
                     any token issued for it: have another operator enable it \
                     (EnableAccount), or bootstrap a different username",
                ));
            }
            Some(existing) if existing.role == Role::Operator => existing,
            Some(_) => {
                return Err(DomainError::NotAllowed(
                    "an account with this username exists and is not an operator",
                ));
            }
            None => {
                let new = NewAccount {
                    username: username.clone(),
                    password: None,
                    email: Email::default(),
                    kind: AccountKind::Robot,
                    role: Role::Operator,
                };
                match self.insert_account(new, &origin, None).await {
                    Ok(account) => account,
                    // Another bootstrap won the race; use its account.
                    Err(DomainError::UsernameTaken) => self
                        .store
                        .account_by_username(&username.key())
                        .await?
                        .filter(|a| a.role == Role::Operator)
                        .ok_or(DomainError::UsernameTaken)?,
                    Err(other) => return Err(other),
                }
            }
        };
        let request = TokenRequest {
            name: TokenName::parse(
                "name",
                &format!("bootstrap-{}", TokenId::generate().as_str()),
            )?,
            account_id: account.id.clone(),
            scopes: Scopes::full(),
            resources: Resources::all(),
            expire_time: None,
            expire_field: "expire_time",
            never_expires: true,
            max_uses: None,
        };
        self.issue_token(&account, request, None, Timestamp::now(), &origin, None)
            .await
    }
}

/// The verdict on a cached credential at `now`: expiry and the end of a
/// rotation's grace period are re-checked on every hit.
fn judge_cached(cached: Cached, now: Timestamp) -> Verdict {
    match cached {
        Cached::Inactive(reason) => Verdict::Inactive(reason),
        Cached::Active { retire_time, .. } if retire_time.is_some_and(|r| r <= now) => {
            Verdict::Inactive(InactiveReason::Revoked)
        }
        Cached::Active { principal, .. } if principal.expire_time.is_some_and(|e| e <= now) => {
            Verdict::Inactive(InactiveReason::Expired)
        }
        Cached::Active { principal, .. } => Verdict::Active(principal),
    }
}

fn token_principal(token: Token, account: Account) -> Principal {
    // The end of a rotation's grace period ends the token as surely as its
    // expiry: report whichever comes first. (A revoked token has no
    // principal.)
    let expire_time = match (token.expire_time, token.retire_time) {
        (Some(expire), Some(retire)) => Some(expire.min(retire)),
        (expire, retire) => expire.or(retire),
    };
    Principal {
        account: without_hash(account),
        credential: CredentialKind::PersonalAccessToken,
        credential_id: token.id,
        scopes: token.scopes,
        resources: token.resources,
        expire_time,
        uses_remaining: token.uses_remaining,
        last_used_time: token.last_used_time,
    }
}

fn session_principal(session: Session, account: Account) -> Principal {
    Principal {
        account: without_hash(account),
        credential: CredentialKind::Session,
        credential_id: session.id,
        scopes: Scopes::full(),
        resources: Resources::all(),
        expire_time: Some(session.expire_time),
        uses_remaining: None,
        last_used_time: None,
    }
}

fn without_hash(mut account: Account) -> Account {
    account.password_hash = None;
    account
}

/// Remembers when each token's last use was last written, so that a busy
/// token costs one write a minute, not one per verification; and buffers the
/// uses to write, so that verification never waits for a write and a burst
/// of first uses costs one statement a second.
#[derive(Debug, Default)]
struct UseRecorder {
    written: std::sync::Mutex<HashMap<TokenId, Timestamp>>,
    pending: std::sync::Mutex<Vec<TokenUse>>,
}

impl UseRecorder {
    /// Entries kept before old ones are dropped.
    const CAPACITY: usize = 100_000;

    /// Whether a use at `now` should be written, given the last one the
    /// store knew of; if so, notes it as written.
    fn due(&self, id: &TokenId, stored: Option<Timestamp>, now: Timestamp) -> bool {
        let interval = LAST_USE_INTERVAL.as_micros() as i64;
        let fresh = |t: Timestamp| now.as_micros() - t.as_micros() < interval;
        if stored.is_some_and(fresh) {
            return false;
        }
        let mut written = self
            .written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if written.get(id).copied().is_some_and(fresh) {
            return false;
        }
        if written.len() >= Self::CAPACITY {
            written.retain(|_, t| fresh(*t));
        }
        written.insert(id.clone(), now);
        true
    }

    /// Queues a use for the next flush. Bounded: past the capacity, uses are
    /// dropped (they are a convenience, not a record of security events).
    fn push(&self, token_use: TokenUse) {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.len() < Self::CAPACITY {
            pending.push(token_use);
        }
    }

    fn take(&self) -> Vec<TokenUse> {
        std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// Returns `token` if `caller` may perform `action` (built for the token's
/// account); hides other accounts' tokens as not found, but reports a missing
/// scope.
fn visible(
    caller: &Principal,
    token: Token,
    action: fn(&crate::domain::account::AccountId) -> Action<'_>,
) -> Result<Token, DomainError> {
    match policy::authorize(caller, action(&token.account_id)) {
        Ok(()) => Ok(token),
        Err(DomainError::NotAllowed(_)) => Err(DomainError::TokenNotFound),
        Err(other) => Err(other),
    }
}
