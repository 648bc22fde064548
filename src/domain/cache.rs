//! The verification cache: each replica remembers recent verdicts on
//! credentials, keyed by their SHA-256 digest (never the secret), so that
//! the hot path (`VerifyToken` and the authentication of every call) usually
//! costs no database round trip.
//!
//! Correctness rules, in order of importance:
//! - A revocation (or sign-out, rotation, disable, delete, leak report)
//!   evicts the affected entries on the replica that made it before the call
//!   returns, and on every other replica when the store's change
//!   notification arrives (PostgreSQL `LISTEN/NOTIFY`).
//! - While the notification channel is down, the cache is bypassed and
//!   emptied: no positive answer is served that a missed notification could
//!   have made stale. It is used again only after the channel is back.
//! - Every entry also expires after a fixed time (`ttl`), which bounds the
//!   damage of any notification lost without the channel noticing.
//! - Expiry and scheduled revocation are checked against the clock on every
//!   hit, not only when the entry was filled.
//! - Limited-use tokens are never cached: each use must reach the store.
//!
//! Memory is bounded by `capacity` positive entries plus an eighth as many
//! negative ones, spread over shards so that concurrent lookups rarely
//! contend. Negative verdicts live in an area of their own: anyone can forge
//! well-formed tokens (the checksum is public), and each forged one that
//! reaches the store leaves an `UNKNOWN` verdict behind. Kept apart, a flood
//! of them only churns the small negative area and never evicts a positive
//! verdict.
//!
//! Lookups are counted (`identity_verification_cache_lookups_total`) by
//! result: hit, miss, or bypassed (cache off or channel down).

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use super::{
    account::AccountId, credential::Digest, policy::Principal, service::InactiveReason,
    time::Timestamp, token::TokenId,
};

/// What changed, as announced by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// One session or token changed.
    Credential(TokenId),
    /// Something about an account, or all of its credentials, changed.
    Account(AccountId),
}

/// Receives the store's change notifications.
pub trait InvalidationSink: Send + Sync + 'static {
    /// A change happened.
    fn invalidate(&self, what: &Invalidation);
    /// The channel went down (`false`) or is (again) up (`true`).
    fn channel_up(&self, up: bool);
    /// Something arrived on the channel (a change or a heartbeat): proof
    /// that it still delivers.
    fn heard(&self);
}

/// A cached verdict.
#[derive(Debug, Clone)]
pub enum Cached {
    /// An active credential, with what must be re-checked on every hit.
    Active {
        /// Who it speaks for.
        principal: Arc<Principal>,
        /// When a rotation's grace period ends, if it is in one: that ends
        /// by itself. (A revoked credential is never cached as active.)
        retire_time: Option<Timestamp>,
    },
    /// An inactive one, and why.
    Inactive(InactiveReason),
}

#[derive(Debug, Clone)]
struct Entry {
    cached: Cached,
    /// The entry is dropped at this instant whatever happens.
    deadline: Timestamp,
}

/// Hashes a digest by its first eight bytes: they are already uniformly
/// distributed, so SipHash would add cost and nothing else.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
}

type Map = HashMap<[u8; 32], Entry, BuildHasherDefault<DigestHasher>>;

/// One shard of the cache: positive and negative verdicts in separate maps,
/// each with its own bound, so that filling one never evicts from the other.
#[derive(Default)]
struct Areas {
    /// `Cached::Active` entries.
    active: Map,
    /// `Cached::Inactive` entries.
    inactive: Map,
}

impl Areas {
    fn len(&self) -> usize {
        self.active.len() + self.inactive.len()
    }
}

type Shard = Mutex<Areas>;

const SHARDS: usize = 32;

