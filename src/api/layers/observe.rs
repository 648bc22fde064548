//! Observing every call: one tower layer, outermost, that gives each call a
//! tracing span (the RPC, the W3C trace it belongs to, and once
//! [`crate::api::auth`] has resolved the caller, its account and token ids),
//! counts it by RPC and gRPC status code, records its latency, and logs one
//! `finished` event with the code and the latency when it ends.
//!
//! The status code is read where gRPC puts it: in the response headers of a
//! "trailers-only" response (how tonic answers a unary call with an error,
//! and how the shed and guard layers refuse), otherwise in the trailers at
//! the end of the body. The latency runs until then, so it includes encoding
//! and sending the response. A call whose body is dropped before its
//! trailers (the client went away) counts as `CANCELLED`.
//!
//! Labels are closed sets: the RPC comes from a fixed table (the methods in
//! [`super::guard::RULES`], health and reflection; anything else is
//! `unknown`) and the code from the seventeen gRPC codes, so no label value
//! ever comes from a client, and none is a secret, a username or an id.
//!
//! The hot path stays cheap. A call's count and latency are two relaxed
//! atomic additions into a [`Latency`] histogram of its RPC and code:
//! registered once per label set (process-wide), fixed buckets, and sharded
//! by thread, each shard on cache lines of its own, so that cores do not
//! contend for them and nothing is buffered per sample. `/metrics` renders
//! them with [`render`] beside the exporter's output (the call counter is
//! the histogram's count, so the two always agree). `VerifyToken`, health
//! checks and reflection get DEBUG spans and events (every other call
//! INFO), so at the default `info` filter their span is a level check and
//! costs no id, no formatting and no log line. (An event logged inside such
//! a call then lacks the call's fields.)
//!
//! A valid `traceparent` (W3C Trace Context, version `00`) continues its
//! trace: the span carries its trace id, and the response carries a
//! `traceresponse` header (W3C Trace Context Level 2) naming this call's own
//! span id. A missing or malformed one is ignored, never an error; the span
//! then gets a new trace id of its own.

