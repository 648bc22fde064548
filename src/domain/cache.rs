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
//! - With a channel, the cache is trusted only as far as the channel is
//!   known to be *current*, not merely delivering: the store tells the cache
//!   "every change committed before instant `t` has been handed to you"
//!   ([`InvalidationSink::current_as_of`], from the replica's own heartbeat
//!   coming back), and the cache is used until `t + max_silence` and
//!   bypassed after. A replica working through a backlog older than the
//!   bound therefore reads from the store until it has caught up.
//! - Every entry also expires after a fixed time (`ttl`), which bounds the
//!   damage of any notification lost without the channel noticing.
//! - Expiry and scheduled revocation are checked against the clock on every
//!   hit, not only when the entry was filled.
//! - Limited-use tokens are never cached: each use must reach the store.
//!
//! The cache's own times (entry deadlines, how long the channel is trusted)
//! are read from a monotonic clock, so a wall-clock step (NTP, an operator,
//! a VM resuming) can neither keep an entry nor a silent channel alive.
//!
//! **Evictions are O(entries evicted).** Besides the shards keyed by digest,
//! an index maps each credential id and each account id to the digests of
//! its positive entries (and keeps the few `ACCOUNT_DISABLED` verdicts,
//! which any account change evicts), so evicting a credential or an account
//! touches only its own entries, however large the cache. Every path that
//! removes an entry (eviction, expiry on lookup, making room, replacement,
//! clearing) removes its index records under the same locks: the index
//! never outgrows the cache. Lock order: a shard, then the index.
//!
//! **A read that raced with an eviction is not cached, and only such a
//! read.** A global sequence numbers the evictions; each eviction records
//! its number in the hash bucket of every credential id and account id it
//! concerns (and, for account changes, in `any_account`; for a clear, in
//! `everything`). A reader takes the sequence ([`VerificationCache::epoch`])
//! *before* it reads the store, and its verdict is put only if no bucket the
//! verdict could concern (its credential's, its account's; for
//! `ACCOUNT_DISABLED`, any account's; always `everything`) records a later
//! eviction. Why that is enough: an eviction that concerns the verdict
//! either numbered itself before the reader took the sequence (then its
//! change had committed before the store read began, and the read saw it),
//! or after. In the latter case it records its number in the bucket and
//! *then* takes the index lock to find the entries; the put compares the
//! buckets while holding the index lock. If the put held the lock first,
//! the eviction finds (and removes) what it put; if the eviction held it
//! first, the put sees the recorded number and refuses. An unrelated
//! eviction refuses a put only when the two ids share a bucket (one in
//! [`BUCKETS`]), which costs a cache miss, never correctness.
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
    collections::{HashMap, HashSet},
    hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    account::{Account, AccountId},
    counters::{Lookup, Sharded, count_lookup},
    credential::Digest,
    policy::Principal,
    time::Timestamp,
    token::TokenId,
    verdict::InactiveReason,
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
    /// Several changes happened (a batch drained from the channel): applied
    /// together, in one pass.
    fn invalidate_all(&self, what: &[Invalidation]) {
        for one in what {
            self.invalidate(one);
        }
    }
    /// The channel went down (`false`) or is (again) up (`true`).
    fn channel_up(&self, up: bool);
    /// Every change committed before `sent` (a monotonic instant of this
    /// process) has been handed to [`Self::invalidate`]: the store proved
    /// it by hearing its own heartbeat, sent at `sent`, come back after
    /// them. Proof of currency, not merely of delivery.
    fn current_as_of(&self, sent: Instant);
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
    /// The entry is dropped at this instant (microseconds on the cache's
    /// monotonic clock) whatever happens.
    deadline: u64,
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

type Key = [u8; 32];
type Map = HashMap<Key, Entry, BuildHasherDefault<DigestHasher>>;
type KeySet = HashSet<Key, BuildHasherDefault<DigestHasher>>;

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

/// Hash buckets of the scoped eviction epochs, for credential ids and for
/// account ids each: two unrelated ids share one with probability
/// 1/`BUCKETS`, and then only cost each other a cache miss.
pub const BUCKETS: usize = 4096;

/// Where the cached entries of each credential and account are, so that an
/// eviction touches only them. Holds exactly the entries the shards hold.
///
/// Ids are kept as keyed 64-bit hashes ([`Index::id`]), not as copies of
/// their strings, and a credential's one digest inline: at a full default
/// cache this is 16 MB less than a string and a vector per entry. Two ids
/// that share a hash (with a per-process key, about one pair in 2^64) share
/// a record, so evicting one also evicts the other's entries: a cache miss,
/// never a stale verdict.
#[derive(Default)]
struct Index {
    /// Hashes the ids (keyed per process).
    hasher: RandomState,
    /// A credential's positive entries (one digest, in practice).
    by_credential: HashMap<u64, Keys, BuildHasherDefault<DigestHasher>>,
    /// An account's positive entries, and the account they share.
    by_account: HashMap<u64, AccountEntries, BuildHasherDefault<DigestHasher>>,
    /// The `ACCOUNT_DISABLED` verdicts: they carry no ids, and any account
    /// change evicts them (an enable may turn one positive again).
    disabled: KeySet,
}

