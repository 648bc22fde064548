//! Metrics export and log set-up: the binary's side of observability.
//!
//! The code that measures things uses the `metrics` facade (as it uses
//! `tracing`) and never sees the exporter; this module installs the one
//! Prometheus recorder and serves it over HTTP, apart from gRPC. The hot
//! path's series are the exception: the call counter and latency histogram
//! (the observe layer's) and the verdict and cache-lookup counters (the
//! domain's, [`crate::domain::counters`]) are sharded atomics of their own,
//! rendered after the recorder's output under the same names and labels.
//!
//! A `metrics` recorder is global to the process and can be installed only
//! once, while tests run many servers in one process. So [`recorder`]
//! installs it on first use (behind a `OnceLock`) and every server then
//! serves the same registry on its own listener: in production one process
//! is one server, and tests assert on increases of series or on labels their
//! own calls alone produce.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use crate::{config::LogFormat, storage::Store};

/// This build's version, from Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit this binary was built from (see build.rs), or `unknown`.
pub const COMMIT: &str = env!("IDENTITY_BUILD_COMMIT");

/// Histogram buckets, in seconds: a cached `VerifyToken` answers in tens of
/// microseconds, a sign-in (argon2id) in tens to hundreds of milliseconds,
/// and a call stuck behind a full pool in seconds. The recorder's
/// histograms and the observe layer's call latencies use them.
pub const BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// How often histogram samples are folded into their buckets when nobody
/// scrapes (otherwise they would pile up in memory).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Longest a metrics client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The process's Prometheus recorder, installed as the global `metrics`
/// recorder on the first call. If another recorder was installed first (by
/// an embedding program), the handle renders only what this one records
/// (nothing), and a warning says so.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = match PrometheusBuilder::new().set_buckets(BUCKETS) {
            Ok(builder) => builder,
            // Only an empty bucket list is refused.
            Err(err) => unreachable!("invalid histogram buckets: {err}"),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if let Err(err) = metrics::set_global_recorder(recorder) {
            tracing::warn!(error = %err, "another metrics recorder is installed: /metrics will be empty");
        }
        describe();
        metrics::gauge!("identity_build_info", "version" => VERSION, "commit" => COMMIT).set(1);
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
        if let Err(err) = spawned {
            tracing::warn!(error = %err, "cannot start the metrics upkeep thread");
        }
        handle
    })
}

/// The process metrics (`process_resident_memory_bytes`,
/// `process_cpu_seconds_total`, `process_open_fds`, `process_max_fds`,
/// `process_threads`, `process_start_time_seconds`, ...), read from /proc by
/// the `metrics-process` crate at each scrape.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// The help text of every metric, in one place for operators.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    process_collector().describe();
    describe_gauge!(
        "identity_build_info",
        "Always 1; its labels name the running build: version and commit"
    );
    describe_gauge!(
        crate::domain::service::VERIFIER_EXPIRY_GAUGE,
        Unit::Seconds,
        "The soonest expiry (Unix time) among the credentials that called VerifyToken in the \
         last hour; +Inf when none of them expires (or none called)"
    );
    describe_gauge!(
        "identity_change_feed_lag_seconds",
        Unit::Seconds,
        "PostgreSQL: how long this replica's last heartbeat took to come back on its change \
         channel (send to applied, after every change committed before it); over the \
         staleness bound (1 s) the verification cache is bypassed"
    );
    describe_counter!(
        "identity_sign_in_failures_total",
        "Failed sign-ins, by cause (never by username)"
    );
    describe_gauge!(
        "identity_password_hashes_waiting",
        "Password hashes (sign-ins, password changes, new accounts) waiting for a hashing thread"
    );
    describe_gauge!(
        "identity_password_hashes_running",
        "Password hashes being computed"
    );
    describe_counter!(
        "identity_password_hashes_queued_total",
        "Password hashes accepted into the hashing queue"
    );
    describe_counter!(
        "identity_password_hashes_completed_total",
        "Password hashes computed"
    );
    describe_counter!(
        "identity_password_hashes_skipped_total",
        "Password hashes dropped unhashed because their call had ended (cancelled or past its \
         deadline) before a thread reached them"
    );
    describe_counter!(
        "identity_password_hashes_refused_total",
        "Password hashes refused because the hashing queue was full (answered RESOURCE_EXHAUSTED)"
    );
    describe_histogram!(
        "identity_password_hash_wait_seconds",
        Unit::Seconds,
        "How long a password hash waited for a hashing thread"
    );
    describe_gauge!(
        "identity_db_pool_connections",
        "Database connections of the pool, by state (idle, in_use), sampled at each scrape"
    );
    describe_gauge!(
        "identity_db_pool_max_connections",
        "The pool's connection limit (IDENTITY_DB_MAX_CONNECTIONS)"
    );
    describe_gauge!(
        "identity_clock_offset_seconds",
        Unit::Seconds,
        "The database's wall clock minus this replica's, as last measured (PostgreSQL only)"
    );
    describe_counter!(
        "identity_db_pool_timeouts_total",
        "Queries that found no free connection within IDENTITY_DB_ACQUIRE_TIMEOUT"
    );
    describe_gauge!(
        crate::app::listen::OPEN,
        "Connections open, TLS handshakes included, by listener (grpc, health)"
    );
    describe_counter!(
        crate::app::listen::REFUSED,
        "Connections closed at accept because the listener had IDENTITY_MAX_CONNECTIONS open, \
         by listener"
    );
    describe_counter!(
        crate::app::listen::STALLED,
        "Connections closed because a response waited on its client (no HTTP/2 flow-control \
         window granted) for longer than the send period, by listener"
    );
}

