//! `loadgen`: the Rust half of the benchmark harness for "VerifyToken at the
//! speed of a no-op RPC". `benches/run.sh` drives it; it is not a Criterion
//! benchmark (`harness = false`), and run without a subcommand (as `cargo
//! bench` and `cargo test --all-targets` do) it does nothing and exits 0.
//!
//! Subcommands (every one talks gRPC through the crate's generated clients):
//!
//! - `setup`: with an operator token, creates a person (with a password), a
//!   robot, a verifier token (`tokens:verify`) for the robot and a "hot"
//!   token for the person; prints `KEY=value` lines for the shell.
//! - `gen-tokens`: generates valid personal access tokens (the service's own
//!   format, through `identity::domain::credential`) and writes them to a
//!   text file plus a CSV of `tokens` rows (SHA-256 digests only) for a bulk
//!   `\copy` into the database.
//! - `probe`: one `VerifyToken` (or `Health/Check`) call; prints the verdict
//!   and the size of the response message, so that h2load's data bytes per
//!   request can be checked against the size of a successful answer.
//! - `load`: closed-loop load: `--concurrency` workers over `--connections`
//!   HTTP/2 connections, a mix of valid, unknown, malformed and revoked
//!   tokens, for a duration or until every token was used once (`--once`).
//!   Reports throughput, latency percentiles, errors by gRPC code and
//!   verdicts that were not the expected one.
//! - `propagation`: creates a token on the first target, verifies it on all
//!   targets (so that a cache would hold it), revokes it on the first target
//!   and polls `VerifyToken` on the others until they answer `active: false`;
//!   reports the delay from the moment `RevokeToken` returned.
//!
//! - `hash-rate`: no server: argon2id password checks, back to back on
//!   `--threads` threads, with the service's own parameters
//!   (`PasswordHasher::argon2id`): the ceiling of sign-ins per second on
//!   as many hashing threads.
//!
//! - `soak`: a long mixed run (verifications, revocations, creations,
//!   sign-ins) against several replicas, checking every answer and watching
//!   the replicas' resident memory; see `soak/mod.rs`.
//!
//! Every subcommand prints exactly one line starting with `RESULT ` on
//! stdout (space-separated `key=value` pairs) for `run.sh` to parse; humans
//! read the summary on stderr.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufWriter, Write as _},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use identity::{
    api::pb::{
        self, accounts_service_client::AccountsServiceClient,
        tokens_service_client::TokensServiceClient,
    },
    config::parse_duration,
    domain::credential::{CredentialKind, Secret},
};
use prost::Message as _;
use rand::{RngCore as _, rngs::OsRng};
use tonic::{
    Code, Request,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

// In a subdirectory: Cargo would take `benches/soak.rs` for a bench target.
#[path = "soak/mod.rs"]
mod soak;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Subcommands `run.sh` uses; anything else is treated as "not for us".
const SUBCOMMANDS: &[&str] = &[
    "setup",
    "gen-tokens",
    "probe",
    "load",
    "propagation",
    "soak",
    "hash-rate",
    "help",
    "-h",
    "--help",
    "-V",
    "--version",
];

/// Load generator and probes for benches/run.sh.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the accounts and tokens the benchmark needs.
    Setup(SetupArgs),
    /// Generate valid tokens and the CSV rows to bulk-load them.
    GenTokens(GenTokensArgs),
    /// One call; print the verdict and the response size.
    Probe(ProbeArgs),
    /// Closed-loop load with latency percentiles.
    Load(LoadArgs),
    /// Revocation propagation delay across replicas.
    Propagation(PropagationArgs),
    /// A long mixed run against several replicas: errors, verdicts,
    /// revocation correctness and memory over time.
    Soak(soak::SoakArgs),
    /// Raw argon2id password checks per second, with the service's
    /// parameters, on a number of threads.
    HashRate(HashRateArgs),
}

#[derive(Debug, Args)]
struct HashRateArgs {
    /// Threads checking passwords (as the server's `--hash-concurrency`).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Measured duration (after the warm-up).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured time before the measurement starts.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// The password checked (the bench person's, as `load --rpc sign-in`
    /// sends it).
    #[arg(long, default_value = "tulip orbit canyon 47")]
    password: String,
}

