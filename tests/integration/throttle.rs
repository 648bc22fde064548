//! Sign-in throttling and the absence of user enumeration, on both stores:
//! failures beyond the free ones are refused with a retry delay and without
//! a password check; a success resets the username's count; the address
//! counter spans usernames; the limits hold across replicas; the hundredth
//! consecutive failure stops password sign-in until an operator enables the
//! account; concurrent failures all count. And an unknown user, a wrong
//! password and a disabled account are refused with the same status, message
//! and (within measurement noise) latency.

use std::time::{Duration, Instant};

use identity::{
    config::Config,
    domain::{
        throttle::{SignInRates, ThrottleClaim, ThrottleScope, ThrottleSettings},
        time::Timestamp,
    },
};
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

use crate::support::{
    Backend, PASSWORD, TestApp, TestDatabase, assert_status, bearer, pb, sign_in,
};

/// Runs `$name(backend)` once per backend, as `$name::sqlite` and
/// `$name::postgres` (these tests need their own settings, so they cannot use
/// `both_backends!`).
macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(crate::support::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(crate::support::Backend::Postgres).await;
            }
        }
    };
}

const WRONG: &str = "not the password at all";
const THROTTLED: &str = "ERROR_REASON_SIGN_IN_THROTTLED";
const LOCKED: &str = "ERROR_REASON_SIGN_IN_LOCKED";
const FAILED: &str = "ERROR_REASON_SIGN_IN_FAILED";

/// Applies `throttle` to a test configuration.
fn with(throttle: ThrottleSettings) -> impl FnOnce(&mut Config) {
    move |config| config.identity.sign_in_throttle = throttle
}

/// Small delays, so the tests wait little: three free failures per
/// username, then 500 ms doubling to at most 3 s; the address limit out of
/// the way.
fn quick() -> ThrottleSettings {
    ThrottleSettings {
        account_free_failures: 3,
        address_free_failures: 1_000_000,
        base_delay: Duration::from_millis(500),
        max_delay: Duration::from_secs(3),
        ..ThrottleSettings::default()
    }
}

/// The RetryInfo delay of a throttled answer.
fn retry_delay(status: &Status) -> Duration {
    status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a throttled answer carries a RetryInfo")
}

/// Creates a person with [`PASSWORD`] (without signing it in).
async fn create_person(app: &TestApp, username: &str) -> pb::Account {
    app.accounts()
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: username.into(),
                password: PASSWORD.into(),
                kind: pb::AccountKind::Person as i32,
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("create a person")
        .into_inner()
        .account
        .expect("account")
}