/// The digests of one credential's or account's positive entries: one
/// inline (a credential has one secret; most accounts have one credential
/// cached), more in a set.
enum Keys {
    One(Key),
    Many(KeySet),
}

impl Keys {
    fn insert(&mut self, key: &Key) {
        match self {
            Keys::One(one) if one == key => {}
            Keys::One(one) => *self = Keys::Many(KeySet::from_iter([*one, *key])),
            Keys::Many(keys) => {
                keys.insert(*key);
            }
        }
    }

    /// Removes `key`; whether none is left.
    fn remove(&mut self, key: &Key) -> bool {
        match self {
            Keys::One(one) => one == key,
            Keys::Many(keys) => {
                keys.remove(key);
                if keys.len() == 1 {
                    let last = keys.iter().copied().next();
                    if let Some(last) = last {
                        *self = Keys::One(last);
                    }
                    return false;
                }
                keys.is_empty()
            }
        }
    }

    fn for_each(&self, mut f: impl FnMut(&Key)) {
        match self {
            Keys::One(key) => f(key),
            Keys::Many(keys) => keys.iter().for_each(f),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        match self {
            Keys::One(_) => 1,
            Keys::Many(keys) => keys.len(),
        }
    }
}

/// One account's positive entries. Their principals share one copy of the
/// account ([`Index::share_account`]): an account with many credentials
/// cached (a robot's tokens) costs one account, not one per entry.
struct AccountEntries {
    account: Arc<Account>,
    keys: Keys,
}

impl Index {
    fn id(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    /// `cached`, with its principal's account replaced by the copy the
    /// account's other entries share, if that copy is equal to it in every
    /// field (so the verdict is the same value); otherwise as it is.
    fn share_account(&self, cached: Cached) -> Cached {
        let Cached::Active {
            principal,
            retire_time,
        } = cached
        else {
            return cached;
        };
        let shared = self
            .by_account
            .get(&self.id(principal.account.id.as_str()))
            .map(|entries| &entries.account)
            .filter(|shared| !Arc::ptr_eq(shared, &principal.account))
            .filter(|shared| ***shared == *principal.account);
        let principal = match shared {
            Some(shared) => Arc::new(Principal {
                account: Arc::clone(shared),
                ..(*principal).clone()
            }),
            None => principal,
        };
        Cached::Active {
            principal,
            retire_time,
        }
    }

    fn add(&mut self, key: &Key, cached: &Cached) {
        match cached {
            Cached::Active { principal, .. } => {
                let credential = self.id(principal.credential_id.as_str());
                let account = self.id(principal.account.id.as_str());
                self.by_credential
                    .entry(credential)
                    .and_modify(|keys| keys.insert(key))
                    .or_insert(Keys::One(*key));
                self.by_account
                    .entry(account)
                    .and_modify(|entries| entries.keys.insert(key))
                    .or_insert_with(|| AccountEntries {
                        account: Arc::clone(&principal.account),
                        keys: Keys::One(*key),
                    });
            }
            Cached::Inactive(InactiveReason::AccountDisabled) => {
                self.disabled.insert(*key);
            }
            Cached::Inactive(_) => {}
        }
    }

    fn remove(&mut self, key: &Key, cached: &Cached) {
        match cached {
            Cached::Active { principal, .. } => {
                let credential = self.id(principal.credential_id.as_str());
                let account = self.id(principal.account.id.as_str());
                if let Some(keys) = self.by_credential.get_mut(&credential)
                    && keys.remove(key)
                {
                    self.by_credential.remove(&credential);
                }
                if let Some(entries) = self.by_account.get_mut(&account)
                    && entries.keys.remove(key)
                {
                    self.by_account.remove(&account);
                }
            }
            Cached::Inactive(InactiveReason::AccountDisabled) => {
                self.disabled.remove(key);
            }
            Cached::Inactive(_) => {}
        }
    }

    /// Calls `f` with the digest of each entry of `credential`.
    fn of_credential(&self, credential: &TokenId, f: impl FnMut(&Key)) {
        if let Some(keys) = self.by_credential.get(&self.id(credential.as_str())) {
            keys.for_each(f);
        }
    }

    /// Calls `f` with the digest of each positive entry of `account`.
    fn of_account(&self, account: &AccountId, f: impl FnMut(&Key)) {
        if let Some(entries) = self.by_account.get(&self.id(account.as_str())) {
            entries.keys.for_each(f);
        }
    }

    /// How many entries it indexes (positive and `ACCOUNT_DISABLED`).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_credential.values().map(Keys::len).sum::<usize>() + self.disabled.len()
    }
}

/// Removes `key` from `area`, and its index records.
fn remove_indexed(area: &mut Map, index: &mut Index, key: &Key) {
    if let Some(entry) = area.remove(key) {
        index.remove(key, &entry.cached);
    }
}

/// The scoped eviction epochs: see the module documentation.
struct Epochs {
    /// Numbers the evictions.
    sequence: AtomicU64,
    /// The number of the last eviction that concerned a credential id of
    /// each bucket.
    credentials: Box<[AtomicU64]>,
    /// The same, for account ids.
    accounts: Box<[AtomicU64]>,
    /// The last eviction of any account.
    any_account: AtomicU64,
    /// The last clear.
    everything: AtomicU64,
    /// Places ids in buckets (keyed per process).
    hasher: RandomState,
}

impl Epochs {
    fn new() -> Self {
        let buckets = || (0..BUCKETS).map(|_| AtomicU64::new(0)).collect();
        Self {
            sequence: AtomicU64::new(0),
            credentials: buckets(),
            accounts: buckets(),
            any_account: AtomicU64::new(0),
            everything: AtomicU64::new(0),
            hasher: RandomState::new(),
        }
    }

