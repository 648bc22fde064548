//! The options of `bash benches/run.sh`: the same names, environment
//! variables, defaults and checks as the bash harness had (options win over
//! the environment).

use std::{collections::HashMap, path::PathBuf};

/// `bash benches/run.sh --help` (the header the bash harness printed).
pub const USAGE: &str = r#"Benchmark harness for the issue "VerifyToken at the speed of a no-op RPC".

  bash benches/run.sh [options]

Self-contained on one Linux machine (run as root or as a user that can run
initdb): installs h2load (apt package nghttp2-client) if it is missing,
builds `target/release/identity` and the load generator
(benches/loadgen.rs, `cargo build --release --bench loadgen`), starts a
throwaway PostgreSQL 15 cluster (fsync=off, 127.0.0.1, a free port, a temp
directory; as the `postgres` user via runuser when run as root) and the
identity replicas on 127.0.0.1 ports chosen by the kernel, runs the
scenarios with bounded durations, prints a Markdown report and writes it to
target/bench-results.md. Every process it starts is stopped, and the
cluster deleted, when it exits (normally, on error or on Ctrl-C).

Options (each has an environment variable; options win):
  -d, --duration SECS       measured seconds per run             BENCH_DURATION (10)
  -w, --warmup SECS         unmeasured seconds before each run   BENCH_WARMUP (1)
  -c, --connections N       HTTP/2 connections of every generator, and
                            pgbench clients                      BENCH_CONNECTIONS (16)
  -m, --streams LIST        h2load streams per connection for the hot
                            path, comma-separated                BENCH_STREAMS (1,8)
  -s, --scenarios LIST      comma-separated subset of: hot, cold, scale,
                            isolation, propagation, memory, soak,
                            signin; or all (every one but soak
                            and signin)                          BENCH_SCENARIOS (all)
      --cold-tokens N       distinct tokens for the cold run, each used at
                            most once                            BENCH_COLD_TOKENS (100000)
      --scale-sizes A,B     tokens stored in the small and large scale
                            runs                                 BENCH_SCALE_SIZES (1000,1000000)
      --revocations N       revocations in the propagation run   BENCH_REVOCATIONS (200)
      --signin-concurrency N  parallel sign-ins (isolation)      BENCH_SIGNIN_CONCURRENCY (4)
      --pgbench-scale N     pgbench -i -s (N x 100,000 rows)     BENCH_PGBENCH_SCALE (1)
      --out FILE            Markdown report                      BENCH_OUT (target/bench-results.md)
      --keep                keep the work directory (server logs, raw
                            generator output); the cluster is still
                            stopped                              BENCH_KEEP=1
      --no-build            use the binaries already built       BENCH_NO_BUILD=1
      --pooler              after the hot and cold scenarios, the same
                            calls through a real PgBouncer in
                            transaction mode (statement cache off)
                            against direct connections, side by side
                            (apt package pgbouncer)              BENCH_POOLER=1
      --read-replica        after the hot and cold scenarios, the same
                            calls with reads on a streaming standby
                            (IDENTITY_DATABASE_READ_URL) against
                            reads on the primary, side by side   BENCH_READ_REPLICA=1
      --memory-accounts-each  memory: every token of the cache fill
                            belongs to an account of its own (the
                            cache then shares no account between
                            its entries)                         BENCH_MEMORY_ACCOUNTS_EACH=1
      --max-other-cpu PCT   a run during which processes the harness did
                            not start (a build...) used this share of the
                            CPU or more is repeated               BENCH_MAX_OTHER_CPU (10)
      --retries N           ... at most N times (not the runs that spend
                            tokens: cold, cache fill, isolation)  BENCH_RETRIES (2)
      --soak-duration T     soak: how long (SECS, or with a unit:
                            90s, 10m, 1h)                        BENCH_SOAK_DURATION (600)
      --soak-connections N  soak: HTTP/2 connections in all, half
                            to each replica; one call in flight
                            per connection                       BENCH_SOAK_CONNECTIONS (64)
      --soak-mix MIX        soak: percentages of calls per operation
                                                                 BENCH_SOAK_MIX
                            (verify:90,verify-revoked:4,use-revoked:1,create:2.45,revoke:2.45,sign-in:0.1)
      --soak-cache-entries N  soak: the replicas' --cache-entries
                            (small, so that the cache is full
                            early and memory can be judged)      BENCH_SOAK_CACHE_ENTRIES (5000)
  -h, --help

