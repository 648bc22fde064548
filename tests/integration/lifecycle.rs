//! The lifecycle of tokens: lifetime policy, limited uses, rotation with
//! reuse detection, last use, leak reports, and listing filters.

use std::time::{Duration, SystemTime};

use tonic::Code;

use crate::both_backends;
use crate::support::{Backend, TestApp, assert_status, bearer, pb};

fn in_the_future(after: Duration) -> prost_types::Timestamp {
    let since = (SystemTime::now() + after)
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after the epoch");
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).expect("fits"),
        nanos: 0,
    }
}

fn seconds_from_now(ts: &prost_types::Timestamp) -> i64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs();
    ts.seconds - i64::try_from(now).expect("fits")
}

async fn create(
    app: &TestApp,
    caller: &str,
    request: pb::CreateTokenRequest,
) -> Result<pb::CreateTokenResponse, tonic::Status> {
    app.tokens()
        .create_token(bearer(request, caller))
        .await
        .map(tonic::Response::into_inner)
}

async fn get(app: &TestApp, token_id: &str) -> pb::Token {
    app.tokens()
        .get_token(bearer(
            pb::GetTokenRequest {
                token_id: token_id.into(),
            },
            &app.operator_token,
        ))
        .await
        .expect("get token")
        .into_inner()
        .token
        .expect("token")
}

async fn rotate(
    app: &TestApp,
    caller: &str,
    token_id: &str,
) -> Result<pb::RotateTokenResponse, tonic::Status> {
    app.tokens()
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                token_id: token_id.into(),
            },
            caller,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn tokens_get_the_default_lifetime_and_no_more_than_the_maximum(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let created = create(
        &app,
        &session,
        pb::CreateTokenRequest {
            account_id: alice.account_id.clone(),
            name: "default".into(),
            ..Default::default()
        },
    )
    .await
    .expect("create");
    let expiry = created
        .token
        .expect("token")
        .expire_time
        .expect("a default expiry");
    let days = seconds_from_now(&expiry) / 86_400;
    assert!(
        (89..=90).contains(&days),
        "default lifetime is 90 days, got {days}"
    );

    use tonic_types::StatusExt as _;
    let too_long = create(
        &app,
        &session,
        pb::CreateTokenRequest {
            account_id: alice.account_id.clone(),
            name: "too-long".into(),
            expire_time: Some(in_the_future(Duration::from_secs(400 * 86_400))),
            ..Default::default()
        },
    )
    .await;
    let status = assert_status(
        too_long,
        Code::InvalidArgument,
        "ERROR_REASON_TOKEN_LIFETIME",
    );
    let fields: Vec<_> = status
        .get_error_details()
        .bad_request()
        .expect("BadRequest")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, ["expire_time"]);

    // Tokens without expiry: not for people, and not for robots unless
    // the server allows it (it does not by default).
    let robot = app.robot("ci").await;
    for account in [&alice.account_id, &robot.account_id] {
        let never = create(
            &app,
            &app.operator_token,
            pb::CreateTokenRequest {
                account_id: account.clone(),
                name: "never".into(),
                never_expires: true,
                ..Default::default()
            },
        )
        .await;
        assert_status(never, Code::InvalidArgument, "ERROR_REASON_TOKEN_LIFETIME");
    }
}
both_backends!(tokens_get_the_default_lifetime_and_no_more_than_the_maximum);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn robots_get_tokens_without_expiry_only_where_configured() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.identity.allow_non_expiring_robot_tokens = true;
    })
    .await;
    let robot = app.robot("ci").await;
    let (alice, _) = app.person("alice").await;
    let never = create(
        &app,
        &app.operator_token,
        pb::CreateTokenRequest {
            account_id: robot.account_id.clone(),
            name: "forever".into(),
            never_expires: true,
            ..Default::default()
        },
    )
    .await
    .expect("a robot may have one");
    assert_eq!(never.token.expect("token").expire_time, None);
    let person = create(
        &app,
        &app.operator_token,
        pb::CreateTokenRequest {
            account_id: alice.account_id.clone(),
            name: "forever".into(),
            never_expires: true,
            ..Default::default()
        },
    )
    .await;
    assert_status(person, Code::InvalidArgument, "ERROR_REASON_TOKEN_LIFETIME");
    let both = create(
        &app,
        &app.operator_token,
        pb::CreateTokenRequest {
            account_id: robot.account_id.clone(),
            name: "both".into(),
            never_expires: true,
            expire_time: Some(in_the_future(Duration::from_secs(60))),
            ..Default::default()
        },
    )
    .await;
    assert_status(both, Code::InvalidArgument, "ERROR_REASON_INVALID_ARGUMENT");
}

