//! The password hashing queue under a flood of abandoned sign-ins, on the
//! real binary (a process of its own, so its metrics are its own): a job
//! whose call has ended is skipped unhashed, a legitimate sign-in after the
//! flood is not queued behind the abandoned ones, and the gauges and
//! counters say what really happened.

use std::time::Duration;

use tonic::{Code, Request};

use crate::{
    observability::scrape,
    support::binary::{Server, bootstrap_operator, printed_token, random_hex},
    support::{
        Backend, TestDatabase, bearer, pb, pb::accounts_service_client::AccountsServiceClient,
    },
};

/// The value of the unlabelled series `name` (0 if absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(' '))
        .filter(|(series, _)| *series == name)
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        .sum()
}

const FLOOD: usize = 100;

/// Creates the person `alice`, with a random password, which it returns.
async fn create_alice(
    accounts: &mut AccountsServiceClient<tonic::transport::Channel>,
    operator: &str,
) -> String {
    let password = format!("right-{}-password", random_hex());
    accounts
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "alice".into(),
                password: password.clone(),
                kind: pb::AccountKind::Person as i32,
                ..Default::default()
            },
            operator,
        ))
        .await
        .expect("create alice");
    password
}

async fn abandoned_sign_ins_are_skipped_and_delay_no_one(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let operator = printed_token(&bootstrap_operator(&db.url, "ops", &[]).await);
    // One hashing thread; the throttle and the rates out of the way (every
    // flood call counts as a failure from 127.0.0.1).
    let server = Server::start(
        &db.url,
        &[
            ("IDENTITY_HASH_CONCURRENCY", "1"),
            ("IDENTITY_SIGN_IN_ADDRESS_FREE_FAILURES", "1000000"),
            ("IDENTITY_SIGN_IN_ACCOUNT_PER_MINUTE", "1000000"),
            ("IDENTITY_SIGN_IN_ADDRESS_PER_MINUTE", "1000000"),
        ],
    )
    .await;
    let metrics = server.metrics_addr.expect("metrics are on");
    let mut accounts = AccountsServiceClient::new(server.channel().await);
    let password = create_alice(&mut accounts, &operator).await;
    let before = scrape(metrics).await;

    // A hundred sign-ins at once, on twenty connections (five on each: one
    // connection resetting a hundred streams at once is closed by HTTP/2's
    // reset-flood protection). Once at least ten of them wait in the hashing
    // queue, as the gauge says, their clients give up: each aborted call
    // resets its stream, the server drops the handler, and its job is left
    // behind in the queue. (Giving up by a deadline instead made the test
    // depend on how fast the machine was: too short and nothing queued, too
    // long and everything was hashed.)
    let mut flood = Vec::new();
    for connection in 0..FLOOD / 5 {
        let accounts = AccountsServiceClient::new(server.channel().await);
        for i in 0..5 {
            let mut accounts = accounts.clone();
            flood.push(tokio::spawn(async move {
                let mut request = Request::new(pb::SignInRequest {
                    username: format!("flood-{connection}-{i}"),
                    password: "a wrong password, whatever".into(),
                });
                request.set_timeout(Duration::from_secs(60));
                accounts.sign_in(request).await.map(drop)
            }));
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while metric(&scrape(metrics).await, "identity_password_hashes_waiting") < 10.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flood never queued ten hashes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for call in &flood {
        call.abort();
    }
    for call in flood {
        match call.await {
            Err(aborted) if aborted.is_cancelled() => {}
            Err(panicked) => panic!("a flood call panicked: {panicked}"),
            Ok(Err(status))
                if matches!(
                    status.code(),
                    Code::Unauthenticated | Code::ResourceExhausted
                ) => {}
            Ok(other) => panic!("a flood call ended with {other:?}"),
        }
    }

    // Every flood call has ended; a legitimate sign-in now queues behind
    // whatever the flood left, and succeeds.
    accounts
        .sign_in(pb::SignInRequest {
            username: "alice".into(),
            password,
        })
        .await
        .expect("the legitimate sign-in succeeds");

    let after = scrape(metrics).await;
    let grew = |name: &str| metric(&after, name) - metric(&before, name);
    let queued = grew("identity_password_hashes_queued_total");
    let completed = grew("identity_password_hashes_completed_total");
    let skipped = grew("identity_password_hashes_skipped_total");
    let summary = format!("queued {queued}, completed {completed}, skipped {skipped}");
    // Everything queued before the legitimate job (which came last) was
    // hashed or skipped by the time it was answered.
    assert_eq!(queued, completed + skipped, "{summary}");
    // The abandoned jobs were skipped, not hashed: the legitimate one did
    // not wait for them.
    assert!(skipped > 0.0, "abandoned jobs are skipped: {summary}");
    assert!(
        completed < queued,
        "not every abandoned job was hashed: {summary}"
    );
    // Nothing is left waiting or running, and the gauges say so.
    assert_eq!(metric(&after, "identity_password_hashes_waiting"), 0.0);
    assert_eq!(metric(&after, "identity_password_hashes_running"), 0.0);
    eprintln!("{summary}");
    server.terminate().await;
}

mod abandoned_sign_ins_are_skipped_and_delay_no_one {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::abandoned_sign_ins_are_skipped_and_delay_no_one(crate::support::Backend::Sqlite)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::abandoned_sign_ins_are_skipped_and_delay_no_one(crate::support::Backend::Postgres)
            .await;
    }
}

/// The username counter of `username_key` (0 when it has none).
async fn account_failures(url: &str, username_key: &str) -> i64 {
    crate::throttle::stored_failures(url, "account", username_key).await
}

/// A sign-in whose password was never checked, because a flood filled the
/// hashing queue, guessed nothing: it gives its throttle claim back, so a
/// flood cannot walk the owner towards a lockout while the owner types the
/// right password.
async fn a_sign_in_refused_by_a_full_queue_is_not_counted(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let operator = printed_token(&bootstrap_operator(&db.url, "ops", &[]).await);
    let server = Server::start(
        &db.url,
        &[
            ("IDENTITY_HASH_CONCURRENCY", "1"),
            ("IDENTITY_SIGN_IN_ADDRESS_FREE_FAILURES", "1000000"),
            ("IDENTITY_SIGN_IN_ACCOUNT_PER_MINUTE", "1000000"),
            ("IDENTITY_SIGN_IN_ADDRESS_PER_MINUTE", "1000000"),
        ],
    )
    .await;
    let mut accounts = AccountsServiceClient::new(server.channel().await);
    let password = create_alice(&mut accounts, &operator).await;

    // Wrong passwords for other usernames, forty at a time, until stopped:
    // more than the one thread and its queue of 32 hold.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for connection in 0..8 {
        let accounts = AccountsServiceClient::new(server.channel().await);
        for i in 0..5 {
            let (mut accounts, stop) = (accounts.clone(), stop.clone());
            flood.push(tokio::spawn(async move {
                // A new username each time, so that none backs off and
                // every attempt hashes.
                for n in 0.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let answer = accounts
                        .sign_in(pb::SignInRequest {
                            username: format!("flood-{connection}-{i}-{n}"),
                            password: "a wrong password, whatever".into(),
                        })
                        .await;
                    match answer {
                        Err(status)
                            if matches!(
                                status.code(),
                                Code::Unauthenticated | Code::ResourceExhausted
                            ) => {}
                        other => panic!("a flood call ended with {other:?}"),
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
    }
    // The owner signs in until the full queue refuses the attempt (one that
    // gets through succeeds and clears the counter anyway).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flood never filled the hashing queue"
        );
        let answer = accounts
            .sign_in(pb::SignInRequest {
                username: "alice".into(),
                password: password.clone(),
            })
            .await;
        match answer {
            Ok(_) => continue,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    !status.message().contains(&password),
                    "the refusal names no password"
                );
                break;
            }
            Err(status) => panic!("the owner's sign-in failed with {status:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for call in flood {
        call.await.expect("a flood call panicked");
    }
    // The claim is given back just after the refusal is answered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let failures = account_failures(&db.url, "alice").await;
        if failures == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused attempt still counts: {failures} failure(s) against alice"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the flood's checked guesses still count against their usernames
    // (any one of them may have been refused unchecked, and given back).
    let mut counted = 0;
    for connection in 0..8 {
        for i in 0..5 {
            for n in 0..3 {
                counted += account_failures(&db.url, &format!("flood-{connection}-{i}-{n}")).await;
            }
        }
    }
    assert!(counted > 0, "no checked guess of the flood counted");
    server.terminate().await;
}

mod a_sign_in_refused_by_a_full_queue_is_not_counted {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::a_sign_in_refused_by_a_full_queue_is_not_counted(crate::support::Backend::Sqlite)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::a_sign_in_refused_by_a_full_queue_is_not_counted(crate::support::Backend::Postgres)
            .await;
    }
}

/// The address counter of the test's client, 127.0.0.1 (0 when it has none).
async fn address_failures(url: &str) -> i64 {
    crate::throttle::stored_failures(url, "address", "127.0.0.1").await
}

/// Stores `hash` as `username`'s password hash, behind the server's back.
async fn store_password_hash(url: &str, username: &str, hash: &str) {
    use sqlx::Connection;
    let query = "UPDATE accounts SET password_hash = $1 WHERE username = $2";
    let updated = if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.expect("open");
        sqlx::query(query)
            .bind(hash)
            .bind(username)
            .execute(&mut conn)
            .await
            .expect("store the hash")
            .rows_affected()
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        sqlx::query(query)
            .bind(hash)
            .bind(username)
            .execute(&mut conn)
            .await
            .expect("store the hash")
            .rows_affected()
    };
    assert_eq!(updated, 1, "{username} has a row");
}

/// Polls `check` until it holds (at most a minute), saying `what` if not.
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A wrong sign-in for `username`, on a connection of its own, left running.
fn wrong_sign_in(
    accounts: &AccountsServiceClient<tonic::transport::Channel>,
    username: &str,
) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
    let (mut accounts, username) = (accounts.clone(), username.to_owned());
    tokio::spawn(async move {
        let mut request = Request::new(pb::SignInRequest {
            username,
            password: "a wrong password, whatever".into(),
        });
        request.set_timeout(Duration::from_secs(600));
        accounts.sign_in(request).await.map(drop)
    })
}