/// The per-replica verification cache.
pub struct VerificationCache {
    shards: Vec<Shard>,
    /// Positive verdicts each shard holds at most.
    per_shard: usize,
    /// Negative verdicts each shard holds at most: an eighth of `per_shard`
    /// (at least one), enough for clients that keep presenting a revoked or
    /// expired token, too small for forged tokens to matter.
    per_shard_negative: usize,
    ttl: Duration,
    /// False while the invalidation channel is down (and for a store that has
    /// none and needs none, never).
    enabled: AtomicBool,
    /// Bumped by every eviction. A verdict read from the store is cached
    /// only if no eviction happened since the read began, so a read that
    /// raced with a revocation cannot re-insert what the revocation removed.
    epoch: AtomicU64,
    /// With a channel, how long it may stay silent before the cache is
    /// bypassed: a channel can die without its connection noticing.
    max_silence: Mutex<Option<Duration>>,
    /// Microseconds since the epoch until which the channel counts as alive.
    alive_until: AtomicI64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// `identity_verification_cache_lookups_total`, by result: registered
    /// once, so a lookup costs an atomic increment, not a registry search.
    counters: LookupCounters,
}

/// The cache's metric handles.
struct LookupCounters {
    hit: metrics::Counter,
    miss: metrics::Counter,
    bypassed: metrics::Counter,
}

impl LookupCounters {
    fn new() -> Self {
        const NAME: &str = "identity_verification_cache_lookups_total";
        Self {
            hit: metrics::counter!(NAME, "result" => "hit"),
            miss: metrics::counter!(NAME, "result" => "miss"),
            bypassed: metrics::counter!(NAME, "result" => "bypassed"),
        }
    }
}