async fn failures_beyond_the_free_ones_wait_a_doubling_delay_and_check_no_password(
    backend: Backend,
) {
    // Delays long enough that a busy machine cannot outlast them by
    // accident; the test moves the server's clock through them.
    let app = TestApp::spawn_with(
        backend,
        with(ThrottleSettings {
            base_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(8),
            ..quick()
        }),
    )
    .await;
    let alice = create_person(&app, "alice").await;
    // A real username (in another case: the key is normalised) and an
    // unknown one go through exactly the same steps.
    let mut answers = Vec::new();
    let mut first = Duration::ZERO;
    for username in ["Alice", "nobody"] {
        let mut seen = Vec::new();
        // Three free failures, and a fourth that arms the first delay.
        for _ in 0..4 {
            let status = assert_status(
                sign_in(&app, username, WRONG).await,
                Code::Unauthenticated,
                FAILED,
            );
            seen.push(status.message().to_owned());
        }
        let hashes = app.identity.password_verifications();
        let status = assert_status(
            sign_in(&app, username, WRONG).await,
            Code::ResourceExhausted,
            THROTTLED,
        );
        // The delay runs from the claim, before the previous attempt's
        // hash: allow for a slow hash on a busy machine.
        let delay = retry_delay(&status);
        assert!(
            delay > Duration::from_millis(500) && delay <= Duration::from_secs(2),
            "{username}: the first delay is the base delay, less the time since: {delay:?}"
        );
        if username == "Alice" {
            first = delay;
        }
        // Even the right password is refused during the backoff, and no
        // refused attempt computes a hash.
        for _ in 0..5 {
            assert_status(
                sign_in(&app, username, PASSWORD).await,
                Code::ResourceExhausted,
                THROTTLED,
            );
        }
        assert_eq!(
            app.identity.password_verifications(),
            hashes,
            "{username}: a throttled attempt checked a password"
        );
        answers.push(seen);
    }
    assert_eq!(answers[0], answers[1], "an unknown username reads the same");
    // After the delay, one more failure doubles it.
    app.clock().advance(first);
    assert_status(
        sign_in(&app, "alice", WRONG).await,
        Code::Unauthenticated,
        FAILED,
    );
    let status = assert_status(
        sign_in(&app, "alice", PASSWORD).await,
        Code::ResourceExhausted,
        THROTTLED,
    );
    let second = retry_delay(&status);
    assert!(
        second > Duration::from_secs(2) && second <= Duration::from_secs(4),
        "the second delay doubles: {second:?}"
    );
    // Once the delay is over, the right password works and resets the
    // count: the free failures again.
    app.clock().advance(second);
    sign_in(&app, "alice", PASSWORD)
        .await
        .expect("the right password after the delay");
    for _ in 0..4 {
        assert_status(
            sign_in(&app, "alice", WRONG).await,
            Code::Unauthenticated,
            FAILED,
        );
    }
    assert_status(
        sign_in(&app, "alice", WRONG).await,
        Code::ResourceExhausted,
        THROTTLED,
    );
    // Each block is audited once, however many attempts it refused: the
    // first block, the doubled one, and the one after the reset.
    let throttled = app
        .audit(&alice.account_id, &[pb::AuditEventType::SignInThrottled])
        .await;
    assert_eq!(throttled.len(), 3, "{throttled:?}");
    assert!(
        throttled
            .iter()
            .all(|e| e.outcome == pb::AuditOutcome::Failure as i32)
    );
    app.stop().await;
}

on_both!(failures_beyond_the_free_ones_wait_a_doubling_delay_and_check_no_password);

async fn the_address_limit_spans_usernames(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        with(ThrottleSettings {
            account_free_failures: 100,
            address_free_failures: 4,
            base_delay: Duration::from_secs(30),
            ..quick()
        }),
    )
    .await;
    create_person(&app, "carol").await;
    for i in 0..5 {
        assert_status(
            sign_in(&app, &format!("sprayed-{i}"), WRONG).await,
            Code::Unauthenticated,
            FAILED,
        );
    }
    let hashes = app.identity.password_verifications();
    // Another username, even with its right password, from the same address.
    let status = assert_status(
        sign_in(&app, "carol", PASSWORD).await,
        Code::ResourceExhausted,
        THROTTLED,
    );
    let delay = retry_delay(&status);
    assert!(
        delay > Duration::from_secs(20) && delay <= Duration::from_secs(30),
        "{delay:?}"
    );
    assert_eq!(app.identity.password_verifications(), hashes);
    app.stop().await;
}
on_both!(the_address_limit_spans_usernames);

async fn successes_do_not_count_against_the_address(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        with(ThrottleSettings {
            address_free_failures: 2,
            ..quick()
        }),
    )
    .await;
    create_person(&app, "dave").await;
    // Many people behind one address sign in fine.
    for _ in 0..5 {
        sign_in(&app, "dave", PASSWORD).await.expect("sign in");
    }
    assert_status(
        sign_in(&app, "dave", WRONG).await,
        Code::Unauthenticated,
        FAILED,
    );
    sign_in(&app, "dave", PASSWORD)
        .await
        .expect("one failure is within the address's two free ones");
    app.stop().await;
}
on_both!(successes_do_not_count_against_the_address);