async fn a_limited_use_token_answers_active_exactly_k_times_under_concurrency(app: TestApp) {
    let robot = app.robot("deployer").await;
    let created = create(
        &app,
        &app.operator_token,
        pb::CreateTokenRequest {
            account_id: robot.account_id.clone(),
            name: "five-uses".into(),
            max_uses: Some(5),
            ..Default::default()
        },
    )
    .await
    .expect("create");
    let token = created.token.expect("token");
    assert_eq!((token.max_uses, token.uses_remaining), (Some(5), Some(5)));

    let verifier = app.verifier_token().await;
    let attempts: Vec<_> = (0..40)
        .map(|_| {
            let mut client = app.tokens();
            let request = bearer(
                pb::VerifyTokenRequest {
                    token: created.secret.clone(),
                    ..Default::default()
                },
                &verifier,
            );
            tokio::spawn(async move { client.verify_token(request).await })
        })
        .collect();
    let mut active = 0;
    let mut remaining_seen = Vec::new();
    for attempt in attempts {
        let verdict = attempt.await.expect("task").expect("verify").into_inner();
        if verdict.active {
            active += 1;
            remaining_seen.push(
                verdict
                    .principal
                    .expect("principal")
                    .uses_remaining
                    .expect("limited"),
            );
        } else {
            assert_eq!(verdict.reason, pb::InactiveReason::Exhausted as i32);
        }
    }
    assert_eq!(active, 5, "exactly K verifications succeed");
    remaining_seen.sort_unstable();
    assert_eq!(
        remaining_seen,
        [0, 1, 2, 3, 4],
        "each use saw its own count"
    );

    let after = get(&app, &token.token_id).await;
    assert_eq!(after.uses_remaining, Some(0));
    assert_eq!(after.state, pb::TokenState::Exhausted as i32);

    // A failed check (missing scope) spends nothing.
    let one = create(
        &app,
        &app.operator_token,
        pb::CreateTokenRequest {
            account_id: robot.account_id.clone(),
            name: "one-time".into(),
            scopes: vec!["project:read".into()],
            max_uses: Some(1),
            ..Default::default()
        },
    )
    .await
    .expect("create");
    let refused = app.verify(&one.secret, &["project:write"]).await;
    assert_eq!(refused.reason, pb::InactiveReason::InsufficientScope as i32);
    assert!(
        app.verify(&one.secret, &["project:read"]).await.active,
        "the one use is still there"
    );
    assert_eq!(
        app.verify(&one.secret, &[]).await.reason,
        pb::InactiveReason::Exhausted as i32
    );

    for bad in [0, -1, 1_000_001] {
        let refused = create(
            &app,
            &app.operator_token,
            pb::CreateTokenRequest {
                account_id: robot.account_id.clone(),
                name: format!("bad-{bad}"),
                max_uses: Some(bad),
                ..Default::default()
            },
        )
        .await;
        assert_status(
            refused,
            Code::InvalidArgument,
            "ERROR_REASON_INVALID_ARGUMENT",
        );
    }
}
both_backends!(a_limited_use_token_answers_active_exactly_k_times_under_concurrency);

