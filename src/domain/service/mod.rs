//! The use cases: one method per thing a caller can ask of the service. Each
//! takes the authenticated caller (a [`Principal`]), where the request came
//! from (an [`Origin`], for the audit log) and validated inputs, checks the
//! policy, and talks to the store.
//!
//! - this module: the [`Identity`] facade, its construction and the helpers
//!   several use cases share; every use case reads the time through
//!   [`Identity::now`], the clock it was built with;
//! - [`settings`]: the tunable rules ([`IdentitySettings`]);
//! - [`hot_path`]: credential checking (authentication and `VerifyToken`);
//! - [`last_use`]: the buffer of tokens' last uses and its background flush;
//! - [`metrics`]: the `VerifyToken` verdict counters;
//! - [`bootstrap`]: `identity bootstrap-operator`;
//! - [`accounts`]: accounts, passwords and sessions;
//! - [`tokens`]: personal access tokens;
//! - [`audit`]: reading the audit log;
//! - [`verifiers`]: the expiry of the credentials verifiers call with.

use std::{sync::Arc, time::Duration};

use super::{
    DomainError,
    account::Account,
    cache::{InvalidationSink, VerificationCache},
    password::PasswordHasher,
    policy::{self, Action, Principal},
    rate::KeyedBuckets,
    throttle::SignInRates,
    time::{Clock, SystemClock, Timestamp},
    token::Token,
};
use crate::domain::store::Store;

mod accounts;
mod audit;
mod bootstrap;
mod caller;
mod hot_path;
mod last_use;
mod metrics;
mod retention;
mod settings;
mod tokens;
mod verifiers;

use self::metrics::VerdictCounters;
pub use accounts::{AccountLookup, NewAccount, SignedIn};
pub use audit::audit_listing;
use last_use::UseRecorder;
pub use settings::IdentitySettings;
pub use tokens::{IssuedToken, MAX_LEAKED_SECRETS, Rotated, TokenRequest};
pub use verifiers::EXPIRY_GAUGE as VERIFIER_EXPIRY_GAUGE;

pub use crate::domain::verdict::{InactiveReason, Verdict, Verification};

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
    /// Where every use case reads the current time.
    clock: Arc<dyn Clock>,
}

/// How long the change channel may stay silent (it carries a heartbeat)
/// before the cache is bypassed: the staleness bound should the channel die
/// without its connection noticing.
pub const CHANNEL_MAX_SILENCE: Duration = Duration::from_secs(1);

/// Accounts whose token creations each replica tracks at most (the least
/// recently used is forgotten first; see [`KeyedBuckets`]).
const TOKEN_CREATORS_TRACKED: usize = 50_000;

impl Identity {
    /// The use cases over `store`, hashing passwords with `hasher`.
    ///
    /// On a store that other replicas share, the verification cache stays
    /// off until [`Self::watch_changes`] has subscribed to the store's change
    /// notifications.
    pub fn new(store: Arc<dyn Store>, hasher: PasswordHasher, settings: IdentitySettings) -> Self {
        Self::with_clock(store, hasher, settings, Arc::new(SystemClock))
    }

    /// [`Self::new`], reading the time from `clock` (tests pass a
    /// [`ManualClock`](super::time::ManualClock) to let time pass without
    /// waiting).
    pub fn with_clock(
        store: Arc<dyn Store>,
        hasher: PasswordHasher,
        settings: IdentitySettings,
        clock: Arc<dyn Clock>,
    ) -> Self {
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
            clock,
        }
    }

    /// The current time, as the use cases see it.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
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

    /// Sets the gauge of the soonest expiry among the credentials that
    /// called `VerifyToken` recently (for the metrics listener, at each
    /// scrape).
    pub fn sample_verifier_credentials(&self) {
        self.verifier_credentials.publish(self.now());
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
}

fn without_hash(mut account: Account) -> Account {
    account.password_hash = None;
    account
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