use std::{
    cell::Cell,
    fmt,
    fmt::Write as _,
    future::Future,
    pin::Pin,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tower::{Layer, Service};
use tracing::Span;

// Histograms are sharded as the domain's counters are.
use crate::domain::counters::{shard_count, shard_number};

/// The metric counting finished calls, by `service`, `method` and `code`.
pub const REQUESTS: &str = "identity_grpc_requests_total";
/// The histogram of call latencies in seconds, by `service`, `method` and
/// `code`.
pub const LATENCY: &str = "identity_grpc_request_duration_seconds";
const REQUESTS_HELP: &str = "gRPC calls finished, by service, method and status code";
const LATENCY_HELP: &str =
    "gRPC call latency until the status is sent, by service, method and status code";

/// The gRPC status codes by number, as they are named in labels and logs.
pub const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
const OK: usize = 0;
const CANCELLED: usize = 1;
const UNKNOWN: usize = 2;

/// The methods served besides this service's own (in `RULES`).
const OTHER_METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Calls whose span and `finished` event are DEBUG rather than INFO: the
/// ones other services make on every request they serve, load balancers
/// every few seconds, and grpcurl before every call it makes.
const QUIET_METHODS: &[&str] = &[
    "/identity.v1.TokensService/VerifyToken",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The span of a call, put in the request's extensions so that whoever
/// authenticates the caller can record who it is (see
/// [`CallSpan::record_caller`]).
#[derive(Debug, Clone)]
pub struct CallSpan(Span);

impl CallSpan {
    /// Records the authenticated caller's account id and token (or
    /// session) id: identifiers, never a secret.
    pub fn record_caller(&self, account_id: &str, token_id: &str) {
        self.0.record("account_id", account_id);
        self.0.record("token_id", token_id);
    }

    /// Records the client's address, as resolved through any trusted
    /// proxies (see [`super::forwarded`]).
    pub fn record_client_address(&self, client: &dyn std::fmt::Display) {
        self.0
            .record("client_address", tracing::field::display(client));
    }
}

/// The `ErrorInfo` reason (such as `ERROR_REASON_TOKEN_NAME_TAKEN`) of the
/// failed status `headers` carry (trailers, or the headers of a
/// trailers-only response); `None` for success or a status without one.
fn error_reason(headers: &http::HeaderMap, code: usize) -> Option<String> {
    use tonic_types::StatusExt as _;
    if code == OK {
        return None;
    }
    let status = tonic::Status::from_header_map(headers)?;
    status.get_details_error_info().map(|info| info.reason)
}

/// A tower layer that observes every call (see the module documentation).
/// Put it outermost, so that refusals by the other layers are observed too.
#[derive(Debug, Clone, Copy)]
pub struct ObserveLayer {
    shared: &'static Shared,
}

impl Default for ObserveLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ObserveLayer {
    /// A layer recording into the process's call metrics, which every
    /// layer shares (see [`render`]).
    pub fn new() -> Self {
        Self {
            shared: Shared::global(),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            shared: self.shared,
        }
    }
}

/// The service [`ObserveLayer`] produces.
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    shared: &'static Shared,
}

impl<S, B> Service<http::Request<B>> for Observe<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let start = Instant::now();
        let rpc = self.shared.find(request.uri().path());
        let info = &self.shared.rpcs[rpc];
        let parent = traceparent(request.headers());
        let span = if info.quiet {
            tracing::debug_span!(
                "grpc",
                rpc = info.name,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
                account_id = tracing::field::Empty,
                token_id = tracing::field::Empty,
                client_address = tracing::field::Empty,
            )
        } else {
            tracing::info_span!(
                "grpc",
                rpc = info.name,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
                account_id = tracing::field::Empty,
                token_id = tracing::field::Empty,
                client_address = tracing::field::Empty,
            )
        };
        // This call's span id: for the span, and for the `traceresponse`
        // of a traced call; neither, no id.
        let span_id = (!span.is_disabled() || parent.is_some()).then(nonzero_random);
        // A disabled span (a quiet call at the default filter) records
        // nothing: skip the work, and the extension's allocation.
        if !span.is_disabled() {
            let trace_id = parent.map_or_else(
                || u128::from(nonzero_random()) << 64 | u128::from(random()),
                |p| p.trace_id,
            );
            span.record("trace_id", tracing::field::display(Hex128(trace_id)));
            if let Some(id) = span_id {
                span.record("span_id", tracing::field::display(Hex64(id)));
            }
            request.extensions_mut().insert(CallSpan(span.clone()));
        }
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        ObserveFuture {
            inner,
            call: Some(Call {
                shared: self.shared,
                rpc,
                start,
                span,
                code: CANCELLED,
                reason: None,
            }),
            response_trace: parent
                .zip(span_id)
                .map(|(p, parent_id)| TraceParent { parent_id, ..p }),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of [`Observe`]: the inner call, run inside the call's
    /// span.
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
        response_trace: Option<TraceParent>,
    }
}