async fn rotation_issues_a_new_secret_and_revokes_the_old_one_only(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let created = create(
        &app,
        &session,
        pb::CreateTokenRequest {
            account_id: alice.account_id.clone(),
            name: "ci".into(),
            scopes: vec!["tokens:write".into(), "project:publish".into()],
            expire_time: Some(in_the_future(Duration::from_secs(3600))),
            max_uses: Some(100),
            ..Default::default()
        },
    )
    .await
    .expect("create");
    let old = created.token.expect("token");
    // The token rotates itself, as a CI system would.
    let rotated = rotate(&app, &created.secret, &old.token_id)
        .await
        .expect("rotate");
    let new = rotated.token.expect("token");
    assert_ne!(rotated.secret, created.secret);
    assert_eq!(new.name, "ci");
    assert_eq!(new.scopes, old.scopes);
    assert_eq!(new.family_id, old.family_id);
    assert_eq!(new.family_id, old.token_id);
    // The rotating call spent one use; the others carry over, as does
    // the absolute expiry: rotation gives no fresh uses or lifetime.
    assert_eq!((new.max_uses, new.uses_remaining), (Some(100), Some(99)));
    assert_eq!(new.expire_time, old.expire_time, "the same absolute expiry");
    let previous = rotated.previous.expect("previous");
    assert_eq!(previous.replaced_by_token_id, new.token_id);
    assert_eq!(
        previous.state,
        pb::TokenState::Revoked as i32,
        "no grace period by default"
    );

    assert!(app.verify(&rotated.secret, &[]).await.active);
    assert_eq!(
        app.verify(&created.secret, &[]).await.reason,
        pb::InactiveReason::Revoked as i32
    );
    assert!(
        app.verify(&session, &[]).await.active,
        "sessions are untouched"
    );

    // Rotating the old token again is refused (its successor rotates).
    assert_status(
        rotate(&app, &session, &old.token_id).await,
        Code::FailedPrecondition,
        "ERROR_REASON_TOKEN_ALREADY_ROTATED",
    );
    // A scoped token cannot rotate a broader one into its hands.
    let (broad, _) = app.token(&session, &alice.account_id, "broad", &[]).await;
    let (_, narrow) = app
        .token(&session, &alice.account_id, "narrow", &["tokens:write"])
        .await;
    assert_status(
        rotate(&app, &narrow, &broad.token_id).await,
        Code::PermissionDenied,
        "ERROR_REASON_ESCALATION",
    );
    // A revoked token cannot be rotated.
    app.tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: broad.token_id.clone(),
            },
            &session,
        ))
        .await
        .expect("revoke");
    assert_status(
        rotate(&app, &session, &broad.token_id).await,
        Code::FailedPrecondition,
        "ERROR_REASON_TOKEN_INACTIVE",
    );
}
both_backends!(rotation_issues_a_new_secret_and_revokes_the_old_one_only);