/// One person signing in from a few places at once (with the default
/// limits) is never throttled: attempts that arm no delay must not refuse
/// a concurrent one whose clock reading is a little older. (Attempts are
/// counted when they start, so more concurrent attempts than the free
/// failures would be throttled by design.)
async fn concurrent_right_passwords_are_never_throttled(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    create_person(&app, "erin").await;
    let concurrent = ThrottleSettings::default().account_free_failures;
    for round in 0..10 {
        let attempts: Vec<_> = (0..concurrent)
            .map(|_| {
                let mut accounts = app.accounts();
                tokio::spawn(async move {
                    accounts
                        .sign_in(pb::SignInRequest {
                            username: "erin".into(),
                            password: PASSWORD.into(),
                        })
                        .await
                })
            })
            .collect();
        for (i, attempt) in attempts.into_iter().enumerate() {
            if let Err(status) = attempt.await.expect("join") {
                panic!("round {round}, attempt {i}: {status:?}");
            }
        }
    }
    app.stop().await;
}
on_both!(concurrent_right_passwords_are_never_throttled);

/// More concurrent right-password sign-ins for one username than its free
/// failures, queued behind one hashing thread, all succeed: an attempt the
/// throttle refuses while others are in flight waits for one to resolve
/// (the first success resets the count) instead of being refused.
async fn more_concurrent_right_passwords_than_free_failures_all_succeed(backend: Backend) {
    // Delays far longer than an attempt ever waits, so that no claim is
    // admitted because a delay ran out.
    let settings = ThrottleSettings {
        base_delay: Duration::from_secs(60),
        max_delay: Duration::from_secs(120),
        ..ThrottleSettings::default()
    };
    let app = TestApp::spawn_with(backend, |config| {
        config.hash_concurrency = 1;
        config.identity.sign_in_throttle = settings;
    })
    .await;
    create_person(&app, "erin").await;
    let concurrent = 2 * ThrottleSettings::default().account_free_failures + 2;
    let hashes = app.identity.password_verifications();
    let attempts: Vec<_> = (0..concurrent)
        .map(|_| {
            let mut accounts = app.accounts();
            tokio::spawn(async move {
                accounts
                    .sign_in(pb::SignInRequest {
                        username: "erin".into(),
                        password: PASSWORD.into(),
                    })
                    .await
            })
        })
        .collect();
    for (i, attempt) in attempts.into_iter().enumerate() {
        if let Err(status) = attempt.await.expect("join") {
            panic!("attempt {i} of {concurrent}: {status:?}");
        }
    }
    assert_eq!(
        app.identity.password_verifications() - hashes,
        u64::from(concurrent),
        "one check each"
    );
    // Concurrent wrong guesses still get no more checks than sequential
    // ones: the free failures and the one that arms the delay.
    let hashes = app.identity.password_verifications();
    let guesses: Vec<_> = (0..concurrent)
        .map(|_| {
            let mut accounts = app.accounts();
            tokio::spawn(async move {
                accounts
                    .sign_in(pb::SignInRequest {
                        username: "erin".into(),
                        password: WRONG.into(),
                    })
                    .await
            })
        })
        .collect();
    let mut throttled = 0;
    for guess in guesses {
        let status = guess.await.expect("join").expect_err("a wrong password");
        if status.code() == Code::ResourceExhausted {
            throttled += 1;
        }
    }
    let free = ThrottleSettings::default().account_free_failures;
    assert_eq!(
        app.identity.password_verifications() - hashes,
        u64::from(free + 1)
    );
    assert_eq!(throttled, concurrent - free - 1);
    app.stop().await;
}
on_both!(more_concurrent_right_passwords_than_free_failures_all_succeed);