#[derive(Debug, Args)]
struct SetupArgs {
    /// Server URL, e.g. http://127.0.0.1:50051.
    #[arg(long)]
    target: String,
    /// An operator's token (from `identity bootstrap-operator`).
    #[arg(long, env = "BENCH_OPERATOR_TOKEN", hide_env_values = true)]
    operator_token: String,
    /// Username of the person (signs in during the isolation scenario).
    #[arg(long, default_value = "alice")]
    person: String,
    /// The person's password.
    #[arg(long, default_value = "tulip orbit canyon 47")]
    password: String,
    /// Username of the robot that holds the verifier token.
    #[arg(long, default_value = "gateway")]
    robot: String,
}

#[derive(Debug, Args)]
struct GenTokensArgs {
    /// How many tokens.
    #[arg(long)]
    count: usize,
    /// The account that owns them.
    #[arg(long)]
    account_id: String,
    /// Token names are `<prefix>-<n>`; must be unique among the account's
    /// live tokens, so use a new prefix per batch.
    #[arg(long)]
    name_prefix: String,
    /// Where to write the tokens, one per line.
    #[arg(long)]
    tokens_out: PathBuf,
    /// Where to write the CSV rows for `\copy tokens (...) FROM ... CSV`
    /// (columns: see `TOKEN_COLUMNS`).
    #[arg(long)]
    csv_out: PathBuf,
    /// Write the rows already revoked.
    #[arg(long)]
    revoked: bool,
    /// Lifetime of the tokens.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    ttl: Duration,
}

