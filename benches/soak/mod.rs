//! `loadgen soak`: a long run of a realistic mix against several replicas
//! on one PostgreSQL, checking every answer and watching the replicas'
//! memory. `benches/run.sh -s soak` starts the replicas and drives it.
//!
//! The mix (percentages of calls, decimals allowed; `--mix`):
//!
//! - `verify`: `VerifyToken` of a token that is active: one of the
//!   bulk-loaded tokens (never revoked) or one created during the soak and
//!   not yet being revoked. Expected: OK, `active: true`. A created token
//!   whose revocation started while the call was in flight may get either
//!   answer (counted as "raced").
//! - `verify-revoked`: `VerifyToken` of one of the last `--revoked-window`
//!   tokens this run revoked. Expected: OK, `active: false`,
//!   `INACTIVE_REASON_REVOKED`.
//! - `use-revoked`: `GetToken` of such a token's own id, authenticated by the
//!   revoked token itself. Expected: `UNAUTHENTICATED` (an outcome, not an
//!   error).
//! - `create`: `CreateToken` (operator) for the bench account. Expected: OK.
//! - `revoke`: `RevokeToken` (operator) of a created token. Expected: OK.
//!   Each acknowledged revocation is followed at once by a `VerifyToken` of
//!   the same token on another replica (counted under `verify-revoked`),
//!   the most adversarial moment for a replica's cache.
//! - `sign-in`: `SignIn` with the bench person's password (argon2id).
//!   Expected: OK with a session token.
//!
//! Every call goes to a replica chosen at random. Any other gRPC code is an
//! unexpected error; so is a wrong verdict.
//!
//! Revocation correctness: a revoked token answered `active: true` (or a
//! call authenticated by it succeeding) is a **violation** when the call
//! started after the revocation was acknowledged and either went to the
//! replica that revoked it (revocation is immediate there) or started
//! `--stale-bound` (1 s, the cache's documented staleness bound) or more
//! after the acknowledgement. On another replica within the bound it is
//! counted as **stale within the bound** (the notification was still in
//! flight), with the longest such delay, and does not fail the run.
//!
//! Memory: `VmRSS` of each replica's pid is sampled every `--sample-every`;
//! the samples after `--settle` are judged. Memory held for a moment (an
//! argon2id hash in progress takes 19 MiB) shows as peaks, memory kept as a
//! higher floor, so each part of the window is summarised by its lowest
//! sample. Two bounded structures of a replica legitimately grow with every
//! credential it sees used for the first time, and the soak creates
//! credentials all along: the verification cache (up to `--cache-entries`;
//! 1 KiB per entry allowed, twice the 506 B measured) and the last-use
//! recorder (the time each token's last use was written, pruned by age:
//! it holds the tokens used in the last two minutes, at most 100,000; 128 B
//! per token allowed, about 100 B seen). Their growth is *explained* by the
//! created tokens first seen active on that replica during the window
//! (for the recorder, those of two minutes at the window's rate). With at least nine samples, a replica
//! **leaks** when the floor of the window's last third exceeds the floor of
//! its first third by more than the explained growth plus the larger of
//! `--max-rss-growth` percent and `--min-rss-growth-mib`, AND is still
//! rising: the floor of the last sixth exceeds the floor of the sixth
//! before it. A step that then stays flat (a hash table doubling, an
//! allocator arena) is not a leak; a steady climb beyond what the new
//! credentials explain is.
//!
//! The run fails (exit 1) on any unexpected error, wrong verdict, violation,
//! leak or replica that disappeared; the Markdown report (`--report`) says
//! which.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    fs,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Args;
use identity::{
    api::pb::{
        self, accounts_service_client::AccountsServiceClient,
        tokens_service_client::TokensServiceClient,
    },
    config::parse_duration,
};
use rand::{RngCore as _, rngs::OsRng};
use tonic::{
    Code, Status,
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};

use super::{BoxError, SplitMix, authorized, bearer, connect, percentile, read_lines, reason_name};

/// The default mix: mostly verifications, as in production.
const DEFAULT_MIX: &str =
    "verify:90,verify-revoked:4,use-revoked:1,create:2.45,revoke:2.45,sign-in:0.1";

