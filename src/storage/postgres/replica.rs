//! Reads from a hot standby (`IDENTITY_DATABASE_READ_URL`), and the
//! watermark that decides whether the standby may answer.
//!
//! A standby may lag, and a stale answer must never undo a revocation. The
//! [`Watermark`] is the newest primary WAL position this process knows of:
//! every change it has been told of, and every write of its own, committed
//! at or before it. A verdict read from the standby is used only if the
//! standby had replayed at least the watermark *before* the read's snapshot
//! was taken; otherwise the read goes to the primary. This module never
//! writes, and never answers anything that must see the latest state (a
//! use count, reuse detection, a sign-in): those never reach it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use sqlx::postgres::{PgPool, PgRow};

use super::{PgBackend, micros};
use crate::domain::credential::Digest;

/// The primary's WAL insert position, as a number of bytes. The insert
/// position, not `pg_current_wal_lsn()` (the write position): with
/// `synchronous_commit = off` a commit can return (and its NOTIFY be
/// delivered) before its commit record is written, and only the insert
/// position is certain to be past it.
/// The primary's position and its timeline (the first eight hexadecimal
/// digits of the WAL file it is inserting into): positions compare only
/// within one timeline.
pub(super) const PRIMARY_POSITION: &str = "SELECT CAST(pg_current_wal_insert_lsn() - '0/0'::pg_lsn AS BIGINT), \
     CAST(CAST(CAST('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8) AS bit(32)) \
     AS integer) AS BIGINT)";

/// How a replica read is counted (`identity_read_replica_reads_total`).
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Answered by the standby.
    Served,
    /// The standby had not replayed the watermark, or the watermark is not
    /// known (the change channel is down or not current): read the primary.
    Stale,
    /// The standby does not know the credential (it may have just been
    /// created): read the primary.
    Absent,
    /// A limited-use token: its use count is the primary's alone.
    Limited,
    /// The standby failed or could not be reached: read the primary.
    Failed,
}

impl Outcome {
    /// Counts one read with this outcome.
    pub fn count(self) {
        let outcome = match self {
            Self::Served => "served",
            Self::Stale => "stale",
            Self::Absent => "absent",
            Self::Limited => "limited",
            Self::Failed => "failed",
        };
        metrics::counter!("identity_read_replica_reads_total", "outcome" => outcome).increment(1);
    }
}

/// The newest primary WAL position this process knows of, and whether it
/// is known at all.
///
/// It only moves forward ([`Self::advance`]). It is *known* only between
/// an [`Self::anchor`] (a position read from the primary after whatever
/// made it unknown) and the next [`Self::lose`] (the change channel went
/// down, or a write of this process could not learn its position), and
/// trusted only while the change channel is proven current
/// ([`Self::current_as_of`]), as the verification cache is: while it is not,
/// announcements may be missing from it, and the standby is not used.
///
/// A change feed (`feed.rs` today; a polled one later) calls `advance` with
/// positions that cover the commits it delivers, `anchor` when it
/// (re)connects, `lose` when it loses its source, and `current_as_of` when
/// it has proven itself current.
#[derive(Debug)]
pub struct Watermark {
    /// The position, in bytes of WAL.
    position: AtomicU64,
    /// How many times it was lost.
    losses: AtomicU64,
    /// The `losses` count the newest anchor was read after: known while it
    /// equals `losses`.
    anchored: AtomicU64,
    /// The monotonic origin of `current_until`.
    origin: Instant,
    /// Microseconds from `origin` until which the channel is trusted.
    current_until: AtomicU64,
    /// The newest primary timeline seen (0: none yet). A standby is used
    /// only while it streams this timeline: after a failover, one left on
    /// the old timeline may hold positions past the new primary's, with
    /// none of its changes.
    timeline: AtomicU64,
}

/// Taken before a position is read from the primary, and handed back with
/// it to [`Watermark::anchor`]: the anchor holds only if the watermark was
/// not lost in between.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl Watermark {
    /// A watermark not yet known: the standby is not used until the change
    /// channel first connects and anchors it.
    pub fn new() -> Self {
        Self {
            position: AtomicU64::new(0),
            losses: AtomicU64::new(1),
            anchored: AtomicU64::new(0),
            origin: Instant::now(),
            current_until: AtomicU64::new(0),
            timeline: AtomicU64::new(0),
        }
    }

    /// The primary was seen on `timeline` (timelines only move forward).
    pub fn on_timeline(&self, timeline: u64) {
        self.timeline.fetch_max(timeline, Ordering::SeqCst);
    }

    /// The newest primary timeline seen, 0 before any.
    pub fn timeline(&self) -> u64 {
        self.timeline.load(Ordering::SeqCst)
    }

    /// Moves the watermark forward to `position` (never back).
    pub fn advance(&self, position: u64) {
        self.position.fetch_max(position, Ordering::SeqCst);
    }

    /// Takes a ticket: before reading a position from the primary.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.losses.load(Ordering::SeqCst))
    }

    /// Advances to `position`, read from the primary after `ticket` was
    /// taken, and makes the watermark known, unless it was lost since.
    pub fn anchor(&self, ticket: Ticket, position: u64) {
        self.advance(position);
        self.anchored.fetch_max(ticket.0, Ordering::SeqCst);
    }

    /// Makes the watermark unknown until the next anchor: something this
    /// process may have missed (a lost channel, a write whose position could
    /// not be read) could be newer than it.
    pub fn lose(&self) {
        self.losses.fetch_add(1, Ordering::SeqCst);
    }

    /// The channel has delivered everything committed before `sent`: it is
    /// trusted until `max_silence` after.
    pub fn current_as_of(&self, sent: Instant, max_silence: std::time::Duration) {
        let until =
            micros(sent.saturating_duration_since(self.origin)).saturating_add(micros(max_silence));
        self.current_until.fetch_max(until, Ordering::SeqCst);
    }

    /// The position a standby must have replayed for a read starting now
    /// to be used, or `None` while the watermark is not known or not
    /// current (then the standby is not used at all). Read before the read
    /// starts: whatever happens while it runs is the cache's epoch's
    /// business.
    pub fn required(&self) -> Option<u64> {
        let position = self.position.load(Ordering::SeqCst);
        let known = self.anchored.load(Ordering::SeqCst) == self.losses.load(Ordering::SeqCst);
        let current = micros(self.origin.elapsed()) < self.current_until.load(Ordering::SeqCst);
        (known && current).then_some(position)
    }
}