/// The columns of `gen-tokens`' CSV, in order (for `\copy tokens (...)`).
const TOKEN_COLUMNS: &str = "token_id,account_id,name,live_name,digest,scopes,create_time,expire_time,revoke_time,family_id";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Rpc {
    /// identity.v1.TokensService/VerifyToken
    Verify,
    /// grpc.health.v1.Health/Check (the no-op baseline)
    Health,
    /// identity.v1.AccountsService/SignIn (`load` only; argon2-bound)
    SignIn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Expect {
    /// Anything but an error.
    Any,
    /// `active: true`.
    Active,
    /// `active: false` with INACTIVE_REASON_REVOKED.
    Revoked,
}

#[derive(Debug, Args)]
struct ProbeArgs {
    /// Server URL.
    #[arg(long)]
    target: String,
    /// Which call.
    #[arg(long, value_enum, default_value = "verify")]
    rpc: Rpc,
    /// The caller's token (needs the `tokens:verify` scope).
    #[arg(
        long,
        env = "BENCH_VERIFIER_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    verifier: String,
    /// The token to verify.
    #[arg(long, default_value = "")]
    token: String,
    /// Fail (exit 1) unless the verdict is this.
    #[arg(long, value_enum, default_value = "any")]
    expect: Expect,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Server URL.
    #[arg(long)]
    target: String,
    /// Which call.
    #[arg(long, value_enum, default_value = "verify")]
    rpc: Rpc,
    /// The caller's token (needs the `tokens:verify` scope).
    #[arg(
        long,
        env = "BENCH_VERIFIER_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    verifier: String,
    /// Valid tokens, one per line (required for a mix with `valid`).
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Revoked tokens, one per line (required for a mix with `revoked`).
    #[arg(long)]
    revoked_file: Option<PathBuf>,
    /// Percentages of each kind of token: valid, unknown (well-formed but not
    /// issued; `invalid` is an alias), malformed (bad checksum; no database
    /// lookup), revoked. Every valid token appears once per pass; the others
    /// are added in proportion.
    #[arg(long, default_value = "valid:100")]
    mix: String,
    /// Measured duration (after the warm-up).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured time before the measurement starts.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Concurrent calls (each worker waits for its answer: closed loop).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// HTTP/2 connections the workers are spread over (default: one per
    /// worker, like `h2load -c N -m 1`).
    #[arg(long)]
    connections: Option<usize>,
    /// Use each token at most once (stop early when all are used), so that
    /// no cache can ever hit; otherwise the list is cycled.
    #[arg(long)]
    once: bool,
    /// Keep the file order instead of shuffling.
    #[arg(long)]
    no_shuffle: bool,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// `--rpc sign-in`: the person's username.
    #[arg(long, default_value = "alice")]
    username: String,
    /// `--rpc sign-in`: the person's password.
    #[arg(long, default_value = "tulip orbit canyon 47")]
    password: String,
}

#[derive(Debug, Args)]
struct PropagationArgs {
    /// Comma-separated server URLs: the first revokes, the others are polled.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// An operator's token (creates and revokes the tokens).
    #[arg(long, env = "BENCH_OPERATOR_TOKEN", hide_env_values = true)]
    operator_token: String,
    /// The caller's token for VerifyToken (`tokens:verify`).
    #[arg(long, env = "BENCH_VERIFIER_TOKEN", hide_env_values = true)]
    verifier: String,
    /// The account the revoked tokens belong to.
    #[arg(long)]
    account_id: String,
    /// How many revocations.
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Verifications on every target before each revocation (to fill caches).
    #[arg(long, default_value_t = 2)]
    warm: usize,
    /// Give up on one revocation after this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
}

fn main() -> ExitCode {
    // `cargo bench` runs this with `--bench`, `cargo test --all-targets` with
    // no argument or a test filter: neither is a request to generate load.
    let first = std::env::args().nth(1);
    if first
        .as_deref()
        .is_none_or(|arg| !SUBCOMMANDS.contains(&arg))
    {
        eprintln!(
            "loadgen: nothing to do (arguments {first:?}); the benchmarks run with `bash benches/run.sh`, \
             see `loadgen --help`"
        );
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Load(args) => args.threads,
        Command::Soak(args) => args.threads,
        _ => None,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("loadgen: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Setup(args) => setup(args).await,
            Command::GenTokens(args) => gen_tokens(&args),
            Command::Probe(args) => probe(args).await,
            Command::Load(args) => load(args).await,
            Command::Propagation(args) => propagation(args).await,
            Command::Soak(args) => soak::soak(args).await,
            Command::HashRate(args) => hash_rate(&args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loadgen: error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// One new HTTP/2 connection to `url`.
async fn connect(url: &str) -> Result<Channel, BoxError> {
    let channel = Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    Ok(channel)
}

fn bearer(token: &str) -> Result<MetadataValue<Ascii>, BoxError> {
    Ok(MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| "the token is not valid header text")?)
}

fn authorized<T>(message: T, auth: &MetadataValue<Ascii>) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", auth.clone());
    request
}

fn status_error(what: &str, status: &tonic::Status) -> BoxError {
    format!("{what} failed: {:?}: {}", status.code(), status.message()).into()
}

fn micros_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// `setup`: accounts and tokens for the run.
async fn setup(args: SetupArgs) -> Result<(), BoxError> {
    let channel = connect(&args.target).await?;
    let ops = bearer(&args.operator_token)?;
    let mut accounts = AccountsServiceClient::new(channel.clone());
    let mut tokens = TokensServiceClient::new(channel);

    let person = accounts
        .create_account(authorized(
            pb::CreateAccountRequest {
                username: args.person.clone(),
                password: args.password.clone(),
                kind: pb::AccountKind::Person as i32,
                ..Default::default()
            },
            &ops,
        ))
        .await
        .map_err(|s| status_error("CreateAccount (person)", &s))?
        .into_inner()
        .account
        .ok_or("CreateAccount returned no account")?;
    let robot = accounts
        .create_account(authorized(
            pb::CreateAccountRequest {
                username: args.robot.clone(),
                kind: pb::AccountKind::Robot as i32,
                ..Default::default()
            },
            &ops,
        ))
        .await
        .map_err(|s| status_error("CreateAccount (robot)", &s))?
        .into_inner()
        .account
        .ok_or("CreateAccount returned no account")?;
    let verifier = tokens
        .create_token(authorized(
            pb::CreateTokenRequest {
                account_id: robot.account_id.clone(),
                name: "verifier".into(),
                scopes: vec!["tokens:verify".into()],
                ..Default::default()
            },
            &ops,
        ))
        .await
        .map_err(|s| status_error("CreateToken (verifier)", &s))?
        .into_inner();
    let hot = tokens
        .create_token(authorized(
            pb::CreateTokenRequest {
                account_id: person.account_id.clone(),
                name: "hot".into(),
                scopes: vec!["project:read".into()],
                ..Default::default()
            },
            &ops,
        ))
        .await
        .map_err(|s| status_error("CreateToken (hot)", &s))?
        .into_inner();
    let hot_id = hot.token.map(|t| t.token_id).unwrap_or_default();
    println!("PERSON_ID={}", person.account_id);
    println!("ROBOT_ID={}", robot.account_id);
    println!("VERIFIER={}", verifier.secret);
    println!("HOT_TOKEN={}", hot.secret);
    println!("HOT_TOKEN_ID={hot_id}");
    println!("RESULT setup=ok");
    Ok(())
}

/// `gen-tokens`: valid tokens and their rows.
fn gen_tokens(args: &GenTokensArgs) -> Result<(), BoxError> {
    let mut tokens = BufWriter::new(fs::File::create(&args.tokens_out)?);
    let mut csv = BufWriter::new(fs::File::create(&args.csv_out)?);
    let now = micros_now();
    let expire = now.saturating_add(i64::try_from(args.ttl.as_micros()).unwrap_or(i64::MAX));
    let mut hex = String::with_capacity(66);
    for n in 0..args.count {
        let secret = Secret::generate(CredentialKind::PersonalAccessToken);
        let id = uuid::Uuid::now_v7().to_string();
        let name = format!("{}-{n}", args.name_prefix);
        hex.clear();
        hex.push_str("\\x");
        for byte in secret.digest().as_bytes() {
            write!(hex, "{byte:02x}")?;
        }
        // Empty unquoted fields are NULL; `""` is the empty string.
        let (live_name, revoke_time) = if args.revoked {
            (String::new(), now.to_string())
        } else {
            (name.clone(), String::new())
        };
        writeln!(
            csv,
            "{id},{},{name},{live_name},{hex},\"\",{now},{expire},{revoke_time},{id}",
            args.account_id
        )?;
        writeln!(tokens, "{}", secret.expose())?;
    }
    tokens.flush()?;
    csv.flush()?;
    println!("RESULT count={} columns={TOKEN_COLUMNS}", args.count);
    Ok(())
}

/// `probe`: one call, its verdict and its size.
async fn probe(args: ProbeArgs) -> Result<(), BoxError> {
    let channel = connect(&args.target).await?;
    let started = Instant::now();
    let (active, reason, size) = match args.rpc {
        Rpc::SignIn => return Err("probe supports --rpc verify and health".into()),
        Rpc::Health => {
            let response = HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
                .map_err(|s| status_error("Health/Check", &s))?
                .into_inner();
            let serving = response.status == 1;
            (
                serving,
                format!("status={}", response.status),
                response.encoded_len(),
            )
        }
        Rpc::Verify => {
            let auth = bearer(&args.verifier)?;
            let response = TokensServiceClient::new(channel)
                .verify_token(authorized(
                    pb::VerifyTokenRequest {
                        token: args.token.clone(),
                        ..Default::default()
                    },
                    &auth,
                ))
                .await
                .map_err(|s| status_error("VerifyToken", &s))?
                .into_inner();
            (
                response.active,
                reason_name(response.reason).to_owned(),
                response.encoded_len(),
            )
        }
    };
    let latency = started.elapsed().as_micros();
    eprintln!(
        "probe {:?}: active={active} reason={reason} message={size} bytes ({} bytes as a gRPC frame), {latency} us",
        args.rpc,
        size + 5
    );
    println!(
        "RESULT active={active} reason={reason} message_bytes={size} frame_bytes={} latency_us={latency}",
        size + 5
    );
    let ok = match args.expect {
        Expect::Any => true,
        Expect::Active => active,
        Expect::Revoked => !active && reason == "INACTIVE_REASON_REVOKED",
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected {:?}, got active={active} reason={reason}",
            args.expect
        )
        .into())
    }
}

fn reason_name(reason: i32) -> &'static str {
    pb::InactiveReason::try_from(reason).map_or("INACTIVE_REASON_OUT_OF_RANGE", |r| r.as_str_name())
}