async fn presenting_a_rotated_token_again_revokes_its_whole_family(app: TestApp) {
    let robot = app.robot("ci").await;
    let (first, first_secret) = app
        .token(&app.operator_token, &robot.account_id, "ci", &[])
        .await;
    let second = rotate(&app, &first_secret, &first.token_id)
        .await
        .expect("first rotation");
    let second_token = second.token.expect("token");
    let third = rotate(&app, &second.secret, &second_token.token_id)
        .await
        .expect("second rotation");
    assert!(app.verify(&third.secret, &[]).await.active);

    // The stolen first secret is presented to rotate the live token.
    let third_id = third.token.as_ref().expect("token").token_id.clone();
    assert_status(
        rotate(&app, &first_secret, &third_id).await,
        Code::Unauthenticated,
        "ERROR_REASON_CREDENTIAL_REUSED",
    );
    assert_eq!(
        app.verify(&third.secret, &[]).await.reason,
        pb::InactiveReason::Revoked as i32
    );

    let events = app
        .audit(&robot.account_id, &[pb::AuditEventType::TokenReuseDetected])
        .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].subject_credential_id, first.token_id);
}
both_backends!(presenting_a_rotated_token_again_revokes_its_whole_family);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_grace_period_keeps_the_old_secret_working_briefly() {
    let app = TestApp::spawn_with(Backend::Postgres, |config| {
        config.identity.rotation_grace = Duration::from_secs(2);
    })
    .await;
    let robot = app.robot("ci").await;
    let (old, old_secret) = app
        .token(&app.operator_token, &robot.account_id, "ci", &[])
        .await;
    // The token rotates itself (a token may rotate only itself).
    let rotated = rotate(&app, &old_secret, &old.token_id)
        .await
        .expect("rotate");
    assert!(
        app.verify(&old_secret, &[]).await.active,
        "still works during the grace period"
    );
    assert!(app.verify(&rotated.secret, &[]).await.active);
    assert!(
        rotated.previous.expect("previous").revoke_time.is_some(),
        "its revocation is scheduled"
    );
    // Let the grace period end: the server's clock moves past it.
    app.clock().advance(Duration::from_millis(2100));
    assert_eq!(
        app.verify(&old_secret, &[]).await.reason,
        pb::InactiveReason::Revoked as i32
    );
    assert!(app.verify(&rotated.secret, &[]).await.active);
}

/// A rotation moves a limited-use token's uses to its successor: during the
/// grace period the old secret keeps working for unlimited tokens, but it
/// cannot spend the uses the successor now holds (uses would double).
/// Expiry is judged by the clock the server was built with, on a cached
/// verdict as on a fresh one, for tokens and sessions alike.
async fn expiry_follows_the_servers_clock(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (alice, session) = app.person("alice").await;
    let secret = create(
        &app,
        &session,
        pb::CreateTokenRequest {
            account_id: alice.account_id.clone(),
            name: "an-hour".into(),
            expire_time: Some(in_the_future(Duration::from_secs(3600))),
            ..Default::default()
        },
    )
    .await
    .expect("create")
    .secret;
    // Twice: the second answer comes from the cache.
    assert!(app.verify(&secret, &[]).await.active);
    assert!(app.verify(&secret, &[]).await.active);
    assert!(app.verify(&session, &[]).await.active);
    app.clock().advance(Duration::from_secs(2 * 3600));
    assert_eq!(
        app.verify(&secret, &[]).await.reason,
        pb::InactiveReason::Expired as i32
    );
    assert!(
        app.verify(&session, &[]).await.active,
        "a session lasts twelve hours"
    );
    app.clock().advance(Duration::from_secs(11 * 3600));
    assert_eq!(
        app.verify(&session, &[]).await.reason,
        pb::InactiveReason::Expired as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_follows_the_servers_clock_on_sqlite() {
    expiry_follows_the_servers_clock(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_follows_the_servers_clock_on_postgres() {
    expiry_follows_the_servers_clock(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_grace_period_does_not_double_the_uses_left() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let app = TestApp::spawn_with(backend, |config| {
            config.identity.rotation_grace = Duration::from_secs(600);
        })
        .await;
        let (alice, session) = app.person("alice").await;
        let created = create(
            &app,
            &session,
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "three".into(),
                max_uses: Some(3),
                ..Default::default()
            },
        )
        .await
        .expect("create");
        let old_secret = created.secret;
        let old_id = created.token.expect("token").token_id;
        assert!(app.verify(&old_secret, &[]).await.active, "{backend:?}");
        let rotated = rotate(&app, &session, &old_id).await.expect("rotate");
        let successor = rotated.token.expect("successor");
        let mut active = 0;
        for _ in 0..4 {
            active += i32::from(app.verify(&old_secret, &[]).await.active);
            active += i32::from(app.verify(&rotated.secret, &[]).await.active);
        }
        assert_eq!(
            active, 2,
            "{backend:?}: the two uses left are spent once, not twice"
        );
        assert_eq!(
            get(&app, &old_id).await.uses_remaining,
            Some(0),
            "{backend:?}"
        );
        assert_eq!(
            get(&app, &successor.token_id).await.uses_remaining,
            Some(0),
            "{backend:?}"
        );
        app.stop().await;
    }
}

/// Revoking a token revokes it under every secret: a predecessor still in
/// its rotation grace period is the same token, and stops with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_rotated_token_ends_its_predecessors_grace_too() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let app = TestApp::spawn_with(backend, |config| {
            config.identity.rotation_grace = Duration::from_secs(600);
        })
        .await;
        let (alice, session) = app.person("alice").await;
        let created = create(
            &app,
            &session,
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "ci".into(),
                ..Default::default()
            },
        )
        .await
        .expect("create");
        let old_id = created.token.expect("token").token_id;
        let rotated = rotate(&app, &session, &old_id).await.expect("rotate");
        assert!(
            app.verify(&created.secret, &[]).await.active,
            "{backend:?}: in its grace period"
        );
        let successor = rotated.token.expect("successor").token_id;
        app.tokens()
            .revoke_token(bearer(
                pb::RevokeTokenRequest {
                    token_id: successor,
                },
                &session,
            ))
            .await
            .expect("revoke the live token");
        for secret in [&created.secret, &rotated.secret] {
            assert_eq!(
                app.verify(secret, &[]).await.reason,
                pb::InactiveReason::Revoked as i32,
                "{backend:?}: every secret of the revoked token"
            );
        }
        app.stop().await;
    }
}

