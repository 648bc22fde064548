//! The change feed: each replica `LISTEN`s for the others' announcements
//! on a connection of its own, applies them to its cache in batches, and
//! proves its listener current with heartbeats of its own; and the clock
//! offset to the database's.

use std::sync::Arc;

use sqlx::postgres::PgPool;

use super::{
    ClockOffset, PgBackend, PgStore, StorageError, classify, database_clock, execute_alone, micros,
    replica,
};
use crate::domain::service::CHANNEL_MAX_SILENCE;
use crate::domain::{
    account::AccountId,
    cache::{Invalidation, InvalidationSink},
    time::Timestamp,
    token::TokenId,
};

/// The channel replicas announce changes on.
pub(super) const CHANNEL: &str = "identity_invalidation";
/// The payload prefix of a heartbeat: `heartbeat:<replica>:<sequence>`.
const HEARTBEAT: &str = "heartbeat";
/// How often each replica sends its heartbeat. Only its own proves its
/// listener current: the cache is trusted until `CHANNEL_MAX_SILENCE` past
/// the send of the last one heard back.
const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);
/// Heartbeats remembered while in flight: with one sent every 200 ms, any
/// older than this many have been lost or are far beyond the bound.
const HEARTBEATS_IN_FLIGHT: usize = 64;
/// Notifications received but not yet applied: the receiving task waits
/// when the applying one is this far behind, and the applying one takes up
/// to this many at once.
const NOTIFICATION_BATCH: usize = 1024;

/// This replica's heartbeats: who it is on the channel, and when it sent
/// each heartbeat not yet heard back (on the monotonic clock).
#[derive(Debug)]
struct Heartbeats {
    /// Random per store: tells this replica's heartbeats from the others'.
    replica: String,
    sent: std::sync::Mutex<std::collections::VecDeque<(u64, std::time::Instant)>>,
}

impl Heartbeats {
    fn new() -> Self {
        Self {
            replica: uuid::Uuid::now_v7().simple().to_string(),
            sent: std::sync::Mutex::default(),
        }
    }

    /// Records that heartbeat `sequence` is being sent now, and returns its
    /// payload. The instant is taken before the `NOTIFY` commits, so every
    /// change committed before it is delivered before the heartbeat.
    fn send(&self, sequence: u64) -> String {
        let mut sent = self
            .sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if sent.len() == HEARTBEATS_IN_FLIGHT {
            sent.pop_front();
        }
        sent.push_back((sequence, std::time::Instant::now()));
        format!("{HEARTBEAT}:{}:{sequence}", self.replica)
    }

    /// When the heartbeat of `payload` was sent, if it is one of this
    /// replica's still remembered (and forgets it and any earlier one).
    fn heard(&self, payload: &str) -> Option<std::time::Instant> {
        let (replica, sequence) = payload.split_once(':')?;
        if replica != self.replica {
            return None;
        }
        let sequence: u64 = sequence.parse().ok()?;
        let mut sent = self
            .sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut found = None;
        while let Some(&(s, at)) = sent.front() {
            if s > sequence {
                break;
            }
            sent.pop_front();
            if s == sequence {
                found = Some(at);
            }
        }
        found
    }
}