async fn the_limits_hold_across_replicas(backend: Backend) {
    let settings = ThrottleSettings {
        base_delay: Duration::from_secs(30),
        max_delay: Duration::from_secs(60),
        ..quick()
    };
    let first = TestApp::spawn_with(backend, with(settings.clone())).await;
    let second = first.replica_with(with(settings)).await;
    create_person(&first, "erin").await;
    assert_status(
        sign_in(&second, "erin", WRONG).await,
        Code::Unauthenticated,
        FAILED,
    );
    assert_status(
        sign_in(&first, "erin", WRONG).await,
        Code::Unauthenticated,
        FAILED,
    );
    assert_status(
        sign_in(&second, "erin", WRONG).await,
        Code::Unauthenticated,
        FAILED,
    );
    assert_status(
        sign_in(&first, "erin", WRONG).await,
        Code::Unauthenticated,
        FAILED,
    );
    for replica in [&second, &first] {
        let status = assert_status(
            sign_in(replica, "erin", PASSWORD).await,
            Code::ResourceExhausted,
            THROTTLED,
        );
        assert!(retry_delay(&status) > Duration::from_secs(20));
    }
    second.stop().await;
    first.stop().await;
}
on_both!(the_limits_hold_across_replicas);

async fn the_hundredth_failure_locks_password_sign_in_until_an_operator_enables_the_account(
    backend: Backend,
) {
    // No backoff before the lock, so that the test reaches it quickly: the
    // lock itself is the default, NIST's 100.
    let app = TestApp::spawn_with(
        backend,
        with(ThrottleSettings {
            account_free_failures: 100,
            address_free_failures: 1_000_000,
            ..ThrottleSettings::default()
        }),
    )
    .await;
    let frank = create_person(&app, "frank").await;
    // One session survives the lock: sessions and tokens are not affected.
    let session = sign_in(&app, "frank", PASSWORD).await.expect("sign in");
    let mut answers = Vec::new();
    for username in ["frank", "ghost"] {
        for i in 0..100 {
            let status = sign_in(&app, username, WRONG)
                .await
                .expect_err("a wrong password");
            assert_eq!(status.code(), Code::Unauthenticated, "{username} #{i}");
        }
        let hashes = app.identity.password_verifications();
        let status = assert_status(
            sign_in(&app, username, PASSWORD).await,
            Code::FailedPrecondition,
            LOCKED,
        );
        assert_eq!(app.identity.password_verifications(), hashes);
        answers.push(status.message().to_owned());
    }
    assert_eq!(
        answers[0], answers[1],
        "a lock reads the same for an unknown username"
    );
    assert!(app.verify(&session, &[]).await.active);
    // The operator lifts it (the account was never disabled).
    app.accounts()
        .enable_account(bearer(
            pb::EnableAccountRequest {
                account_id: frank.account_id.clone(),
            },
            &app.operator_token,
        ))
        .await
        .expect("enable");
    sign_in(&app, "frank", PASSWORD)
        .await
        .expect("signs in after the operator's EnableAccount");
    assert_status(
        sign_in(&app, "ghost", PASSWORD).await,
        Code::FailedPrecondition,
        LOCKED,
    );
    app.stop().await;
}
on_both!(the_hundredth_failure_locks_password_sign_in_until_an_operator_enables_the_account);

async fn change_password_counts_and_obeys_the_username_limit(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        with(ThrottleSettings {
            account_free_failures: 100,
            lockout_failures: 3,
            ..quick()
        }),
    )
    .await;
    let gwen = create_person(&app, "gwen").await;
    let session = sign_in(&app, "gwen", PASSWORD).await.expect("sign in");
    const NEW: &str = "a brand new passphrase 9";
    let change = |current: &'static str| {
        let mut client = app.accounts();
        let request = bearer(
            pb::ChangePasswordRequest {
                current_password: current.into(),
                new_password: NEW.into(),
            },
            &session,
        );
        async move { client.change_password(request).await }
    };
    // Wrong current passwords are failures of the username, like sign-ins.
    for _ in 0..2 {
        assert_status(change(WRONG).await, Code::Unauthenticated, FAILED);
    }
    assert_status(
        sign_in(&app, "gwen", WRONG).await,
        Code::Unauthenticated,
        FAILED,
    );
    // Three failures in all: locked, for both ways of checking a password,
    // and neither checks it.
    let hashes = app.identity.password_verifications();
    assert_status(
        sign_in(&app, "gwen", PASSWORD).await,
        Code::FailedPrecondition,
        LOCKED,
    );
    assert_status(change(PASSWORD).await, Code::FailedPrecondition, LOCKED);
    assert_eq!(app.identity.password_verifications(), hashes);
    app.accounts()
        .enable_account(bearer(
            pb::EnableAccountRequest {
                account_id: gwen.account_id,
            },
            &app.operator_token,
        ))
        .await
        .expect("enable");
    change(PASSWORD)
        .await
        .expect("the change after EnableAccount");
    // The change started the count afresh: two failures do not lock.
    for _ in 0..2 {
        assert_status(
            sign_in(&app, "gwen", WRONG).await,
            Code::Unauthenticated,
            FAILED,
        );
    }
    sign_in(&app, "gwen", NEW).await.expect("the new password");
    app.stop().await;
}
on_both!(change_password_counts_and_obeys_the_username_limit);

