//! The sign-in throttle: counters claimed before a password is checked,
//! reset or given back after.

use super::{
    SqlStore, StorageError, ThrottleClaim, ThrottleCounter, Timestamp, execute, fetch_optional,
};
use crate::storage::{
    backend::{Backend, Bind as _},
    rows::SqlRow as _,
};

/// A sign-in counter's count after one more attempt: one if its previous
/// attempt is older than `$8` (forgotten).
macro_rules! throttle_next {
    () => {
        "(CASE WHEN sign_in_throttle.last_attempt < $8 THEN 1 \
         ELSE sign_in_throttle.failures + 1 END)"
    };
}

/// The delay (microseconds) that count arms, as `throttle::Backoff`
/// computes it: none below `$4` (the first delayed count), then `$5 <<
/// (count - $4)`, or the cap `$6` from the shift `$7` on (so the shift never
/// overflows).
macro_rules! throttle_delay {
    () => {
        concat!(
            "(CASE WHEN ",
            throttle_next!(),
            " < $4 THEN 0 WHEN ",
            throttle_next!(),
            " - $4 >= $7 THEN $6 ELSE $5 << CAST(",
            throttle_next!(),
            " - $4 AS INTEGER) END)"
        )
    };
}

/// Counts one attempt against a counter unless it is in backoff (`$3`: now)
/// or locked (`$10` failures), in one statement, so that concurrent attempts
/// serialise on the row and each sees the others' counts. A count that arms
/// no delay leaves `blocked_until` alone: setting it to "now" would refuse a
/// concurrent attempt whose clock reading is a microsecond older. `$9`: the delay a
/// first failure arms. `count_since` says when the current count began:
/// now for a new row or a forgotten count that restarts at one (see
/// [`UNCOUNT_SIGN_IN`]). Returns no row when refused.
pub(super) const CLAIM_SIGN_IN: &str = concat!(
    "INSERT INTO sign_in_throttle \
     (scope, subject, failures, last_attempt, blocked_until, reported_until, count_since) \
     VALUES ($1, $2, 1, $3, CASE WHEN $9 = 0 THEN 0 ELSE $3 + $9 END, 0, $3) \
     ON CONFLICT (scope, subject) DO UPDATE SET failures = ",
    throttle_next!(),
    ", count_since = CASE WHEN sign_in_throttle.last_attempt < $8 THEN $3 \
     ELSE sign_in_throttle.count_since END",
    ", last_attempt = $3, blocked_until = CASE WHEN ",
    throttle_delay!(),
    " = 0 THEN sign_in_throttle.blocked_until ELSE $3 + ",
    throttle_delay!(),
    " END WHERE sign_in_throttle.blocked_until <= $3 AND sign_in_throttle.failures < $10 \
     RETURNING failures"
);
pub(super) const SIGN_IN_COUNTER: &str = "SELECT failures, blocked_until FROM sign_in_throttle \
    WHERE scope = $1 AND subject = $2";
/// Marks a counter's current block as audited; changes nothing (and returns
/// no row) if it already was.
pub(super) const REPORT_SIGN_IN_BLOCK: &str = "UPDATE sign_in_throttle \
    SET reported_until = blocked_until \
    WHERE scope = $1 AND subject = $2 AND reported_until < blocked_until";
pub(super) const RESET_SIGN_IN_ACCOUNT: &str =
    "DELETE FROM sign_in_throttle WHERE scope = 'account' AND subject = $1";
/// Takes back one attempt claimed at `$3`, from the count it was counted in
/// only: a count that began after the claim (the row was deleted by a reset
/// and inserted again, or its count was forgotten and restarted at one)
/// holds none of the claim's failure, and giving it back there would erase
/// a later, checked guess. A later count's `count_since` is past `$3` by
/// construction: it is the instant of a claim that followed the reset,
/// itself after this claim (on one replica's clock; across replicas, up to
/// their clock skew, which errs either way by at most the give-backs of
/// claims made within that skew of a reset).
pub(super) const UNCOUNT_SIGN_IN: &str = "UPDATE sign_in_throttle \
    SET failures = failures - 1 \
    WHERE scope = $1 AND subject = $2 AND failures > 0 AND count_since <= $3";
pub(super) const UNCOUNT_SIGN_IN_ADDRESS: &str = "UPDATE sign_in_throttle \
    SET failures = failures - 1 WHERE scope = 'address' AND subject = $1 AND failures > 0";

