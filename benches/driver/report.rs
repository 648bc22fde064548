//! The Markdown report (target/bench-results.md): the rows of every run,
//! the ratio rows, the propagation, memory and soak sections. Written at
//! the end, and also after a failure, with what ran.

use std::{
    collections::HashMap,
    fs,
    path::PathBuf,
    process::Command,
    sync::{Mutex, MutexGuard},
};

use crate::procs::{self, log};

/// Everything the report shows.
#[derive(Default)]
pub struct Report {
    pub out: PathBuf,
    pub repo: PathBuf,
    pub loadavg_at_start: String,
    pub duration: u64,
    pub warmup: u64,
    pub connections: u64,
    pub max_other_cpu: u64,
    pub retries: u64,
    pub streams: Vec<String>,
    pub scale_small: u64,
    pub scale_large: u64,
    pub cache_flag: bool,
    pub cache_capacity: u64,
    pub pg_version: String,
    /// The share of other processes' CPU during the last measured run.
    pub foreign: Option<i64>,
    pub rows: Vec<String>,
    /// Calls/s and p99 (µs) of each recorded run, by key.
    pub figures: HashMap<String, (f64, f64)>,
    pub memory_rows: Vec<String>,
    pub propagation_line: Option<String>,
    pub soak_section: Option<String>,
    /// The `signin` scenario's section (see `signin.rs`).
    pub signin_section: Option<String>,
    /// The `--pooler` section (see `pooler.rs`).
    pub pooler_section: Option<String>,
    pub read_replica_section: Option<String>,
    /// Whether the final report has been written (no partial one then).
    pub reported: bool,
}

static REPORT: Mutex<Option<Report>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<Report>> {
    REPORT.lock().unwrap_or_else(|p| p.into_inner())
}

/// Installs the report (and the partial report after a failure).
pub fn install(report: Report) {
    *lock() = Some(report);
    procs::on_failure(|rc| {
        let mut guard = lock();
        let Some(report) = guard.as_mut() else {
            return;
        };
        if !report.reported
            && !report.rows.is_empty()
            && report
                .write(&format!("FAILED (exit status {rc}), partial"))
                .is_ok()
        {
            log(format!("partial report: {}", report.out.display()));
        }
    });
}

/// Runs `f` on the report.
pub fn with<R>(f: impl FnOnce(&mut Report) -> R) -> R {
    f(lock().as_mut().expect("the report is installed"))
}

/// `printf "%.0f"`.
pub fn fmt_int(v: f64) -> String {
    format!("{v:.0}")
}

/// Microseconds as milliseconds, two decimals.
pub fn us_ms(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

fn fmt_ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "n/a".into()
    } else {
        format!("{:.2}", a / b)
    }
}

/// The output of a command, trimmed ("" when it fails).
fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `git rev-parse --short HEAD` of the repository, or `?`.
pub fn commit(repo: &PathBuf) -> String {
    output(
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["rev-parse", "--short", "HEAD"]),
    )
    .unwrap_or_else(|| "?".into())
}

impl Report {
    /// One row: KEY "scenario" "run" "generator" calls/s p50 p99 p99.9 (µs)
    /// "check" "notes".
    #[allow(clippy::too_many_arguments, reason = "the columns of one row")]
    pub fn record(
        &mut self,
        key: &str,
        scenario: &str,
        run: &str,
        generator: &str,
        rps: f64,
        p50: f64,
        p99: f64,
        p999: f64,
        check: &str,
        notes: &str,
    ) {
        self.figures.insert(key.to_owned(), (rps, p99));
        let shown = self
            .foreign
            .map_or_else(|| "?".to_owned(), |f| f.to_string());
        let mut other = format!("{shown}%");
        if self.foreign.unwrap_or(0) >= self.max_other_cpu as i64 {
            other = format!("**{other}**");
        }
        self.rows.push(format!(
            "| {scenario} | {run} | {generator} | {} | {} | {} | {} | {check} | {other} | {notes} |",
            fmt_int(rps),
            us_ms(p50),
            us_ms(p99),
            us_ms(p999)
        ));
        log(format!(
            "{scenario} / {run}: {}/s p50 {} ms p99 {} ms p99.9 {} ms [{check}] (other processes: {shown}% of the CPU)",
            fmt_int(rps),
            us_ms(p50),
            us_ms(p99),
            us_ms(p999)
        ));
    }

    fn ratio_rows(&self) -> Vec<String> {
        let mut rows = Vec::new();
        let mut ratio = |what: String, a: &str, b: &str| {
            if let (Some(a), Some(b)) = (self.figures.get(a), self.figures.get(b)) {
                rows.push(format!(
                    "| {what} | {} | {} |",
                    fmt_ratio(a.0, b.0),
                    fmt_ratio(a.1, b.1)
                ));
            }
        };
        for m in &self.streams {
            ratio(
                format!("hot, -m {m}: VerifyToken / Health"),
                &format!("verify-m{m}"),
                &format!("health-m{m}"),
            );
        }
        ratio(
            "hot, -m 1, cache off: VerifyToken / Health".into(),
            "verify-m1-nocache",
            "health-m1",
        );
        ratio(
            "hot, loadgen: VerifyToken / Health".into(),
            "lg-verify",
            "lg-health",
        );
        ratio(
            "cold: VerifyToken (each token once) / pgbench -S".into(),
            "cold",
            "pgbench",
        );
        let (small, large) = (self.scale_small, self.scale_large);
        ratio(
            format!("scale hot: {large} stored / {small} stored"),
            "verify-large",
            "verify-m1",
        );
        ratio(
            format!("scale cold: {large} stored / {small} stored"),
            "cold-large",
            "cold-small",
        );
        ratio(
            "isolation: hot during sign-ins / hot idle".into(),
            "verify-signin",
            "verify-idle",
        );
        rows
    }