/// What a token in the load list should be answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Valid,
    Unknown,
    Malformed,
    Revoked,
}

impl Kind {
    fn expected(self) -> (bool, pb::InactiveReason) {
        match self {
            Self::Valid => (true, pb::InactiveReason::Unspecified),
            Self::Unknown => (false, pb::InactiveReason::Unknown),
            Self::Malformed => (false, pb::InactiveReason::Malformed),
            Self::Revoked => (false, pb::InactiveReason::Revoked),
        }
    }
}

/// A small, fast, seedable generator for shuffling (SplitMix64).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        // The modulo bias is irrelevant for shuffling benchmark inputs.
        (self.next() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

fn read_lines(path: &PathBuf) -> Result<Vec<String>, BoxError> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Parses `valid:90,unknown:5,revoked:5` into percentages.
fn parse_mix(raw: &str) -> Result<Vec<(Kind, u64)>, BoxError> {
    let mut mix = Vec::new();
    for part in raw.split(',').filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once(':')
            .ok_or_else(|| format!("--mix: expected kind:percent, got {part:?}"))?;
        let kind = match name {
            "valid" => Kind::Valid,
            "unknown" | "invalid" => Kind::Unknown,
            "malformed" => Kind::Malformed,
            "revoked" => Kind::Revoked,
            _ => return Err(format!("--mix: unknown kind {name:?}").into()),
        };
        let weight: u64 = weight
            .parse()
            .map_err(|_| format!("--mix: bad percentage in {part:?}"))?;
        if weight > 0 {
            mix.push((kind, weight));
        }
    }
    if mix.is_empty() {
        return Err("--mix names no kind with a positive share".into());
    }
    Ok(mix)
}

