//! The client half of `benches/fleet_page.sh`: times pages of the operators'
//! fleet-wide views (ListTokens without an account, ListAuditEvents) on a
//! server whose database the script loaded with a million tokens and a
//! million events, against the per-account listing as a baseline, and shows
//! the PostgreSQL plans of the deep pages (`EXPLAIN ANALYZE` of the very
//! statements the store runs). Not a test and not run in CI.
//!
//! Environment: `BENCH_TARGET` (the server, `http://127.0.0.1:port`),
//! `BENCH_OPERATOR_TOKEN`, `BENCH_ACCOUNT` (an account for the baseline),
//! `DATABASE_URL` (for the plans), `BENCH_RUNS` (timed calls per case, 50),
//! `BENCH_DEPTH` (how many tokens or events deep the deep pages start,
//! 500000).

use std::time::{Duration, Instant};

use identity::{
    api::pb::{
        ListAuditEventsRequest, ListTokensRequest, audit_service_client::AuditServiceClient,
        tokens_service_client::TokensServiceClient,
    },
    storage::LISTING_QUERIES,
};
use sqlx::Connection as _;
use tonic::{Request, metadata::MetadataValue, transport::Channel};

type Error = Box<dyn std::error::Error>;

fn env(name: &str) -> Result<String, Error> {
    std::env::var(name).map_err(|_| format!("{name} is not set").into())
}

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    let value = MetadataValue::try_from(format!("Bearer {token}")).expect("ascii token");
    request.metadata_mut().insert("authorization", value);
    request
}