async fn concurrent_attempts_all_count_and_only_the_allowed_ones_pass(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let now = Timestamp::now();
    let claims = |settings: &ThrottleSettings, name: &str| -> Vec<ThrottleClaim> {
        settings.claims(name, "10.0.0.1:1234", now)[..1].to_vec()
    };
    // 40 concurrent failures, no backoff before the 40th: every one counts,
    // so the 41st is refused by the lock at 40.
    let lenient = ThrottleSettings {
        account_free_failures: 100,
        lockout_failures: 40,
        ..ThrottleSettings::default()
    };
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let store = store.clone();
            let claims = claims(&lenient, "racer");
            tokio::spawn(async move { store.claim_sign_in(&claims, now).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("task").expect("claim"), None);
    }
    let refused = store
        .claim_sign_in(&claims(&lenient, "racer"), now)
        .await
        .expect("claim")
        .expect("the 41st attempt is refused");
    assert_eq!(refused[0].scope, ThrottleScope::Account);
    assert_eq!(refused[0].failures, 40);
    // With no free failure, exactly one of 40 concurrent attempts passes.
    let strict = ThrottleSettings {
        account_free_failures: 0,
        ..ThrottleSettings::default()
    };
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let store = store.clone();
            let claims = claims(&strict, "sprinter");
            tokio::spawn(async move { store.claim_sign_in(&claims, now).await })
        })
        .collect();
    let mut passed = 0;
    for task in tasks {
        if task.await.expect("task").expect("claim").is_none() {
            passed += 1;
        }
    }
    assert_eq!(passed, 1);
}
on_both!(concurrent_attempts_all_count_and_only_the_allowed_ones_pass);

/// The failures a counter holds (0 when it has no row), read behind the
/// store's back.
pub(crate) async fn stored_failures(url: &str, scope: &str, subject: &str) -> i64 {
    use sqlx::Connection;
    let query = "SELECT failures FROM sign_in_throttle WHERE scope = $1 AND subject = $2";
    let found: Option<i64> = if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.expect("open");
        sqlx::query_scalar(query)
            .bind(scope)
            .bind(subject)
            .fetch_optional(&mut conn)
            .await
            .expect("read the counter")
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        sqlx::query_scalar(query)
            .bind(scope)
            .bind(subject)
            .fetch_optional(&mut conn)
            .await
            .expect("read the counter")
    };
    found.unwrap_or(0)
}