    fn bucket(&self, id: &str) -> usize {
        // The modulo keeps the value below BUCKETS, so it fits a usize.
        (self.hasher.hash_one(id) % BUCKETS as u64) as usize
    }

    /// Numbers a new eviction.
    fn next(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Records eviction `number` as concerning `credentials` and `accounts`.
    fn record(&self, number: u64, credentials: &[TokenId], accounts: &[AccountId]) {
        for id in credentials {
            self.credentials[self.bucket(id.as_str())].fetch_max(number, Ordering::SeqCst);
        }
        for id in accounts {
            self.accounts[self.bucket(id.as_str())].fetch_max(number, Ordering::SeqCst);
        }
        if !accounts.is_empty() {
            self.any_account.fetch_max(number, Ordering::SeqCst);
        }
    }

    /// Whether an eviction numbered after `since` could concern `cached`.
    fn evicted_since(&self, cached: &Cached, since: u64) -> bool {
        let later = |slot: &AtomicU64| slot.load(Ordering::SeqCst) > since;
        if later(&self.everything) {
            return true;
        }
        match cached {
            Cached::Active { principal, .. } => {
                later(&self.credentials[self.bucket(principal.credential_id.as_str())])
                    || later(&self.accounts[self.bucket(principal.account.id.as_str())])
            }
            Cached::Inactive(InactiveReason::AccountDisabled) => later(&self.any_account),
            // No other negative verdict can turn positive again, and no
            // eviction removes one.
            Cached::Inactive(_) => false,
        }
    }
}

/// The cache's monotonic clock, in microseconds since the cache was made.
/// Tests move it forward by hand.
struct Clock {
    origin: Instant,
    #[cfg(test)]
    offset: AtomicU64,
}

impl Clock {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            #[cfg(test)]
            offset: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        let now = self.at(Instant::now());
        #[cfg(test)]
        let now = now.saturating_add(self.offset.load(Ordering::Relaxed));
        now
    }