impl std::fmt::Debug for VerificationCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationCache")
            .field("entries", &self.len())
            .field("enabled", &self.enabled.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl VerificationCache {
    /// A cache of at most `capacity` positive entries and an eighth as many
    /// negative ones (0 disables it), each kept at most `ttl`. It starts enabled; a store with a notification channel
    /// disables it until the channel is up.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        let per_shard = capacity.div_ceil(SHARDS);
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard,
            per_shard_negative: if per_shard == 0 {
                0
            } else {
                (per_shard / 8).max(1)
            },
            ttl,
            enabled: AtomicBool::new(capacity > 0),
            epoch: AtomicU64::new(0),
            max_silence: Mutex::new(None),
            alive_until: AtomicI64::new(i64::MAX),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            counters: LookupCounters::new(),
        }
    }

    fn shard(&self, digest: &Digest) -> &Shard {
        &self.shards[usize::from(digest.as_bytes()[31]) % SHARDS]
    }

    /// The cached verdict for `digest` at `now`, if any. The caller still
    /// checks expiry and revocation times (see [`Cached`]).
    pub fn get(&self, digest: &Digest, now: Timestamp) -> Option<Cached> {
        if !self.usable(now) {
            self.counters.bypassed.increment(1);
            return None;
        }
        let mut shard = self
            .shard(digest)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let areas = &mut *shard;
        let area = if areas.active.contains_key(digest.as_bytes()) {
            &mut areas.active
        } else {
            &mut areas.inactive
        };
        let found = match area.get(digest.as_bytes()) {
            Some(entry) if entry.deadline > now => Some(entry.cached.clone()),
            Some(_) => {
                area.remove(digest.as_bytes());
                None
            }
            None => None,
        };
        drop(shard);
        let (counter, metric) = if found.is_some() {
            (&self.hits, &self.counters.hit)
        } else {
            (&self.misses, &self.counters.miss)
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metric.increment(1);
        found
    }

    /// Whether the cache may be used at `now`: enabled, and its channel (if
    /// it has one) heard from recently enough.
    fn usable(&self, now: Timestamp) -> bool {
        self.enabled.load(Ordering::Acquire)
            && now.as_micros() <= self.alive_until.load(Ordering::Acquire)
    }

    /// Requires the channel to be heard from at least every `max_silence`;
    /// until it first is, the cache is bypassed.
    pub fn require_heartbeat(&self, max_silence: Duration) {
        *self
            .max_silence
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(max_silence);
        self.alive_until.store(i64::MIN, Ordering::Release);
    }

    /// The current eviction epoch: read it before reading the store, and
    /// hand it to [`Self::put`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Remembers a verdict read from the store at `now`, unless an eviction
    /// happened since `epoch` was read. A positive verdict goes to the
    /// positive area and a negative one to the negative area; making room
    /// in one never touches the other.
    pub fn put(&self, digest: &Digest, cached: Cached, now: Timestamp, epoch: u64) {
        if self.per_shard == 0 || !self.usable(now) {
            return;
        }
        let positive = matches!(cached, Cached::Active { .. });
        let entry = Entry {
            cached,
            deadline: now.saturating_add(self.ttl),
        };
        let mut shard = self
            .shard(digest)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let areas = &mut *shard;
        let (area, other, bound) = if positive {
            (&mut areas.active, &mut areas.inactive, self.per_shard)
        } else {
            (
                &mut areas.inactive,
                &mut areas.active,
                self.per_shard_negative,
            )
        };
        if area.len() >= bound && !area.contains_key(digest.as_bytes()) {
            area.retain(|_, e| e.deadline > now);
            if area.len() >= bound {
                // Full of live entries: drop an arbitrary eighth of them.
                let drop_count = (bound / 8).max(1);
                let victims: Vec<[u8; 32]> = area.keys().take(drop_count).copied().collect();
                for key in victims {
                    area.remove(&key);
                }
            }
        }
        // Checked under the shard lock: an eviction bumps the epoch before
        // it scans, so either it sees this entry or this sees its bump.
        if self.epoch.load(Ordering::Acquire) == epoch {
            // One verdict per digest: the newer one replaces the other kind.
            other.remove(digest.as_bytes());
            area.insert(*digest.as_bytes(), entry);
        }
    }

    /// Drops every entry about `what`. Scans the cache: revocations are rare
    /// next to verifications, and a scan needs no secondary index to keep
    /// consistent.
    pub fn evict(&self, what: &Invalidation) {
        let matches = |entry: &Entry| match (&entry.cached, what) {
            (Cached::Active { principal, .. }, Invalidation::Credential(id)) => {
                &principal.credential_id == id
            }
            (Cached::Active { principal, .. }, Invalidation::Account(id)) => {
                &principal.account.id == id
            }
            // Negative verdicts carry no ids; only ACCOUNT_DISABLED can turn
            // positive again (on enable), so those go whenever an account
            // changes.
            (Cached::Inactive(InactiveReason::AccountDisabled), Invalidation::Account(_)) => true,
            (Cached::Inactive(_), _) => false,
        };
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for shard in &self.shards {
            let mut areas = shard.lock().unwrap_or_else(PoisonError::into_inner);
            areas.active.retain(|_, entry| !matches(entry));
            areas.inactive.retain(|_, entry| !matches(entry));
        }
    }

    /// Drops every entry about any of the credentials `ids`, in one scan
    /// (a cascading revocation may revoke many at once).
    pub fn evict_credentials(&self, ids: &[TokenId]) {
        if ids.is_empty() {
            return;
        }
        let ids: std::collections::HashSet<&TokenId> = ids.iter().collect();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        // Negative verdicts carry no ids, and a revoked credential cannot
        // have a positive verdict in the negative area: only the positive
        // area holds what these ids name.
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .active
                .retain(|_, entry| match &entry.cached {
                    Cached::Active { principal, .. } => !ids.contains(&principal.credential_id),
                    Cached::Inactive(_) => true,
                });
        }
    }

    /// Drops everything.
    pub fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for shard in &self.shards {
            let mut areas = shard.lock().unwrap_or_else(PoisonError::into_inner);
            areas.active.clear();
            areas.inactive.clear();
        }
    }

    /// Enables or disables the cache; disabling empties it, and so does
    /// enabling again (notifications may have been missed in between).
    pub fn set_enabled(&self, enabled: bool) {
        let usable = enabled && self.per_shard > 0;
        self.enabled.store(false, Ordering::Release);
        self.clear();
        self.enabled.store(usable, Ordering::Release);
    }

    /// Whether lookups are being served from the cache.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// How many entries are held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hits and misses so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

impl InvalidationSink for VerificationCache {
    fn invalidate(&self, what: &Invalidation) {
        self.evict(what);
    }