/// A claim given back undoes only the count it was counted in: not one an
/// account reset started since, nor one the address's forgetting restarted
/// at one. Within its own count, it is taken back.
async fn a_give_back_undoes_only_its_own_count(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let settings = ThrottleSettings {
        account_free_failures: 100,
        address_free_failures: 100,
        address_memory: Duration::from_secs(1),
        ..ThrottleSettings::default()
    };
    let t0 = Timestamp::now();
    let t1 = Timestamp::from_micros(t0.as_micros() + 5_000_000);
    let (early, late) = (
        settings.claims("mo", "10.0.0.7:1", t0),
        settings.claims("mo", "10.0.0.7:1", t1),
    );
    let failures = |scope: &'static str, subject: &'static str| {
        let url = db.url.clone();
        async move { stored_failures(&url, scope, subject).await }
    };
    for _ in 0..2 {
        assert_eq!(store.claim_sign_in(&early, t0).await.expect("claim"), None);
    }
    // Its own count: taken back from both counters.
    store
        .give_back_sign_in(&early, t0)
        .await
        .expect("give back");
    assert_eq!(failures("account", "mo").await, 1);
    assert_eq!(failures("address", "10.0.0.7").await, 1);
    // The username's counter is reset and the address's forgotten (its
    // last attempt is older than its memory): both restart at one.
    store.reset_sign_in_failures("mo").await.expect("reset");
    assert_eq!(store.claim_sign_in(&late, t1).await.expect("claim"), None);
    assert_eq!(failures("account", "mo").await, 1);
    assert_eq!(failures("address", "10.0.0.7").await, 1);
    // The early claim's give-back finds neither of its counts.
    store
        .give_back_sign_in(&early, t0)
        .await
        .expect("give back");
    assert_eq!(failures("account", "mo").await, 1, "the reset count stands");
    assert_eq!(
        failures("address", "10.0.0.7").await,
        1,
        "the restarted count stands"
    );
    // The late claim's own give-back still applies.
    store.give_back_sign_in(&late, t1).await.expect("give back");
    assert_eq!(failures("account", "mo").await, 0);
    assert_eq!(failures("address", "10.0.0.7").await, 0);
}
on_both!(a_give_back_undoes_only_its_own_count);

/// Applies the per-replica password-check rates (the harness otherwise
/// sets them out of the way).
fn rates(account_per_minute: u32, address_per_minute: u32) -> impl FnOnce(&mut Config) {
    move |config| {
        config.identity.sign_in_rates = SignInRates {
            account_per_minute,
            address_per_minute,
        }
    }
}

const RATE_LIMITED: &str = "ERROR_REASON_RATE_LIMITED";

async fn right_passwords_beyond_the_account_rate_are_refused_without_a_hash(backend: Backend) {
    let app = TestApp::spawn_with(backend, rates(3, 1_000)).await;
    create_person(&app, "kim").await;
    create_person(&app, "lee").await;
    for _ in 0..3 {
        sign_in(&app, "kim", PASSWORD)
            .await
            .expect("within the rate");
    }
    let hashes = app.identity.password_verifications();
    let status = assert_status(
        sign_in(&app, "kim", PASSWORD).await,
        Code::ResourceExhausted,
        RATE_LIMITED,
    );
    let wait = retry_delay(&status);
    assert!(
        wait > Duration::from_secs(10) && wait <= Duration::from_secs(20),
        "one check of 3 a minute comes back within 20 s: {wait:?}"
    );
    assert_eq!(
        app.identity.password_verifications(),
        hashes,
        "a limited sign-in costs no hash"
    );
    // The refused attempt was not counted by the failure throttle either,
    // and another account is unaffected.
    sign_in(&app, "lee", PASSWORD)
        .await
        .expect("another username");
    app.stop().await;
}
on_both!(right_passwords_beyond_the_account_rate_are_refused_without_a_hash);

async fn right_passwords_beyond_the_address_rate_are_refused_without_a_hash(backend: Backend) {
    let app = TestApp::spawn_with(backend, rates(1_000, 3)).await;
    for name in ["mia", "ned", "oli", "pat"] {
        create_person(&app, name).await;
    }
    for name in ["mia", "ned", "oli"] {
        sign_in(&app, name, PASSWORD)
            .await
            .expect("within the rate");
    }
    let hashes = app.identity.password_verifications();
    let status = assert_status(
        sign_in(&app, "pat", PASSWORD).await,
        Code::ResourceExhausted,
        RATE_LIMITED,
    );
    assert!(retry_delay(&status) > Duration::ZERO);
    assert_eq!(app.identity.password_verifications(), hashes);
    app.stop().await;
}
on_both!(right_passwords_beyond_the_address_rate_are_refused_without_a_hash);