/// A well-formed token with a wrong checksum: refused without I/O.
fn malformed(rng: &mut SplitMix) -> String {
    let text = Secret::generate(CredentialKind::PersonalAccessToken)
        .expose()
        .to_owned();
    let mut bytes = text.into_bytes();
    let last = bytes.len() - 1;
    let alphabet = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut replacement = alphabet[rng.below(alphabet.len())];
    if replacement == bytes[last] {
        replacement = if bytes[last] == b'0' { b'1' } else { b'0' };
    }
    bytes[last] = replacement;
    String::from_utf8(bytes).unwrap_or_default()
}

/// The list of (token, expected kind) the workers go through.
fn build_items(args: &LoadArgs, rng: &mut SplitMix) -> Result<Vec<(String, Kind)>, BoxError> {
    if args.rpc != Rpc::Verify {
        return Ok(vec![(String::new(), Kind::Valid)]);
    }
    let mix = parse_mix(&args.mix)?;
    let total_weight: u64 = mix.iter().map(|(_, w)| w).sum();
    let valid = match &args.tokens_file {
        Some(path) => read_lines(path)?,
        None => Vec::new(),
    };
    let revoked = match &args.revoked_file {
        Some(path) => read_lines(path)?,
        None => Vec::new(),
    };
    let valid_weight = mix
        .iter()
        .find(|(k, _)| *k == Kind::Valid)
        .map_or(0, |(_, w)| *w);
    // Every valid token once; the others in proportion to it (or 10,000
    // calls' worth when the mix has no valid tokens).
    let total = if valid_weight > 0 {
        if valid.is_empty() {
            return Err("--mix has valid tokens but --tokens-file is missing or empty".into());
        }
        (valid.len() as u64 * total_weight).div_ceil(valid_weight)
    } else {
        10_000
    };
    let mut items = Vec::with_capacity(usize::try_from(total)?);
    for (kind, weight) in &mix {
        let n = usize::try_from(total * weight / total_weight)?;
        match kind {
            Kind::Valid => items.extend(valid.iter().map(|t| (t.clone(), Kind::Valid))),
            Kind::Unknown => items.extend((0..n).map(|_| {
                let secret = Secret::generate(CredentialKind::PersonalAccessToken);
                (secret.expose().to_owned(), Kind::Unknown)
            })),
            Kind::Malformed => items.extend((0..n).map(|_| (malformed(rng), Kind::Malformed))),
            Kind::Revoked => {
                if revoked.is_empty() {
                    return Err(
                        "--mix has revoked tokens but --revoked-file is missing or empty".into(),
                    );
                }
                items.extend((0..n).map(|i| (revoked[i % revoked.len()].clone(), Kind::Revoked)));
            }
        }
    }
    if !args.no_shuffle {
        rng.shuffle(&mut items);
    }
    Ok(items)
}

/// What one worker saw during the measurement.
#[derive(Default)]
struct WorkerStats {
    latencies_us: Vec<u32>,
    codes: BTreeMap<String, u64>,
    verdicts: BTreeMap<String, u64>,
    wrong: u64,
    last_end: Option<Instant>,
}

impl WorkerStats {
    fn merge(&mut self, other: Self) {
        self.latencies_us.extend(other.latencies_us);
        for (k, v) in other.codes {
            *self.codes.entry(k).or_default() += v;
        }
        for (k, v) in other.verdicts {
            *self.verdicts.entry(k).or_default() += v;
        }
        self.wrong += other.wrong;
        self.last_end = self.last_end.max(other.last_end);
    }
}

/// Shared by the workers of one `load` run.
struct Plan {
    items: Vec<(String, Kind)>,
    next: AtomicUsize,
    once: bool,
    measure_from: Instant,
    deadline: Instant,
}

impl Plan {
    /// The next item, or `None` when `--once` has used them all.
    fn take(&self) -> Option<&(String, Kind)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if self.once && i >= self.items.len() {
            None
        } else {
            Some(&self.items[i % self.items.len()])
        }
    }
}

enum Client {
    Verify(TokensServiceClient<Channel>, MetadataValue<Ascii>),
    Health(HealthClient<Channel>),
    SignIn(AccountsServiceClient<Channel>, pb::SignInRequest),
}