impl<F, E> Future for ObserveFuture<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.call {
            Some(call) => {
                let _entered = call.span.enter();
                ready!(this.inner.poll(cx))
            }
            None => ready!(this.inner.poll(cx)),
        };
        let Some(call) = this.call.take() else {
            return Poll::Ready(result);
        };
        let mut response = match result {
            Ok(response) => response,
            Err(err) => {
                call.finish(UNKNOWN);
                return Poll::Ready(Err(err));
            }
        };
        if let Some(trace) = this.response_trace
            && let Ok(value) = http::HeaderValue::from_str(&trace.to_string())
        {
            response.headers_mut().insert("traceresponse", value);
        }
        // Trailers-only: the status is in the headers, and the body is empty.
        if let Some(status) = response.headers().get("grpc-status") {
            let code = code_index(status.as_bytes());
            call.finish_from(response.headers(), code);
            return Poll::Ready(Ok(response));
        }
        Poll::Ready(Ok(response.map(|inner| {
            tonic::body::Body::new(ObservedBody {
                inner,
                call: Some(call),
            })
        })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that finishes its call when the trailers pass (or
    /// the body ends, fails, or is dropped).
    struct ObservedBody {
        #[pin]
        inner: tonic::body::Body,
        call: Option<Call>,
    }
}

impl http_body::Body for ObservedBody {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let code = match &frame {
            Some(Ok(frame)) => frame.trailers_ref().map(|trailers| {
                trailers
                    .get("grpc-status")
                    .map_or(UNKNOWN, |status| code_index(status.as_bytes()))
            }),
            // An error, or an end without trailers: not a proper gRPC end.
            Some(Err(_)) | None => Some(UNKNOWN),
        };
        if let Some(code) = code
            && let Some(call) = this.call.take()
        {
            match frame.as_ref().and_then(|f| f.as_ref().ok()?.trailers_ref()) {
                Some(trailers) => call.finish_from(trailers, code),
                None => call.finish(code),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The RPC table and each RPC's histograms: one per process.
#[derive(Debug)]
struct Shared {
    /// The known RPCs; the last is `unknown`.
    rpcs: Vec<Rpc>,
    /// Per RPC, per code: the latency histogram, created on first use.
    series: Vec<[OnceLock<Latency>; CODES.len()]>,
    /// The buckets' upper bounds in nanoseconds, from
    /// [`crate::observability::BUCKETS`].
    bounds: Vec<u64>,
}

#[derive(Debug)]
struct Rpc {
    /// The HTTP/2 path, such as `/identity.v1.TokensService/VerifyToken`.
    path: &'static str,
    /// The path without its leading slash, for logs.
    name: &'static str,
    service: &'static str,
    method: &'static str,
    /// DEBUG rather than INFO.
    quiet: bool,
}

impl Shared {
    /// The process's table: the series are the process's, like the
    /// `metrics` recorder, whichever server's layer records into them.
    fn global() -> &'static Self {
        static SHARED: OnceLock<Shared> = OnceLock::new();
        SHARED.get_or_init(Self::new)
    }

    fn new() -> Self {
        let paths = super::guard::RULES
            .iter()
            .map(|&(path, _)| path)
            .chain(OTHER_METHODS.iter().copied());
        let mut rpcs: Vec<Rpc> = paths
            .map(|path| {
                let name = &path[1..];
                let (service, method) = name.rsplit_once('/').unwrap_or((name, name));
                Rpc {
                    path,
                    name,
                    service,
                    method,
                    quiet: QUIET_METHODS.contains(&path),
                }
            })
            .collect();
        // Anything else (a scanner, a misconfigured client): one series, and
        // quiet, so a flood of junk does not flood the log.
        rpcs.push(Rpc {
            path: "",
            name: "unknown",
            service: "unknown",
            method: "unknown",
            quiet: true,
        });
        let series = rpcs.iter().map(|_| Default::default()).collect();
        let bounds = crate::observability::BUCKETS
            .iter()
            .map(|&seconds| Duration::from_secs_f64(seconds).as_nanos())
            .map(|nanos| u64::try_from(nanos).unwrap_or(u64::MAX))
            .collect();
        Self {
            rpcs,
            series,
            bounds,
        }
    }

    /// The index of the RPC at `path` (the last, `unknown`, if none).
    fn find(&self, path: &str) -> usize {
        self.rpcs
            .iter()
            .position(|rpc| rpc.path == path)
            .unwrap_or(self.rpcs.len() - 1)
    }

    fn series(&self, rpc: usize, code: usize) -> &Latency {
        self.series[rpc][code].get_or_init(Latency::new)
    }

    /// Appends both metrics in the Prometheus text format: each series
    /// used so far, its counts read once so that the counter, the
    /// histogram's count and its `+Inf` bucket agree.
    fn render(&self, out: &mut String) {
        let mut requests = String::new();
        let mut latency = String::new();
        for (info, series) in self.rpcs.iter().zip(&self.series) {
            for (code, series) in CODES.iter().zip(series) {
                let Some(series) = series.get() else {
                    continue;
                };
                let (buckets, sum) = series.read();
                let labels = format!(
                    "service=\"{}\",method=\"{}\",code=\"{code}\"",
                    info.service, info.method
                );
                let mut count = 0;
                for (i, n) in buckets.iter().enumerate() {
                    count += n;
                    let le = match crate::observability::BUCKETS.get(i) {
                        Some(bound) => bound.to_string(),
                        None => "+Inf".to_owned(),
                    };
                    let _ = writeln!(latency, "{LATENCY}_bucket{{{labels},le=\"{le}\"}} {count}");
                }
                let seconds = sum as f64 / 1e9;
                let _ = writeln!(latency, "{LATENCY}_sum{{{labels}}} {seconds}");
                let _ = writeln!(latency, "{LATENCY}_count{{{labels}}} {count}");
                let _ = writeln!(requests, "{REQUESTS}{{{labels}}} {count}");
            }
        }
        if requests.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {REQUESTS} {REQUESTS_HELP}");
        let _ = writeln!(out, "# TYPE {REQUESTS} counter");
        out.push_str(&requests);
        out.push('\n');
        let _ = writeln!(out, "# HELP {LATENCY} {LATENCY_HELP}");
        let _ = writeln!(out, "# TYPE {LATENCY} histogram");
        out.push_str(&latency);
        out.push('\n');
    }
}

/// Appends `identity_grpc_requests_total` and
/// `identity_grpc_request_duration_seconds` for every call observed in this
/// process so far, in the Prometheus text format (nothing before the first
/// call).
pub fn render(out: &mut String) {
    Shared::global().render(out);
}

/// Buckets of a [`Latency`]: the finite bounds
/// ([`crate::observability::BUCKETS`]) and `+Inf`.
const BUCKETS: usize = crate::observability::BUCKETS.len() + 1;

/// A latency histogram with fixed buckets, sharded by thread: recording is
/// two relaxed atomic additions on cache lines that only threads sharing
/// the shard touch (one thread per shard while there are no more threads
/// than shards); reading sums the shards. Counts are exact; a read that
/// races with a recording may see the sample in its bucket before its sum.
#[derive(Debug)]
struct Latency {
    shards: Box<[Shard]>,
}

/// One thread group's counts. Aligned to two cache lines (what adjacent
/// line prefetching pulls in together) so that shards share none.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    /// Samples per bucket (not cumulative).
    counts: [AtomicU64; BUCKETS],
    /// The samples' sum, in nanoseconds.
    sum: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty histogram.
    fn new() -> Self {
        Self {
            shards: (0..shard_count()).map(|_| Shard::default()).collect(),
        }
    }

    /// Records one sample of `nanos` into `bucket`: the first whose bound
    /// it does not exceed (past the last, `+Inf`).
    fn record(&self, bucket: usize, nanos: u64) {
        let shard = &self.shards[shard_number() % self.shards.len()];
        shard.counts[bucket.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        shard.sum.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The samples per bucket (not cumulative; the last is `+Inf`) and
    /// their sum in nanoseconds, over every shard.
    fn read(&self) -> ([u64; BUCKETS], u64) {
        let mut counts = [0u64; BUCKETS];
        let mut sum = 0u64;
        for shard in &self.shards {
            for (total, n) in counts.iter_mut().zip(&shard.counts) {
                *total += n.load(Ordering::Relaxed);
            }
            sum = sum.wrapping_add(shard.sum.load(Ordering::Relaxed));
        }
        (counts, sum)
    }
}

/// A call in progress. Dropped without [`Call::finish`] (the client went
/// away first), it finishes as `CANCELLED`.
struct Call {
    shared: &'static Shared,
    rpc: usize,
    start: Instant,
    span: Span,
    code: usize,
    /// The failed status's `ErrorInfo` reason, for the `finished` event.
    reason: Option<String>,
}

impl Call {
    fn finish(mut self, code: usize) {
        self.code = code;
    }

    /// Finishes with the status `headers` carry, recording its reason in
    /// the `finished` event when the call failed (and is logged at all).
    fn finish_from(mut self, headers: &http::HeaderMap, code: usize) {
        if !self.span.is_disabled() {
            self.reason = error_reason(headers, code);
        }
        self.finish(code);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = self.shared.bounds.partition_point(|&bound| bound < nanos);
        self.shared
            .series(self.rpc, self.code)
            .record(bucket, nanos);
        let code = CODES[self.code];
        let latency_ms = elapsed.as_secs_f64() * 1e3;
        let reason = self.reason.as_deref();
        if self.shared.rpcs[self.rpc].quiet {
            tracing::debug!(parent: &self.span, code, reason, latency_ms, "finished");
        } else {
            tracing::info!(parent: &self.span, code, reason, latency_ms, "finished");
        }
    }
}

/// The code index for a `grpc-status` value; anything unparsable or out of
/// range is UNKNOWN.
fn code_index(value: &[u8]) -> usize {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse::<usize>().ok())
        .filter(|&code| code < CODES.len())
        .unwrap_or(UNKNOWN)
}

/// A W3C `traceparent`, version `00`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id, never zero.
    pub trace_id: u128,
    /// The caller's span id, never zero.
    pub parent_id: u64,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>` strictly: lowercase hex, version
    /// `00` only, neither id all zeros, nothing before or after.
    pub fn parse(value: &[u8]) -> Option<Self> {
        // 2 + 1 + 32 + 1 + 16 + 1 + 2 bytes.
        if value.len() != 55 || !value.starts_with(b"00-") || value[35] != b'-' || value[52] != b'-'
        {
            return None;
        }
        let trace_id = hex(&value[3..35])?;
        let parent_id = u64::try_from(hex(&value[36..52])?).ok()?;
        let flags = u8::try_from(hex(&value[53..55])?).ok()?;
        (trace_id != 0 && parent_id != 0).then_some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            Hex128(self.trace_id),
            Hex64(self.parent_id),
            self.flags
        )
    }
}

/// The request's `traceparent`, if it has exactly one and it is valid.
fn traceparent(headers: &http::HeaderMap) -> Option<TraceParent> {
    let mut values = headers.get_all("traceparent").iter();
    match (values.next(), values.next()) {
        (Some(value), None) => TraceParent::parse(value.as_bytes()),
        _ => None,
    }
}

/// Lowercase hex digits to a number (at most 32 digits).
fn hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(n << 4 | u128::from(v))
    })
}

struct Hex128(u128);

impl fmt::Display for Hex128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

struct Hex64(u64);

impl fmt::Display for Hex64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A random number for span and trace ids: SplitMix64 per thread, seeded
/// from the OS. Ids need to be unique, not unpredictable, and this costs a
/// few nanoseconds where the OS generator costs a system call.
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(rand::RngCore::next_u64(&mut rand::rngs::OsRng));
    }
    STATE.with(|state| {
        let x = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(x);
        let z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

fn nonzero_random() -> u64 {
    loop {
        let n = random();
        if n != 0 {
            return n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_parses_and_prints_back() {
        let parsed = TraceParent::parse(VALID.as_bytes()).expect("valid");
        assert_eq!(parsed.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert_eq!(parsed.parent_id, 0x00f0_67aa_0ba9_02b7);
        assert_eq!(parsed.flags, 1);
        assert_eq!(parsed.to_string(), VALID);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00",
            // Version other than 00, including the forbidden ff.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Uppercase, non-hex, wrong lengths, wrong separators, extra text.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn two_traceparents_are_ignored() {
        let mut headers = http::HeaderMap::new();
        headers.append("traceparent", http::HeaderValue::from_static(VALID));
        assert!(traceparent(&headers).is_some());
        headers.append("traceparent", http::HeaderValue::from_static(VALID));
        assert_eq!(traceparent(&headers), None);
    }

    #[test]
    fn codes_outside_grpc_are_unknown() {
        assert_eq!(CODES[code_index(b"0")], "OK");
        assert_eq!(CODES[code_index(b"16")], "UNAUTHENTICATED");
        for bad in [&b"17"[..], b"-1", b"", b"x", b"999999999999999999999"] {
            assert_eq!(CODES[code_index(bad)], "UNKNOWN");
        }
    }

    #[test]
    fn concurrent_samples_from_several_threads_sum_exactly() {
        let latency = Latency::new();
        let (threads, per_thread) = (8u64, 10_000u64);
        std::thread::scope(|scope| {
            for t in 0..threads {
                let latency = &latency;
                scope.spawn(move || {
                    for i in 0..per_thread {
                        latency.record(usize::try_from((t + i) % 20).unwrap(), t + 1);
                    }
                });
            }
        });
        let (counts, sum) = latency.read();
        assert_eq!(counts.iter().sum::<u64>(), threads * per_thread);
        // Buckets past the last go to +Inf.
        assert_eq!(counts[BUCKETS - 1], threads * per_thread * 3 / 20);
        assert_eq!(sum, (1..=threads).sum::<u64>() * per_thread);
    }

    #[test]
    fn the_exposition_is_cumulative_and_counts_agree() {
        let shared = Shared::new();
        let verify = shared.find("/identity.v1.TokensService/VerifyToken");
        // 40 us, 100 us (on the bound: its bucket), 3 ms, 20 s.
        for nanos in [40_000, 100_000, 3_000_000, 20_000_000_000] {
            let bucket = shared.bounds.partition_point(|&bound| bound < nanos);
            shared.series(verify, OK).record(bucket, nanos);
        }
        let mut text = String::new();
        shared.render(&mut text);
        let labels = "service=\"identity.v1.TokensService\",method=\"VerifyToken\",code=\"OK\"";
        for line in [
            format!("{REQUESTS}{{{labels}}} 4"),
            format!("{LATENCY}_bucket{{{labels},le=\"0.00005\"}} 1"),
            format!("{LATENCY}_bucket{{{labels},le=\"0.0001\"}} 2"),
            format!("{LATENCY}_bucket{{{labels},le=\"0.0025\"}} 2"),
            format!("{LATENCY}_bucket{{{labels},le=\"0.005\"}} 3"),
            format!("{LATENCY}_bucket{{{labels},le=\"10\"}} 3"),
            format!("{LATENCY}_bucket{{{labels},le=\"+Inf\"}} 4"),
            format!("{LATENCY}_sum{{{labels}}} 20.00314"),
            format!("{LATENCY}_count{{{labels}}} 4"),
            format!("# TYPE {REQUESTS} counter"),
            format!("# TYPE {LATENCY} histogram"),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // Only the series used appear.
        assert_eq!(text.matches("_count{").count(), 1, "{text}");
    }

    #[test]
    fn every_rpc_has_a_service_and_a_method() {
        let layer = ObserveLayer::new();
        for rpc in &layer.shared.rpcs {
            assert!(!rpc.service.is_empty() && !rpc.method.is_empty(), "{rpc:?}");
            assert!(!rpc.method.contains('/'), "{rpc:?}");
        }
        let shared = &layer.shared;
        let verify = shared.find("/identity.v1.TokensService/VerifyToken");
        assert_eq!(shared.rpcs[verify].service, "identity.v1.TokensService");
        assert_eq!(shared.rpcs[verify].method, "VerifyToken");
        assert!(shared.rpcs[verify].quiet);
        let junk = shared.find("/identity.v1.TokensService/VerifyToken/../x");
        assert_eq!(shared.rpcs[junk].method, "unknown");
    }
}