/// A running metrics listener; dropping it stops it.
#[derive(Debug)]
pub struct MetricsTask(tokio::task::JoinHandle<()>);

impl Drop for MetricsTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves [`recorder`] on `listener`, sampling the process, `store`'s
/// connection pool and `identity`'s verifier credentials at each scrape,
/// until the returned task is dropped.
pub fn spawn_metrics(
    listener: TcpListener,
    store: Arc<dyn Store>,
    identity: crate::domain::Identity,
) -> MetricsTask {
    let sample = move || {
        process_collector().collect();
        identity.sample_verifier_credentials();
        if let Some(usage) = store.pool_usage() {
            let in_use = usage.size.saturating_sub(usage.idle);
            metrics::gauge!("identity_db_pool_connections", "state" => "idle").set(usage.idle);
            metrics::gauge!("identity_db_pool_connections", "state" => "in_use").set(in_use);
            metrics::gauge!("identity_db_pool_max_connections").set(usage.max);
        }
    };
    MetricsTask(tokio::spawn(serve_metrics(
        listener,
        recorder().clone(),
        Arc::new(sample),
    )))
}

/// Serves `/metrics` (Prometheus text format) on `listener` for ever,
/// calling `sample` before each scrape so gauges that are read rather than
/// updated (the pool's) are current.
pub async fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    sample: Arc<dyn Fn() + Send + Sync>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors, most likely: do not spin.
                tracing::debug!(error = %err, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let sample = Arc::clone(&sample);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&request, &handle, &*sample);
                async move { Ok::<_, Infallible>(response) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(error = %err, "metrics listener: connection failed");
            }
        });
    }
}

/// Binds the metrics listener.
pub async fn bind_metrics(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn respond<B>(
    request: &http::Request<B>,
    handle: &PrometheusHandle,
    sample: &(dyn Fn() + Send + Sync),
) -> http::Response<Full<Bytes>> {
    let status = match (request.method(), request.uri().path()) {
        (&http::Method::GET, "/metrics") => {
            sample();
            let mut text = handle.render();
            // The calls' counter and latency histogram are the observe
            // layer's own (sharded, so that recording does not contend):
            // rendered beside the recorder's.
            crate::api::layers::observe::render(&mut text);
            // So are the verdict and cache counters, the domain's own.
            render_counters(&mut text, &crate::domain::counters::families());
            let mut response = http::Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return response;
        }
        (_, "/metrics") => http::StatusCode::METHOD_NOT_ALLOWED,
        _ => http::StatusCode::NOT_FOUND,
    };
    let mut response = http::Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// Appends `families` in the Prometheus text format: each with its help,
/// its type and every series, counted or not (as the recorder shows a
/// counter from its registration on).
fn render_counters(out: &mut String, families: &[crate::domain::counters::Family]) {
    use std::fmt::Write as _;
    for family in families {
        let name = family.name;
        let _ = writeln!(out, "# HELP {name} {}", family.help);
        let _ = writeln!(out, "# TYPE {name} counter");
        for (value, count) in &family.series {
            let _ = writeln!(out, "{name}{{{}=\"{value}\"}} {count}", family.label);
        }
        out.push('\n');
    }
}

/// Sets up the global log subscriber: `filter` (EnvFilter syntax) to
/// stderr, as human-readable text or as JSON lines. Text is coloured only
/// on a terminal.
pub fn init_logging(format: LogFormat, filter: EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Each line carries its event's fields, the innermost span's fields
        // (`span`) and the whole chain (`spans`), so a collector can filter
        // by rpc, trace_id or account_id without parsing text.
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}