pub(super) async fn claim_sign_in<B: Backend>(
    store: &SqlStore<B>,
    claims: &[ThrottleClaim],
    now: Timestamp,
) -> Result<Option<Vec<ThrottleCounter>>, StorageError> {
    // A counter may stop refusing between the failed claim and
    // the read (its block ends, or a success resets it): then
    // claim again, a few times at most.
    for _ in 0..3 {
        if try_claim_sign_in(store, claims, now).await? {
            return Ok(None);
        }
        let mut counters = Vec::with_capacity(claims.len());
        for claim in claims {
            let row = store
                .fetch_optional(
                    sqlx::query(SIGN_IN_COUNTER)
                        .arg(claim.scope.as_str())
                        .arg(claim.subject.as_str()),
                )
                .await?;
            let Some(row) = row else {
                continue;
            };
            let (failures, blocked_until) = (row.int("failures")?, row.int("blocked_until")?);
            let refusing = blocked_until > now.as_micros() || failures >= claim.lockout;
            let first_refusal = refusing
                && store
                    .execute(
                        sqlx::query(REPORT_SIGN_IN_BLOCK)
                            .arg(claim.scope.as_str())
                            .arg(claim.subject.as_str()),
                    )
                    .await?
                    > 0;
            counters.push(ThrottleCounter {
                scope: claim.scope,
                failures,
                blocked_until: Timestamp::from_micros(blocked_until),
                refusing,
                first_refusal,
            });
        }
        if counters.iter().any(|c| c.refusing) {
            return Ok(Some(counters));
        }
    }
    Err(StorageError::Unavailable(
        "sign-in counters kept changing under contention".into(),
    ))
}

pub(super) async fn sign_in_succeeded<B: Backend>(
    store: &SqlStore<B>,
    username_key: &str,
    address_key: &str,
) -> Result<(), StorageError> {
    let mut tx = store.begin().await?;
    execute::<B>(
        &mut tx,
        sqlx::query(RESET_SIGN_IN_ACCOUNT).arg(username_key),
    )
    .await?;
    execute::<B>(
        &mut tx,
        sqlx::query(UNCOUNT_SIGN_IN_ADDRESS).arg(address_key),
    )
    .await?;
    tx.commit().await.map_err(B::classify)
}

pub(super) async fn give_back_sign_in<B: Backend>(
    store: &SqlStore<B>,
    claims: &[ThrottleClaim],
    claimed_at: Timestamp,
) -> Result<(), StorageError> {
    let mut tx = store.begin().await?;
    for claim in claims {
        execute::<B>(
            &mut tx,
            sqlx::query(UNCOUNT_SIGN_IN)
                .arg(claim.scope.as_str())
                .arg(claim.subject.as_str())
                .arg(claimed_at.as_micros()),
        )
        .await?;
    }
    tx.commit().await.map_err(B::classify)
}

pub(super) async fn reset_sign_in_failures<B: Backend>(
    store: &SqlStore<B>,
    username_key: &str,
) -> Result<(), StorageError> {
    store
        .execute(sqlx::query(RESET_SIGN_IN_ACCOUNT).arg(username_key))
        .await
        .map(drop)
}

/// Claims the attempt against every counter in one transaction:
/// `true` if all counted it, `false` (nothing changed) if one
/// refused. Counters are always claimed in the same order
/// (username before address), so concurrent claims cannot
/// deadlock.
async fn try_claim_sign_in<B: Backend>(
    store: &SqlStore<B>,
    claims: &[ThrottleClaim],
    now: Timestamp,
) -> Result<bool, StorageError> {
    let mut tx = store.begin().await?;
    for claim in claims {
        let curve = &claim.curve;
        let claim_one = sqlx::query(CLAIM_SIGN_IN)
            .arg(claim.scope.as_str())
            .arg(claim.subject.as_str())
            .arg(now.as_micros())
            .arg(curve.first_delayed)
            .arg(curve.base_micros)
            .arg(curve.max_micros)
            .arg(curve.max_shift)
            .arg(claim.forget_before.as_micros())
            .arg(curve.delay_micros(1))
            .arg(claim.lockout);
        if fetch_optional::<B>(&mut tx, claim_one).await?.is_none() {
            // Dropping the transaction rolls the others back.
            return Ok(false);
        }
    }
    tx.commit().await.map_err(B::classify)?;
    Ok(true)
}