/// The median and the 90th percentile of `samples`, in milliseconds.
fn summary(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    (at(0.5), at(0.9))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    // `cargo test --all-targets` runs this too, with nothing set up: only
    // `benches/fleet_page.sh`, which sets BENCH_TARGET, asks for a run.
    if std::env::var_os("BENCH_TARGET").is_none() {
        eprintln!(
            "fleet_page: nothing to do (BENCH_TARGET unset); run `bash benches/fleet_page.sh`"
        );
        return Ok(());
    }
    let target = env("BENCH_TARGET")?;
    let ops = env("BENCH_OPERATOR_TOKEN")?;
    let account = env("BENCH_ACCOUNT")?;
    let runs: usize = std::env::var("BENCH_RUNS").map_or(Ok(50), |v| v.parse())?;
    let depth: usize = std::env::var("BENCH_DEPTH").map_or(Ok(500_000), |v| v.parse())?;
    let channel = Channel::from_shared(target)?.connect().await?;
    let mut tokens = TokensServiceClient::new(channel.clone());
    let mut audit = AuditServiceClient::new(channel);

    // Page tokens `depth` items deep, reached by paging (untimed).
    let mut deep_tokens = String::new();
    for _ in 0..depth / 1000 {
        let page = tokens
            .list_tokens(bearer(
                ListTokensRequest {
                    page_size: 1000,
                    page_token: deep_tokens.clone(),
                    ..Default::default()
                },
                &ops,
            ))
            .await?
            .into_inner();
        deep_tokens = page.next_page_token;
    }
    let mut deep_events = String::new();
    for _ in 0..depth / 1000 {
        let page = audit
            .list_audit_events(bearer(
                ListAuditEventsRequest {
                    page_size: 1000,
                    page_token: deep_events.clone(),
                    ..Default::default()
                },
                &ops,
            ))
            .await?
            .into_inner();
        deep_events = page.next_page_token;
    }
    // Half-way down the account's own listing, likewise.
    let first = tokens
        .list_tokens(bearer(
            ListTokensRequest {
                account_id: account.clone(),
                page_size: 500,
                ..Default::default()
            },
            &ops,
        ))
        .await?
        .into_inner();
    let deep_account = first.next_page_token;
    // A time range in the middle of the log: the events' times are spread
    // evenly (see fleet_page.sh), the newest at `now`.
    let newest = audit
        .list_audit_events(bearer(
            ListAuditEventsRequest {
                page_size: 1,
                ..Default::default()
            },
            &ops,
        ))
        .await?
        .into_inner()
        .events
        .remove(0)
        .time
        .expect("time");
    let end = prost_types::Timestamp {
        seconds: newest.seconds - 400_000,
        nanos: 0,
    };
    let start = prost_types::Timestamp {
        seconds: newest.seconds - 600_000,
        nanos: 0,
    };

    let tokens_case = |account_id: &str, page_token: &str| ListTokensRequest {
        account_id: account_id.to_owned(),
        page_size: 50,
        page_token: page_token.to_owned(),
        ..Default::default()
    };
    let cases: Vec<(
        &str,
        Option<ListTokensRequest>,
        Option<ListAuditEventsRequest>,
    )> = vec![
        (
            "ListTokens, every account, first page",
            Some(tokens_case("", "")),
            None,
        ),
        (
            "ListTokens, every account, page 500000 deep",
            Some(tokens_case("", &deep_tokens)),
            None,
        ),
        (
            "ListTokens, one account (baseline), first page",
            Some(tokens_case(&account, "")),
            None,
        ),
        (
            "ListTokens, one account (baseline), page 500 deep",
            Some(tokens_case(&account, &deep_account)),
            None,
        ),
        (
            "ListAuditEvents, every account, first page",
            None,
            Some(ListAuditEventsRequest {
                page_size: 50,
                ..Default::default()
            }),
        ),
        (
            "ListAuditEvents, every account, page 500000 deep",
            None,
            Some(ListAuditEventsRequest {
                page_size: 50,
                page_token: deep_events.clone(),
                ..Default::default()
            }),
        ),
        (
            "ListAuditEvents, a time range mid-log, first page",
            None,
            Some(ListAuditEventsRequest {
                page_size: 50,
                start_time: Some(start),
                end_time: Some(end),
                ..Default::default()
            }),
        ),
    ];
    println!("| case | median ms | p90 ms | items |");
    println!("|---|---:|---:|---:|");
    let mut medians = Vec::new();
    for (label, list, events) in cases {
        let mut samples = Vec::with_capacity(runs);
        let mut items = 0;
        for _ in 0..runs {
            let began = Instant::now();
            items = match (&list, &events) {
                (Some(req), _) => tokens
                    .list_tokens(bearer(req.clone(), &ops))
                    .await?
                    .into_inner()
                    .tokens
                    .len(),
                (_, Some(req)) => audit
                    .list_audit_events(bearer(req.clone(), &ops))
                    .await?
                    .into_inner()
                    .events
                    .len(),
                _ => unreachable!(),
            };
            samples.push(began.elapsed());
        }
        let (median, p90) = summary(samples);
        medians.push(median);
        println!("| {label} | {median:.2} | {p90:.2} | {items} |");
    }
    println!();
    println!(
        "Ratios of medians, every account / one account: first page {:.2}, deep page {:.2}",
        medians[0] / medians[2],
        medians[1] / medians[3]
    );

    // The plans of the deep pages, as the store runs them.
    let url = env("DATABASE_URL")?;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    let query = |name: &str| {
        LISTING_QUERIES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, q)| q)
            .expect("query")
    };
    let middle: String =
        sqlx::query_scalar("SELECT token_id FROM tokens ORDER BY token_id OFFSET 500000 LIMIT 1")
            .fetch_one(&mut conn)
            .await?;
    let (event_time, event_id): (i64, String) =
        sqlx::query_as("SELECT event_time, event_id FROM audit_events ORDER BY event_time DESC, event_id DESC OFFSET 500000 LIMIT 1")
            .fetch_one(&mut conn)
            .await?;
    let explained = [
        (
            "LIST_ALL_TOKENS",
            "text, int8, text, int8, int8, int8",
            format!("'{middle}', 51, '', 0, NULL, NULL"),
        ),
        (
            "LIST_EVENTS",
            "text, text, int8, text, int8, int8, int8",
            format!(
                "'', '', {event_time}, '{event_id}', 51, {}, {}",
                i64::MIN,
                i64::MAX
            ),
        ),
    ];
    for (name, types, args) in explained {
        sqlx::raw_sql(&format!("PREPARE q ({types}) AS {}", query(name)))
            .execute(&mut conn)
            .await?;
        for mode in ["force_custom_plan", "force_generic_plan"] {
            sqlx::raw_sql(&format!("SET plan_cache_mode = {mode}"))
                .execute(&mut conn)
                .await?;
            let plan: Vec<String> = sqlx::query_scalar(&format!(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE q({args})"
            ))
            .fetch_all(&mut conn)
            .await?;
            println!("\n{name}, page 500000 deep ({mode}):\n");
            for line in plan {
                println!("    {line}");
            }
        }
        sqlx::raw_sql("DEALLOCATE q").execute(&mut conn).await?;
    }
    Ok(())
}