/// Verifies `secret` as seen from `address`, then waits for its token's
/// last use to be recorded: the token as it then reads.
async fn record_a_use(app: &TestApp, token_id: &str, secret: &str, address: &str) -> pb::Token {
    let verdict = app
        .tokens()
        .verify_token(bearer(
            pb::VerifyTokenRequest {
                token: secret.into(),
                client_address: address.into(),
                ..Default::default()
            },
            &app.verifier_token().await,
        ))
        .await
        .expect("verify")
        .into_inner();
    assert!(verdict.active);
    // The write happens in the background so verification never waits
    // for it: poll until it lands.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = get(app, token_id).await;
        if now.last_used_time.is_some() {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "last use never recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn the_last_use_is_recorded_with_the_client_address(app: TestApp) {
    let robot = app.robot("ci").await;
    let (token, secret) = app
        .token(&app.operator_token, &robot.account_id, "ci", &[])
        .await;
    assert!(token.last_used_time.is_none());
    let recorded = record_a_use(&app, &token.token_id, &secret, "203.0.113.7:4431").await;
    assert_eq!(recorded.last_used_address, "203.0.113.7:4431");

    assert_status(
        app.tokens()
            .verify_token(bearer(
                pb::VerifyTokenRequest {
                    token: secret,
                    client_address: "not an address".into(),
                    ..Default::default()
                },
                &app.verifier_token().await,
            ))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
}
both_backends!(the_last_use_is_recorded_with_the_client_address);

/// On PostgreSQL recording a use is a HOT update: the new row version stays
/// on its page and no index gains an entry, because no index of `tokens`
/// reads a column that a use writes. An index keyed on `last_used_time`
/// made every recorded use add an entry to each of the table's indexes and
/// leave a dead one, which every creation's live-token count then read
/// (the soak's decline, BENCHMARKS.md). Nor does a creation write a new
/// version of its account's row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_use_and_a_creation_write_no_new_index_entry_on_postgres() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let reading = crate::retention::column(
        &app.db.url,
        "SELECT i.relname::text FROM pg_index x \
         JOIN pg_class i ON i.oid = x.indexrelid \
         JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum > 0 \
         WHERE x.indrelid = 'tokens'::regclass \
         AND a.attname IN ('last_used_time', 'last_used_address') \
         AND (a.attnum = ANY (x.indkey::int2[]) \
           OR COALESCE(pg_get_expr(x.indpred, x.indrelid), '') LIKE '%' || a.attname || '%' \
           OR COALESCE(pg_get_expr(x.indexprs, x.indrelid), '') LIKE '%' || a.attname || '%')",
    )
    .await;
    assert!(
        reading.is_empty(),
        "indexes reading what a use writes: {reading:?}"
    );

    let robot = app.robot("ci").await;
    // A creation takes its account's row lock without writing the row: a
    // version per creation made every read of a busy account walk them.
    let version = format!(
        "SELECT xmin::text FROM accounts WHERE account_id = '{}'",
        robot.account_id
    );
    let before = crate::retention::column(&app.db.url, &version).await;
    let (token, secret) = app
        .token(&app.operator_token, &robot.account_id, "ci", &[])
        .await;
    let after = crate::retention::column(&app.db.url, &version).await;
    assert_eq!(
        before, after,
        "the account row's version, before and after a creation"
    );
    record_a_use(&app, &token.token_id, &secret, "203.0.113.7:4431").await;
    // Each backend reports its counts when idle (within PostgreSQL's idle
    // stats interval): every update reported, the recorded uses among
    // them, must have been HOT.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let counts = crate::retention::column(
            &app.db.url,
            "SELECT n_tup_upd || ' ' || n_tup_hot_upd FROM pg_stat_user_tables \
             WHERE relname = 'tokens'",
        )
        .await;
        let counts = counts.first().expect("the tokens table's counts").clone();
        let (updated, hot) = counts.split_once(' ').expect("two counts");
        if updated != "0" {
            assert_eq!(updated, hot, "updates of tokens, and how many were HOT");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no update of tokens reported"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await;
}