async fn change_password_is_rate_limited_like_sign_in(backend: Backend) {
    let app = TestApp::spawn_with(backend, rates(2, 1_000)).await;
    create_person(&app, "quinn").await;
    let session = sign_in(&app, "quinn", PASSWORD).await.expect("sign in");
    const NEW: &str = "a brand new passphrase 9";
    let change = |current: &'static str, new: &'static str| {
        let mut client = app.accounts();
        let request = bearer(
            pb::ChangePasswordRequest {
                current_password: current.into(),
                new_password: new.into(),
            },
            &session,
        );
        async move { client.change_password(request).await }
    };
    change(PASSWORD, NEW).await.expect("the second check");
    let hashes = app.identity.password_verifications();
    assert_status(
        change(NEW, PASSWORD).await,
        Code::ResourceExhausted,
        RATE_LIMITED,
    );
    assert_status(
        sign_in(&app, "quinn", NEW).await,
        Code::ResourceExhausted,
        RATE_LIMITED,
    );
    assert_eq!(
        app.identity.password_verifications(),
        hashes,
        "neither limited check hashed anything"
    );
    app.stop().await;
}
on_both!(change_password_is_rate_limited_like_sign_in);

// ---------------------------------------------------------------------------
// No user enumeration.

/// Whether two kinds of attempt take distinguishable time. `a[i]` and `b[i]`
/// were measured in the same round, moments apart, so the machine's load
/// (shared, and it drifts) weighs on both alike: the statistic is the median,
/// over rounds, of the log-ratio `ln(a[i] / b[i])`, and the kinds differ when
/// it exceeds `ln(1 + tolerance)` either way. Pairing cancels the drift, the
/// median the outliers; a path that skips or adds an argon2 verification
/// moves it by a multiple of the tolerance.
fn distinguishable(a: &[Duration], b: &[Duration], tolerance: f64) -> bool {
    median_log_ratio(a, b).abs() > (1.0 + tolerance).ln()
}