/// One closed-loop worker: the outcome of each call is (code, verdict).
async fn worker(mut client: Client, plan: Arc<Plan>) -> WorkerStats {
    let mut stats = WorkerStats::default();
    while Instant::now() < plan.deadline {
        let Some((token, kind)) = plan.take() else {
            break;
        };
        let started = Instant::now();
        let outcome: Result<Option<(bool, i32)>, tonic::Status> = match &mut client {
            Client::Verify(client, auth) => client
                .verify_token(authorized(
                    pb::VerifyTokenRequest {
                        token: token.clone(),
                        ..Default::default()
                    },
                    auth,
                ))
                .await
                .map(|r| {
                    let r = r.into_inner();
                    Some((r.active, r.reason))
                }),
            Client::Health(client) => client
                .check(HealthCheckRequest::default())
                .await
                .map(|_| None),
            Client::SignIn(client, request) => client.sign_in(request.clone()).await.map(|_| None),
        };
        let ended = Instant::now();
        if started < plan.measure_from {
            continue;
        }
        let micros = (ended - started).as_micros();
        stats
            .latencies_us
            .push(u32::try_from(micros).unwrap_or(u32::MAX));
        stats.last_end = Some(ended);
        let code = match outcome {
            Ok(None) => Code::Ok,
            Ok(Some((active, reason))) => {
                let verdict = if active {
                    "active"
                } else {
                    reason_name(reason)
                        .strip_prefix("INACTIVE_REASON_")
                        .unwrap_or("?")
                };
                *stats.verdicts.entry(verdict.to_owned()).or_default() += 1;
                let (want_active, want_reason) = kind.expected();
                if active != want_active || (!active && reason != want_reason as i32) {
                    stats.wrong += 1;
                }
                Code::Ok
            }
            Err(status) => status.code(),
        };
        *stats.codes.entry(format!("{code:?}")).or_default() += 1;
    }
    stats
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn joined(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "-".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `load`: closed-loop load for a duration.
async fn load(args: LoadArgs) -> Result<(), BoxError> {
    let mut rng = SplitMix(OsRng.next_u64());
    let items = build_items(&args, &mut rng)?;
    let concurrency = args.concurrency.max(1);
    let connections = args
        .connections
        .unwrap_or(concurrency)
        .clamp(1, concurrency);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(connect(&args.target).await?);
    }
    let auth = bearer(&args.verifier)?;
    let item_count = items.len();
    let start = Instant::now();
    let plan = Arc::new(Plan {
        items,
        next: AtomicUsize::new(0),
        once: args.once,
        measure_from: start + args.warmup,
        deadline: start + args.warmup + args.duration,
    });
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let channel = channels[w % connections].clone();
        let client = match args.rpc {
            Rpc::Verify => Client::Verify(TokensServiceClient::new(channel), auth.clone()),
            Rpc::Health => Client::Health(HealthClient::new(channel)),
            Rpc::SignIn => Client::SignIn(
                AccountsServiceClient::new(channel),
                pb::SignInRequest {
                    username: args.username.clone(),
                    password: args.password.clone(),
                },
            ),
        };
        tasks.push(tokio::spawn(worker(client, Arc::clone(&plan))));
    }
    let mut stats = WorkerStats::default();
    for task in tasks {
        stats.merge(task.await?);
    }
    let used =
        plan.next
            .load(Ordering::Relaxed)
            .min(if args.once { item_count } else { usize::MAX });
    let exhausted = args.once && used >= item_count && Instant::now() < plan.deadline;
    let window = stats.last_end.map_or(Duration::ZERO, |end| {
        end.saturating_duration_since(plan.measure_from)
    });
    let seconds = window.as_secs_f64();
    let mut latencies = std::mem::take(&mut stats.latencies_us);
    latencies.sort_unstable();
    let n = latencies.len();
    let rps = if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    };
    let mean = if n > 0 {
        latencies.iter().map(|&v| u64::from(v)).sum::<u64>() as f64 / n as f64
    } else {
        0.0
    };
    let errors: u64 = stats
        .codes
        .iter()
        .filter(|(k, _)| k.as_str() != "Ok")
        .map(|(_, v)| v)
        .sum();
    let (p50, p90, p99, p999) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
    );
    let max = latencies.last().copied().unwrap_or(0);
    eprintln!(
        "load {:?} {}: {n} calls in {seconds:.2}s = {rps:.0}/s over {connections} connections x {concurrency} workers; \
         latency us p50 {p50} p90 {p90} p99 {p99} p99.9 {p999} max {max} mean {mean:.0}; \
         codes {}; verdicts {}; wrong verdicts {}; list {item_count}{}",
        args.rpc,
        args.mix,
        joined(&stats.codes),
        joined(&stats.verdicts),
        stats.wrong,
        if exhausted {
            " (every token used once: stopped early)"
        } else {
            ""
        }
    );
    println!(
        "RESULT requests={n} seconds={seconds:.3} rps={rps:.1} p50_us={p50} p90_us={p90} p99_us={p99} \
         p999_us={p999} max_us={max} mean_us={mean:.0} errors={errors} wrong={} codes={} verdicts={} \
         list={item_count} used={used} exhausted={exhausted}",
        stats.wrong,
        joined(&stats.codes),
        joined(&stats.verdicts)
    );
    Ok(())
}

