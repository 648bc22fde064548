//! The operators' fleet-wide views: `ListTokens` without an account (every
//! account's tokens, operators only) and `ListAuditEvents` over a time
//! range, through the real server on both stores; and the plans of their
//! statements, which must stay index range scans at any page depth.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use identity::storage::{LISTING_QUERIES, PURGE_TOKENS_QUERY};
use sqlx::Connection as _;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::both_backends;
use crate::support::{Backend, TestApp, assert_status, bearer, pb};
use pb::audit_service_client::AuditServiceClient;

/// The filters of a token listing, as sent.
#[derive(Debug, Clone, Default)]
struct Filter {
    states: Vec<pb::TokenState>,
    expire_before: Option<prost_types::Timestamp>,
    last_used_before: Option<prost_types::Timestamp>,
}

impl Filter {
    fn request(
        &self,
        account_id: &str,
        page_size: i32,
        page_token: String,
    ) -> pb::ListTokensRequest {
        pb::ListTokensRequest {
            account_id: account_id.to_owned(),
            page_size,
            page_token,
            states: self.states.iter().map(|s| *s as i32).collect(),
            expire_before: self.expire_before,
            last_used_before: self.last_used_before,
        }
    }
}

/// Pages through a token listing (`account_id` empty for every account's)
/// as `credential`, `page_size` at a time: the ids in the order listed.
async fn list_ids(
    app: &TestApp,
    credential: &str,
    account_id: &str,
    filter: &Filter,
    page_size: i32,
) -> Vec<String> {
    list(app, credential, account_id, filter, page_size)
        .await
        .into_iter()
        .map(|t| t.token_id)
        .collect()
}

/// As [`list_ids`], the tokens themselves.
async fn list(
    app: &TestApp,
    credential: &str,
    account_id: &str,
    filter: &Filter,
    page_size: i32,
) -> Vec<pb::Token> {
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .tokens()
            .list_tokens(bearer(
                filter.request(account_id, page_size, page_token),
                credential,
            ))
            .await
            .expect("list tokens")
            .into_inner();
        assert!(page.tokens.len() <= usize::try_from(page_size).expect("positive"));
        ids.extend(page.tokens);
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}

/// Every account's id, as the operator lists them.
async fn account_ids(app: &TestApp) -> Vec<String> {
    app.accounts()
        .list_accounts(bearer(
            pb::ListAccountsRequest {
                page_size: 1000,
                page_token: String::new(),
            },
            &app.operator_token,
        ))
        .await
        .expect("list accounts")
        .into_inner()
        .accounts
        .into_iter()
        .map(|a| a.account_id)
        .collect()
}

fn at(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

#[track_caller]
fn assert_ascending(ids: &[String], what: &str) {
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "{what}: not in strictly ascending id order (a duplicate or a reordering): {ids:?}"
    );
}