    /// `instant` on this clock (the origin, if earlier).
    fn at(&self, instant: Instant) -> u64 {
        micros(instant.saturating_duration_since(self.origin))
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// The per-replica verification cache.
pub struct VerificationCache {
    shards: Vec<Shard>,
    /// Where each credential's and account's entries are.
    index: Mutex<Index>,
    /// Positive verdicts each shard holds at most.
    per_shard: usize,
    /// Negative verdicts each shard holds at most: an eighth of `per_shard`
    /// (at least one), enough for clients that keep presenting a revoked or
    /// expired token, too small for forged tokens to matter.
    per_shard_negative: usize,
    /// How long an entry is kept, in microseconds.
    ttl: u64,
    clock: Clock,
    /// False while the invalidation channel is down (and for a store that has
    /// none and needs none, never).
    enabled: AtomicBool,
    /// Which reads may still be cached: see the module documentation.
    epochs: Epochs,
    /// With a channel, how long past the instant it was last proven current
    /// it may be trusted: the cross-replica staleness bound.
    max_silence: Mutex<Option<Duration>>,
    /// The instant (on `clock`) until which the channel counts as current;
    /// `u64::MAX` for a store with no channel.
    alive_until: AtomicU64,
    /// Hits and misses of this cache (for [`Self::stats`]), sharded by
    /// thread like the process's `identity_verification_cache_lookups_total`
    /// ([`crate::domain::counters`]), which every lookup also counts into:
    /// a lookup costs two relaxed additions on lines no other core writes.
    stats: Sharded<2>,
}

impl std::fmt::Debug for VerificationCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationCache")
            .field("entries", &self.len())
            .field("enabled", &self.enabled.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl VerificationCache {
    /// A cache of at most `capacity` positive entries and an eighth as many
    /// negative ones (0 disables it), each kept at most `ttl`. It starts
    /// enabled; a store with a notification channel disables it until the
    /// channel is up.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        let per_shard = capacity.div_ceil(SHARDS);
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            index: Mutex::default(),
            per_shard,
            per_shard_negative: if per_shard == 0 {
                0
            } else {
                (per_shard / 8).max(1)
            },
            ttl: micros(ttl),
            clock: Clock::new(),
            enabled: AtomicBool::new(capacity > 0),
            epochs: Epochs::new(),
            max_silence: Mutex::new(None),
            alive_until: AtomicU64::new(u64::MAX),
            stats: Sharded::new(),
        }
    }

    fn shard_of(key: &Key) -> usize {
        usize::from(key[31]) % SHARDS
    }

    fn shard(&self, digest: &Digest) -> &Shard {
        &self.shards[Self::shard_of(digest.as_bytes())]
    }

    /// The cached verdict for `digest`, if any. The caller still checks
    /// expiry and revocation times (see [`Cached`]).
    pub fn get(&self, digest: &Digest) -> Option<Cached> {
        let now = self.clock.now();
        if !self.usable(now) {
            count_lookup(Lookup::Bypassed);
            return None;
        }
        let key = digest.as_bytes();
        let mut shard = lock(self.shard(digest));
        let areas = &mut *shard;
        let area = if areas.active.contains_key(key) {
            &mut areas.active
        } else {
            &mut areas.inactive
        };
        let found = match area.get(key) {
            Some(entry) if entry.deadline > now => Some(entry.cached.clone()),
            Some(_) => {
                remove_indexed(area, &mut lock(&self.index), key);
                None
            }
            None => None,
        };
        drop(shard);
        let result = if found.is_some() {
            Lookup::Hit
        } else {
            Lookup::Miss
        };
        self.stats.add(result as usize);
        count_lookup(result);
        found
    }

    /// Whether the cache may be used at `now`: enabled, and its channel (if
    /// it has one) proven current recently enough.
    fn usable(&self, now: u64) -> bool {
        self.enabled.load(Ordering::Acquire) && now < self.alive_until.load(Ordering::Acquire)
    }

    /// Trusts the channel only up to `max_silence` past the instant it was
    /// last proven current ([`InvalidationSink::current_as_of`]); until it
    /// first is, the cache is bypassed.
    pub fn require_heartbeat(&self, max_silence: Duration) {
        *lock(&self.max_silence) = Some(max_silence);
        self.alive_until.store(0, Ordering::Release);
    }

    /// The current eviction sequence: read it before reading the store, and
    /// hand it to [`Self::put`].
    pub fn epoch(&self) -> u64 {
        self.epochs.sequence.load(Ordering::SeqCst)
    }

    /// Remembers a verdict read from the store, unless an eviction that
    /// could concern it happened since `epoch` was read. A positive verdict
    /// goes to the positive area and a negative one to the negative area;
    /// making room in one never touches the other.
    pub fn put(&self, digest: &Digest, cached: Cached, epoch: u64) {
        let now = self.clock.now();
        if self.per_shard == 0 || !self.usable(now) {
            return;
        }
        let key = digest.as_bytes();
        let positive = matches!(cached, Cached::Active { .. });
        let mut shard = lock(self.shard(digest));
        let mut index = lock(&self.index);
        // Compared under the index lock: see the module documentation.
        if self.epochs.evicted_since(&cached, epoch) {
            return;
        }
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
        if area.len() >= bound && !area.contains_key(key) {
            let mut victims: Vec<Key> = area
                .iter()
                .filter(|(_, e)| e.deadline <= now)
                .map(|(k, _)| *k)
                .collect();
            if area.len() - victims.len() >= bound {
                // Full of live entries: drop an arbitrary eighth of them.
                let drop_count = (bound / 8).max(1);
                victims.extend(
                    area.iter()
                        .filter(|(_, e)| e.deadline > now)
                        .take(drop_count)
                        .map(|(k, _)| *k),
                );
            }
            for victim in &victims {
                remove_indexed(area, &mut index, victim);
            }
        }
        // One verdict per digest: the newer one replaces the other kind.
        remove_indexed(other, &mut index, key);
        remove_indexed(area, &mut index, key);
        let cached = index.share_account(cached);
        index.add(key, &cached);
        area.insert(
            *key,
            Entry {
                cached,
                deadline: now.saturating_add(self.ttl),
            },
        );
    }

    /// Drops every entry about `what`.
    pub fn evict(&self, what: &Invalidation) {
        self.evict_all(std::slice::from_ref(what));
    }

    /// Drops every entry about any of the credentials `ids` (a cascading
    /// revocation may revoke many at once).
    pub fn evict_credentials(&self, ids: &[TokenId]) {
        self.evict_ids(ids, &[]);
    }

    /// Drops every entry about any of `changes`, as one eviction.
    pub fn evict_all(&self, changes: &[Invalidation]) {
        let mut credentials = Vec::new();
        let mut accounts = Vec::new();
        for change in changes {
            match change {
                Invalidation::Credential(id) => credentials.push(id.clone()),
                Invalidation::Account(id) => accounts.push(id.clone()),
            }
        }
        self.evict_ids(&credentials, &accounts);
    }

    /// Drops the entries of `credentials` and of `accounts` (and, if any
    /// account changed, the `ACCOUNT_DISABLED` verdicts), touching only
    /// them.
    fn evict_ids(&self, credentials: &[TokenId], accounts: &[AccountId]) {
        if credentials.is_empty() && accounts.is_empty() {
            return;
        }
        // First number and record the eviction, then look in the index: see
        // the module documentation for why this order.
        let number = self.epochs.next();
        self.epochs.record(number, credentials, accounts);
        let mut by_shard: Vec<Vec<Key>> = vec![Vec::new(); SHARDS];
        {
            let index = lock(&self.index);
            let mut add = |key: &Key| by_shard[Self::shard_of(key)].push(*key);
            for id in credentials {
                index.of_credential(id, &mut add);
            }
            for id in accounts {
                index.of_account(id, &mut add);
            }
            if !accounts.is_empty() {
                index.disabled.iter().for_each(&mut add);
            }
        }
        for (shard, keys) in self.shards.iter().zip(by_shard) {
            if keys.is_empty() {
                continue;
            }
            let mut areas = lock(shard);
            let mut index = lock(&self.index);
            for key in &keys {
                // Whatever the digest holds now goes: a newer verdict for it
                // costs at most one more miss.
                remove_indexed(&mut areas.active, &mut index, key);
                remove_indexed(&mut areas.inactive, &mut index, key);
            }
        }
    }

    /// Drops everything.
    pub fn clear(&self) {
        let number = self.epochs.next();
        self.epochs.everything.fetch_max(number, Ordering::SeqCst);
        // Every shard, then the index, in the usual order: no put can slip
        // in between (and it would be refused anyway).
        let mut shards: Vec<MutexGuard<'_, Areas>> = self.shards.iter().map(lock).collect();
        let mut index = lock(&self.index);
        for areas in &mut shards {
            areas.active.clear();
            areas.inactive.clear();
        }
        *index = Index::default();
    }

    /// Enables or disables the cache; disabling empties it, and so does
    /// enabling again (notifications may have been missed in between).
    pub fn set_enabled(&self, enabled: bool) {
        let usable = enabled && self.per_shard > 0;
        self.enabled.store(false, Ordering::Release);
        self.clear();
        self.enabled.store(usable, Ordering::Release);
    }

    /// Whether lookups may be served from the cache: it is enabled, and
    /// its change channel (if any) is up and proven current.
    pub fn is_enabled(&self) -> bool {
        self.usable(self.clock.now())
    }

    /// How many entries are held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hits and misses so far.
    pub fn stats(&self) -> (u64, u64) {
        let [hits, misses] = self.stats.read();
        (hits, misses)
    }
}

impl InvalidationSink for VerificationCache {
    fn invalidate(&self, what: &Invalidation) {
        self.evict(what);
    }