    fn channel_up(&self, up: bool) {
        if up {
            tracing::info!("invalidation channel up: verification cache in use");
        } else {
            tracing::warn!(
                "invalidation channel down: verification cache bypassed until it is back"
            );
        }
        self.set_enabled(up);
        if up {
            self.heard();
        }
    }

    fn heard(&self) {
        let Some(max_silence) = *self
            .max_silence
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        else {
            return;
        };
        let now = Timestamp::now();
        if now.as_micros() > self.alive_until.load(Ordering::Acquire) {
            // The channel was silent too long: whatever it did not deliver
            // meanwhile may be cached. Start afresh.
            self.clear();
        }
        self.alive_until.store(
            now.saturating_add(max_silence).as_micros(),
            Ordering::Release,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        account::{Account, AccountKind, Email, Role, Username},
        credential::{CredentialKind, Secret},
        scope::Scopes,
    };

    fn principal(account: &AccountId, credential: &TokenId) -> Arc<Principal> {
        Arc::new(Principal {
            account: Account {
                id: account.clone(),
                username: Username::from_stored("u".into()),
                email: Email::default(),
                kind: AccountKind::Robot,
                role: Role::User,
                password_hash: None,
                create_time: Timestamp::from_micros(0),
                disable_time: None,
            },
            credential: CredentialKind::PersonalAccessToken,
            credential_id: credential.clone(),
            scopes: Scopes::full(),
            expire_time: None,
            uses_remaining: None,
            last_used_time: None,
        })
    }

    fn active(account: &AccountId, credential: &TokenId) -> Cached {
        Cached::Active {
            principal: principal(account, credential),
            retire_time: None,
        }
    }

    fn digest() -> Digest {
        Secret::generate(CredentialKind::PersonalAccessToken).digest()
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let cache = VerificationCache::new(100, Duration::from_secs(1));
        let d = digest();
        let now = Timestamp::from_micros(1_000_000);
        cache.put(
            &d,
            Cached::Inactive(InactiveReason::Unknown),
            now,
            cache.epoch(),
        );
        assert!(cache.get(&d, now).is_some());
        assert!(
            cache
                .get(&d, now.saturating_add(Duration::from_secs(1)))
                .is_none()
        );
    }

    #[test]
    fn evictions_by_credential_and_by_account_remove_only_their_entries() {
        let cache = VerificationCache::new(100, Duration::from_secs(60));
        let now = Timestamp::from_micros(0);
        let (a, b) = (AccountId::generate(), AccountId::generate());
        let (t1, t2, t3) = (
            TokenId::generate(),
            TokenId::generate(),
            TokenId::generate(),
        );
        let (d1, d2, d3) = (digest(), digest(), digest());
        for (d, account, token) in [(&d1, &a, &t1), (&d2, &a, &t2), (&d3, &b, &t3)] {
            cache.put(d, active(account, token), now, cache.epoch());
        }
        cache.evict(&Invalidation::Credential(t1));
        assert!(cache.get(&d1, now).is_none());
        assert!(cache.get(&d2, now).is_some());
        cache.evict(&Invalidation::Account(a));
        assert!(cache.get(&d2, now).is_none());
        assert!(cache.get(&d3, now).is_some());
    }

    #[test]
    fn a_read_that_raced_with_an_eviction_is_not_cached() {
        let cache = VerificationCache::new(100, Duration::from_secs(60));
        let now = Timestamp::from_micros(0);
        let (account, token, d) = (AccountId::generate(), TokenId::generate(), digest());
        let before_read = cache.epoch();
        // The revocation commits and evicts while the read is in flight.
        cache.evict(&Invalidation::Credential(token.clone()));
        cache.put(&d, active(&account, &token), now, before_read);
        assert!(cache.get(&d, now).is_none(), "a stale positive was cached");
    }

    #[test]
    fn a_disabled_cache_serves_nothing_and_reenabling_starts_empty() {
        let cache = VerificationCache::new(100, Duration::from_secs(60));
        let now = Timestamp::from_micros(0);
        let d = digest();
        cache.put(
            &d,
            Cached::Inactive(InactiveReason::Revoked),
            now,
            cache.epoch(),
        );
        cache.channel_up(false);
        assert!(cache.get(&d, now).is_none());
        cache.put(
            &d,
            Cached::Inactive(InactiveReason::Revoked),
            now,
            cache.epoch(),
        );
        cache.channel_up(true);
        assert!(cache.get(&d, now).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn capacity_is_bounded() {
        let cache = VerificationCache::new(64, Duration::from_secs(60));
        let now = Timestamp::from_micros(0);
        for _ in 0..10_000 {
            cache.put(
                &digest(),
                Cached::Inactive(InactiveReason::Unknown),
                now,
                cache.epoch(),
            );
        }
        assert!(cache.len() <= 64 + SHARDS, "{} entries", cache.len());
        let off = VerificationCache::new(0, Duration::from_secs(60));
        off.put(
            &digest(),
            Cached::Inactive(InactiveReason::Unknown),
            now,
            off.epoch(),
        );
        assert!(off.is_empty() && !off.is_enabled());
    }

    #[test]
    fn negative_verdicts_never_evict_positive_ones() {
        let cache = VerificationCache::new(1024, Duration::from_secs(60));
        let now = Timestamp::from_micros(0);
        let account = AccountId::generate();
        let positives: Vec<Digest> = (0..64).map(|_| digest()).collect();
        for d in &positives {
            cache.put(
                d,
                active(&account, &TokenId::generate()),
                now,
                cache.epoch(),
            );
        }
        for _ in 0..20_000 {
            cache.put(
                &digest(),
                Cached::Inactive(InactiveReason::Unknown),
                now,
                cache.epoch(),
            );
        }
        for d in &positives {
            assert!(matches!(cache.get(d, now), Some(Cached::Active { .. })));
        }
        // The negative area holds an eighth of the positive capacity.
        assert!(cache.len() <= 64 + 1024 / 8, "{} entries", cache.len());
    }

    #[test]
    fn a_new_verdict_replaces_one_of_the_other_kind() {
        let cache = VerificationCache::new(1024, Duration::from_secs(60));
        let now = Timestamp::from_micros(0);
        let (account, token, d) = (AccountId::generate(), TokenId::generate(), digest());
        cache.put(&d, active(&account, &token), now, cache.epoch());
        cache.put(
            &d,
            Cached::Inactive(InactiveReason::Revoked),
            now,
            cache.epoch(),
        );
        assert!(matches!(
            cache.get(&d, now),
            Some(Cached::Inactive(InactiveReason::Revoked))
        ));
        assert_eq!(cache.len(), 1);
        cache.put(&d, active(&account, &token), now, cache.epoch());
        assert!(matches!(cache.get(&d, now), Some(Cached::Active { .. })));
        assert_eq!(cache.len(), 1);
    }
}

#[cfg(test)]
mod heartbeat_tests {
    use super::*;
    use crate::domain::credential::{CredentialKind, Secret};

    #[test]
    fn a_silent_channel_bypasses_the_cache_and_a_recovered_one_starts_empty() {
        let cache = VerificationCache::new(100, Duration::from_secs(60));
        cache.require_heartbeat(Duration::from_millis(50));
        let d = Secret::generate(CredentialKind::Session).digest();
        let put = |cache: &VerificationCache| {
            let now = Timestamp::now();
            cache.put(
                &d,
                Cached::Inactive(InactiveReason::Revoked),
                now,
                cache.epoch(),
            );
        };
        put(&cache);
        assert!(
            cache.get(&d, Timestamp::now()).is_none(),
            "not heard from yet"
        );
        cache.channel_up(true);
        put(&cache);
        assert!(cache.get(&d, Timestamp::now()).is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            cache.get(&d, Timestamp::now()).is_none(),
            "silent for too long"
        );
        cache.heard();
        assert!(cache.is_empty(), "recovering from silence starts empty");
        put(&cache);
        assert!(cache.get(&d, Timestamp::now()).is_some());
    }
}