impl PgBackend {
    /// Listens for announcements on a dedicated connection and hands them to
    /// `sink`. Whenever the connection is lost the sink hears the channel is
    /// down, and up again once a new connection listens.
    ///
    /// Pending notifications are drained and applied as one batch. The
    /// sink is told the channel is current (as of a send instant) only when
    /// this replica's own heartbeat comes back: NOTIFY delivers in commit
    /// order, so every change committed before the heartbeat was sent has
    /// been applied by then. Other replicas' heartbeats and the changes
    /// themselves prove delivery, not currency, and count for nothing.
    pub(super) fn run_change_feed(
        &self,
        pool: &PgPool,
        sink: std::sync::Arc<dyn InvalidationSink>,
    ) {
        let heartbeats = Arc::new(Heartbeats::new());
        // The listener's connection stays its own (`listen_pool`); the
        // heartbeat is an ordinary statement, so it may go through the
        // query pool (and a transaction pooler).
        let heartbeat_pool = pool.clone();
        // With a read replica, the watermark (`replica.rs`) and the pool the
        // primary's WAL position is read on.
        let watermark = self
            .watermark()
            .map(|watermark| (Arc::clone(watermark), pool.clone()));
        let sender = Arc::clone(&heartbeats);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sequence: u64 = 0;
            loop {
                tick.tick().await;
                sequence += 1;
                let sent = execute_alone(
                    &heartbeat_pool,
                    sqlx::query("SELECT pg_notify($1, $2)")
                        .bind(CHANNEL)
                        .bind(sender.send(sequence)),
                )
                .await;
                if let Err(err) = sent {
                    tracing::debug!(error = %err, "cannot send the change channel's heartbeat");
                }
            }
        });
        let pool = self.listen_pool.clone();
        let losses = Arc::clone(&self.losses);
        let lag = metrics::gauge!("identity_change_feed_lag_seconds");
        tokio::spawn(async move {
            let mut backoff = std::time::Duration::from_millis(100);
            loop {
                match listen(&pool).await {
                    Ok(mut listener) => {
                        backoff = std::time::Duration::from_millis(100);
                        // Before the channel is reported up: whatever was
                        // committed while it was down is covered, so a
                        // lagging standby cannot answer from before it.
                        if let Some((watermark, primary)) = &watermark {
                            replica::anchor_to_primary(watermark, primary).await;
                        }
                        sink.channel_up(true);
                        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(NOTIFICATION_BATCH);
                        // Receives; stops (dropping `tx`) once the connection
                        // is gone: Ok(None) or an error.
                        let receiver = tokio::spawn(async move {
                            while let Ok(Some(notification)) = listener.try_recv().await {
                                if tx.send(notification.payload().to_owned()).await.is_err() {
                                    break;
                                }
                            }
                        });
                        let mut changes = Vec::with_capacity(NOTIFICATION_BATCH);
                        while let Some(first) = rx.recv().await {
                            let mut current = None;
                            let mut next = Some(first);
                            let mut taken = 0;
                            while let Some(payload) = next {
                                taken += 1;
                                if let Some(beat) = payload
                                    .strip_prefix(HEARTBEAT)
                                    .and_then(|rest| rest.strip_prefix(':'))
                                {
                                    if let Some(sent) = heartbeats.heard(beat) {
                                        current = Some(sent);
                                    }
                                } else {
                                    match parse_payload(&payload) {
                                        Some(what) => changes.push(what),
                                        None => tracing::warn!(
                                            "ignored a malformed change notification"
                                        ),
                                    }
                                }
                                next = if taken < NOTIFICATION_BATCH {
                                    rx.try_recv().ok()
                                } else {
                                    None
                                };
                            }
                            // The watermark moves before the cache hears of
                            // the batch: a read that starts after an eviction
                            // must hold the standby to the change evicted.
                            // The position is read once per batch, after its
                            // notifications were received: NOTIFY is
                            // delivered only after its transaction commits,
                            // so the primary's position read now is past
                            // every commit of the batch (a payload cannot
                            // carry its own commit's position: it is written
                            // inside the transaction, before the commit). A
                            // batch of heartbeats alone announces no change
                            // to cover: moving the watermark to the primary's
                            // latest position then would only send reads to
                            // the primary while the standby replays unrelated
                            // writes (such as the last-use recorder's).
                            if let Some((watermark, primary)) = &watermark
                                && !changes.is_empty()
                            {
                                replica::anchor_to_primary(watermark, primary).await;
                            }
                            sink.invalidate_all(&changes);
                            changes.clear();
                            // Only after what preceded the heartbeat is applied.
                            if let Some(sent) = current {
                                lag.set(sent.elapsed().as_secs_f64());
                                sink.current_as_of(sent);
                                if let Some((watermark, _)) = &watermark {
                                    watermark.current_as_of(sent, CHANNEL_MAX_SILENCE);
                                }
                            }
                        }
                        receiver.abort();
                        losses.record();
                        if let Some((watermark, _)) = &watermark {
                            watermark.lose();
                        }
                        sink.channel_up(false);
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "cannot listen for changes yet");
                    }
                }
                tokio::time::sleep(backoff).await;
                // At most a second between attempts: until the channel is
                // back the cache is bypassed, so every verification costs a
                // query just when the database is recovering.
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
            }
        });
    }
}

async fn listen(pool: &PgPool) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    // Report a lost connection at once (`Ok(None)`), instead of first trying
    // to reconnect: that attempt waits up to the acquire timeout while the
    // database is down, and the cache would be trusted all that time.
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

fn parse_payload(payload: &str) -> Option<Invalidation> {
    let (kind, id) = payload.split_once(':')?;
    uuid::Uuid::try_parse(id).ok()?;
    match kind {
        "credential" => Some(Invalidation::Credential(TokenId::from_stored(
            id.to_owned(),
        ))),
        "account" => Some(Invalidation::Account(AccountId::from_stored(id.to_owned()))),
        _ => None,
    }
}

impl PgStore {
    /// Measures this process's wall clock against the database server's:
    /// one round trip on a connection already acquired (so that waiting for
    /// the pool does not widen it), the database's `clock_timestamp()`
    /// taken as read at the round trip's midpoint.
    pub async fn clock_offset(&self) -> Result<ClockOffset, StorageError> {
        let mut conn = self.pool.acquire().await.map_err(classify)?;
        let sent = Timestamp::now();
        let started = std::time::Instant::now();
        let database = database_clock(&mut *conn).await.map_err(classify)?;
        let round_trip = micros(started.elapsed());
        let midpoint = sent
            .as_micros()
            .saturating_add(i64::try_from(round_trip / 2).unwrap_or(i64::MAX));
        Ok(ClockOffset {
            offset_micros: database.saturating_sub(midpoint),
            uncertainty_micros: round_trip.div_ceil(2),
        })
    }
}