async fn leaked_credentials_are_revoked_and_the_answer_reveals_nothing(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (_, pat) = app.token(&session, &alice.account_id, "leaky", &[]).await;
    let unknown = identity::domain::credential::Secret::generate(
        identity::domain::credential::CredentialKind::PersonalAccessToken,
    );
    let report = |secrets: Vec<String>| {
        let mut client = app.tokens();
        async move {
            client
                .revoke_leaked_token(pb::RevokeLeakedTokenRequest { secrets })
                .await
        }
    };
    let live = report(vec![
        pat.clone(),
        session.clone(),
        "garbage".into(),
        unknown.expose().to_owned(),
    ])
    .await
    .expect("anyone may report, without credentials");
    let nothing = report(vec!["garbage".into()])
        .await
        .expect("garbage is answered the same way");
    assert_eq!(live.metadata().len(), nothing.metadata().len());
    assert_eq!(live.into_inner(), nothing.into_inner());

    assert_eq!(
        app.verify(&pat, &[]).await.reason,
        pb::InactiveReason::Revoked as i32
    );
    assert_eq!(
        app.verify(&session, &[]).await.reason,
        pb::InactiveReason::Revoked as i32
    );
    let leaked = app
        .audit(&alice.account_id, &[pb::AuditEventType::TokenLeaked])
        .await;
    assert_eq!(leaked.len(), 2, "one event per live credential: {leaked:?}");
    assert!(leaked.iter().all(|e| e.actor_account_id.is_empty()));

    assert_status(
        report(vec![]).await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    assert_status(
        report(vec!["x".into(); 1001]).await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
}
both_backends!(leaked_credentials_are_revoked_and_the_answer_reveals_nothing);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leak_reports_are_rate_limited_per_client() {
    let app =
        TestApp::spawn_with(Backend::Sqlite, |config| config.leak_reports_per_minute = 2).await;
    let mut client = app.tokens();
    for _ in 0..2 {
        client
            .revoke_leaked_token(pb::RevokeLeakedTokenRequest {
                secrets: vec!["x".into()],
            })
            .await
            .expect("within the limit");
    }
    let status = assert_status(
        client
            .revoke_leaked_token(pb::RevokeLeakedTokenRequest {
                secrets: vec!["x".into()],
            })
            .await,
        Code::ResourceExhausted,
        "ERROR_REASON_RATE_LIMITED",
    );
    use tonic_types::StatusExt as _;
    let retry = status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(
        retry > Duration::from_secs(1) && retry <= Duration::from_secs(30),
        "{retry:?}"
    );
}

async fn list_tokens_filters_by_state_expiry_and_staleness(app: TestApp) {
    let robot = app.robot("ci").await;
    let ops = app.operator_token.clone();
    let (active, _) = app.token(&ops, &robot.account_id, "active", &[]).await;
    let (revoked, _) = app.token(&ops, &robot.account_id, "revoked", &[]).await;
    app.tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: revoked.token_id.clone(),
            },
            &ops,
        ))
        .await
        .expect("revoke");
    let soon = create(
        &app,
        &ops,
        pb::CreateTokenRequest {
            account_id: robot.account_id.clone(),
            name: "expiring-soon".into(),
            expire_time: Some(in_the_future(Duration::from_secs(2))),
            ..Default::default()
        },
    )
    .await
    .expect("create")
    .token
    .expect("token");
    let exhausted = create(
        &app,
        &ops,
        pb::CreateTokenRequest {
            account_id: robot.account_id.clone(),
            name: "one-time".into(),
            max_uses: Some(1),
            ..Default::default()
        },
    )
    .await
    .expect("create");
    assert!(app.verify(&exhausted.secret, &[]).await.active);
    let exhausted = exhausted.token.expect("token");

    let list = |states: Vec<pb::TokenState>,
                expire_before: Option<prost_types::Timestamp>,
                last_used_before: Option<prost_types::Timestamp>| {
        let mut client = app.tokens();
        let request = bearer(
            pb::ListTokensRequest {
                account_id: robot.account_id.clone(),
                states: states.into_iter().map(|s| s as i32).collect(),
                expire_before,
                last_used_before,
                ..Default::default()
            },
            &ops,
        );
        async move {
            let mut ids: Vec<String> = client
                .list_tokens(request)
                .await
                .expect("list")
                .into_inner()
                .tokens
                .into_iter()
                .map(|t| t.token_id)
                .collect();
            ids.sort();
            ids
        }
    };
    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };
    assert_eq!(
        list(vec![pb::TokenState::Revoked], None, None).await,
        vec![revoked.token_id.clone()]
    );
    assert_eq!(
        list(vec![pb::TokenState::Exhausted], None, None).await,
        vec![exhausted.token_id.clone()]
    );
    assert_eq!(
        list(
            vec![pb::TokenState::Revoked, pb::TokenState::Exhausted],
            None,
            None
        )
        .await,
        sorted(vec![revoked.token_id.clone(), exhausted.token_id.clone()])
    );
    // About to expire: within the next hour.
    assert_eq!(
        list(
            vec![pb::TokenState::Active],
            Some(in_the_future(Duration::from_secs(3600))),
            None
        )
        .await,
        vec![soon.token_id.clone()]
    );
    // Stale as of five seconds from now: every active token, used or not.
    let stale = list(
        vec![pb::TokenState::Active],
        None,
        Some(in_the_future(Duration::from_secs(5))),
    )
    .await;
    assert_eq!(
        stale,
        sorted(vec![active.token_id.clone(), soon.token_id.clone()])
    );
    assert!(
        list(
            vec![],
            None,
            Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0
            })
        )
        .await
        .is_empty()
    );

    // Move the server's clock past the expiry.
    app.clock().advance(Duration::from_millis(2100));
    assert_eq!(
        list(vec![pb::TokenState::Expired], None, None).await,
        vec![soon.token_id.clone()]
    );
    assert_eq!(
        list(vec![pb::TokenState::Active], None, None).await,
        vec![active.token_id.clone()]
    );

    assert_status(
        app.tokens()
            .list_tokens(bearer(
                pb::ListTokensRequest {
                    account_id: robot.account_id.clone(),
                    states: vec![42],
                    ..Default::default()
                },
                &ops,
            ))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
}
both_backends!(list_tokens_filters_by_state_expiry_and_staleness);