Any IDENTITY_* variable in the environment (e.g. IDENTITY_CACHE_ENTRIES,
IDENTITY_DB_MAX_CONNECTIONS) reaches every replica; DATABASE_URL and
IDENTITY_LISTEN_ADDR are always set by the harness, and IDENTITY_METRICS_ADDR
defaults to a free port per replica (set it to off to measure without metrics). BENCH_SERVER_LOG sets the
replicas' log filter (default warn,identity::app=info).

Scenarios (each reports throughput and p50/p99/p99.9 latency):
  hot          VerifyToken of one valid token (same token every call) vs
               grpc.health.v1.Health/Check on the same server, both with
               h2load (-c CONNECTIONS -m M for each M in --streams;
               percentiles from h2load --log-file); success is checked by
               comparing h2load's data bytes per request with the size of
               a successful answer (loadgen probe), plus probes before and
               after. When the binary has a cache, VerifyToken also runs
               against a replica with --cache-entries 0 (what the hot path
               costs without it). A loadgen run of both calls cross-checks
               the generator, and a loadgen run with a realistic mix
               (valid:90,unknown:5,revoked:5) checks every verdict.
  cold         VerifyToken of --cold-tokens distinct valid tokens, each used
               at most once (no cache can hit), with the loadgen, vs
               pgbench -S -M prepared on the same database, same clients.
  scale        hot and cold with the two --scale-sizes tokens stored (the
               large size filled with generate_series rows); "cold" here
               cycles through the small size's real tokens on a replica
               with the cache turned off (--cache-entries 0), when the
               binary has a cache. The large-table runs use fresh replicas,
               like the small-table ones, so that only the table differs.
  isolation    the hot path (h2load, -m 1) while the loadgen signs in at full
               speed in parallel, vs the idle hot path.
  propagation  three replicas on one database; revoke on A, poll B and C
               until both answer active: false (loadgen propagation).
  memory       VmRSS of replica A after the hot and cold runs, and of a fresh
               replica before and after verifying as many distinct tokens as
               the default cache holds (with a long --cache-ttl so nothing
               expires during the fill).
  soak         (not part of "all"; 10 minutes by default) two fresh replicas
               S0 and S1 on the database; `loadgen soak` sends a realistic
               mix from --soak-connections connections, each call to a
               random replica: VerifyToken of valid tokens, VerifyToken of
               and GetToken with tokens it revoked, CreateToken,
               RevokeToken, SignIn. Reports throughput and p50/p90/p99/max
               per operation, unexpected errors by gRPC code, the replicas'
               VmRSS over time, and fails (exit 1) on any unexpected error,
               wrong verdict, revoked token accepted after its revocation
               was acknowledged (by the revoking replica at all, by the
               other one 1 s or more after), or memory that keeps growing.
               The rules are in benches/soak/mod.rs and BENCHMARKS.md.
"#;

/// Every scenario "all" stands for (soak is only run when asked for).
const ALL: &str = "hot,cold,scale,isolation,propagation,memory";
const KNOWN: &[&str] = &[
    "hot",
    "cold",
    "scale",
    "isolation",
    "propagation",
    "memory",
    "soak",
    "signin",
];