/// How one polled replica ended up after a revocation.
enum Seen {
    /// Answered inactive (revoked) this long after the revocation returned,
    /// after this many polls.
    Inactive(Duration, u32),
    /// Still active when the timeout expired.
    TimedOut,
    /// Answered inactive for another reason, or failed.
    Failed(String),
}

/// Polls `token` on one replica until it is reported revoked.
async fn poll_until_revoked(
    mut client: TokensServiceClient<Channel>,
    auth: MetadataValue<Ascii>,
    token: String,
    revoked_at: Instant,
    timeout: Duration,
) -> Seen {
    let mut polls = 0;
    loop {
        polls += 1;
        let answer = client
            .verify_token(authorized(
                pb::VerifyTokenRequest {
                    token: token.clone(),
                    ..Default::default()
                },
                &auth,
            ))
            .await;
        let elapsed = revoked_at.elapsed();
        match answer {
            Ok(r) => {
                let r = r.into_inner();
                if !r.active {
                    return if r.reason == pb::InactiveReason::Revoked as i32 {
                        Seen::Inactive(elapsed, polls)
                    } else {
                        Seen::Failed(reason_name(r.reason).to_owned())
                    };
                }
            }
            Err(status) => return Seen::Failed(format!("{:?}", status.code())),
        }
        if elapsed > timeout {
            return Seen::TimedOut;
        }
    }
}