/// The median over rounds of `ln(a[i] / b[i])`.
fn median_log_ratio(a: &[Duration], b: &[Duration]) -> f64 {
    assert_eq!(a.len(), b.len(), "paired samples");
    assert!(!a.is_empty(), "samples");
    let mut ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x.as_secs_f64().max(1e-9) / y.as_secs_f64().max(1e-9)).ln())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let mid = ratios.len() / 2;
    if ratios.len().is_multiple_of(2) {
        (ratios[mid - 1] + ratios[mid]) / 2.0
    } else {
        ratios[mid]
    }
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// The `i`-th sign-in attempt of one kind: username and password.
type Attempt = fn(usize) -> (String, &'static str);

/// How far apart (as a fraction) two kinds' typical times may be before the
/// test calls them different.
const TOLERANCE: f64 = 0.25;

#[test]
fn the_statistic_tells_a_real_difference_from_noise() {
    // Rounds under a load that drifts threefold, with up to 60% noise per
    // sample, and one sample in seven a tenfold outlier.
    let rounds = |base_a_ms: f64, base_b_ms: f64| -> (Vec<Duration>, Vec<Duration>) {
        let mut x: u64 = 7;
        let mut noise = move || {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (x >> 33) as f64 / f64::from(u32::MAX >> 1) * 0.6
        };
        let mut a = Vec::new();
        let mut b = Vec::new();
        for i in 0..45 {
            let load = 1.0 + 2.0 * (f64::from(i) / 45.0);
            let spike = |k: i32| if (i + k) % 7 == 0 { 10.0 } else { 1.0 };
            let sample = |base: f64, n: f64, k| {
                Duration::from_secs_f64(base * load * (1.0 + n) * spike(k) / 1000.0)
            };
            a.push(sample(base_a_ms, noise(), 0));
            b.push(sample(base_b_ms, noise(), 3));
        }
        (a, b)
    };
    // Same cost: not distinguishable, whatever the load does.
    let (a, b) = rounds(20.0, 20.0);
    assert!(!distinguishable(&a, &b, TOLERANCE));
    // One argon2 verification skipped, or one added: distinguishable.
    let (a, b) = rounds(20.0, 1.0);
    assert!(distinguishable(&a, &b, TOLERANCE));
    let (a, b) = rounds(20.0, 40.0);
    assert!(distinguishable(&a, &b, TOLERANCE));
}

async fn unknown_wrong_and_disabled_sign_ins_look_and_take_the_same(backend: Backend) {
    // Throttling out of the way: no delay below 100 failures, and fewer
    // attempts than that per username.
    let app = TestApp::spawn_with(
        backend,
        with(ThrottleSettings {
            account_free_failures: 100,
            address_free_failures: 1_000_000,
            ..ThrottleSettings::default()
        }),
    )
    .await;
    // The positive control, on a server of its own: an attempt the throttle
    // refuses (no argon2) must look different to the same statistic.
    let control = TestApp::spawn_with(
        backend,
        with(ThrottleSettings {
            account_free_failures: 0,
            address_free_failures: 1_000_000,
            base_delay: Duration::from_secs(600),
            ..ThrottleSettings::default()
        }),
    )
    .await;
    create_person(&app, "henry").await;
    let ivy = create_person(&app, "ivy").await;
    app.accounts()
        .disable_account(bearer(
            pb::DisableAccountRequest {
                account_id: ivy.account_id,
            },
            &app.operator_token,
        ))
        .await
        .expect("disable");
    let _ = sign_in(&control, "blocked", WRONG).await;
    const ROUNDS: usize = 45;
    let kinds: [(&str, Attempt); 3] = [
        ("unknown user", |i| (format!("nobody-{i}"), PASSWORD)),
        ("wrong password", |_| ("henry".to_owned(), WRONG)),
        // The disabled account with its right password, or a wrong one:
        // neither may differ from the others.
        ("disabled account", |i| {
            ("ivy".to_owned(), if i % 2 == 0 { PASSWORD } else { WRONG })
        }),
    ];
    let mut timings = vec![Vec::new(); kinds.len()];
    let mut refused = Vec::new();
    let mut answers = Vec::new();
    // Warm up the connection and the database before measuring.
    let _ = sign_in(&app, "warm-up", WRONG).await;
    for i in 0..ROUNDS {
        // One attempt of each kind per round, in a rotating order.
        for k in 0..kinds.len() {
            let kind = (i + k) % kinds.len();
            let (username, password) = (kinds[kind].1)(i);
            let started = Instant::now();
            let status = sign_in(&app, &username, password)
                .await
                .expect_err("every kind fails");
            timings[kind].push(started.elapsed());
            answers.push((
                status.code(),
                status.message().to_owned(),
                crate::support::reason(&status),
            ));
        }
        let started = Instant::now();
        let status = sign_in(&control, "blocked", WRONG)
            .await
            .expect_err("throttled");
        refused.push(started.elapsed());
        assert_eq!(status.code(), Code::ResourceExhausted);
    }
    answers.dedup();
    assert_eq!(
        answers,
        vec![(
            Code::Unauthenticated,
            "unknown username or wrong password".to_owned(),
            FAILED.to_owned()
        )],
        "every kind must give the same status, message and reason"
    );
    let medians: Vec<_> = timings.iter().map(|t| median(t)).collect();
    eprintln!(
        "{backend:?}: median latencies {medians:?}; throttled refusal {:?}",
        median(&refused)
    );
    for a in 0..kinds.len() {
        for b in a + 1..kinds.len() {
            let ratio = median_log_ratio(&timings[a], &timings[b]).exp();
            eprintln!(
                "{backend:?}: {} / {}: median paired ratio {ratio:.3}",
                kinds[a].0, kinds[b].0
            );
            assert!(
                !distinguishable(&timings[a], &timings[b], TOLERANCE),
                "{} and {} sign-ins take distinguishable time (median paired ratio {ratio:.3}; medians {medians:?})",
                kinds[a].0,
                kinds[b].0
            );
        }
    }
    assert!(
        distinguishable(&timings[1], &refused, TOLERANCE),
        "the statistic cannot see the cost of a hash: {:?} vs {:?}",
        medians[1],
        median(&refused)
    );
    control.stop().await;
    app.stop().await;
}
on_both!(unknown_wrong_and_disabled_sign_ins_look_and_take_the_same);