/// A claim given back (its password never checked) undoes only its own
/// count: claimed before an operator reset the username's counter, its
/// give-back must not erase the wrong guesses counted since. Otherwise a
/// guesser queues attempts behind a busy hashing queue, waits for the
/// reset, guesses, and cancels the queued ones to uncount the guesses.
///
/// The interleaving is forced: the one hashing thread is held by a
/// verification against a stored hash of thousands of passes (argon2 takes
/// its cost from the stored hash), so every later job waits in the queue
/// until its call is cancelled; each step waits for the gauges and the
/// counters to say it happened.
async fn a_give_back_spares_guesses_counted_after_a_reset(backend: Backend) {
    const HELD: i64 = 5;
    const GUESSES: i64 = 3;
    let db = TestDatabase::new(backend).await;
    let operator = printed_token(&bootstrap_operator(&db.url, "ops", &[]).await);
    let server = Server::start(
        &db.url,
        &[
            ("IDENTITY_HASH_CONCURRENCY", "1"),
            ("IDENTITY_SIGN_IN_FREE_FAILURES", "100"),
            ("IDENTITY_SIGN_IN_ADDRESS_FREE_FAILURES", "1000000"),
            ("IDENTITY_SIGN_IN_ACCOUNT_PER_MINUTE", "1000000"),
            ("IDENTITY_SIGN_IN_ADDRESS_PER_MINUTE", "1000000"),
        ],
    )
    .await;
    let metrics = server.metrics_addr.expect("metrics are on");
    let gauge = |name: &'static str| async move { metric(&scrape(metrics).await, name) };
    let mut accounts = AccountsServiceClient::new(server.channel().await);
    let mut victim = None;
    for username in ["hog", "pd"] {
        let created = accounts
            .create_account(bearer(
                pb::CreateAccountRequest {
                    username: username.into(),
                    password: format!("right-{}-password", random_hex()),
                    kind: pb::AccountKind::Person as i32,
                    ..Default::default()
                },
                &operator,
            ))
            .await
            .expect("create the account")
            .into_inner();
        victim = created.account.map(|a| a.account_id);
    }
    let victim = victim.expect("pd's account");
    // Verifying any password against this hash takes far longer than the
    // test: it holds the only hashing thread.
    let slow = format!(
        "$argon2id$v=19$m=19456,t=3000,p=1$c29tZXNhbHRzb21lc2FsdA${}",
        "A".repeat(43)
    );
    store_password_hash(&db.url, "hog", &slow).await;
    let hog = wrong_sign_in(&AccountsServiceClient::new(server.channel().await), "hog");
    until("the hashing thread is busy", || async {
        gauge("identity_password_hashes_running").await >= 1.0
    })
    .await;
    let completed = gauge("identity_password_hashes_completed_total").await;

    // Wrong sign-ins for pd, claimed (counted) and queued behind the hog.
    let mut held = Vec::new();
    for _ in 0..HELD {
        let accounts = AccountsServiceClient::new(server.channel().await);
        held.push(wrong_sign_in(&accounts, "pd"));
    }
    until("pd's sign-ins wait in the queue", || async {
        gauge("identity_password_hashes_waiting").await >= HELD as f64
    })
    .await;
    assert_eq!(account_failures(&db.url, "pd").await, HELD);

    // The operator resets pd's counter.
    accounts
        .enable_account(bearer(
            pb::EnableAccountRequest { account_id: victim },
            &operator,
        ))
        .await
        .expect("enable pd");
    assert_eq!(account_failures(&db.url, "pd").await, 0);

    // New guesses, counted after the reset (they queue too).
    let mut guesses = Vec::new();
    for _ in 0..GUESSES {
        let accounts = AccountsServiceClient::new(server.channel().await);
        guesses.push(wrong_sign_in(&accounts, "pd"));
    }
    until("the new guesses wait in the queue", || async {
        gauge("identity_password_hashes_waiting").await >= (HELD + GUESSES) as f64
    })
    .await;
    assert_eq!(account_failures(&db.url, "pd").await, GUESSES);

    // The held sign-ins are cancelled before a thread took them: they give
    // their claims back. Each give-back takes its attempt off the address
    // counter too (whose count never restarted), in the same transaction:
    // once it is down to the hog's and the new guesses', every give-back
    // has committed.
    for call in &held {
        call.abort();
    }
    for call in held {
        match call.await {
            Err(aborted) if aborted.is_cancelled() => {}
            other => panic!("a held sign-in ended with {other:?}"),
        }
    }
    until("every held claim is given back", || async {
        gauge("identity_sign_in_claims_given_back_total").await >= HELD as f64
            && address_failures(&db.url).await == 1 + GUESSES
    })
    .await;
    assert_eq!(
        account_failures(&db.url, "pd").await,
        GUESSES,
        "the give-backs of claims made before the reset erased guesses counted after it"
    );
    // No sign-in of pd's was hashed: the hog's still runs.
    assert_eq!(
        gauge("identity_password_hashes_completed_total").await,
        completed
    );
    for call in guesses.into_iter().chain([hog]) {
        call.abort();
    }
    // Dropping the server kills it, hashing thread and all.
    drop(server);
}

mod a_give_back_spares_guesses_counted_after_a_reset {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::a_give_back_spares_guesses_counted_after_a_reset(crate::support::Backend::Sqlite)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::a_give_back_spares_guesses_counted_after_a_reset(crate::support::Backend::Postgres)
            .await;
    }
}