async fn an_operator_lists_every_accounts_tokens_with_each_filter(app: TestApp) {
    let ops = app.operator_token.clone();
    let (alice, alice_session) = app.person("alice").await;
    let (bob, _) = app.person("bob").await;
    let robot = app.robot("robot").await;
    let (active, _) = app.token(&ops, &alice.account_id, "active", &[]).await;
    let (revoked, _) = app.token(&ops, &alice.account_id, "revoked", &[]).await;
    app.tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: revoked.token_id.clone(),
            },
            &ops,
        ))
        .await
        .expect("revoke");
    let soon = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: bob.account_id.clone(),
                name: "soon".into(),
                expire_time: Some(at(SystemTime::now() + Duration::from_secs(3600))),
                ..Default::default()
            },
            &ops,
        ))
        .await
        .expect("create")
        .into_inner()
        .token
        .expect("token");
    let once = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: robot.account_id.clone(),
                name: "once".into(),
                max_uses: Some(1),
                ..Default::default()
            },
            &ops,
        ))
        .await
        .expect("create")
        .into_inner();
    assert!(app.verify(&once.secret, &[]).await.active);
    let once = once.token.expect("token");
    // Everything above was created (and `once` used) before `cut`; `late`
    // is created after it. (Last uses are recorded in the background, so
    // nothing here depends on when a use after `cut` lands.)
    let cut = at(SystemTime::now());
    let (late, _) = app.token(&ops, &bob.account_id, "late", &[]).await;

    // The harness's operator calls all along, so its tokens' last use
    // may move on between two listings: the comparisons leave them out.
    let operator = app
        .verify(&ops, &[])
        .await
        .principal
        .expect("active")
        .account_id;
    let others = |tokens: Vec<pb::Token>| -> Vec<String> {
        tokens
            .into_iter()
            .filter(|t| t.account_id != operator)
            .map(|t| t.token_id)
            .collect()
    };
    let accounts = account_ids(&app).await;
    assert!(accounts.len() >= 4, "{accounts:?}");
    let filters = [
        ("no filter", Filter::default()),
        (
            "revoked",
            Filter {
                states: vec![pb::TokenState::Revoked],
                ..Filter::default()
            },
        ),
        (
            "exhausted",
            Filter {
                states: vec![pb::TokenState::Exhausted],
                ..Filter::default()
            },
        ),
        (
            "active or revoked",
            Filter {
                states: vec![pb::TokenState::Active, pb::TokenState::Revoked],
                ..Filter::default()
            },
        ),
        (
            "expiring within two hours",
            Filter {
                expire_before: Some(at(SystemTime::now() + Duration::from_secs(7200))),
                ..Filter::default()
            },
        ),
        (
            "stale since the cut",
            Filter {
                last_used_before: Some(cut),
                ..Filter::default()
            },
        ),
        (
            "active and stale",
            Filter {
                states: vec![pb::TokenState::Active],
                last_used_before: Some(cut),
                ..Filter::default()
            },
        ),
    ];
    for (label, filter) in &filters {
        // Every account's listing is the union of the per-account ones,
        // in the same (id) order, paged small or in one go.
        let mut expected = Vec::new();
        for account in accounts.iter().filter(|a| **a != operator) {
            expected.extend(list_ids(&app, &ops, account, filter, 1000).await);
        }
        expected.sort();
        let small = list(&app, &ops, "", filter, 2).await;
        let small_ids: Vec<String> = small.iter().map(|t| t.token_id.clone()).collect();
        assert_ascending(&small_ids, label);
        assert_eq!(others(small), expected, "{label}, two a page");
        assert_eq!(
            others(list(&app, &ops, "", filter, 1000).await),
            expected,
            "{label}, one page"
        );
    }

    let listed = |filter: Filter| {
        let app = &app;
        let ops = ops.clone();
        async move { list_ids(app, &ops, "", &filter, 3).await }
    };
    let all = listed(Filter::default()).await;
    for token in [&active, &revoked, &soon, &once, &late] {
        assert!(all.contains(&token.token_id), "{} missing", token.name);
    }
    let revoked_ids = listed(filters[1].1.clone()).await;
    assert!(revoked_ids.contains(&revoked.token_id) && !revoked_ids.contains(&active.token_id));
    let exhausted = listed(filters[2].1.clone()).await;
    assert_eq!(exhausted, std::slice::from_ref(&once.token_id));
    let expiring = listed(filters[4].1.clone()).await;
    assert!(expiring.contains(&soon.token_id) && !expiring.contains(&late.token_id));
    let stale = listed(filters[5].1.clone()).await;
    for token in [&active, &revoked, &soon, &once] {
        assert!(stale.contains(&token.token_id), "{} is stale", token.name);
    }
    assert!(!stale.contains(&late.token_id));

    // An owner's own listing is what it was: hers only, and its page
    // tokens belong to it, not to the operators' listing.
    let own = list_ids(
        &app,
        &alice_session,
        &alice.account_id,
        &Filter::default(),
        1,
    )
    .await;
    assert_eq!(own, [active.token_id.clone(), revoked.token_id.clone()]);
    let own_page = app
        .tokens()
        .list_tokens(bearer(
            Filter::default().request(&alice.account_id, 1, String::new()),
            &alice_session,
        ))
        .await
        .expect("own listing")
        .into_inner()
        .next_page_token;
    let fleet_page = app
        .tokens()
        .list_tokens(bearer(
            Filter::default().request("", 1, String::new()),
            &ops,
        ))
        .await
        .expect("fleet listing")
        .into_inner()
        .next_page_token;
    assert!(!own_page.is_empty() && !fleet_page.is_empty());
    assert_status(
        app.tokens()
            .list_tokens(bearer(Filter::default().request("", 1, own_page), &ops))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    assert_status(
        app.tokens()
            .list_tokens(bearer(
                Filter::default().request(&alice.account_id, 1, fleet_page),
                &ops,
            ))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    // Bad filters are refused on the fleet-wide listing as on the other.
    assert_status(
        app.tokens()
            .list_tokens(bearer(
                pb::ListTokensRequest {
                    states: vec![0],
                    ..Default::default()
                },
                &ops,
            ))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
}
both_backends!(an_operator_lists_every_accounts_tokens_with_each_filter);

async fn only_operators_may_list_every_accounts_tokens(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (_, full) = app.token(&session, &alice.account_id, "full", &[]).await;
    let (_, reader) = app
        .token(&session, &alice.account_id, "reader", &["tokens:read"])
        .await;
    let robot = app.robot("robot").await;
    let (_, robot_full) = app
        .token(&app.operator_token, &robot.account_id, "full", &[])
        .await;
    for (who, credential) in [
        ("session", &session),
        ("full", &full),
        ("reader", &reader),
        ("robot", &robot_full),
    ] {
        let status = assert_status(
            app.tokens()
                .list_tokens(bearer(pb::ListTokensRequest::default(), credential))
                .await,
            Code::PermissionDenied,
            "ERROR_REASON_NOT_ALLOWED",
        );
        assert!(status.message().contains("operator"), "{who}: {status:?}");
        // Her own listing still works with the same credential.
        if who != "robot" {
            list_ids(&app, credential, &alice.account_id, &Filter::default(), 10).await;
        }
    }
}
both_backends!(only_operators_may_list_every_accounts_tokens);

async fn fleet_pages_hold_every_token_once_while_tokens_are_created(app: TestApp) {
    let ops = app.operator_token.clone();
    let mut accounts = Vec::new();
    for name in ["a", "b", "c"] {
        let robot = app.robot(name).await;
        for i in 0..4 {
            app.token(&ops, &robot.account_id, &format!("before-{i}"), &[])
                .await;
        }
        accounts.push(robot.account_id);
    }
    let before = list_ids(&app, &ops, "", &Filter::default(), 1000).await;
    assert!(before.len() >= 12);

    // Tokens keep being created, for every account in turn, for as long
    // as the paging runs (and at least once between two pages).
    let done = Arc::new(AtomicBool::new(false));
    let created = Arc::new(std::sync::Mutex::new(Vec::new()));
    let creator = tokio::spawn({
        let (tokens, ops, done, created) = (
            app.tokens(),
            ops.clone(),
            Arc::clone(&done),
            Arc::clone(&created),
        );
        async move {
            let mut n = 0;
            while !done.load(Ordering::SeqCst) || n == 0 {
                let account_id = accounts[n % accounts.len()].clone();
                let token = tokens
                    .clone()
                    .create_token(bearer(
                        pb::CreateTokenRequest {
                            account_id,
                            name: format!("during-{n}"),
                            ..Default::default()
                        },
                        &ops,
                    ))
                    .await
                    .expect("create during paging")
                    .into_inner()
                    .token
                    .expect("token");
                created.lock().expect("lock").push(token.token_id);
                n += 1;
            }
            n
        }
    });
    let mut paged = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .tokens()
            .list_tokens(bearer(Filter::default().request("", 2, page_token), &ops))
            .await
            .expect("page")
            .into_inner();
        paged.extend(page.tokens.into_iter().map(|t| t.token_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    done.store(true, Ordering::SeqCst);
    let created_count = creator.await.expect("creator");
    assert!(created_count > 0);

    // No token twice, in order; every token that existed before the
    // first page exactly once; anything else is one created meanwhile.
    assert_ascending(&paged, "fleet pages");
    let paged_set: BTreeSet<_> = paged.iter().cloned().collect();
    for id in &before {
        assert!(
            paged_set.contains(id),
            "{id} existed before paging but was not listed"
        );
    }
    let created: BTreeSet<_> = created.lock().expect("lock").iter().cloned().collect();
    let before: BTreeSet<_> = before.into_iter().collect();
    for id in &paged_set {
        assert!(
            before.contains(id) || created.contains(id),
            "{id} came from nowhere"
        );
    }
    // And afterwards the listing holds them all.
    let after: BTreeSet<_> = list_ids(&app, &ops, "", &Filter::default(), 1000)
        .await
        .into_iter()
        .collect();
    assert!(after.is_superset(&before) && after.is_superset(&created));
}
both_backends!(fleet_pages_hold_every_token_once_while_tokens_are_created);

/// A page of audit events, as `credential` lists them.
async fn audit_page(
    app: &TestApp,
    credential: &str,
    request: pb::ListAuditEventsRequest,
) -> Result<pb::ListAuditEventsResponse, tonic::Status> {
    AuditServiceClient::new(app.channel.clone())
        .list_audit_events(bearer(request, credential))
        .await
        .map(tonic::Response::into_inner)
}

/// Every event of a listing, paging `page_size` at a time.
async fn audit_all(
    app: &TestApp,
    credential: &str,
    request: pb::ListAuditEventsRequest,
) -> Vec<pb::AuditEvent> {
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = audit_page(
            app,
            credential,
            pb::ListAuditEventsRequest {
                page_token,
                ..request.clone()
            },
        )
        .await
        .expect("list audit events");
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        page_token = page.next_page_token;
    }
}

/// An event's time in microseconds, the precision the log keeps.
fn micros(event: &pb::AuditEvent) -> i64 {
    let time = event.time.expect("time");
    time.seconds * 1_000_000 + i64::from(time.nanos / 1_000)
}

async fn an_audit_time_range_includes_its_start_and_excludes_its_end(app: TestApp) {
    let ops = app.operator_token.clone();
    let (alice, session) = app.person("alice").await;
    for i in 0..6 {
        app.token(&session, &alice.account_id, &format!("t{i}"), &[])
            .await;
    }
    let robot = app.robot("robot").await;
    app.token(&ops, &robot.account_id, "r", &[]).await;

    let all = audit_all(
        &app,
        &ops,
        pb::ListAuditEventsRequest {
            page_size: 1000,
            ..Default::default()
        },
    )
    .await;
    // Newest first, by time then id.
    assert!(
        all.windows(2)
            .all(|w| (micros(&w[0]), &w[0].event_id) > (micros(&w[1]), &w[1].event_id)),
        "not newest first"
    );
    // Two events at distinct times, `high` newer than `low`, with events
    // on both sides of each.
    let alice_created: Vec<_> = all
        .iter()
        .filter(|e| {
            e.r#type == pb::AuditEventType::TokenCreated as i32
                && e.subject_account_id == alice.account_id
        })
        .collect();
    assert_eq!(alice_created.len(), 6);
    let (high, low) = (alice_created[1], alice_created[4]);
    assert!(micros(high) > micros(low));
    let start = low.time.expect("time");
    let end = high.time.expect("time");
    let in_range = |e: &&pb::AuditEvent| micros(e) >= micros(low) && micros(e) < micros(high);
    let expected: Vec<pb::AuditEvent> = all.iter().filter(in_range).cloned().collect();
    assert!(
        expected.iter().any(|e| e.event_id == low.event_id),
        "the start is inclusive"
    );
    assert!(
        !expected.iter().any(|e| e.event_id == high.event_id),
        "the end is exclusive"
    );

    let ranged = pb::ListAuditEventsRequest {
        start_time: Some(start),
        end_time: Some(end),
        ..Default::default()
    };
    for page_size in [1, 2, 1000] {
        let got = audit_all(
            &app,
            &ops,
            pb::ListAuditEventsRequest {
                page_size,
                ..ranged.clone()
            },
        )
        .await;
        assert_eq!(got, expected, "page size {page_size}");
    }
    // Only a start, only an end.
    let since = audit_all(
        &app,
        &ops,
        pb::ListAuditEventsRequest {
            start_time: Some(start),
            page_size: 2,
            ..Default::default()
        },
    )
    .await;
    let since_expected: Vec<_> = all
        .iter()
        .filter(|e| micros(e) >= micros(low))
        .cloned()
        .collect();
    assert_eq!(since, since_expected);
    let until = audit_all(
        &app,
        &ops,
        pb::ListAuditEventsRequest {
            end_time: Some(end),
            page_size: 2,
            ..Default::default()
        },
    )
    .await;
    let until_expected: Vec<_> = all
        .iter()
        .filter(|e| micros(e) < micros(high))
        .cloned()
        .collect();
    assert_eq!(until, until_expected);

    // With the other filters, for the operator and for the owner.
    let types = vec![pb::AuditEventType::TokenCreated as i32];
    let of_alice = |e: &&pb::AuditEvent| {
        e.actor_account_id == alice.account_id || e.subject_account_id == alice.account_id
    };
    let created_expected: Vec<_> = expected
        .iter()
        .filter(|e| e.r#type == types[0])
        .cloned()
        .collect();
    let got = audit_all(
        &app,
        &ops,
        pb::ListAuditEventsRequest {
            types: types.clone(),
            page_size: 1,
            ..ranged.clone()
        },
    )
    .await;
    assert_eq!(got, created_expected);
    let alice_expected: Vec<_> = expected.iter().filter(of_alice).cloned().collect();
    assert!(!alice_expected.is_empty());
    for credential in [&ops, &session] {
        let got = audit_all(
            &app,
            credential,
            pb::ListAuditEventsRequest {
                account_id: alice.account_id.clone(),
                page_size: 1,
                ..ranged.clone()
            },
        )
        .await;
        assert_eq!(got, alice_expected);
    }
    // The owner still may not list everyone's, range or not.
    assert_status(
        audit_page(&app, &session, ranged.clone()).await,
        Code::PermissionDenied,
        "ERROR_REASON_NOT_ALLOWED",
    );

    // An empty range is empty, not an error; a range wholly in the
    // future is empty too.
    let empty = audit_page(
        &app,
        &ops,
        pb::ListAuditEventsRequest {
            start_time: Some(end),
            end_time: Some(end),
            ..Default::default()
        },
    )
    .await
    .expect("an empty range");
    assert!(empty.events.is_empty() && empty.next_page_token.is_empty());
    let later = at(SystemTime::now() + Duration::from_secs(3600));
    let future = audit_page(
        &app,
        &ops,
        pb::ListAuditEventsRequest {
            start_time: Some(later),
            ..Default::default()
        },
    )
    .await
    .expect("a future range");
    assert!(future.events.is_empty());
}
both_backends!(an_audit_time_range_includes_its_start_and_excludes_its_end);

async fn an_audit_range_that_ends_before_it_starts_is_invalid_argument(app: TestApp) {
    let now = SystemTime::now();
    let (start, end) = (at(now), at(now - Duration::from_micros(1)));
    let status = assert_status(
        audit_page(
            &app,
            &app.operator_token,
            pb::ListAuditEventsRequest {
                start_time: Some(start),
                end_time: Some(end),
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    let fields: Vec<String> = status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    assert_eq!(fields, ["start_time", "end_time"], "{status:?}");
    assert!(
        status.message().contains("end_time") && status.message().contains("start_time"),
        "{status:?}"
    );
    // Out-of-range times are refused by name too.
    let status = assert_status(
        audit_page(
            &app,
            &app.operator_token,
            pb::ListAuditEventsRequest {
                end_time: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    assert!(status.message().contains("end_time"), "{status:?}");
}
both_backends!(an_audit_range_that_ends_before_it_starts_is_invalid_argument);

// ---------------------------------------------------------------------------
// Plans.

/// How many rows the plan tests load: enough that reading a whole table and
/// sorting it costs the planner far more than a range scan.
const PLAN_ROWS: i64 = 20_000;

/// A statement of [`LISTING_QUERIES`] by name.
fn listing(name: &str) -> &'static str {
    LISTING_QUERIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, sql)| sql)
        .expect("a listing query")
}

/// Loads [`PLAN_ROWS`] tokens of `account_id` and as many audit events
/// straight into the database, the way the benchmark does at scale.
async fn load_rows(backend: Backend, url: &str, account_id: &str) {
    let (token_id, digest, event_id) = match backend {
        Backend::Postgres => (
            "'00000000-0000-7000-8000-' || lpad(to_hex(i), 12, '0')",
            "decode(md5(i::text) || md5(i::text), 'hex')",
            "'00000000-0000-7000-9000-' || lpad(to_hex(i), 12, '0')",
        ),
        Backend::Sqlite => (
            "printf('00000000-0000-7000-8000-%012x', i)",
            "randomblob(32)",
            "printf('00000000-0000-7000-9000-%012x', i)",
        ),
    };
    let series = format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {PLAN_ROWS})"
    );
    let tokens = format!(
        "{series} INSERT INTO tokens (token_id, account_id, name, digest, create_time, family_id) \
         SELECT {token_id}, '{account_id}', 'bulk', {digest}, i, {token_id} FROM n"
    );
    let events = format!(
        "{series} INSERT INTO audit_events (event_id, event_time, event_type, outcome) \
         SELECT {event_id}, i * 1000, 'token.created', 'success' FROM n"
    );
    match backend {
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
            for sql in [tokens.as_str(), events.as_str(), "ANALYZE"] {
                sqlx::raw_sql(sql).execute(&mut conn).await.expect(sql);
            }
        }
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(url).await.expect("connect");
            for sql in [tokens.as_str(), events.as_str(), "ANALYZE"] {
                sqlx::raw_sql(sql).execute(&mut conn).await.expect(sql);
            }
        }
    }
}

/// The statements the plan tests explain: a name, the listing, the index
/// its page must be a range scan of, and the arguments (a first page and a
/// deep one) as SQL literals in parameter order.
type Explained = (&'static str, &'static str, &'static str, Vec<String>);

/// The types of a listing's parameters, as sqlx binds them.
fn parameter_types(name: &str) -> &'static str {
    match name {
        "LIST_ALL_TOKENS" => "text, int8, text, int8, int8, int8",
        "LIST_TOKENS" => "text, text, int8, text, int8, int8, int8",
        "LIST_EVENTS" => "text, text, int8, text, int8, int8, int8",
        other => panic!("no parameter types for {other}"),
    }
}

fn explained(account_id: &str) -> Vec<Explained> {
    let deep_token = "'00000000-0000-7000-8000-000000002710'".to_owned();
    let deep_event = "'00000000-0000-7000-9000-000000002710'".to_owned();
    let account = format!("'{account_id}'");
    let (start, end) = (i64::MIN.to_string(), i64::MAX.to_string());
    let tokens = |after: String| {
        vec![
            after,
            "51".into(),
            "''".into(),
            "0".into(),
            "NULL".into(),
            "NULL".into(),
        ]
    };
    let events = |time: String, id: String| {
        vec![
            "''".into(),
            "''".into(),
            time,
            id,
            "51".into(),
            start.clone(),
            end.clone(),
        ]
    };
    vec![
        (
            "every account's tokens, first page",
            "LIST_ALL_TOKENS",
            "pkey",
            tokens("''".into()),
        ),
        (
            "every account's tokens, deep page",
            "LIST_ALL_TOKENS",
            "pkey",
            tokens(deep_token),
        ),
        (
            "one account's tokens, deep page",
            "LIST_TOKENS",
            // Its account index, or the primary key (every row is the
            // account's): either is a range scan.
            "tokens_",
            vec![
                account,
                "'00000000-0000-7000-8000-000000002710'".into(),
                "51".into(),
                "''".into(),
                "0".into(),
                "NULL".into(),
                "NULL".into(),
            ],
        ),
        (
            "audit events, first page",
            "LIST_EVENTS",
            "audit_events_time_id_idx",
            events(end.clone(), "''".into()),
        ),
        (
            "audit events, deep page",
            "LIST_EVENTS",
            "audit_events_time_id_idx",
            events("10000000".into(), deep_event),
        ),
        (
            "audit events in a range",
            "LIST_EVENTS",
            "audit_events_time_id_idx",
            vec![
                "''".into(),
                "''".into(),
                "15000000".into(),
                "''".into(),
                "51".into(),
                "5000000".into(),
                "15000000".into(),
            ],
        ),
    ]
}

/// `sql` with its `$n` parameters replaced by `args` (literals), highest
/// number first so that `$1` does not match the start of `$10`.
fn inline(sql: &str, args: &[String]) -> String {
    let mut sql = sql.to_owned();
    for (i, arg) in args.iter().enumerate().rev() {
        sql = sql.replace(&format!("${}", i + 1), arg);
    }
    sql
}

/// The plans PostgreSQL gives the prepared statement `q` for `args`, by
/// `plan_cache_mode`: the custom one (for these arguments) and the generic
/// one it may switch to after five executions.
async fn prepared_plans(conn: &mut sqlx::PgConnection, args: &str) -> Vec<(&'static str, String)> {
    let mut plans = Vec::new();
    for mode in ["force_custom_plan", "force_generic_plan"] {
        sqlx::raw_sql(&format!("SET plan_cache_mode = {mode}"))
            .execute(&mut *conn)
            .await
            .expect("set plan_cache_mode");
        let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN EXECUTE q({args})"))
            .fetch_all(&mut *conn)
            .await
            .expect("explain");
        plans.push((mode, plan.join("\n")));
    }
    plans
}

async fn listing_pages_are_index_range_scans_at_any_depth(app: TestApp) {
    let robot = app.robot("bulk").await;
    let backend = if app.db.url.starts_with("sqlite:") {
        Backend::Sqlite
    } else {
        Backend::Postgres
    };
    load_rows(backend, &app.db.url, &robot.account_id).await;
    let mut failures = Vec::new();
    match backend {
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&app.db.url)
                .await
                .expect("connect");
            for (label, name, index, args) in explained(&robot.account_id) {
                sqlx::raw_sql(&format!(
                    "PREPARE q ({}) AS {}",
                    parameter_types(name),
                    listing(name)
                ))
                .execute(&mut conn)
                .await
                .expect("prepare");
                for (mode, plan) in prepared_plans(&mut conn, &args.join(", ")).await {
                    let scans_index = plan.contains("Index Scan") && plan.contains(index);
                    if !scans_index || plan.contains("Seq Scan") || plan.contains("Sort") {
                        failures.push(format!("{label} ({mode}):\n{plan}"));
                    }
                }
                sqlx::raw_sql("DEALLOCATE q")
                    .execute(&mut conn)
                    .await
                    .expect("deallocate");
            }
        }
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&app.db.url)
                .await
                .expect("connect");
            for (label, name, index, args) in explained(&robot.account_id) {
                // SQLite plans each statement as it runs it; the
                // arguments do not change the plan here.
                let sql = format!("EXPLAIN QUERY PLAN {}", inline(listing(name), &args));
                let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(&sql)
                    .fetch_all(&mut conn)
                    .await
                    .expect("explain");
                let plan: Vec<String> = rows.into_iter().map(|r| r.3).collect();
                let plan = plan.join("\n");
                let index = if index == "pkey" {
                    "sqlite_autoindex_tokens_1"
                } else {
                    index
                };
                // SEARCH: a range of the index, not a walk of all of it.
                let ranged = plan
                    .lines()
                    .any(|l| l.starts_with("SEARCH") && l.contains(index));
                if !ranged || plan.contains("TEMP B-TREE") {
                    failures.push(format!("{label}:\n{plan}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "plans that are not index range scans:\n{}",
        failures.join("\n\n")
    );
}
both_backends!(listing_pages_are_index_range_scans_at_any_depth);

/// Retention's deletion of dead tokens finds them through the partial
/// indexes of its conditions (revoked, rotated, expired, used up: a union
/// of index scans), never by reading the whole table, in the custom plan
/// and the generic one. (Its used-up arm once read
/// `COALESCE(uses_remaining, -1) = 0`, which does not imply the condition
/// of `tokens_used_up_idx`: every batch of every purge was a sequential
/// scan of `tokens`.) PostgreSQL only: the embedded SQLite store holds no
/// table that size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_reads_dead_tokens_through_their_indexes_on_postgres() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let robot = app.robot("bulk").await;
    load_rows(Backend::Postgres, &app.db.url, &robot.account_id).await;
    let mut conn = sqlx::PgConnection::connect(&app.db.url)
        .await
        .expect("connect");
    sqlx::raw_sql(&format!("PREPARE q (int8, int8) AS {PURGE_TOKENS_QUERY}"))
        .execute(&mut conn)
        .await
        .expect("prepare");
    let mut failures = Vec::new();
    for (mode, plan) in prepared_plans(&mut conn, &format!("{}, 1000", PLAN_ROWS * 2)).await {
        if plan.contains("Seq Scan") || !plan.contains("tokens_used_up_idx") {
            failures.push(format!("{mode}:\n{plan}"));
        }
    }
    assert!(
        failures.is_empty(),
        "plans that read the whole table:\n{}",
        failures.join("\n\n")
    );
}