/// The settings of one run.
#[derive(Debug, Clone)]
pub struct Options {
    pub duration: u64,
    pub warmup: u64,
    pub connections: u64,
    pub streams: Vec<String>,
    /// The scenario list, "all" expanded (as the soak command line shows it).
    pub scenarios: String,
    pub cold_tokens: u64,
    pub scale_small: u64,
    pub scale_large: u64,
    pub revocations: u64,
    pub signin_concurrency: u64,
    pub pgbench_scale: u64,
    pub out: Option<PathBuf>,
    pub keep: bool,
    pub no_build: bool,
    /// `--pooler`: the hot and cold paths through PgBouncer as well.
    pub pooler: bool,
    /// `--memory-accounts-each`: the memory scenario's cache fill has one
    /// account per token (by default all tokens are the bench person's).
    pub memory_accounts_each: bool,
    /// `--read-replica`: the hot and cold paths with reads on a standby.
    pub read_replica: bool,
    pub server_log: String,
    pub max_other_cpu: u64,
    pub retries: u64,
    /// With its unit (`600s`, `10m`, `1h`).
    pub soak_duration: String,
    pub soak_secs: u64,
    pub soak_connections: u64,
    pub soak_mix: String,
    pub soak_cache_entries: u64,
}

/// What the command line asks for.
pub enum Parsed {
    Run(Box<Options>),
    Help,
}

impl Options {
    /// Whether scenario `name` is to run.
    pub fn want(&self, name: &str) -> bool {
        self.scenarios.split(',').any(|s| s == name)
    }
}

fn whole(name: &str, value: &str) -> Result<u64, String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("run.sh: expected a whole number, got '{value}'"));
    }
    value
        .parse()
        .map_err(|_| format!("run.sh: {name}: '{value}' is too large"))
}

