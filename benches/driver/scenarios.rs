//! The scenarios of `bash benches/run.sh`, in the order the bash harness
//! ran them: setup, phase 1 (the small table: hot, the loadgen
//! cross-checks, scale's small cold run), phase 2 (the cold pool: cold,
//! pgbench, memory, isolation), phase 3 (the large table: scale),
//! propagation, soak, and the report.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use crate::{
    cluster::{self, Db},
    generators::{self, Kv, err_path, f, s},
    options::Options,
    procs::{self, Result, fail, log},
    replicas::{Replicas, tail},
    report::{self, Report, fmt_int, us_ms},
    sampling::{Sampler, fmt_mib, rss_kb},
};

/// Everything a run shares.
pub struct Bench {
    pub o: Options,
    pub repo: PathBuf,
    pub work: PathBuf,
    pub loadgen: PathBuf,
    /// The tokens the loadgen reads from its environment.
    pub lg_env: Vec<(String, String)>,
    pub db: Db,
    pub r: Replicas,
    pub sampler: Sampler,
    /// Repeats of a disturbed run (0 while the sign-ins run in parallel).
    pub retries: u64,
}

pub const VERIFY: &str = "/identity.v1.TokensService/VerifyToken";
const HEALTH: &str = "/grpc.health.v1.Health/Check";

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// The first `n` lines of `from`, into `to`.
fn head(from: &Path, n: u64, to: &Path) -> Result<()> {
    let text = fs::read_to_string(from)?;
    let mut out = String::new();
    for line in text.lines().take(n as usize) {
        out.push_str(line);
        out.push('\n');
    }
    fs::write(to, out)?;
    Ok(())
}

/// Writes the lines of `from` after the first `n` to `to`.
fn tail_after(from: &Path, n: u64, to: &Path) -> Result<()> {
    let text = fs::read_to_string(from)?;
    let mut out = String::new();
    for line in text.lines().skip(n as usize) {
        out.push_str(line);
        out.push('\n');
    }
    fs::write(to, out)?;
    Ok(())
}

/// Tokens beyond `--cold-tokens` for the cold path at one client: more
/// than one client uses in a run of the default length.
const COLD_ONE_CLIENT_TOKENS: u64 = 20_000;

/// `--memory-accounts-each`: every token of the pool (named `cold…`) moves
/// to a robot account of its own, so that no two cached verdicts share an
/// account.
const ACCOUNT_EACH: &str = "BEGIN; \
INSERT INTO accounts (account_id, username, username_key, kind, role, create_time) \
SELECT 'each-' || t.token_id, 'each-' || left(md5(t.token_id), 24), \
'each-' || left(md5(t.token_id), 24), 'robot', 'user', t.create_time \
FROM tokens t WHERE t.name LIKE 'cold%'; \
UPDATE tokens SET account_id = 'each-' || token_id WHERE name LIKE 'cold%'; \
COMMIT;";

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The newest `target/release/deps/NAME-*` executable.
fn newest_bench(repo: &Path, name: &str) -> Option<PathBuf> {
    let deps = repo.join("target/release/deps");
    fs::read_dir(deps)
        .ok()?
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('-') && !rest.contains('.'))
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, p)| p)
}