    /// Writes the report to `out` (through a temporary file).
    pub fn write(&self, status: &str) -> std::io::Result<()> {
        let repo = &self.repo;
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|l| l.trim_start().trim_start_matches(':').trim().to_owned())
            })
            .unwrap_or_default();
        let mem_gib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
            .unwrap_or(0.0)
            / 1_048_576.0;
        let dirty = !Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["diff", "--quiet", "HEAD", "--", "src"])
            .status()
            .is_ok_and(|s| s.success());
        let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut t = String::new();
        let mut line = |s: &str| {
            t.push_str(s);
            t.push('\n');
        };
        line("# identity benchmark: VerifyToken at the speed of a no-op RPC");
        line("");
        line(&format!(
            "- date: {}; commit {}{}",
            procs::utc_now(),
            commit(repo),
            if dirty {
                " + uncommitted changes in src/"
            } else {
                ""
            }
        ));
        line(&format!(
            "- machine: {nproc} cores ({cpu_model}), {mem_gib:.0} GiB; server, PostgreSQL {} (fsync=off) and generators share it",
            self.pg_version
        ));
        line(&format!(
            "- verification cache: {}",
            if self.cache_flag {
                format!("present, capacity {}", self.cache_capacity)
            } else {
                "absent (no --cache-entries flag)".into()
            }
        ));
        line(&format!(
            "- load average before the run: {}; total wall time: {}s; run: {status}",
            self.loadavg_at_start,
            procs::elapsed()
        ));
        if !self.rows.is_empty() {
            line(&format!(
                "- each run: {}s measured after {}s warm-up; {} connections; latencies in ms (nearest-rank percentiles of every call)",
                self.duration, self.warmup, self.connections
            ));
            line(&format!(
                "- \"Other processes' CPU\" is the share of the machine's CPU time used during each run by processes the harness did not start (a concurrent build, say); runs at {}% or more (in bold, after {} repeats) are not comparable",
                self.max_other_cpu, self.retries
            ));
            line(
                "- hot: the same token every call (a cache hit when there is a cache). cold: each token used once (a miss). Every VerifyToken also authenticates its caller (the verifier token, a hit when cached): with the cache off it is two indexed lookups, against pgbench's one",
            );
            line(
                "- h2load sees only HTTP statuses: its runs are checked by data bytes / size of a successful answer, and by probes before and after; the loadgen counts gRPC codes and verdicts itself. The loadgen (a tonic client) needs more CPU than h2load on the shared cores: compare loadgen runs with loadgen runs",
            );
        }
        line("");
        if !self.rows.is_empty() {
            line(
                "| Scenario | Run | Generator | Calls/s | p50 | p99 | p99.9 | Success check | Other processes' CPU | Notes |",
            );
            line("|---|---|---|---:|---:|---:|---:|---|---:|---|");
            for row in &self.rows {
                line(row);
            }
        }
        let ratios = self.ratio_rows();
        if !ratios.is_empty() {
            line("");
            line("| Ratio | Throughput | p99 latency |");
            line("|---|---:|---:|");
            for row in &ratios {
                line(row);
            }
        }
        if let Some(prop) = &self.propagation_line {
            line("");
            line(
                "Revocation propagation (3 replicas; delay from RevokeToken returning on A until B and C both answer active: false, polling back to back; ms):",
            );
            line("");
            line(
                "| Revocations | p50 | p99 | max | inactive at first poll | timeouts | still active on A | polls of B and C | status |",
            );
            line("|---:|---:|---:|---:|---:|---:|---:|---:|---|");
            line(prop);
        }
        if !self.memory_rows.is_empty() {
            line("");
            line("| Resident memory (VmRSS) | MiB | Notes |");
            line("|---|---:|---|");
            for row in &self.memory_rows {
                line(row);
            }
        }
        if let Some(pooler) = &self.pooler_section {
            line("");
            line("## Through PgBouncer (transaction mode) against direct connections");
            line("");
            line(pooler);
        }
        if let Some(replica) = &self.read_replica_section {
            line("");
            line("## Reads on a streaming standby against reads on the primary");
            line("");
            line(replica);
        }
        if let Some(signin) = &self.signin_section {
            line("");
            line("## Sign-in throughput");
            line("");
            line(signin);
        }
        if let Some(soak) = &self.soak_section {
            line("");
            line("## Soak");
            line("");
            line(soak);
        }
        let tmp = PathBuf::from(format!("{}.tmp", self.out.display()));
        fs::write(&tmp, t)?;
        fs::rename(&tmp, &self.out)
    }
}

/// The median of `values` (0 when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