/// Parses `args` (without the program name) over the environment `env`.
/// An error is the message for stderr (exit status 2).
pub fn parse(args: &[String], env: &HashMap<String, String>) -> Result<Parsed, String> {
    let var = |name: &str, default: &str| -> String {
        env.get(name)
            .filter(|v| !v.is_empty())
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    };
    let mut v: HashMap<&str, String> = HashMap::new();
    for (key, name, default) in [
        ("duration", "BENCH_DURATION", "10"),
        ("warmup", "BENCH_WARMUP", "1"),
        ("connections", "BENCH_CONNECTIONS", "16"),
        ("streams", "BENCH_STREAMS", "1,8"),
        ("scenarios", "BENCH_SCENARIOS", "all"),
        ("cold-tokens", "BENCH_COLD_TOKENS", "100000"),
        ("scale-sizes", "BENCH_SCALE_SIZES", "1000,1000000"),
        ("revocations", "BENCH_REVOCATIONS", "200"),
        ("signin-concurrency", "BENCH_SIGNIN_CONCURRENCY", "4"),
        ("pgbench-scale", "BENCH_PGBENCH_SCALE", "1"),
        ("out", "BENCH_OUT", ""),
        ("keep", "BENCH_KEEP", "0"),
        ("no-build", "BENCH_NO_BUILD", "0"),
        ("pooler", "BENCH_POOLER", "0"),
        ("memory-accounts-each", "BENCH_MEMORY_ACCOUNTS_EACH", "0"),
        ("read-replica", "BENCH_READ_REPLICA", "0"),
        ("server-log", "BENCH_SERVER_LOG", "warn,identity::app=info"),
        ("max-other-cpu", "BENCH_MAX_OTHER_CPU", "10"),
        ("retries", "BENCH_RETRIES", "2"),
        ("soak-duration", "BENCH_SOAK_DURATION", "600"),
        ("soak-connections", "BENCH_SOAK_CONNECTIONS", "64"),
        ("soak-mix", "BENCH_SOAK_MIX", ""),
        ("soak-cache-entries", "BENCH_SOAK_CACHE_ENTRIES", "5000"),
    ] {
        v.insert(key, var(name, default));
    }
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let key = match arg.as_str() {
            "-d" | "--duration" => "duration",
            "-w" | "--warmup" => "warmup",
            "-c" | "--connections" => "connections",
            "-m" | "--streams" => "streams",
            "-s" | "--scenarios" => "scenarios",
            "--keep" => {
                v.insert("keep", "1".into());
                continue;
            }
            "--no-build" => {
                v.insert("no-build", "1".into());
                continue;
            }
            "--pooler" => {
                v.insert("pooler", "1".into());
                continue;
            }
            "--read-replica" => {
                v.insert("read-replica", "1".into());
                continue;
            }
            "--memory-accounts-each" => {
                v.insert("memory-accounts-each", "1".into());
                continue;
            }
            "-h" | "--help" => return Ok(Parsed::Help),
            long if long.starts_with("--")
                && v.contains_key(&long[2..])
                && !matches!(
                    &long[2..],
                    "keep"
                        | "no-build"
                        | "pooler"
                        | "read-replica"
                        | "memory-accounts-each"
                        | "server-log"
                ) =>
            {
                &long[2..]
            }
            other => return Err(format!("run.sh: unknown option {other} (see --help)")),
        };
        let value = it
            .next()
            .ok_or_else(|| format!("run.sh: {arg} needs a value (see --help)"))?;
        let key = *v.keys().find(|k| **k == key).expect("a known key");
        v.insert(key, value.clone());
    }
    let n = |key: &str| whole(key, &v[key]);
    let duration = n("duration")?;
    let warmup = n("warmup")?;
    let connections = n("connections")?;
    let cold_tokens = n("cold-tokens")?;
    let revocations = n("revocations")?;
    let signin_concurrency = n("signin-concurrency")?;
    let pgbench_scale = n("pgbench-scale")?;
    let max_other_cpu = n("max-other-cpu")?;
    let retries = n("retries")?;
    let soak_connections = n("soak-connections")?;
    let soak_cache_entries = n("soak-cache-entries")?;
    if duration < 1 {
        return Err("run.sh: --duration must be at least 1".into());
    }
    let soak = v["soak-duration"].clone();
    let (digits, unit) = match soak.char_indices().last() {
        Some((i, c @ ('s' | 'm' | 'h'))) => (&soak[..i], c),
        _ => (soak.as_str(), 's'),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "run.sh: --soak-duration wants SECS or a number with s, m or h (e.g. 10m), got '{soak}'"
        ));
    }
    let count: u64 = digits
        .parse()
        .map_err(|_| format!("run.sh: --soak-duration '{soak}' is too large"))?;
    let soak_secs = count
        * match unit {
            'h' => 3600,
            'm' => 60,
            _ => 1,
        };
    if soak_secs < 1 {
        return Err("run.sh: --soak-duration must be at least 1s".into());
    }
    let sizes = || -> Option<(u64, u64)> {
        let (a, b) = v["scale-sizes"].split_once(',')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(a) || !digits(b) {
            return None;
        }
        let (a, b) = (a.parse().ok()?, b.parse().ok()?);
        (a < b).then_some((a, b))
    };
    let (scale_small, scale_large) =
        sizes().ok_or("run.sh: --scale-sizes wants SMALL,LARGE (e.g. 1000,1000000)")?;
    let mut scenarios = v["scenarios"].clone();
    if scenarios == "all" {
        scenarios = ALL.into();
    }
    for s in scenarios.split(',').filter(|s| !s.is_empty()) {
        if !KNOWN.contains(&s) {
            return Err(format!("run.sh: unknown scenario '{s}'"));
        }
    }
    Ok(Parsed::Run(Box::new(Options {
        duration,
        warmup,
        connections,
        streams: v["streams"]
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        scenarios,
        cold_tokens,
        scale_small,
        scale_large,
        revocations,
        signin_concurrency,
        pgbench_scale,
        out: Some(v["out"].clone())
            .filter(|o| !o.is_empty())
            .map(PathBuf::from),
        keep: v["keep"] == "1",
        no_build: v["no-build"] == "1",
        pooler: v["pooler"] == "1",
        memory_accounts_each: v["memory-accounts-each"] == "1",
        read_replica: v["read-replica"] == "1",
        server_log: v["server-log"].clone(),
        max_other_cpu,
        retries,
        soak_duration: format!("{digits}{unit}"),
        soak_secs,
        soak_connections,
        soak_mix: v["soak-mix"].clone(),
        soak_cache_entries,
    })))
}