    fn invalidate_all(&self, what: &[Invalidation]) {
        self.evict_all(what);
    }

    fn channel_up(&self, up: bool) {
        if up {
            tracing::info!("invalidation channel up: verification cache in use once current");
        } else {
            tracing::warn!(
                "invalidation channel down: verification cache bypassed until it is back"
            );
        }
        if lock(&self.max_silence).is_some() {
            // Trusted again only once the new connection proves current.
            self.alive_until.store(0, Ordering::Release);
        }
        self.set_enabled(up);
    }

    fn current_as_of(&self, sent: Instant) {
        let Some(max_silence) = *lock(&self.max_silence) else {
            return;
        };
        let until = self.clock.at(sent).saturating_add(micros(max_silence));
        if self.clock.now() >= self.alive_until.load(Ordering::Acquire) {
            // The channel was not known current for a while: whatever it
            // had not delivered meanwhile may be cached. Start afresh.
            self.clear();
        }
        self.alive_until.fetch_max(until, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        account::{Account, AccountKind, Email, Role, Username},
        credential::{CredentialKind, Secret},
        resource::Resources,
        scope::Scopes,
    };

    fn principal(account: &AccountId, credential: &TokenId) -> Arc<Principal> {
        Arc::new(Principal {
            account: Arc::new(Account {
                id: account.clone(),
                username: Username::from_stored("u".into()),
                email: Email::default(),
                kind: AccountKind::Robot,
                role: Role::User,
                password_hash: None,
                create_time: Timestamp::from_micros(0),
                disable_time: None,
                credentials_generation: 0,
            }),
            credential: CredentialKind::PersonalAccessToken,
            credential_id: credential.clone(),
            scopes: Scopes::full(),
            resources: Resources::all(),
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

    impl VerificationCache {
        fn advance(&self, by: Duration) {
            self.clock.offset.fetch_add(micros(by), Ordering::Relaxed);
        }

        /// The instant the cache's clock reads now.
        fn instant_now(&self) -> Instant {
            Instant::now() + Duration::from_micros(self.clock.offset.load(Ordering::Relaxed))
        }

        /// Whether the index holds exactly what the shards hold.
        fn index_consistent(&self) -> bool {
            let shards: Vec<MutexGuard<'_, Areas>> = self.shards.iter().map(lock).collect();
            let index = lock(&self.index);
            let indexed = shards
                .iter()
                .flat_map(|a| a.active.values().chain(a.inactive.values()))
                .filter(|e| {
                    matches!(
                        e.cached,
                        Cached::Active { .. } | Cached::Inactive(InactiveReason::AccountDisabled)
                    )
                })
                .count();
            index.len() == indexed
                && index
                    .by_account
                    .values()
                    .map(|a| a.keys.len())
                    .sum::<usize>()
                    == shards.iter().map(|a| a.active.len()).sum::<usize>()
        }
    }

    /// A credential id whose epoch bucket differs from `other`'s.
    fn unrelated_token(cache: &VerificationCache, other: &TokenId) -> TokenId {
        loop {
            let id = TokenId::generate();
            if cache.epochs.bucket(id.as_str()) != cache.epochs.bucket(other.as_str()) {
                return id;
            }
        }
    }

    fn unrelated_account(cache: &VerificationCache, other: &AccountId) -> AccountId {
        loop {
            let id = AccountId::generate();
            if cache.epochs.bucket(id.as_str()) != cache.epochs.bucket(other.as_str()) {
                return id;
            }
        }
    }

    #[test]
    fn entries_expire_after_the_ttl_on_the_monotonic_clock() {
        let cache = VerificationCache::new(100, Duration::from_secs(1));
        let d = digest();
        cache.put(&d, Cached::Inactive(InactiveReason::Unknown), cache.epoch());
        assert!(cache.get(&d).is_some());
        cache.advance(Duration::from_secs(1));
        assert!(cache.get(&d).is_none());
        assert!(cache.is_empty() && cache.index_consistent());
    }

    #[test]
    fn evictions_by_credential_and_by_account_remove_only_their_entries() {
        let cache = VerificationCache::new(100, Duration::from_secs(60));
        let (a, b) = (AccountId::generate(), AccountId::generate());
        let (t1, t2, t3) = (
            TokenId::generate(),
            TokenId::generate(),
            TokenId::generate(),
        );
        let (d1, d2, d3) = (digest(), digest(), digest());
        for (d, account, token) in [(&d1, &a, &t1), (&d2, &a, &t2), (&d3, &b, &t3)] {
            cache.put(d, active(account, token), cache.epoch());
        }
        cache.evict(&Invalidation::Credential(t1));
        assert!(cache.get(&d1).is_none());
        assert!(cache.get(&d2).is_some());
        cache.evict(&Invalidation::Account(a));
        assert!(cache.get(&d2).is_none());
        assert!(cache.get(&d3).is_some());
        assert!(cache.index_consistent());
    }

    fn cached_account(cache: &VerificationCache, d: &Digest) -> Arc<Account> {
        match cache.get(d) {
            Some(Cached::Active { principal, .. }) => Arc::clone(&principal.account),
            other => panic!("not active: {other:?}"),
        }
    }

    #[test]
    fn the_entries_of_one_account_share_it_only_while_it_is_equal() {
        let cache = VerificationCache::new(100, Duration::from_secs(60));
        let (a, b) = (AccountId::generate(), AccountId::generate());
        let (d1, d2, d3, d4) = (digest(), digest(), digest(), digest());
        cache.put(&d1, active(&a, &TokenId::generate()), cache.epoch());
        cache.put(&d2, active(&a, &TokenId::generate()), cache.epoch());
        cache.put(&d3, active(&b, &TokenId::generate()), cache.epoch());
        // Read of the same account by another miss: one copy for both.
        assert!(Arc::ptr_eq(
            &cached_account(&cache, &d1),
            &cached_account(&cache, &d2)
        ));
        assert_eq!(cached_account(&cache, &d3).id, b);
        // An account that differs in any field (here its role, as a read
        // racing an unannounced change could see it) keeps its own copy, and
        // every entry keeps the account it was read with.
        let mut operator = principal(&a, &TokenId::generate());
        Arc::make_mut(&mut Arc::make_mut(&mut operator).account).role = Role::Operator;
        cache.put(
            &d4,
            Cached::Active {
                principal: operator,
                retire_time: None,
            },
            cache.epoch(),
        );
        assert_eq!(cached_account(&cache, &d4).role, Role::Operator);
        assert_eq!(cached_account(&cache, &d1).role, Role::User);
        assert!(cache.index_consistent());
        // Evicting the account drops its three entries and both copies.
        cache.evict(&Invalidation::Account(a));
        for d in [&d1, &d2, &d4] {
            assert!(cache.get(d).is_none());
        }
        assert!(cache.get(&d3).is_some());
        assert_eq!(lock(&cache.index).by_account.len(), 1);
        assert!(cache.index_consistent());
    }

    #[test]
    fn a_credential_with_several_digests_is_evicted_with_all_of_them() {
        let cache = VerificationCache::new(100, Duration::from_secs(60));
        let (account, token, other) = (
            AccountId::generate(),
            TokenId::generate(),
            TokenId::generate(),
        );
        let digests = [digest(), digest(), digest()];
        for d in &digests {
            cache.put(d, active(&account, &token), cache.epoch());
        }
        let kept = digest();
        cache.put(&kept, active(&account, &other), cache.epoch());
        assert!(cache.index_consistent());
        // Expiring one on a lookup leaves the others indexed.
        cache.put(
            &digests[0],
            Cached::Inactive(InactiveReason::Revoked),
            cache.epoch(),
        );
        assert!(cache.index_consistent());
        cache.evict(&Invalidation::Credential(token));
        for d in &digests[1..] {
            assert!(cache.get(d).is_none());
        }
        assert!(cache.get(&kept).is_some());
        assert!(cache.index_consistent());
        assert_eq!(lock(&cache.index).by_credential.len(), 1);
    }

    #[test]
    fn an_account_change_evicts_account_disabled_verdicts_and_no_other_negative() {
        let cache = VerificationCache::new(1024, Duration::from_secs(60));
        let (disabled, revoked) = (digest(), digest());
        let epoch = cache.epoch();
        cache.put(
            &disabled,
            Cached::Inactive(InactiveReason::AccountDisabled),
            epoch,
        );
        cache.put(&revoked, Cached::Inactive(InactiveReason::Revoked), epoch);
        cache.evict(&Invalidation::Account(AccountId::generate()));
        assert!(cache.get(&disabled).is_none(), "an enable may revive it");
        assert!(cache.get(&revoked).is_some());
        assert!(cache.index_consistent());
    }

    #[test]
    fn a_read_that_raced_with_an_eviction_of_its_credential_is_not_cached() {
        let cache = VerificationCache::new(100, Duration::from_secs(60));
        let (account, token, d) = (AccountId::generate(), TokenId::generate(), digest());
        let before_read = cache.epoch();
        // The revocation commits and evicts while the read is in flight.
        cache.evict(&Invalidation::Credential(token.clone()));
        cache.put(&d, active(&account, &token), before_read);
        assert!(cache.get(&d).is_none(), "a stale positive was cached");
    }

    #[test]
    fn a_read_that_raced_with_an_eviction_of_its_account_is_not_cached() {
        let cache = VerificationCache::new(100, Duration::from_secs(60));
        let (account, token, d) = (AccountId::generate(), TokenId::generate(), digest());
        let before_read = cache.epoch();
        cache.evict(&Invalidation::Account(account.clone()));
        cache.put(&d, active(&account, &token), before_read);
        assert!(cache.get(&d).is_none(), "a stale positive was cached");
        let (disabled, before_read) = (digest(), cache.epoch());
        cache.evict(&Invalidation::Account(AccountId::generate()));
        cache.put(
            &disabled,
            Cached::Inactive(InactiveReason::AccountDisabled),
            before_read,
        );
        assert!(cache.get(&disabled).is_none(), "any enable may revive it");
    }

    #[test]
    fn an_unrelated_eviction_does_not_refuse_a_read() {
        let cache = VerificationCache::new(100, Duration::from_secs(60));
        let (account, token, d) = (AccountId::generate(), TokenId::generate(), digest());
        let before_read = cache.epoch();
        // A flood of evictions of other credentials and accounts.
        for _ in 0..100 {
            cache.evict(&Invalidation::Credential(unrelated_token(&cache, &token)));
            cache.evict(&Invalidation::Account(unrelated_account(&cache, &account)));
        }
        cache.evict_credentials(&[unrelated_token(&cache, &token)]);
        cache.put(&d, active(&account, &token), before_read);
        assert!(matches!(cache.get(&d), Some(Cached::Active { .. })));
        // Negative verdicts other than ACCOUNT_DISABLED are refused only by
        // a clear.
        let (revoked, before_read) = (digest(), cache.epoch());
        cache.evict(&Invalidation::Account(account.clone()));
        cache.put(
            &revoked,
            Cached::Inactive(InactiveReason::Revoked),
            before_read,
        );
        assert!(cache.get(&revoked).is_some());
        let before_read = cache.epoch();
        cache.clear();
        cache.put(
            &revoked,
            Cached::Inactive(InactiveReason::Revoked),
            before_read,
        );
        assert!(cache.get(&revoked).is_none(), "a clear refuses every read");
    }

    #[test]
    fn a_disabled_cache_serves_nothing_and_reenabling_starts_empty() {
        let cache = VerificationCache::new(100, Duration::from_secs(60));
        let d = digest();
        cache.put(&d, Cached::Inactive(InactiveReason::Revoked), cache.epoch());
        cache.channel_up(false);
        assert!(cache.get(&d).is_none());
        cache.put(&d, Cached::Inactive(InactiveReason::Revoked), cache.epoch());
        cache.channel_up(true);
        assert!(cache.get(&d).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn capacity_is_bounded_and_the_index_with_it() {
        let cache = VerificationCache::new(64, Duration::from_secs(60));
        for _ in 0..10_000 {
            cache.put(
                &digest(),
                Cached::Inactive(InactiveReason::Unknown),
                cache.epoch(),
            );
        }
        assert!(cache.len() <= 64 + SHARDS, "{} entries", cache.len());
        let account = AccountId::generate();
        for i in 0..10_000 {
            let cached = if i % 3 == 0 {
                Cached::Inactive(InactiveReason::AccountDisabled)
            } else {
                active(&account, &TokenId::generate())
            };
            cache.put(&digest(), cached, cache.epoch());
        }
        assert!(
            cache.len() <= 64 + 64 / 8 + 2 * SHARDS,
            "{} entries",
            cache.len()
        );
        assert!(cache.index_consistent());
        cache.advance(Duration::from_secs(61));
        for _ in 0..10_000 {
            cache.put(
                &digest(),
                active(&account, &TokenId::generate()),
                cache.epoch(),
            );
        }
        assert!(cache.index_consistent());
        cache.evict(&Invalidation::Account(account));
        assert!(cache.index_consistent());
        assert_eq!(lock(&cache.index).by_account.len(), 0);
        let off = VerificationCache::new(0, Duration::from_secs(60));
        off.put(
            &digest(),
            Cached::Inactive(InactiveReason::Unknown),
            off.epoch(),
        );
        assert!(off.is_empty() && !off.is_enabled());
    }

    #[test]
    fn negative_verdicts_never_evict_positive_ones() {
        let cache = VerificationCache::new(1024, Duration::from_secs(60));
        let account = AccountId::generate();
        let positives: Vec<Digest> = (0..64).map(|_| digest()).collect();
        for d in &positives {
            cache.put(d, active(&account, &TokenId::generate()), cache.epoch());
        }
        for _ in 0..20_000 {
            cache.put(
                &digest(),
                Cached::Inactive(InactiveReason::Unknown),
                cache.epoch(),
            );
        }
        for d in &positives {
            assert!(matches!(cache.get(d), Some(Cached::Active { .. })));
        }
        // The negative area holds an eighth of the positive capacity.
        assert!(cache.len() <= 64 + 1024 / 8, "{} entries", cache.len());
    }

    #[test]
    fn a_new_verdict_replaces_one_of_the_other_kind() {
        let cache = VerificationCache::new(1024, Duration::from_secs(60));
        let (account, token, d) = (AccountId::generate(), TokenId::generate(), digest());
        cache.put(&d, active(&account, &token), cache.epoch());
        cache.put(&d, Cached::Inactive(InactiveReason::Revoked), cache.epoch());
        assert!(matches!(
            cache.get(&d),
            Some(Cached::Inactive(InactiveReason::Revoked))
        ));
        assert_eq!(cache.len(), 1);
        assert!(cache.index_consistent());
        cache.put(&d, active(&account, &token), cache.epoch());
        assert!(matches!(cache.get(&d), Some(Cached::Active { .. })));
        assert_eq!(cache.len(), 1);
        assert!(cache.index_consistent());
    }

    #[test]
    fn a_channel_is_trusted_only_up_to_the_bound_past_its_last_proven_currency() {
        let cache = VerificationCache::new(100, Duration::from_secs(60));
        cache.require_heartbeat(Duration::from_secs(1));
        let d = digest();
        let put = |cache: &VerificationCache| {
            cache.put(&d, Cached::Inactive(InactiveReason::Revoked), cache.epoch());
        };
        cache.channel_up(true);
        put(&cache);
        assert!(cache.get(&d).is_none(), "up, but not yet proven current");
        // The own heartbeat sent now came back: trusted for the bound.
        let sent = cache.instant_now();
        cache.current_as_of(sent);
        put(&cache);
        assert!(cache.get(&d).is_some());
        cache.advance(Duration::from_millis(900));
        assert!(cache.get(&d).is_some());
        cache.advance(Duration::from_millis(200));
        assert!(cache.get(&d).is_none(), "not proven current for too long");
        // A heartbeat that comes back more than the bound after it was
        // sent (a backlog) does not restore trust.
        cache.current_as_of(sent);
        assert!(cache.get(&d).is_none(), "a late heartbeat is silence");
        assert!(cache.is_empty(), "recovering from silence starts empty");
        cache.current_as_of(cache.instant_now());
        put(&cache);
        assert!(cache.get(&d).is_some());
        // A lost connection: bypassed at once, and not trusted again until
        // the new connection proves current.
        cache.channel_up(false);
        cache.channel_up(true);
        assert!(cache.get(&d).is_none() && !cache.is_enabled());
        cache.current_as_of(cache.instant_now());
        assert!(cache.is_enabled());
    }
}