/// `propagation`: revoke on the first target, poll the others.
async fn propagation(args: PropagationArgs) -> Result<(), BoxError> {
    if args.targets.len() < 2 {
        return Err("--targets needs at least two URLs (the first revokes)".into());
    }
    let ops = bearer(&args.operator_token)?;
    let auth = bearer(&args.verifier)?;
    let mut verifiers = Vec::new();
    for url in &args.targets {
        verifiers.push(TokensServiceClient::new(connect(url).await?));
    }
    let mut admin = verifiers[0].clone();
    let run = OsRng.next_u32();
    // Per polled replica, and overall (the slowest replica of each revocation).
    let mut per_replica: Vec<Vec<u32>> = vec![Vec::new(); args.targets.len() - 1];
    let mut overall: Vec<u32> = Vec::new();
    let (mut timeouts, mut failures, mut stale_on_revoker, mut first_poll) =
        (0u64, 0u64, 0u64, 0u64);
    let mut polls_total = 0u64;
    for i in 0..args.count {
        let created = admin
            .create_token(authorized(
                pb::CreateTokenRequest {
                    account_id: args.account_id.clone(),
                    name: format!("propagation-{run:08x}-{i}"),
                    ..Default::default()
                },
                &ops,
            ))
            .await
            .map_err(|s| status_error("CreateToken", &s))?
            .into_inner();
        let token_id = created.token.map(|t| t.token_id).unwrap_or_default();
        for _ in 0..args.warm {
            for (t, client) in verifiers.iter_mut().enumerate() {
                let r = client
                    .verify_token(authorized(
                        pb::VerifyTokenRequest {
                            token: created.secret.clone(),
                            ..Default::default()
                        },
                        &auth,
                    ))
                    .await
                    .map_err(|s| status_error("VerifyToken (warm-up)", &s))?
                    .into_inner();
                if !r.active {
                    return Err(format!(
                        "a new token is not active on {}: {}",
                        args.targets[t],
                        reason_name(r.reason)
                    )
                    .into());
                }
            }
        }
        admin
            .revoke_token(authorized(pb::RevokeTokenRequest { token_id }, &ops))
            .await
            .map_err(|s| status_error("RevokeToken", &s))?;
        let revoked_at = Instant::now();
        let polls: Vec<_> = verifiers[1..]
            .iter()
            .map(|client| {
                tokio::spawn(poll_until_revoked(
                    client.clone(),
                    auth.clone(),
                    created.secret.clone(),
                    revoked_at,
                    args.timeout,
                ))
            })
            .collect();
        // The revoking replica itself must answer inactive at once.
        let own = verifiers[0]
            .verify_token(authorized(
                pb::VerifyTokenRequest {
                    token: created.secret.clone(),
                    ..Default::default()
                },
                &auth,
            ))
            .await
            .map_err(|s| status_error("VerifyToken (revoker)", &s))?
            .into_inner();
        if own.active {
            stale_on_revoker += 1;
        }
        let mut slowest = Some(Duration::ZERO);
        let mut all_first = true;
        for (r, poll) in polls.into_iter().enumerate() {
            match poll.await? {
                Seen::Inactive(delay, n) => {
                    polls_total += u64::from(n);
                    all_first &= n == 1;
                    per_replica[r].push(u32::try_from(delay.as_micros()).unwrap_or(u32::MAX));
                    slowest = slowest.map(|s| s.max(delay));
                }
                Seen::TimedOut => {
                    timeouts += 1;
                    slowest = None;
                }
                Seen::Failed(why) => {
                    eprintln!(
                        "propagation: revocation {i}: replica {} answered {why}",
                        r + 1
                    );
                    failures += 1;
                    slowest = None;
                }
            }
        }
        if let Some(delay) = slowest {
            overall.push(u32::try_from(delay.as_micros()).unwrap_or(u32::MAX));
            if all_first {
                first_poll += 1;
            }
        }
    }
    overall.sort_unstable();
    for (r, delays) in per_replica.iter_mut().enumerate() {
        delays.sort_unstable();
        eprintln!(
            "propagation to {}: p50 {} us, p99 {} us, max {} us ({} revocations seen)",
            args.targets[r + 1],
            percentile(delays, 0.50),
            percentile(delays, 0.99),
            delays.last().copied().unwrap_or(0),
            delays.len()
        );
    }
    let (p50, p99) = (percentile(&overall, 0.50), percentile(&overall, 0.99));
    let max = overall.last().copied().unwrap_or(0);
    eprintln!(
        "propagation (slowest of {} replicas per revocation): {} revocations, p50 {p50} us, p99 {p99} us, max {max} us; \
         inactive on the first poll everywhere: {first_poll}; timeouts {timeouts}; failures {failures}; \
         still active on the revoking replica: {stale_on_revoker}; polls {polls_total}",
        args.targets.len() - 1,
        overall.len()
    );
    println!(
        "RESULT revocations={} p50_us={p50} p99_us={p99} max_us={max} first_poll={first_poll} timeouts={timeouts} \
         failures={failures} stale_on_revoker={stale_on_revoker} polls={polls_total}",
        overall.len()
    );
    if timeouts + failures + stale_on_revoker > 0 {
        return Err("some revocations did not propagate (see above)".into());
    }
    Ok(())
}

/// `hash-rate`: what a sign-in's password check costs with nothing else
/// around it: `--threads` threads verifying the password against its hash
/// back to back (one argon2id hash each, exactly the service's check of a
/// correct password), counted over the measured window.
fn hash_rate(args: &HashRateArgs) -> Result<(), BoxError> {
    use argon2::password_hash::{
        PasswordHash, PasswordHasher as _, SaltString, rand_core::OsRng as SaltRng,
    };
    let argon2 = identity::domain::password::PasswordHasher::argon2id()?;
    let salt = SaltString::generate(&mut SaltRng);
    let phc = argon2
        .hash_password(args.password.as_bytes(), &salt)?
        .to_string();
    let threads = args.threads.max(1);
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let until = measure_from + args.duration;
    let counted = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let phc = phc.as_str();
                scope.spawn(move || {
                    let parsed = PasswordHash::new(phc).expect("a hash made just now parses");
                    let mut counted = 0u64;
                    loop {
                        let began = Instant::now();
                        if began >= until {
                            return counted;
                        }
                        // The check a sign-in runs, on this thread's
                        // reused argon2 memory, as the hashing threads do.
                        let ok = identity::domain::password::PasswordHasher::check(
                            args.password.as_bytes(),
                            &parsed,
                        );
                        assert!(ok, "the password does not match its own hash");
                        // Counted by when they end, as `load` counts calls.
                        let ended = Instant::now();
                        if ended > measure_from && ended <= until {
                            counted += 1;
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a hashing thread"))
            .sum::<u64>()
    });
    let seconds = args.duration.as_secs_f64();
    let rps = counted as f64 / seconds;
    eprintln!(
        "hash-rate: {counted} argon2id checks in {seconds:.2}s on {threads} threads = {rps:.1}/s"
    );
    println!("RESULT hashes={counted} seconds={seconds:.3} rps={rps:.1} threads={threads}");
    Ok(())
}