#[derive(Debug, Args)]
pub(crate) struct SoakArgs {
    /// Comma-separated replica URLs (at least two); every call goes to one
    /// of them at random.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// The replicas' process ids, in the order of `--targets`, to sample
    /// their resident memory (`VmRSS` in /proc/<pid>/status).
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// The processes whose CPU time is the system under test's, each with
    /// its children (the replicas and the PostgreSQL postmaster, whose
    /// children are the backends); default: `--pids`.
    #[arg(long, value_delimiter = ',')]
    cpu_pids: Vec<u32>,
    /// Efficiency (calls per CPU-second of the system under test) of the
    /// window's last third may be this many percent below its first third's
    /// before the run is judged not flat.
    #[arg(long, default_value_t = 5.0)]
    max_efficiency_drop: f64,
    /// An operator's token (creates and revokes tokens).
    #[arg(long, env = "BENCH_OPERATOR_TOKEN", hide_env_values = true)]
    operator_token: String,
    /// The caller's token for VerifyToken (`tokens:verify`).
    #[arg(long, env = "BENCH_VERIFIER_TOKEN", hide_env_values = true)]
    verifier: String,
    /// The account the created tokens belong to (the person of `setup`).
    #[arg(long)]
    account_id: String,
    /// Valid tokens that stay valid, one per line (the bulk-loaded pool).
    #[arg(long)]
    tokens_file: PathBuf,
    /// Username for `sign-in`.
    #[arg(long, default_value = "alice")]
    username: String,
    /// Password for `sign-in`.
    #[arg(long, default_value = "tulip orbit canyon 47")]
    password: String,
    /// Percentages of calls per operation: verify, verify-revoked,
    /// use-revoked, create, revoke, sign-in (decimals allowed).
    #[arg(long, default_value = DEFAULT_MIX)]
    mix: String,
    /// How long the load runs.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    duration: Duration,
    /// HTTP/2 connections in all, spread evenly over the targets.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Concurrent calls (closed loop; default: one per connection).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Time before latencies, throughput and memory are judged (errors and
    /// verdicts count from the start). Default: a fifth of the duration, at
    /// most 60 s.
    #[arg(long, value_parser = parse_duration)]
    settle: Option<Duration>,
    /// Memory sampling period. Default: a twentieth of the duration, at
    /// most 10 s.
    #[arg(long, value_parser = parse_duration)]
    sample_every: Option<Duration>,
    /// The replicas' `--cache-entries`: growth the cache explains is not a
    /// leak.
    #[arg(long, default_value_t = 0)]
    cache_entries: u64,
    /// Leak threshold: growth of the window's last third over its first, in
    /// percent.
    #[arg(long, default_value_t = 10.0)]
    max_rss_growth: f64,
    /// ... and in MiB (both must be exceeded).
    #[arg(long, default_value_t = 4.0)]
    min_rss_growth_mib: f64,
    /// How long after a revocation was acknowledged another replica may
    /// still answer from its cache before it is a violation.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    stale_bound: Duration,
    /// Created tokens alive at most at once (beyond, `create` revokes).
    #[arg(long, default_value_t = 1000)]
    max_live: usize,
    /// How many of the latest revoked tokens `verify-revoked` and
    /// `use-revoked` draw from (bounds the working set).
    #[arg(long, default_value_t = 1000)]
    revoked_window: usize,
    /// Write the Markdown report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

/// One kind of call in the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Verify,
    VerifyRevoked,
    UseRevoked,
    Create,
    Revoke,
    SignIn,
}

const OPS: [Op; 6] = [
    Op::Verify,
    Op::VerifyRevoked,
    Op::UseRevoked,
    Op::Create,
    Op::Revoke,
    Op::SignIn,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Self::Verify => "verify",
            Self::VerifyRevoked => "verify-revoked",
            Self::UseRevoked => "use-revoked",
            Self::Create => "create",
            Self::Revoke => "revoke",
            Self::SignIn => "sign-in",
        }
    }

    /// The RPC and the outcome that counts as success.
    fn describe(self) -> &'static str {
        match self {
            Self::Verify => "VerifyToken, active token: OK, active",
            Self::VerifyRevoked => "VerifyToken, revoked token: OK, inactive (REVOKED)",
            Self::UseRevoked => "GetToken with a revoked token: UNAUTHENTICATED",
            Self::Create => "CreateToken: OK",
            Self::Revoke => "RevokeToken: OK",
            Self::SignIn => "SignIn: OK",
        }
    }
}

/// Parses `verify:90,create:2.5,...` into weights.
fn parse_mix(raw: &str) -> Result<Vec<(Op, f64)>, BoxError> {
    let mut mix = Vec::new();
    for part in raw.split(',').filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once(':')
            .ok_or_else(|| format!("--mix: expected operation:percent, got {part:?}"))?;
        let op = OPS
            .into_iter()
            .find(|op| op.name() == name)
            .ok_or_else(|| {
                format!(
                    "--mix: unknown operation {name:?} (known: {})",
                    OPS.map(Op::name).join(", ")
                )
            })?;
        let weight: f64 = weight
            .parse()
            .ok()
            .filter(|w: &f64| w.is_finite() && *w >= 0.0)
            .ok_or_else(|| format!("--mix: bad percentage in {part:?}"))?;
        if weight > 0.0 {
            mix.push((op, weight));
        }
    }
    if mix.is_empty() {
        return Err("--mix names no operation with a positive share".into());
    }
    Ok(mix)
}

const LIVE: u8 = 0;
const REVOKING: u8 = 1;
const REVOKED: u8 = 2;

/// A token created during the soak.
struct Created {
    id: String,
    secret: String,
    /// `LIVE`, then `REVOKING` from the moment its revocation is sent, then
    /// `REVOKED` once it is acknowledged.
    state: AtomicU8,
    /// Bit r: already answered active by replica r.
    seen: AtomicU64,
}

/// A revocation that was acknowledged.
struct Revoked {
    token: Arc<Created>,
    acked: Instant,
    by: usize,
}

/// Counters of the answers' correctness (whole run).
#[derive(Default)]
struct Checks {
    revoked_checks: AtomicU64,
    violations: AtomicU64,
    stale: AtomicU64,
    stale_max_us: AtomicU64,
    wrong: AtomicU64,
    raced: AtomicU64,
}

/// What the workers share.
struct Shared {
    /// Bulk-loaded tokens, valid for the whole run.
    pool: Vec<String>,
    /// Created tokens answered active by each replica for the first time
    /// (each costs it a cache entry and a last-use record).
    fresh: Vec<AtomicU64>,
    live: Mutex<Vec<Arc<Created>>>,
    revoked: Mutex<VecDeque<Revoked>>,
    names: AtomicU64,
    run: u32,
    account_id: String,
    sign_in: pb::SignInRequest,
    mix: Vec<(Op, f64)>,
    total_weight: f64,
    measure_from: Instant,
    deadline: Instant,
    stale_bound: Duration,
    max_live: usize,
    revoked_window: usize,
    calls: AtomicU64,
    errors: AtomicU64,
    checks: Checks,
    /// The first few problems, for the report (ids and codes, never secrets).
    notes: Mutex<Vec<String>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn note(&self, text: String) {
        let mut notes = locked(&self.notes);
        if notes.len() < 20 {
            eprintln!("soak: {text}");
            notes.push(text);
        }
    }

