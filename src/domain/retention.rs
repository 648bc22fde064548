//! Retention: what is deleted, and when. Nothing a live credential, a
//! counting sign-in throttle or the audit trail still needs is ever
//! deleted; everything else goes once it has been dead for a configurable
//! while, so that the database does not grow for ever (one
//! `sign_in_throttle` row per made-up username, one session per sign-in).
//!
//! - Sessions: once expired or signed out longer than the credential
//!   retention (`IDENTITY_RETENTION`, 30 days by default).
//! - Tokens: once revoked, expired or used up longer than that, and only
//!   when every token of its rotation family is too, so that reuse detection
//!   (a rotated-out secret presented to `RotateToken` revokes the family)
//!   holds as long as any token of the family works. A token's `parent`
//!   pointer (the token that created it) may then name a deleted token:
//!   a child never outlives its parent, so nothing live points there.
//! - Sign-in throttle counters: an address's once it is forgotten (idle
//!   longer than `IDENTITY_SIGN_IN_ADDRESS_MEMORY`, when an attempt would
//!   start it afresh anyway); a username's once idle longer than the
//!   credential retention, unless it is locked (a lock waits for an
//!   operator, however old).
//! - Audit events: once older than the audit retention
//!   (`IDENTITY_AUDIT_RETENTION`, 400 days by default; `off` keeps them for
//!   ever).
//!
//! The store deletes in bounded batches, each its own short statement, and
//! on PostgreSQL under an advisory lock, so that one replica at a time
//! purges.

use std::time::Duration;

use super::time::Timestamp;

/// How long dead rows are kept, and how often they are purged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionSettings {
    /// How long sessions, tokens and username throttle counters are kept
    /// after they stopped working (or counting); `None`: for ever.
    pub credentials: Option<Duration>,
    /// How long audit events are kept; `None`: for ever.
    pub audit: Option<Duration>,
    /// How often a purge runs (the first one an interval, at most a minute,
    /// after start-up).
    pub interval: Duration,
    /// Most rows one statement deletes.
    pub batch: u32,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        const DAY: u64 = 24 * 60 * 60;
        Self {
            credentials: Some(Duration::from_secs(30 * DAY)),
            audit: Some(Duration::from_secs(400 * DAY)),
            interval: Duration::from_secs(60 * 60),
            batch: 1000,
        }
    }
}

/// What one purge deletes, as instants: rows dead at or before them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeCutoffs {
    /// Sessions and tokens that stopped working at or before this instant;
    /// `None`: none.
    pub credentials: Option<Timestamp>,
    /// Username throttle counters last counting at or before this instant
    /// (`None`: none), unless they have `lockout` failures or more.
    pub username_counters: Option<Timestamp>,
    /// Failures at which a username counter is locked.
    pub lockout: i64,
    /// Address throttle counters whose last attempt is older than this
    /// instant (forgotten).
    pub address_counters: Timestamp,
    /// The current instant: no counter still blocking attempts is deleted.
    pub now: Timestamp,
    /// Audit events at or before this instant; `None`: none.
    pub audit: Option<Timestamp>,
    /// Most rows one statement deletes.
    pub batch: u32,
}

impl PurgeCutoffs {
    /// The cutoffs of a purge at `now`, with these settings and an address
    /// memory of `address_memory`.
    pub fn at(
        now: Timestamp,
        settings: &RetentionSettings,
        address_memory: Duration,
        lockout: u32,
    ) -> Self {
        let before = |age: Duration| {
            let micros = i64::try_from(age.as_micros()).unwrap_or(i64::MAX);
            Timestamp::from_micros(now.as_micros().saturating_sub(micros))
        };
        let credentials = settings.credentials.map(before);
        Self {
            credentials,
            username_counters: credentials,
            lockout: i64::from(lockout),
            address_counters: before(address_memory),
            now,
            audit: settings.audit.map(before),
            batch: settings.batch.max(1),
        }
    }
}

/// How many rows a purge deleted, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Sessions.
    pub sessions: u64,
    /// Tokens.
    pub tokens: u64,
    /// Sign-in throttle counters.
    pub sign_in_throttle: u64,
    /// Audit events.
    pub audit_events: u64,
    /// Rows of the polled change feed's table (PostgreSQL).
    pub changes: u64,
}

impl Purged {
    /// Each count with its metric label.
    pub fn by_kind(&self) -> [(&'static str, u64); 5] {
        [
            ("sessions", self.sessions),
            ("tokens", self.tokens),
            ("sign_in_throttle", self.sign_in_throttle),
            ("audit_events", self.audit_events),
            ("changes", self.changes),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_keeps_for_ever_and_ages_become_instants() {
        let now = Timestamp::from_micros(100_000_000);
        let settings = RetentionSettings {
            credentials: Some(Duration::from_secs(10)),
            audit: None,
            interval: Duration::from_secs(1),
            batch: 0,
        };
        let cutoffs = PurgeCutoffs::at(now, &settings, Duration::from_secs(30), 100);
        assert_eq!(
            cutoffs.credentials,
            Some(Timestamp::from_micros(90_000_000))
        );
        assert_eq!(cutoffs.username_counters, cutoffs.credentials);
        assert_eq!(cutoffs.address_counters, Timestamp::from_micros(70_000_000));
        assert_eq!(cutoffs.audit, None);
        assert_eq!(cutoffs.batch, 1);
        let off = RetentionSettings {
            credentials: None,
            ..settings
        };
        let cutoffs = PurgeCutoffs::at(now, &off, Duration::MAX, 100);
        assert_eq!(cutoffs.credentials, None);
        assert_eq!(cutoffs.username_counters, None);
        assert_eq!(
            cutoffs.address_counters,
            Timestamp::from_micros(i64::MIN + 100_000_001)
        );
    }
}