impl Default for Watermark {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads the primary's [`PRIMARY_POSITION`] on `pool`, noting its
/// timeline in `watermark`: the position.
pub(super) async fn primary_position(
    watermark: &Watermark,
    pool: &PgPool,
) -> Result<u64, sqlx::Error> {
    use sqlx::Row as _;
    let row = sqlx::Executor::fetch_one(pool, PRIMARY_POSITION).await?;
    let position: i64 = row.try_get(0)?;
    let timeline: i64 = row.try_get(1)?;
    watermark.on_timeline(u64::try_from(timeline).unwrap_or(0));
    Ok(u64::try_from(position).unwrap_or(0))
}

/// Anchors `watermark` to the primary's current position, or loses it if
/// that cannot be read.
pub(super) async fn anchor_to_primary(watermark: &Watermark, pool: &PgPool) {
    let ticket = watermark.ticket();
    match primary_position(watermark, pool).await {
        Ok(position) => watermark.anchor(ticket, position),
        Err(err) => {
            watermark.lose();
            tracing::debug!(error = %err, "cannot read the primary's WAL position");
        }
    }
}

/// The standby's replay position, in bytes from 0/0 (NULL when the server
/// is not in recovery), and the timeline its WAL receiver streams (NULL
/// when it is not streaming, or the role may not see it: `pg_monitor`).
const REPLAYED: &str = "SELECT CAST(pg_last_wal_replay_lsn() - '0/0'::pg_lsn AS BIGINT), \
     (SELECT CAST(received_tli AS BIGINT) FROM pg_stat_wal_receiver WHERE status = 'streaming')";

/// How long a standby that failed is left alone: its reads go straight to
/// the primary meanwhile, and the first read after tries it again.
pub(super) const REPLICA_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a read waits for a connection to the standby (at most; the
/// pool's acquire timeout if shorter): a standby that is down refuses
/// connections, which the pool would otherwise retry for the whole acquire
/// timeout, holding the call all that time.
pub(super) const REPLICA_ACQUIRE_TIMEOUT: std::time::Duration =
    std::time::Duration::from_millis(250);

/// The standby and the watermark its answers are held to.
#[derive(Debug)]
pub(super) struct Replica {
    /// Connections to the standby.
    pub(super) pool: PgPool,
    /// Shared with the change feed, which advances it.
    pub(super) watermark: std::sync::Arc<Watermark>,
    /// The monotonic origin of `down_until`.
    pub(super) origin: Instant,
    /// Microseconds from `origin` until which the standby, having failed,
    /// is not tried; 0 while it works.
    pub(super) down_until: AtomicU64,
}

impl Replica {
    /// Whether this read may try the standby: yes while it works; after a
    /// failure, only once [`REPLICA_RETRY`] has passed, and then only for
    /// the one read that claims the retry.
    fn may_try(&self) -> bool {
        let until = self.down_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = micros(self.origin.elapsed());
        now >= until
            && self
                .down_until
                .compare_exchange(
                    until,
                    now.saturating_add(micros(REPLICA_RETRY)),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// The standby failed a read: left alone for [`REPLICA_RETRY`].
    fn failed(&self) {
        let until = micros(self.origin.elapsed()).saturating_add(micros(REPLICA_RETRY));
        self.down_until.store(until.max(1), Ordering::Release);
    }

    /// The standby answered a read.
    fn worked(&self) {
        if self.down_until.load(Ordering::Acquire) != 0 {
            self.down_until.store(0, Ordering::Release);
        }
    }
}

impl PgBackend {
    /// The watermark, when there is a read replica: for a change feed.
    pub(super) fn watermark(&self) -> Option<&std::sync::Arc<Watermark>> {
        self.replica.as_ref().map(|replica| &replica.watermark)
    }

    /// The rows of `statement` (a lookup by one digest, its one parameter
    /// `$1`) as the standby has them, if it is fresh enough: `None` when
    /// there is no standby, it had not replayed the watermark, or it failed
    /// (the caller then reads the primary).
    ///
    /// Two statements on one connection, outside any transaction: the
    /// standby's replay position, then the lookup. Each takes its own
    /// snapshot when it starts, so the lookup's is taken after the position
    /// was read and (replay only moving forward on one server, and a
    /// connection staying on one server) holds every commit up to it. Read
    /// in the lookup's own statement instead, the position would be read
    /// *after* its snapshot and could overstate it. The digest is bound,
    /// never written into the statement's text: a standby logs the text of
    /// a statement that fails (a recovery conflict cancels one now and
    /// then), and shows it in `pg_stat_activity`, but never its parameters.
    pub(super) async fn replica_rows(
        &self,
        statement: &'static str,
        digest: &Digest,
    ) -> Option<Vec<PgRow>> {
        let replica = self.replica.as_ref()?;
        let Some(required) = replica.watermark.required() else {
            Outcome::Stale.count();
            return None;
        };
        if !replica.may_try() {
            Outcome::Failed.count();
            return None;
        }
        let mut conn = match replica.pool.acquire().await {
            Ok(conn) => conn,
            Err(err) => {
                replica.failed();
                Outcome::Failed.count();
                tracing::debug!(error = %err, "cannot reach the read replica");
                return None;
            }
        };
        let timeline = replica.watermark.timeline();
        let persistent = !super::statement_cache_off();
        let position = sqlx::query_as::<_, (Option<i64>, Option<i64>)>(REPLAYED)
            .persistent(persistent)
            .fetch_one(&mut *conn)
            .await;
        let replayed = match position {
            Ok(replayed) => replayed,
            Err(err) => {
                conn.close_on_drop();
                replica.failed();
                Outcome::Failed.count();
                tracing::debug!(error = %err, "the read replica failed to say its position");
                return None;
            }
        };
        // NULL where the server is not (or no longer) in recovery: then it
        // is not the standby this process was given, and not trusted. Nor
        // is one that does not stream the primary's timeline: after a
        // failover it may have replayed the old timeline past the new
        // primary's position, which then proves nothing.
        let (replayed, streams) = replayed;
        let on_timeline = streams.and_then(|t| u64::try_from(t).ok()) == Some(timeline);
        match replayed.and_then(|p| u64::try_from(p).ok()) {
            Some(replayed) if on_timeline && replayed >= required => {}
            _ => {
                replica.worked();
                Outcome::Stale.count();
                return None;
            }
        }
        let rows = sqlx::query(statement)
            .bind(&digest.as_bytes()[..])
            .persistent(persistent)
            .fetch_all(&mut *conn)
            .await;
        match rows {
            Ok(rows) => {
                replica.worked();
                Some(rows)
            }
            Err(err) => {
                conn.close_on_drop();
                replica.failed();
                Outcome::Failed.count();
                tracing::debug!(error = %err, "the read replica failed a lookup");
                None
            }
        }
    }

    /// After a write of this process committed (and before the call that
    /// made it returns): advances the watermark to the primary's position,
    /// which covers the commit, so that the standby cannot answer from
    /// before it here; or, if it cannot be read, loses the watermark (the
    /// standby is then not used until the change feed anchors it again).
    pub(super) async fn wrote(&self, pool: &PgPool) {
        let Some(replica) = &self.replica else {
            return;
        };
        match primary_position(&replica.watermark, pool).await {
            Ok(position) => replica.watermark.advance(position),
            Err(err) => {
                replica.watermark.lose();
                tracing::debug!(error = %err, "cannot read the primary's WAL position after a write");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watermark_is_known_only_between_an_anchor_and_a_loss() {
        let mark = Watermark::new();
        mark.current_as_of(Instant::now(), std::time::Duration::from_secs(60));
        assert_eq!(mark.required(), None, "known before any anchor");
        let ticket = mark.ticket();
        mark.anchor(ticket, 100);
        assert_eq!(mark.required(), Some(100));
        mark.advance(50);
        assert_eq!(mark.required(), Some(100), "moved back");
        mark.advance(150);
        assert_eq!(mark.required(), Some(150));
        // A position read before a loss does not make it known again.
        let stale = mark.ticket();
        mark.lose();
        mark.anchor(stale, 200);
        assert_eq!(mark.required(), None);
        let fresh = mark.ticket();
        mark.anchor(fresh, 210);
        assert_eq!(mark.required(), Some(210));
    }

    #[test]
    fn a_watermark_is_not_trusted_past_the_channels_silence() {
        let mark = Watermark::new();
        let ticket = mark.ticket();
        mark.anchor(ticket, 1);
        assert_eq!(
            mark.required(),
            None,
            "trusted before the channel was current"
        );
        mark.current_as_of(Instant::now(), std::time::Duration::ZERO);
        assert_eq!(mark.required(), None, "trusted past its silence");
        mark.current_as_of(Instant::now(), std::time::Duration::from_secs(60));
        assert_eq!(mark.required(), Some(1));
    }
}