/// `cargo build ARGS --message-format=json`: the executable of target `name`.
pub fn cargo_build_bench(args: &[&str], name: &str) -> Result<Option<PathBuf>> {
    let out = Command::new("cargo")
        .arg("build")
        .args(args)
        .args(["--bench", name, "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .next_back())
}

fn need(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

fn as_root() -> bool {
    // "Uid:\t<real>\t<effective>\t..."
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// What `identity serve --help` says about the cache (the top-level help
/// lists the commands only, since each command has its own settings).
struct CacheInfo {
    flag: bool,
    capacity: u64,
    ttl_flag: bool,
}

fn cache_info(identity: &Path) -> Result<CacheInfo> {
    let out = Command::new(identity).args(["serve", "--help"]).output()?;
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let flag = help.contains("--cache-entries");
    let mut capacity = 0;
    if flag {
        capacity = match std::env::var("IDENTITY_CACHE_ENTRIES")
            .ok()
            .filter(|v| !v.is_empty())
        {
            Some(v) => v.parse()?,
            None => {
                let lines: Vec<&str> = help.lines().collect();
                let at = lines
                    .iter()
                    .position(|l| l.contains("--cache-entries"))
                    .unwrap_or(0);
                lines[at..lines.len().min(at + 4)]
                    .iter()
                    .find_map(|l| {
                        let rest = &l[l.find("default: ")? + "default: ".len()..];
                        let digits: String =
                            rest.chars().take_while(char::is_ascii_digit).collect();
                        digits.parse().ok()
                    })
                    .unwrap_or(0)
            }
        };
    }
    Ok(CacheInfo {
        flag,
        capacity,
        ttl_flag: help.contains("--cache-ttl"),
    })
}

/// The whole run.
pub fn run(o: Options) -> Result<()> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(&repo)?;
    let out = o
        .out
        .clone()
        .map_or_else(|| repo.join("target/bench-results.md"), |p| repo.join(p));
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    report::install(Report {
        out: out.clone(),
        repo: repo.clone(),
        loadavg_at_start: loadavg(),
        duration: o.duration,
        warmup: o.warmup,
        connections: o.connections,
        max_other_cpu: o.max_other_cpu,
        retries: o.retries,
        streams: o.streams.clone(),
        scale_small: o.scale_small,
        scale_large: o.scale_large,
        pg_version: "?".into(),
        ..Report::default()
    });

    // --- prerequisites ---------------------------------------------------
    if !o.no_build && !need("cargo") {
        return fail("cargo is required");
    }
    if as_root() && !need("runuser") {
        return fail("runuser is required when running as root");
    }
    if !need("h2load") {
        if !(as_root() && need("apt-get")) {
            return fail("h2load is missing (apt-get install nghttp2-client)");
        }
        log("installing h2load (nghttp2-client)");
        let quiet = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
        };
        quiet(&["update", "-qq"])?;
        if !quiet(&["install", "-y", "-qq", "nghttp2-client"])?.success() {
            return fail("apt-get install nghttp2-client failed");
        }
    }

    // --- build -----------------------------------------------------------
    let identity = repo.join("target/release/identity");
    let loadgen = if o.no_build {
        newest_bench(&repo, "loadgen")
    } else {
        log("cargo build --release (identity and the loadgen bench)");
        if !procs::run(
            Command::new("cargo").args(["build", "--release", "--bin", "identity"]),
            None,
        )? {
            return fail("cargo build --release --bin identity failed");
        }
        cargo_build_bench(&["--release"], "loadgen")?
    };
    let Some(loadgen) = loadgen.filter(|p| p.is_file()) else {
        return fail("building the loadgen failed (cargo build --release --bench loadgen)");
    };
    if !identity.is_file() {
        return fail(format!(
            "{} is missing (drop --no-build)",
            identity.display()
        ));
    }
    let cache = cache_info(&identity)?;
    report::with(|r| {
        r.cache_flag = cache.flag;
        r.cache_capacity = cache.capacity;
    });
    if cache.flag {
        log(format!(
            "the binary has a verification cache: --cache-entries (capacity here: {})",
            cache.capacity
        ));
    } else {
        log("the binary has no verification cache (no --cache-entries flag)");
    }

    // --- PostgreSQL --------------------------------------------------------
    let work = tempfile::Builder::new()
        .prefix("identity-bench.")
        .tempdir()?
        .keep();
    procs::own_work_dir(work.clone(), o.keep);
    log("initdb + start PostgreSQL (fsync=off, 127.0.0.1, a free port)");
    let db = Db::start(cluster::SETTINGS)?;
    db.announce();
    report::with(|r| r.pg_version = db.version());
    let database_url = db.url();

    // --- replicas ------------------------------------------------------------
    log("migrate, bootstrap an operator, start replica A");
    let quiet_identity = |args: &[&str]| {
        Command::new(&identity)
            .args(args)
            .env("DATABASE_URL", &database_url)
            .env("IDENTITY_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
    };
    if !quiet_identity(&["migrate"])?.status.success() {
        return fail("identity migrate failed");
    }
    let ops = quiet_identity(&["bootstrap-operator", "--username", "bench-ops"])?;
    if !ops.status.success() {
        return fail("identity bootstrap-operator failed");
    }
    let ops_token = String::from_utf8_lossy(&ops.stdout).trim().to_owned();
    let replicas = Replicas {
        identity: identity.clone(),
        work: work.clone(),
        database_url: database_url.clone(),
        server_log: o.server_log.clone(),
        running: BTreeMap::new(),
    };
    let roots = vec![std::process::id(), db.postmaster_pid()];
    let retries = o.retries;
    let mut b = Bench {
        o,
        repo,
        work,
        loadgen,
        lg_env: vec![("BENCH_OPERATOR_TOKEN".into(), ops_token)],
        db,
        r: replicas,
        sampler: Sampler::new(roots),
        retries,
    };
    b.r.require("A", &[])?;
    b.scenarios(&cache)
}

impl Bench {
    fn probe(&self, args: &[&str]) -> Result<Kv> {
        let mut command = self.loadgen("probe");
        command.args(args);
        self.result_of(&mut command, "loadgen probe")
    }

    fn scenarios(&mut self, cache: &CacheInfo) -> Result<()> {
        let o = self.o.clone();
        let url_a = self.r.url("A");
        let rss_a_idle = rss_kb(self.r.pid("A"));
        let setup = self
            .loadgen("setup")
            .args(["--target", &url_a])
            .stderr(Stdio::inherit())
            .output()?;
        if !setup.status.success() {
            return fail("loadgen setup failed");
        }
        // KEY=value lines, read as data (never evaluated).
        let vars: HashMap<String, String> = String::from_utf8_lossy(&setup.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter(|(k, v)| {
                !k.is_empty()
                    && k.bytes().all(|c| c.is_ascii_uppercase() || c == b'_')
                    && v.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"_.:-".contains(&c))
            })
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let var = |k: &str| {
            vars.get(k)
                .cloned()
                .ok_or_else(|| format!("loadgen setup did not print {k}"))
        };
        let (person, robot, verifier, hot) = (
            var("PERSON_ID")?,
            var("ROBOT_ID")?,
            var("VERIFIER")?,
            var("HOT_TOKEN")?,
        );
        self.lg_env
            .push(("BENCH_VERIFIER_TOKEN".into(), verifier.clone()));

        let frames = self.work.join("frames");
        fs::create_dir_all(&frames)?;
        let health_bin = frames.join("health.bin");
        let verify_bin = frames.join("verify-hot.bin");
        fs::write(&health_bin, generators::grpc_frame(&[]))?;
        fs::write(&verify_bin, generators::grpc_frame(&[(1, &hot)]))?;
        let health_frame = f(
            &self.probe(&["--target", &url_a, "--rpc", "health"])?,
            "frame_bytes",
        ) as u64;
        let verify_frame = f(
            &self.probe(&["--target", &url_a, "--token", &hot, "--expect", "active"])?,
            "frame_bytes",
        ) as u64;
        log(format!(
            "a successful answer is {health_frame} bytes (Health/Check) and {verify_frame} bytes (VerifyToken, active)"
        ));

        // ================= Phase 1: the small table =================
        let tokens = self.work.join("tokens");
        fs::create_dir_all(&tokens)?;
        let tf = |name: &str| tokens.join(name);
        let path_s = |p: PathBuf| p.display().to_string();
        // 100 revoked tokens for the mixed run, then valid ones up to scale_small.
        self.add_tokens(&person, "revoked", 100, &tf("revoked.txt"), true)?;
        let rows = self.db.token_rows()?;
        if o.scale_small <= rows {
            return fail(format!(
                "--scale-sizes small size must exceed the {rows} tokens setup creates"
            ));
        }
        let small_fill = o.scale_small - rows;
        log(format!(
            "phase 1: {} tokens stored ({small_fill} generated)",
            o.scale_small
        ));
        self.add_tokens(&person, "scale", small_fill, &tf("scale.txt"), false)?;
        self.db.psql(&["-c", "VACUUM ANALYZE"])?;
        fs::write(tf("hot.txt"), format!("{hot}\n"))?;

        let vf = verify_frame;
        let auth = Some(verifier.as_str());
        let mut ran_hot_m1 = false;
        if o.want("hot") || o.want("scale") {
            log(format!(
                "hot path: h2load, -c {}, streams {}",
                o.connections,
                o.streams.join(",")
            ));
            self.hot_m1(
                &mut ran_hot_m1,
                &health_bin,
                health_frame,
                &verify_bin,
                vf,
                auth,
            )?;
        }
        let mut nocache = "A".to_owned();
        let mut nocache_note = "no cache in this binary".to_owned();
        if o.want("hot") {
            for m in &o.streams {
                if m == "1" {
                    continue;
                }
                self.h2load_run(
                    &format!("health-m{m}"),
                    "hot",
                    "Health/Check (baseline)",
                    HEALTH,
                    &health_bin,
                    health_frame,
                    m,
                    None,
                    None,
                )?;
                self.h2load_run(
                    &format!("verify-m{m}"),
                    "hot",
                    "VerifyToken, 1 token",
                    VERIFY,
                    &verify_bin,
                    vf,
                    m,
                    None,
                    auth,
                )?;
            }
            if cache.flag {
                self.ensure_nocache(cache, &mut nocache, &mut nocache_note)?;
                if nocache == "N" {
                    let url = self.r.url("N");
                    self.h2load_run(
                        "verify-m1-nocache",
                        "hot",
                        "VerifyToken, 1 token, cache off (replica N)",
                        VERIFY,
                        &verify_bin,
                        vf,
                        "1",
                        Some(&url),
                        auth,
                    )?;
                }
            }
            log("hot path cross-check with the loadgen");
            self.loadgen_run(
                "lg-health",
                "hot",
                "Health/Check (baseline)",
                "",
                &strings(&["--target", &url_a, "--rpc", "health"]),
            )?;
            self.loadgen_run(
                "lg-verify",
                "hot",
                "VerifyToken, 1 token",
                "",
                &strings(&["--target", &url_a, "--tokens-file", &path_s(tf("hot.txt"))]),
            )?;
            log("hot path with a realistic mix (loadgen)");
            self.loadgen_run(
                "lg-mix",
                "hot",
                &format!("VerifyToken, mix valid:90,unknown:5,revoked:5 over {small_fill} tokens"),
                "",
                &strings(&[
                    "--target",
                    &url_a,
                    "--tokens-file",
                    &path_s(tf("scale.txt")),
                    "--revoked-file",
                    &path_s(tf("revoked.txt")),
                    "--mix",
                    "valid:90,unknown:5,revoked:5",
                ]),
            )?;
            let mut probe = self.loadgen("probe");
            probe
                .args(["--target", &url_a, "--token", &hot, "--expect", "active"])
                .stdout(Stdio::null());
            if !procs::run(&mut probe, None)? {
                return fail("the hot token is not active after the hot runs");
            }
        }
        let rss_a_hot = rss_kb(self.r.pid("A"));

        if o.want("scale") {
            self.ensure_nocache(cache, &mut nocache, &mut nocache_note)?;
            log(format!(
                "scale: cold path with {} tokens stored (replica {nocache})",
                o.scale_small
            ));
            let url = self.r.url(&nocache);
            self.loadgen_run(
                "cold-small",
                "scale",
                &format!(
                    "VerifyToken cold, cycling {small_fill} tokens, {} stored",
                    o.scale_small
                ),
                &nocache_note,
                &strings(&["--target", &url, "--tokens-file", &path_s(tf("scale.txt"))]),
            )?;
        }

        // ================= Phase 2: the cold pool =================
        let mut pool = 0;
        if o.want("cold") {
            pool = o.cold_tokens + COLD_ONE_CLIENT_TOKENS;
        }
        if o.want("memory") && cache.capacity > pool {
            pool = cache.capacity;
        }
        if pool > 0 {
            log(format!(
                "phase 2: generating and loading {pool} distinct tokens"
            ));
            self.add_tokens(&person, "cold", pool, &tf("cold.txt"), false)?;
            self.db.psql(&["-c", "VACUUM ANALYZE tokens"])?;
            head(&tf("cold.txt"), o.cold_tokens, &tf("cold-run.txt"))?;
            if o.want("cold") {
                tail_after(&tf("cold.txt"), o.cold_tokens, &tf("cold-one-client.txt"))?;
            }
        }
        let mut cold_kv = Kv::new();
        if o.want("cold") {
            log(format!(
                "cold path: {} distinct tokens, each used at most once",
                o.cold_tokens
            ));
            let stored = self.db.token_rows()?;
            cold_kv = self.loadgen_run(
                "cold",
                "cold",
                &format!("VerifyToken, each token once, {stored} stored"),
                "",
                &strings(&[
                    "--target",
                    &url_a,
                    "--tokens-file",
                    &path_s(tf("cold-run.txt")),
                    "--once",
                ]),
            )?;
            // The latency of a miss at low load: one client, one call at a
            // time, each of its own tokens once (so a batch is one lookup).
            self.loadgen_run(
                "cold-1",
                "cold",
                "VerifyToken, each token once, 1 client",
                "",
                &strings(&[
                    "--target",
                    &url_a,
                    "--tokens-file",
                    &path_s(tf("cold-one-client.txt")),
                    "--once",
                    "--concurrency",
                    "1",
                    "--connections",
                    "1",
                ]),
            )?;
            log(format!(
                "pgbench -i -s {}, then pgbench -S -c {} -j 2 -T {}",
                o.pgbench_scale, o.connections, o.duration
            ));
            self.pgbench_run()?;
        }
        let rss_a_cold = rss_kb(self.r.pid("A"));

        if o.want("memory") {
            self.memory(
                cache,
                rss_a_idle,
                rss_a_hot,
                rss_a_cold,
                &cold_kv,
                &tf("cold.txt"),
                &tf("fill.txt"),
            )?;
        }

        if o.want("isolation") {
            self.isolation(&verify_bin, vf, auth)?;
        }

        // ================= Phase 3: the large table =================
        if o.want("scale") {
            let current = self.db.token_rows()?;
            if o.scale_large > current {
                let filler = o.scale_large - current;
                log(format!(
                    "phase 3: inserting {filler} filler rows (generate_series) to reach {} tokens",
                    o.scale_large
                ));
                let now_us = procs::epoch_secs() * 1_000_000;
                // Filler rows: random digests (SHA-256 of a random UUID),
                // owned by the robot.
                let sql = self.work.join("filler.sql");
                fs::write(&sql, FILLER_SQL)?;
                self.db.psql(&[
                    "-v",
                    &format!("acct={robot}"),
                    "-v",
                    &format!("n={filler}"),
                    "-v",
                    &format!("now={now_us}"),
                    "-v",
                    &format!("exp={}", now_us + 30 * 86_400 * 1_000_000),
                    "-f",
                    &path_s(sql),
                ])?;
            } else {
                log(format!(
                    "phase 3: {current} tokens already stored (>= {}): no filler",
                    o.scale_large
                ));
            }
            let stored = self.db.token_rows()?;
            log(format!("scale: {stored} tokens stored"));
            // Fresh replicas, as A and N were when they measured the small
            // table, so that only the table differs (A has served the cold
            // run and the sign-ins since).
            self.r.require("L", &[])?;
            let url_l = self.r.url("L");
            self.h2load_run(
                "verify-large",
                "scale",
                &format!("VerifyToken, 1 token, {stored} stored (fresh replica L)"),
                VERIFY,
                &verify_bin,
                vf,
                "1",
                Some(&url_l),
                auth,
            )?;
            let mut large_cold = "L";
            let mut large_note = nocache_note.clone();
            if nocache == "N" {
                self.r.require("L0", &["--cache-entries", "0"])?;
                large_cold = "L0";
                large_note = "fresh replica started with --cache-entries 0".into();
            }
            let url = self.r.url(large_cold);
            self.loadgen_run(
                "cold-large",
                "scale",
                &format!("VerifyToken cold, cycling {small_fill} tokens, {stored} stored"),
                &large_note,
                &strings(&["--target", &url, "--tokens-file", &path_s(tf("scale.txt"))]),
            )?;
        }

        if o.pooler && (o.want("hot") || o.want("cold")) {
            self.pooler(&verify_bin, vf, auth, &tf("scale.txt"))?;
        }
        if o.read_replica && (o.want("hot") || o.want("cold")) {
            self.read_replica(&verify_bin, vf, auth, &tf("scale.txt"))?;
        }
        if o.want("signin") {
            self.signin()?;
        }
        if o.want("propagation") {
            self.propagation(&person)?;
        }
        if o.want("soak") {
            self.soak(cache, &person, &tf("scale.txt"))?;
        }

        // ================= Report =================
        let out = report::with(|r| {
            r.reported = true;
            r.write("complete").map(|()| r.out.clone())
        })?;
        print!("{}", fs::read_to_string(&out)?);
        log(format!(
            "report written to {} ({}s)",
            out.display(),
            procs::elapsed()
        ));
        Ok(())
    }

    /// The hot path with one stream per connection: shared by hot, scale
    /// and isolation.
    fn hot_m1(
        &mut self,
        ran: &mut bool,
        health: &Path,
        hf: u64,
        verify: &Path,
        vf: u64,
        auth: Option<&str>,
    ) -> Result<()> {
        if *ran {
            return Ok(());
        }
        self.h2load_run(
            "health-m1",
            "hot",
            "Health/Check (baseline)",
            HEALTH,
            health,
            hf,
            "1",
            None,
            None,
        )?;
        let run = format!("VerifyToken, 1 token, {} stored", self.o.scale_small);
        self.h2load_run(
            "verify-m1",
            "hot",
            &run,
            VERIFY,
            verify,
            vf,
            "1",
            None,
            auth,
        )?;
        *ran = true;
        Ok(())
    }

    /// The replica with the cache off (for the scale scenario's cold runs):
    /// A itself when the binary has no cache.
    fn ensure_nocache(
        &mut self,
        cache: &CacheInfo,
        nocache: &mut String,
        note: &mut String,
    ) -> Result<()> {
        if !cache.flag || self.r.has("N") {
            return Ok(());
        }
        if self.r.start("N", &["--cache-entries", "0"])? {
            *nocache = "N".into();
            *note = "replica started with --cache-entries 0".into();
        } else {
            *note = "**--cache-entries 0 refused: ran on A, cache on (hits possible)**".into();
        }
        Ok(())
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the figures of the earlier phases"
    )]
    fn memory(
        &mut self,
        cache: &CacheInfo,
        idle: u64,
        hot: u64,
        cold: u64,
        cold_kv: &Kv,
        cold_file: &Path,
        fill_file: &Path,
    ) -> Result<()> {
        let o = self.o.clone();
        let mut rows = vec![
            format!("| A, just started (idle) | {} | |", fmt_mib(idle as i64)),
            format!("| A, after the hot runs | {} | |", fmt_mib(hot as i64)),
            format!(
                "| A, after the cold run | {} | {} |",
                fmt_mib(cold as i64),
                if o.want("cold") {
                    format!(
                        "{} distinct tokens verified (warm-up included)",
                        s(cold_kv, "used")
                    )
                } else {
                    "cold not run".into()
                }
            ),
        ];
        if cache.flag && cache.capacity > 0 {
            if o.memory_accounts_each {
                log("memory: giving every token of the pool an account of its own");
                self.db.psql(&["-c", ACCOUNT_EACH])?;
            }
            let mut fill_args: Vec<&str> = if cache.ttl_flag {
                vec!["--cache-ttl", "1h"]
            } else {
                vec![]
            };
            if !self.r.start("M", &fill_args)? {
                fill_args.clear();
                self.r.require("M", &[])?;
            }
            let m_idle = rss_kb(self.r.pid("M"));
            head(cold_file, cache.capacity, fill_file)?;

            log(format!(
                "memory: filling replica M's cache with {} distinct tokens",
                cache.capacity
            ));
            let raw = self.work.join("loadgen-fill.txt");
            let mut command = self.loadgen("load");
            command
                .args(["--target", &self.r.url("M"), "--tokens-file"])
                .arg(fill_file)
                .args(["--once", "--concurrency", &o.connections.to_string()])
                .args(["--duration", "600s", "--warmup", "0s"]);
            if !self.loadgen_to(&mut command, &raw, Some(Duration::from_secs(900)))? {
                eprintln!("{}", fs::read_to_string(err_path(&raw)).unwrap_or_default());
                return fail("the cache fill failed");
            }
            eprint!("{}", fs::read_to_string(err_path(&raw)).unwrap_or_default());
            let kv = generators::result_line(&fs::read_to_string(&raw)?);
            let m_full = rss_kb(self.r.pid("M"));
            let settings = if fill_args.is_empty() {
                "default settings".to_owned()
            } else {
                fill_args.join(" ")
            };
            let d = m_full as i64 - m_idle as i64;
            rows.push(format!(
                "| M ({settings}), just started | {} | |",
                fmt_mib(m_idle as i64)
            ));
            rows.push(format!(
                "| M, after verifying {n} distinct tokens (= cache capacity) | {} | +{} MiB, {:.0} B/entry; fill took {} s at {}/s, errors {} |",
                fmt_mib(m_full as i64),
                fmt_mib(d),
                d as f64 * 1024.0 / cache.capacity as f64,
                s(&kv, "seconds"),
                fmt_int(f(&kv, "rps")),
                s(&kv, "errors"),
                n = cache.capacity,
            ));
        } else {
            rows.push("| (cache fill) | n/a | no cache in this binary: the cold-run figure above is the one to compare |".into());
        }
        report::with(|r| r.memory_rows.extend(rows));
        Ok(())
    }

    fn isolation(&mut self, verify: &Path, vf: u64, auth: Option<&str>) -> Result<()> {
        let o = self.o.clone();
        log(format!(
            "isolation: hot path idle, then while signing in at full speed ({} in parallel)",
            o.signin_concurrency
        ));
        self.h2load_run(
            "verify-idle",
            "isolation",
            "VerifyToken, 1 token, idle (reference)",
            VERIFY,
            verify,
            vf,
            "1",
            None,
            auth,
        )?;
        let raw = self.work.join("loadgen-signin.txt");
        let mut command = self.loadgen("load");
        command
            .args(["--target", &self.r.url("A"), "--rpc", "sign-in"])
            .args(["--concurrency", &o.signin_concurrency.to_string()])
            .args([
                "--duration",
                &format!("{}s", o.duration + 2 * o.warmup + 2),
                "--warmup",
                "0s",
            ])
            .stdout(fs::File::create(&raw)?)
            .stderr(fs::File::create(err_path(&raw))?);
        let mut signin = procs::spawn(&mut command)?;
        thread::sleep(Duration::from_secs(o.warmup + 1));
        // No repeat: the sign-ins would be over.
        self.retries = 0;
        let during = self.h2load_run(
            "verify-signin",
            "isolation",
            "VerifyToken, 1 token, during sign-ins",
            VERIFY,
            verify,
            vf,
            "1",
            None,
            auth,
        );
        self.retries = o.retries;
        during?;
        if !procs::wait(&mut signin, None)?.success() {
            eprintln!("{}", fs::read_to_string(err_path(&raw)).unwrap_or_default());
            return fail("the sign-in generator failed");
        }
        eprint!("{}", fs::read_to_string(err_path(&raw)).unwrap_or_default());
        let kv = generators::result_line(&fs::read_to_string(&raw)?);
        let mut ok = format!("OK: codes {}", s(&kv, "codes"));
        if s(&kv, "errors") != "0" {
            ok = format!("**ERRORS**: codes {}", s(&kv, "codes"));
        }
        let rss = rss_kb(self.r.pid("A"));
        report::with(|r| {
            r.record(
                "signin",
                "isolation",
                "SignIn in parallel (argon2id)",
                &format!("loadgen -c {}", o.signin_concurrency),
                f(&kv, "rps"),
                f(&kv, "p50_us"),
                f(&kv, "p99_us"),
                f(&kv, "p999_us"),
                &ok,
                &format!("{} sign-ins", s(&kv, "requests")),
            );
            if o.want("memory") {
                r.memory_rows.push(format!(
                    "| A, after the isolation run | {} | {} sign-ins: argon2id (19 MiB per hash) on the blocking pool |",
                    fmt_mib(rss as i64),
                    s(&kv, "requests")
                ));
            }
        });
        Ok(())
    }

    fn propagation(&mut self, person: &str) -> Result<()> {
        self.r.require("B", &[])?;
        self.r.require("C", &[])?;
        log(format!(
            "propagation: {} revocations on A, polled on B and C",
            self.o.revocations
        ));
        let raw = self.work.join("loadgen-propagation.txt");
        let targets = format!(
            "{},{},{}",
            self.r.url("A"),
            self.r.url("B"),
            self.r.url("C")
        );
        let mut command = self.loadgen("propagation");
        command.args([
            "--targets",
            &targets,
            "--account-id",
            person,
            "--count",
            &self.o.revocations.to_string(),
        ]);
        let status = if self.loadgen_to(&mut command, &raw, Some(Duration::from_secs(900)))? {
            "OK"
        } else {
            "**FAILED**"
        };
        eprint!("{}", fs::read_to_string(err_path(&raw)).unwrap_or_default());
        let kv = generators::result_line(&fs::read_to_string(&raw)?);
        if s(&kv, "revocations").is_empty() {
            return fail("the propagation run produced no result");
        }
        let line = format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {status} |",
            s(&kv, "revocations"),
            us_ms(f(&kv, "p50_us")),
            us_ms(f(&kv, "p99_us")),
            us_ms(f(&kv, "max_us")),
            s(&kv, "first_poll"),
            s(&kv, "timeouts"),
            s(&kv, "stale_on_revoker"),
            s(&kv, "polls"),
        );
        report::with(|r| r.propagation_line = Some(line));
        Ok(())
    }

    fn soak(&mut self, cache: &CacheInfo, person: &str, tokens: &Path) -> Result<()> {
        let o = self.o.clone();
        let entries = o.soak_cache_entries.to_string();
        let (mut flags, soak_cache): (Vec<&str>, u64) = if cache.flag {
            (vec!["--cache-entries", &entries], o.soak_cache_entries)
        } else {
            (vec![], 0)
        };
        // The soak signs the one bench person in from one address several
        // times a second: the per-minute limits on password checks would
        // refuse that (as they should a real flood), as in the sign-in
        // scenario. The failure throttle still runs.
        flags.extend([
            "--sign-in-account-per-minute",
            "1000000",
            "--sign-in-address-per-minute",
            "1000000",
        ]);
        self.r.require("S0", &flags)?;
        self.r.require("S1", &flags)?;
        let mix_opt = if o.soak_mix.is_empty() {
            String::new()
        } else {
            format!(" --soak-mix {}", o.soak_mix)
        };
        let soak_cmd = format!(
            "bash benches/run.sh -s {} --soak-duration {} --soak-connections {}{mix_opt} --soak-cache-entries {}",
            o.scenarios, o.soak_duration, o.soak_connections, o.soak_cache_entries
        );
        log(format!(
            "soak: {} against replicas S0 and S1 ({} connections, --cache-entries {soak_cache})",
            o.soak_duration, o.soak_connections
        ));
        let raw = self.work.join("loadgen-soak.txt");
        let soak_md = self.work.join("soak.md");
        let load_before = loadavg();
        let started = procs::utc_now();
        self.sampler.mark();
        let mut command = self.loadgen("soak");
        command
            .args([
                "--targets",
                &format!("{},{}", self.r.url("S0"), self.r.url("S1")),
            ])
            .args([
                "--pids",
                &format!("{},{}", self.r.pid("S0"), self.r.pid("S1")),
            ])
            // Whose CPU time the soak's efficiency counts: both replicas
            // and the cluster (the postmaster and its backends).
            .args([
                "--cpu-pids",
                &format!(
                    "{},{},{}",
                    self.r.pid("S0"),
                    self.r.pid("S1"),
                    self.db.postmaster_pid()
                ),
            ])
            .args(["--account-id", person, "--tokens-file"])
            .arg(tokens)
            .args([
                "--duration",
                &o.soak_duration,
                "--connections",
                &o.soak_connections.to_string(),
            ]);
        if !o.soak_mix.is_empty() {
            command.args(["--mix", &o.soak_mix]);
        }
        command
            .args(["--cache-entries", &soak_cache.to_string(), "--report"])
            .arg(&soak_md);
        let ok = self.loadgen_to(
            &mut command,
            &raw,
            Some(Duration::from_secs(o.soak_secs + 600)),
        );
        let foreign = self.sampler.foreign();
        report::with(|r| r.foreign = Some(foreign));
        // The replicas' own complaints during the soak (WARN and ERROR lines).
        let mut logs = Vec::new();
        for name in ["S0", "S1"] {
            let text = fs::read_to_string(self.work.join(format!("replica-{name}.log")))
                .unwrap_or_default();
            let count = |what: &str| text.lines().filter(|l| l.contains(what)).count();
            logs.push(format!(
                "{name}: {} WARN, {} ERROR",
                count(" WARN "),
                count(" ERROR ")
            ));
            if !procs::running(self.r.pid(name)) {
                logs.push(format!("**{name} is no longer running**"));
            }
        }
        let mut section = format!(
            "- command: `{soak_cmd}`; started {started}; commit {}\n\
             - machine: {} cores, shared: the two replicas, PostgreSQL and the generator run on it, and processes the harness did not start used {foreign}% of the CPU during the soak (load average {load_before} before, {} after)\n\
             - replicas' logs: {}\n",
            report::commit(&self.repo),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            loadavg(),
            logs.join("; "),
        );
        let err_text = err_path(&raw);
        match fs::read_to_string(&soak_md) {
            Ok(md) if !md.is_empty() => {
                section.push_str(&format!("\n{}", md.trim_end_matches('\n')))
            }
            _ => section.push_str(&format!(
                "\n**the soak produced no report**: {}",
                tail(&err_text, 5)
            )),
        }
        report::with(|r| r.soak_section = Some(section));
        let kv = generators::result_line(&fs::read_to_string(&raw).unwrap_or_default());
        match ok {
            Ok(true) => {
                let result = fs::read_to_string(&raw)
                    .unwrap_or_default()
                    .lines()
                    .find(|l| l.starts_with("RESULT "))
                    .unwrap_or("")
                    .to_owned();
                log(format!("soak passed: {result}"));
                Ok(())
            }
            failed => {
                eprintln!("{}", tail(&err_text, 20));
                let out = report::with(|r| {
                    r.reported = true;
                    r.write("FAILED: the soak failed").map(|()| r.out.clone())
                })?;
                print!("{}", fs::read_to_string(&out)?);
                let why = match failed {
                    Err(e) => e.to_string(),
                    _ => "non-zero exit status".into(),
                };
                fail(format!(
                    "the soak failed ({why}): {} - see the Soak section of {}",
                    s(&kv, "status"),
                    out.display()
                ))
            }
        }
    }
}

const FILLER_SQL: &str = "INSERT INTO tokens (token_id, account_id, name, live_name, digest, scopes, create_time, expire_time, family_id)
SELECT id, :'acct', 'filler-' || g, 'filler-' || g, sha256(convert_to(id, 'UTF8')), '', :now, :exp, id
FROM (SELECT g, gen_random_uuid()::text AS id FROM generate_series(1, :n) AS g) AS s;
VACUUM ANALYZE tokens;
";