    /// A revoked token was accepted by `replica` in a call that started at
    /// `started`, after `by` acknowledged its revocation at `acked`.
    fn accepted_revoked(
        &self,
        what: &str,
        token: &Created,
        (replica, started): (usize, Instant),
        (by, acked): (usize, Instant),
    ) {
        let lag = started.saturating_duration_since(acked);
        if replica == by || lag >= self.stale_bound {
            self.checks.violations.fetch_add(1, Ordering::Relaxed);
            self.note(format!(
                "VIOLATION: {what}: token {} accepted by replica {replica} {lag:?} after replica {by} acknowledged its revocation",
                token.id
            ));
        } else {
            // The answer's arrival, not the call's start: how long after the
            // acknowledgement the replica was seen still trusting it.
            let seen_until = acked.elapsed();
            self.checks.stale.fetch_add(1, Ordering::Relaxed);
            self.checks.stale_max_us.fetch_max(
                u64::try_from(seen_until.as_micros()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        }
    }
}

/// Latencies and outcomes of one operation, per worker, merged at the end.
#[derive(Default)]
struct OpStats {
    /// Calls started after the settle time.
    latencies_us: Vec<u32>,
    /// Every call.
    calls: u64,
    /// Unexpected codes, every call.
    codes: BTreeMap<String, u64>,
}

/// One replica, as a worker sees it.
struct Lane {
    tokens: TokensServiceClient<Channel>,
    accounts: AccountsServiceClient<Channel>,
}

struct Worker {
    lanes: Vec<Lane>,
    verifier: MetadataValue<Ascii>,
    operator: MetadataValue<Ascii>,
    rng: SplitMix,
    stats: BTreeMap<Op, OpStats>,
    shared: Arc<Shared>,
}

/// The verdict of a `VerifyToken`: (active, reason).
type Verdict = Result<(bool, i32), Status>;

impl Worker {
    async fn run(mut self) -> BTreeMap<Op, OpStats> {
        while Instant::now() < self.shared.deadline {
            match self.pick() {
                Op::Verify => self.verify().await,
                Op::VerifyRevoked => self.verify_revoked().await,
                Op::UseRevoked => self.use_revoked().await,
                Op::Create => self.create().await,
                Op::Revoke => self.revoke().await,
                Op::SignIn => self.sign_in().await,
            }
        }
        self.stats
    }

    /// The next operation: drawn from the mix, then adjusted to what exists
    /// (nothing revoked yet: verify; no live token: create; too many: revoke).
    fn pick(&mut self) -> Op {
        let x = (self.rng.next() >> 11) as f64 / (1u64 << 53) as f64 * self.shared.total_weight;
        let mut acc = 0.0;
        let mut op = self.shared.mix[self.shared.mix.len() - 1].0;
        for &(candidate, weight) in &self.shared.mix {
            acc += weight;
            if x < acc {
                op = candidate;
                break;
            }
        }
        match op {
            Op::VerifyRevoked | Op::UseRevoked if locked(&self.shared.revoked).is_empty() => {
                Op::Verify
            }
            Op::Revoke if locked(&self.shared.live).is_empty() => Op::Create,
            Op::Create if locked(&self.shared.live).len() >= self.shared.max_live => Op::Revoke,
            op => op,
        }
    }

    fn replica(&mut self) -> usize {
        self.rng.below(self.lanes.len())
    }

    /// Counts one call; `error` is an unexpected outcome.
    fn record(&mut self, op: Op, started: Instant, error: Option<&Status>) {
        let micros = started.elapsed().as_micros();
        self.shared.calls.fetch_add(1, Ordering::Relaxed);
        let stats = self.stats.entry(op).or_default();
        stats.calls += 1;
        if started >= self.shared.measure_from {
            stats
                .latencies_us
                .push(u32::try_from(micros).unwrap_or(u32::MAX));
        }
        if let Some(status) = error {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
            *stats
                .codes
                .entry(format!("{:?}", status.code()))
                .or_default() += 1;
            self.shared.note(format!(
                "{}: unexpected {:?}: {}",
                op.name(),
                status.code(),
                status.message()
            ));
        }
    }

    async fn call_verify(&mut self, replica: usize, token: &str) -> Verdict {
        self.lanes[replica]
            .tokens
            .verify_token(authorized(
                pb::VerifyTokenRequest {
                    token: token.to_owned(),
                    ..Default::default()
                },
                &self.verifier,
            ))
            .await
            .map(|r| {
                let r = r.into_inner();
                (r.active, r.reason)
            })
    }

    async fn verify(&mut self) {
        let shared = Arc::clone(&self.shared);
        let created = {
            let live = locked(&shared.live);
            let i = self.rng.below(shared.pool.len() + live.len());
            i.checked_sub(shared.pool.len())
                .map(|j| Arc::clone(&live[j]))
        };
        let replica = self.replica();
        let (secret, what) = match &created {
            None => (
                shared.pool[self.rng.below(shared.pool.len())].as_str(),
                "a bulk-loaded token",
            ),
            Some(token) => (token.secret.as_str(), "a created token"),
        };
        let started = Instant::now();
        let verdict = self.call_verify(replica, secret).await;
        self.record(Op::Verify, started, verdict.as_ref().err());
        let Ok((active, reason)) = verdict else {
            return;
        };
        if active {
            if let Some(token) = &created {
                let bit = 1u64 << replica;
                if token.seen.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                    shared.fresh[replica].fetch_add(1, Ordering::Relaxed);
                }
            }
            return;
        }
        let racing = created
            .as_ref()
            .is_some_and(|t| t.state.load(Ordering::Acquire) != LIVE);
        if racing && reason == pb::InactiveReason::Revoked as i32 {
            shared.checks.raced.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.checks.wrong.fetch_add(1, Ordering::Relaxed);
            shared.note(format!(
                "WRONG: verify of {what} answered inactive ({}) on replica {replica}",
                reason_name(reason)
            ));
        }
    }

    /// A random entry of the revocation window.
    fn recent_revoked(&mut self) -> Option<(Arc<Created>, Instant, usize)> {
        let ring = locked(&self.shared.revoked);
        if ring.is_empty() {
            return None;
        }
        let r = &ring[self.rng.below(ring.len())];
        Some((Arc::clone(&r.token), r.acked, r.by))
    }

    async fn verify_revoked(&mut self) {
        let Some((token, acked, by)) = self.recent_revoked() else {
            return;
        };
        let replica = self.replica();
        self.check_revoked(&token, acked, by, replica).await;
    }

    /// `VerifyToken` of a token whose revocation `by` acknowledged at
    /// `acked`, on `replica`.
    async fn check_revoked(&mut self, token: &Created, acked: Instant, by: usize, replica: usize) {
        let shared = Arc::clone(&self.shared);
        let started = Instant::now();
        let verdict = self.call_verify(replica, &token.secret).await;
        self.record(Op::VerifyRevoked, started, verdict.as_ref().err());
        let Ok((active, reason)) = verdict else {
            return;
        };
        shared.checks.revoked_checks.fetch_add(1, Ordering::Relaxed);
        if active {
            shared.accepted_revoked(
                "VerifyToken answered active",
                token,
                (replica, started),
                (by, acked),
            );
        } else if reason != pb::InactiveReason::Revoked as i32 {
            shared.checks.wrong.fetch_add(1, Ordering::Relaxed);
            shared.note(format!(
                "WRONG: revoked token {} answered {} on replica {replica}",
                token.id,
                reason_name(reason)
            ));
        }
    }

    async fn use_revoked(&mut self) {
        let Some((token, acked, by)) = self.recent_revoked() else {
            return;
        };
        let shared = Arc::clone(&self.shared);
        let replica = self.replica();
        let Ok(auth) = bearer(&token.secret) else {
            return;
        };
        let started = Instant::now();
        let answer = self.lanes[replica]
            .tokens
            .get_token(authorized(
                pb::GetTokenRequest {
                    token_id: token.id.clone(),
                },
                &auth,
            ))
            .await;
        match answer {
            Err(status) if status.code() == Code::Unauthenticated => {
                self.record(Op::UseRevoked, started, None);
            }
            Err(status) => self.record(Op::UseRevoked, started, Some(&status)),
            Ok(_) => {
                self.record(Op::UseRevoked, started, None);
                shared.accepted_revoked(
                    "GetToken succeeded",
                    &token,
                    (replica, started),
                    (by, acked),
                );
            }
        }
        shared.checks.revoked_checks.fetch_add(1, Ordering::Relaxed);
    }

    async fn create(&mut self) {
        let shared = Arc::clone(&self.shared);
        let replica = self.replica();
        let n = shared.names.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let answer = self.lanes[replica]
            .tokens
            .create_token(authorized(
                pb::CreateTokenRequest {
                    account_id: shared.account_id.clone(),
                    name: format!("soak-{:08x}-{n}", shared.run),
                    // `tokens:read` lets the token read itself (use-revoked).
                    scopes: vec!["project:read".into(), "tokens:read".into()],
                    ..Default::default()
                },
                &self.operator,
            ))
            .await;
        self.record(Op::Create, started, answer.as_ref().err());
        let Ok(answer) = answer else {
            return;
        };
        let answer = answer.into_inner();
        let Some(token) = answer.token else {
            shared.checks.wrong.fetch_add(1, Ordering::Relaxed);
            shared.note("WRONG: CreateToken returned no token".into());
            return;
        };
        locked(&shared.live).push(Arc::new(Created {
            id: token.token_id,
            secret: answer.secret,
            state: AtomicU8::new(LIVE),
            seen: AtomicU64::new(0),
        }));
    }

    async fn revoke(&mut self) {
        let shared = Arc::clone(&self.shared);
        let token = {
            let mut live = locked(&shared.live);
            if live.is_empty() {
                return;
            }
            let i = self.rng.below(live.len());
            live.swap_remove(i)
        };
        token.state.store(REVOKING, Ordering::Release);
        let replica = self.replica();
        let started = Instant::now();
        let answer = self.lanes[replica]
            .tokens
            .revoke_token(authorized(
                pb::RevokeTokenRequest {
                    token_id: token.id.clone(),
                },
                &self.operator,
            ))
            .await;
        let acked = Instant::now();
        self.record(Op::Revoke, started, answer.as_ref().err());
        if answer.is_err() {
            // In an unknown state: neither live nor known revoked.
            return;
        }
        token.state.store(REVOKED, Ordering::Release);
        {
            let mut ring = locked(&shared.revoked);
            if ring.len() >= shared.revoked_window {
                ring.pop_front();
            }
            ring.push_back(Revoked {
                token: Arc::clone(&token),
                acked,
                by: replica,
            });
        }
        // At once, on another replica.
        let n = self.lanes.len();
        let other = (replica + 1 + self.rng.below(n - 1)) % n;
        self.check_revoked(&token, acked, replica, other).await;
    }

    async fn sign_in(&mut self) {
        let shared = Arc::clone(&self.shared);
        let replica = self.replica();
        let started = Instant::now();
        let answer = self.lanes[replica]
            .accounts
            .sign_in(shared.sign_in.clone())
            .await;
        self.record(Op::SignIn, started, answer.as_ref().err());
        if let Ok(answer) = answer
            && !answer.into_inner().session_token.starts_with("idses_")
        {
            shared.checks.wrong.fetch_add(1, Ordering::Relaxed);
            shared.note("WRONG: SignIn returned no session token".into());
        }
    }
}

/// One memory sample.
struct Sample {
    at: Duration,
    /// KiB per replica; `None` once the process is gone.
    rss_kib: Vec<Option<u64>>,
    calls: u64,
    errors: u64,
    /// `Shared::fresh` at that moment.
    fresh: Vec<u64>,
    /// CPU time used so far by the system under test (`--cpu-pids` and
    /// their children), in clock ticks.
    cpu_ticks: u64,
}

/// `/proc/<pid>/stat`'s clock ticks per second (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// Fields of `/proc/<pid>/stat` after the command name: (ppid, the CPU
/// ticks of the process itself (utime + stime), those of its children it
/// has waited for (cutime + cstime)).
fn proc_stat(pid: u32) -> Option<(u32, u64, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // rest[0] is field 3 (state): ppid is field 4, utime..cstime 14..17.
    let num = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
    let ppid = u32::try_from(num(4)?).ok()?;
    Some((ppid, num(14)? + num(15)?, num(16)? + num(17)?))
}

/// The CPU ticks used by `roots` and their children: each root's own and
/// its reaped children's (the backends of closed connections), and each
/// live child's own (the backends serving now).
fn cpu_ticks(roots: &[u32]) -> u64 {
    let mut total = 0;
    for &root in roots {
        if let Some((_, own, reaped)) = proc_stat(root) {
            total += own + reaped;
        }
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return total;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((ppid, own, _)) = proc_stat(pid)
            && roots.contains(&ppid)
            && !roots.contains(&pid)
        {
            total += own;
        }
    }
    total
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Samples every `every` from `start` until `end` (both included).
async fn sampler(
    shared: Arc<Shared>,
    pids: Vec<u32>,
    cpu_pids: Vec<u32>,
    start: Instant,
    end: Instant,
    every: Duration,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut k = 0u32;
    loop {
        let due = (start + every * k).min(end);
        tokio::time::sleep_until(due.into()).await;
        samples.push(Sample {
            // When it was taken: a busy machine wakes the sampler late.
            at: start.elapsed(),
            rss_kib: pids.iter().map(|&p| rss_kib(p)).collect(),
            calls: shared.calls.load(Ordering::Relaxed),
            errors: shared.errors.load(Ordering::Relaxed),
            fresh: shared
                .fresh
                .iter()
                .map(|f| f.load(Ordering::Relaxed))
                .collect(),
            cpu_ticks: cpu_ticks(&cpu_pids),
        });
        if due >= end {
            return samples;
        }
        k += 1;
    }
}

/// The lowest sample: what the process kept, without the transient peaks.
fn floor(values: &[u64]) -> f64 {
    values.iter().copied().min().unwrap_or(0) as f64
}

/// Memory a cache entry may take, in KiB: twice the 506 B measured with the
/// default cache full (BENCHMARKS.md).
const CACHE_KIB_PER_ENTRY: f64 = 1.0;

/// The service's last-use recorder: how many tokens it remembers at most,
/// for how long (it prunes entries older than the minute between two
/// recorded uses once a minute, so an entry lives at most two), and what
/// one may take (a `HashMap<TokenId, Timestamp>`: a 36-byte id on the heap,
/// 32 bytes of bucket: about 100 B, as the soak runs show).
const RECORDER_CAPACITY: u64 = 100_000;
const RECORDER_SPAN_SECS: f64 = 120.0;
const RECORDER_KIB_PER_ENTRY: f64 = 0.125;

/// The memory judgement of one replica.
struct MemoryVerdict {
    samples: usize,
    first_mib: f64,
    last_mib: f64,
    leak: bool,
    judged: bool,
    gone: bool,
    why: String,
}

/// Whether the replica's memory keeps growing (see the module's doc).
fn judge_memory(
    samples: &[Sample],
    replica: usize,
    settle: Duration,
    cache_entries: u64,
    max_growth_pct: f64,
    min_growth_mib: f64,
) -> MemoryVerdict {
    let gone = samples.iter().any(|s| s.rss_kib[replica].is_none());
    let in_window: Vec<&Sample> = samples.iter().filter(|s| s.at >= settle).collect();
    let window: Vec<u64> = in_window
        .iter()
        .filter_map(|s| s.rss_kib[replica])
        .collect();
    let fresh = match (in_window.first(), in_window.last()) {
        (Some(a), Some(b)) => b.fresh[replica] - a.fresh[replica],
        _ => 0,
    };
    let window_secs = match (in_window.first(), in_window.last()) {
        (Some(a), Some(b)) => b.at.saturating_sub(a.at).as_secs_f64(),
        _ => 0.0,
    };
    // The recorder holds the tokens of its span, at the window's rate.
    let recorder_entries = if window_secs > 0.0 {
        (fresh as f64 * (RECORDER_SPAN_SECS / window_secs).min(1.0)).min(RECORDER_CAPACITY as f64)
    } else {
        0.0
    };
    let explained_kib = fresh.min(cache_entries) as f64 * CACHE_KIB_PER_ENTRY
        + recorder_entries * RECORDER_KIB_PER_ENTRY;
    let mut verdict = MemoryVerdict {
        samples: window.len(),
        first_mib: 0.0,
        last_mib: 0.0,
        leak: false,
        judged: false,
        gone,
        why: String::new(),
    };
    if gone {
        verdict.why = "**the replica exited during the soak**".into();
        return verdict;
    }
    if window.len() < 9 {
        verdict.why = format!(
            "not judged: {} samples after {}s (need 9); run longer",
            window.len(),
            settle.as_secs()
        );
        return verdict;
    }
    let third = window.len() / 3;
    let first = floor(&window[..third]);
    let last_third = &window[window.len() - third..];
    let last = floor(last_third);
    let half = last_third.len() / 2;
    let rising = floor(&last_third[last_third.len() - half..]) > floor(&last_third[..half]);
    let growth_kib = last - first;
    let growth_pct = if first > 0.0 {
        growth_kib / first * 100.0
    } else {
        0.0
    };
    let allowed_kib = explained_kib + (first * max_growth_pct / 100.0).max(min_growth_mib * 1024.0);
    verdict.judged = true;
    verdict.first_mib = first / 1024.0;
    verdict.last_mib = last / 1024.0;
    verdict.leak = growth_kib > allowed_kib && rising;
    let change = format!(
        "{growth_pct:+.1} % ({:+.1} MiB; allowed {:.1} MiB, of which {:.1} MiB explained by {fresh} new tokens)",
        growth_kib / 1024.0,
        allowed_kib / 1024.0,
        explained_kib / 1024.0
    );
    verdict.why = if verdict.leak {
        format!("**LEAK**: {change}, still rising at the end")
    } else {
        format!(
            "OK: {change}{}",
            if rising {
                ", floor still rising at the end"
            } else {
                ", flat at the end"
            }
        )
    };
    verdict
}

/// Throughput and efficiency of a stretch of the run, between two samples.
struct Stretch {
    calls_per_s: f64,
    /// CPU-seconds per second used by the system under test.
    cpu_per_s: f64,
    /// Calls per CPU-second of the system under test.
    calls_per_cpu_s: f64,
}

fn stretch(from: &Sample, to: &Sample) -> Option<Stretch> {
    let secs = to.at.checked_sub(from.at)?.as_secs_f64();
    let cpu = to.cpu_ticks.checked_sub(from.cpu_ticks)? as f64 / TICKS_PER_SECOND;
    let calls = to.calls.checked_sub(from.calls)? as f64;
    (secs > 0.0 && cpu > 0.0).then(|| Stretch {
        calls_per_s: calls / secs,
        cpu_per_s: cpu / secs,
        calls_per_cpu_s: calls / cpu,
    })
}

/// Whether throughput stayed flat: the first and last thirds of the samples
/// after the warm-up, compared in calls per CPU-second of the system under
/// test (which other processes' load disturbs far less than calls per
/// second: a replica that gets less CPU serves fewer calls, but not fewer
/// per CPU-second).
struct Flatness {
    first: Stretch,
    last: Stretch,
    /// Last third's efficiency over the first's, minus one, in percent.
    change_pct: f64,
    flat: bool,
}

fn judge_flatness(samples: &[Sample], settle: Duration, max_drop_pct: f64) -> Option<Flatness> {
    let window: Vec<&Sample> = samples.iter().filter(|s| s.at >= settle).collect();
    // At least three intervals per third.
    let third = window.len().checked_sub(1)? / 3;
    if third < 3 {
        return None;
    }
    let first = stretch(window[0], window[third])?;
    let last = stretch(window[window.len() - 1 - third], window[window.len() - 1])?;
    let change_pct = (last.calls_per_cpu_s / first.calls_per_cpu_s - 1.0) * 100.0;
    Some(Flatness {
        flat: change_pct >= -max_drop_pct,
        first,
        last,
        change_pct,
    })
}

/// The summary of one operation.
struct OpLine {
    op: Op,
    calls: u64,
    rps: f64,
    p50: u32,
    p90: u32,
    p99: u32,
    max: u32,
    codes: BTreeMap<String, u64>,
}

fn ms(us: u32) -> String {
    format!("{:.2}", f64::from(us) / 1000.0)
}

fn joined(codes: &BTreeMap<String, u64>) -> String {
    if codes.is_empty() {
        return "0".into();
    }
    codes
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `soak`: the whole run.
pub(crate) async fn soak(args: SoakArgs) -> Result<(), BoxError> {
    let n = args.targets.len();
    if n < 2 {
        return Err("--targets needs at least two replica URLs".into());
    }
    if n > 64 {
        return Err("--targets: at most 64 replicas".into());
    }
    if args.pids.len() != n {
        return Err("--pids needs one process id per target, in the same order".into());
    }
    if args.duration.is_zero() {
        return Err("--duration must be positive".into());
    }
    let mix = parse_mix(&args.mix)?;
    let total_weight: f64 = mix.iter().map(|(_, w)| w).sum();
    let pool = read_lines(&args.tokens_file)?;
    if pool.is_empty() {
        return Err("--tokens-file is empty".into());
    }
    let connections = args.connections.max(n);
    let per_replica = connections.div_ceil(n);
    let concurrency = args.concurrency.unwrap_or(connections).max(1);
    let settle = args
        .settle
        .unwrap_or_else(|| (args.duration / 5).min(Duration::from_secs(60)));
    let every = args
        .sample_every
        .unwrap_or_else(|| (args.duration / 20).min(Duration::from_secs(10)))
        .max(Duration::from_millis(100));

    let mut channels: Vec<Vec<Channel>> = Vec::new();
    for url in &args.targets {
        let mut lane = Vec::with_capacity(per_replica);
        for _ in 0..per_replica {
            lane.push(connect(url).await?);
        }
        channels.push(lane);
    }
    let verifier = bearer(&args.verifier)?;
    let operator = bearer(&args.operator_token)?;

    let start = Instant::now();
    let deadline = start + args.duration;
    let shared = Arc::new(Shared {
        pool,
        live: Mutex::default(),
        revoked: Mutex::default(),
        names: AtomicU64::new(0),
        fresh: (0..n).map(|_| AtomicU64::new(0)).collect(),
        run: OsRng.next_u32(),
        account_id: args.account_id.clone(),
        sign_in: pb::SignInRequest {
            username: args.username.clone(),
            password: args.password.clone(),
        },
        mix: mix.clone(),
        total_weight,
        measure_from: start + settle,
        deadline,
        stale_bound: args.stale_bound,
        max_live: args.max_live.max(1),
        revoked_window: args.revoked_window.max(1),
        calls: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        checks: Checks::default(),
        notes: Mutex::default(),
    });
    eprintln!(
        "soak: {:?} against {} replicas, {} connections ({per_replica} per replica), {concurrency} concurrent calls, \
         mix {}; memory sampled every {every:?}, judged after {settle:?}",
        args.duration,
        n,
        per_replica * n,
        args.mix
    );
    let sampler = tokio::spawn(sampler(
        Arc::clone(&shared),
        args.pids.clone(),
        if args.cpu_pids.is_empty() {
            args.pids.clone()
        } else {
            args.cpu_pids.clone()
        },
        start,
        deadline,
        every,
    ));
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let lanes = channels
            .iter()
            .map(|lane| {
                let channel = lane[w % lane.len()].clone();
                Lane {
                    tokens: TokensServiceClient::new(channel.clone()),
                    accounts: AccountsServiceClient::new(channel),
                }
            })
            .collect();
        let worker = Worker {
            lanes,
            verifier: verifier.clone(),
            operator: operator.clone(),
            rng: SplitMix(OsRng.next_u64()),
            stats: BTreeMap::new(),
            shared: Arc::clone(&shared),
        };
        tasks.push(tokio::spawn(worker.run()));
    }
    let mut stats: BTreeMap<Op, OpStats> = BTreeMap::new();
    for task in tasks {
        for (op, s) in task.await? {
            let into = stats.entry(op).or_default();
            into.latencies_us.extend(s.latencies_us);
            into.calls += s.calls;
            for (code, count) in s.codes {
                *into.codes.entry(code).or_default() += count;
            }
        }
    }
    let finished = Instant::now();
    let samples = sampler.await?;
    let window = finished
        .saturating_duration_since(shared.measure_from)
        .as_secs_f64();

    // Per operation, then all together.
    let mut lines = Vec::new();
    let mut all = OpStats::default();
    for op in OPS {
        let Some(mut s) = stats.remove(&op) else {
            continue;
        };
        s.latencies_us.sort_unstable();
        lines.push(summarise(op, &s, window));
        all.calls += s.calls;
        all.latencies_us.extend(s.latencies_us);
        for (code, count) in s.codes {
            *all.codes.entry(code).or_default() += count;
        }
    }
    all.latencies_us.sort_unstable();
    let total = summarise(Op::Verify, &all, window);

    let memory: Vec<MemoryVerdict> = (0..n)
        .map(|r| {
            judge_memory(
                &samples,
                r,
                settle,
                args.cache_entries,
                args.max_rss_growth,
                args.min_rss_growth_mib,
            )
        })
        .collect();

    let flatness = judge_flatness(&samples, settle, args.max_efficiency_drop);

    let checks = &shared.checks;
    let errors = shared.errors.load(Ordering::Relaxed);
    let wrong = checks.wrong.load(Ordering::Relaxed);
    let violations = checks.violations.load(Ordering::Relaxed);
    let stale = checks.stale.load(Ordering::Relaxed);
    let stale_max_us = checks.stale_max_us.load(Ordering::Relaxed);
    let revoked_checks = checks.revoked_checks.load(Ordering::Relaxed);
    let raced = checks.raced.load(Ordering::Relaxed);
    let mut failures = Vec::new();
    if errors > 0 {
        failures.push(format!("{errors} unexpected errors"));
    }
    if wrong > 0 {
        failures.push(format!("{wrong} wrong verdicts"));
    }
    if violations > 0 {
        failures.push(format!("{violations} revoked tokens accepted (violations)"));
    }
    for (r, m) in memory.iter().enumerate() {
        if m.leak {
            failures.push(format!("replica {r}: memory keeps growing"));
        }
        if m.gone {
            failures.push(format!("replica {r} exited"));
        }
    }
    let unjudged = memory.iter().filter(|m| !m.judged && !m.gone).count();
    let status = if failures.is_empty() {
        if unjudged > 0 {
            "PASS (memory not judged: too short)".to_owned()
        } else {
            "PASS".to_owned()
        }
    } else {
        format!("FAIL: {}", failures.join("; "))
    };

    // The Markdown report.
    let mut md = String::new();
    writeln!(
        md,
        "Soak: {}s, {n} replicas, {} HTTP/2 connections ({per_replica} per replica), {concurrency} concurrent calls (closed loop), \
         each call to a random replica; mix `{}`. Latencies and throughput after {}s of warm-up; errors and verdicts over the whole run. \
         Result: **{status}**.",
        args.duration.as_secs(),
        per_replica * n,
        args.mix,
        settle.as_secs()
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "| Operation | Success is | Calls | Calls/s | p50 | p90 | p99 | max | Unexpected errors |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---|")?;
    for line in &lines {
        writeln!(
            md,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} |",
            line.op.name(),
            line.op.describe(),
            line.calls,
            line.rps,
            ms(line.p50),
            ms(line.p90),
            ms(line.p99),
            ms(line.max),
            joined(&line.codes)
        )?;
    }
    writeln!(
        md,
        "| **all** | | {} | {:.0} | {} | {} | {} | {} | {} |",
        total.calls,
        total.rps,
        ms(total.p50),
        ms(total.p90),
        ms(total.p99),
        ms(total.max),
        joined(&total.codes)
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "Revocations: {revoked_checks} checks of revoked tokens (VerifyToken and GetToken authenticated by them, \
         {} of them right after the acknowledgement on another replica); **{violations} violations** \
         (accepted by the revoking replica, or by another one {:?} or more after the acknowledgement); \
         {stale} accepted by another replica within that bound (longest {:.2} ms after the acknowledgement); \
         {raced} verifications raced with their token's revocation (either answer right); {wrong} wrong verdicts.",
        lines
            .iter()
            .find(|l| l.op == Op::Revoke)
            .map_or(0, |l| l.calls - l.codes.values().sum::<u64>()),
        args.stale_bound,
        stale_max_us as f64 / 1000.0
    )?;
    writeln!(md)?;
    write!(
        md,
        "| Time (s) | Calls/s | Errors | CPU of the system under test (s/s) | Calls/CPU-s |"
    )?;
    for r in 0..n {
        write!(md, " RSS {r} (MiB) |")?;
    }
    writeln!(md)?;
    write!(md, "|---:|---:|---:|---:|---:|")?;
    for _ in 0..n {
        write!(md, "---:|")?;
    }
    writeln!(md)?;
    let mut previous: Option<&Sample> = None;
    for s in &samples {
        let (rate, errs) = match previous {
            Some(p) if s.at > p.at => (
                (s.calls - p.calls) as f64 / (s.at - p.at).as_secs_f64(),
                s.errors - p.errors,
            ),
            _ => (0.0, s.errors),
        };
        write!(md, "| {} | {rate:.0} | {errs} |", s.at.as_secs())?;
        match previous.and_then(|p| stretch(p, s)) {
            Some(st) => write!(md, " {:.2} | {:.0} |", st.cpu_per_s, st.calls_per_cpu_s)?,
            None => write!(md, " | |")?,
        }
        for r in 0..n {
            match s.rss_kib[r] {
                Some(kib) => write!(md, " {:.1} |", kib as f64 / 1024.0)?,
                None => write!(md, " gone |")?,
            }
        }
        writeln!(md)?;
        previous = Some(s);
    }
    writeln!(md)?;
    writeln!(
        md,
        "Memory, judged on the samples after {}s: a leak is the floor (lowest sample) of the last third above the floor of the first third by more than \
         what the tokens first answered active during the window explain (each up to {} KiB in the cache, while it has fewer than {} entries, and {} KiB in the \
         last-use recorder, for those of its {RECORDER_SPAN_SECS} s span, at most {RECORDER_CAPACITY}) plus the larger of {} % and {} MiB, with the floor of the last sixth above that of \
         the sixth before:",
        settle.as_secs(),
        CACHE_KIB_PER_ENTRY,
        args.cache_entries,
        RECORDER_KIB_PER_ENTRY,
        args.max_rss_growth,
        args.min_rss_growth_mib,
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "| Replica | Samples | Floor, first third (MiB) | Floor, last third (MiB) | Verdict |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---|")?;
    for (r, m) in memory.iter().enumerate() {
        writeln!(
            md,
            "| {r} ({}) | {} | {:.1} | {:.1} | {} |",
            args.targets[r], m.samples, m.first_mib, m.last_mib, m.why
        )?;
    }
    writeln!(md)?;
    match &flatness {
        Some(f) => {
            writeln!(
                md,
                "Flat over time, after {}s (first third against last third of the samples): throughput {:.0} → {:.0} calls/s ({:+.1} %); \
                 the system under test (the replicas and PostgreSQL, children included) used {:.2} → {:.2} CPU-s/s; \
                 efficiency {:.0} → {:.0} calls per CPU-second ({:+.1} %); memory floors {}. \
                 Rule: flat when the last third's calls per CPU-second are at most {} % below the first third's. Verdict: **{}**.",
                settle.as_secs(),
                f.first.calls_per_s,
                f.last.calls_per_s,
                (f.last.calls_per_s / f.first.calls_per_s - 1.0) * 100.0,
                f.first.cpu_per_s,
                f.last.cpu_per_s,
                f.first.calls_per_cpu_s,
                f.last.calls_per_cpu_s,
                f.change_pct,
                memory
                    .iter()
                    .enumerate()
                    .map(|(r, m)| format!("{r}: {:.1} → {:.1} MiB", m.first_mib, m.last_mib))
                    .collect::<Vec<_>>()
                    .join(", "),
                args.max_efficiency_drop,
                if f.flat { "FLAT" } else { "NOT FLAT" }
            )?;
        }
        None => writeln!(
            md,
            "Flat over time: not judged (fewer than ten samples after {}s, or no CPU time read); run longer.",
            settle.as_secs()
        )?,
    }
    let notes = locked(&shared.notes).clone();
    if !notes.is_empty() {
        writeln!(md)?;
        writeln!(md, "First problems seen:")?;
        writeln!(md)?;
        for note in notes {
            writeln!(md, "- {note}")?;
        }
    }
    eprint!("{md}");
    if let Some(path) = &args.report {
        fs::write(path, &md).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let rss_end: Vec<String> = samples.last().map_or_else(Vec::new, |s| {
        s.rss_kib
            .iter()
            .map(|r| r.map_or("gone".into(), |k| k.to_string()))
            .collect()
    });
    println!(
        "RESULT status={} calls={} rps={:.1} p50_us={} p99_us={} max_us={} errors={errors} wrong={wrong} \
         violations={violations} stale={stale} stale_max_us={stale_max_us} revoked_checks={revoked_checks} \
         leaks={} unjudged={unjudged} rss_end_kib={} flat={} efficiency_change_pct={}",
        if failures.is_empty() { "pass" } else { "fail" },
        total.calls,
        total.rps,
        total.p50,
        total.p99,
        total.max,
        memory.iter().filter(|m| m.leak).count(),
        rss_end.join(","),
        flatness
            .as_ref()
            .map_or("unjudged", |f| if f.flat { "yes" } else { "no" }),
        flatness
            .as_ref()
            .map_or("na".into(), |f| format!("{:.1}", f.change_pct)),
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("soak failed: {}", failures.join("; ")).into())
    }
}

fn summarise(op: Op, s: &OpStats, window: f64) -> OpLine {
    let l = &s.latencies_us;
    OpLine {
        op,
        calls: s.calls,
        rps: if window > 0.0 {
            l.len() as f64 / window
        } else {
            0.0
        },
        p50: percentile(l, 0.50),
        p90: percentile(l, 0.90),
        p99: percentile(l, 0.99),
        max: l.last().copied().unwrap_or(0),
        codes: s.codes.clone(),
    }
}
