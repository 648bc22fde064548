//! The `signin` scenario (issue 14, "sign-in throughput"): sign-ins per
//! second through the real server against raw argon2id password checks
//! per second on as many threads, with the service's own parameters
//! (`loadgen hash-rate`, through `PasswordHasher::argon2id`), measured in
//! alternating rounds; and the replica's resident memory after the flood.
//!
//! The replica (H) runs with `--hash-concurrency` set to the threads the
//! baseline uses and the per-minute sign-in limits lifted (they would
//! refuse a flood from one address for one account before any hashing);
//! the throttle's claims still run, so every sign-in pays what a real one
//! does: the claim, the username lookup, the hash, the success that clears
//! the claim, the session and its audit row.

use std::{fs, time::Duration};

use crate::{
    generators::{self, err_path, f, s},
    procs::{Result, fail, log},
    replicas::tail,
    report::{self, fmt_int, median, us_ms},
    sampling::{fmt_mib, rss_kb},
    scenarios::Bench,
};

/// Rounds of (raw checks, sign-ins), alternated: the ratio is of medians.
const ROUNDS: usize = 3;

/// The resident memory the issue allows a replica after a sign-in flood.
const MEMORY_TARGET_MIB: f64 = 128.0;

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Bench {
    /// Runs the scenario and adds its section to the report.
    pub fn signin(&mut self) -> Result<()> {
        let o = self.o.clone();
        // The server's default: every core but one hashes.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .saturating_sub(1)
            .max(1);
        // Enough callers to keep every hashing thread busy while others'
        // database round trips are in flight (at most 32 per thread wait).
        let clients = o.connections.max(4 * threads as u64);
        let threads_s = threads.to_string();
        self.r.require(
            "H",
            &[
                "--hash-concurrency",
                &threads_s,
                "--sign-in-account-per-minute",
                "1000000",
                "--sign-in-address-per-minute",
                "1000000",
            ],
        )?;
        let url = self.r.url("H");
        let pid = self.r.pid("H");
        let rss_idle = rss_kb(pid);
        log(format!(
            "signin: raw argon2id checks on {threads} threads vs SignIn with {clients} clients on H (--hash-concurrency {threads}), {ROUNDS} rounds"
        ));
        let load_before = loadavg();
        let (duration, warmup) = (format!("{}s", o.duration), format!("{}s", o.warmup));
        let (mut raw, mut signed, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        let mut peak_rss = rss_idle;
        for round in 1..=ROUNDS {
            let mut command = self.loadgen("hash-rate");
            command.args([
                "--threads",
                &threads_s,
                "--duration",
                &duration,
                "--warmup",
                &warmup,
            ]);
            let hashes = f(&self.result_of(&mut command, "loadgen hash-rate")?, "rps");

            let out = self.work.join(format!("loadgen-signin-flood-{round}.txt"));
            let mut command = self.loadgen("load");
            command
                .args(["--target", &url, "--rpc", "sign-in"])
                .args(["--concurrency", &clients.to_string()])
                .args(["--duration", &duration, "--warmup", &warmup]);
            let timeout = Duration::from_secs(o.duration + o.warmup + 120);
            if !self.loadgen_to(&mut command, &out, Some(timeout))? {
                eprintln!("{}", tail(&err_path(&out), 20));
                return fail("the sign-in flood failed");
            }
            eprint!("{}", fs::read_to_string(err_path(&out)).unwrap_or_default());
            let kv = generators::result_line(&fs::read_to_string(&out)?);
            let rps = f(&kv, "rps");
            peak_rss = peak_rss.max(rss_kb(pid));
            rows.push(format!(
                "| {round} | {} | {} | {:.2} | {} | {} | {} |",
                fmt_int(hashes),
                fmt_int(rps),
                if hashes > 0.0 { rps / hashes } else { 0.0 },
                us_ms(f(&kv, "p50_us")),
                us_ms(f(&kv, "p99_us")),
                s(&kv, "codes"),
            ));
            raw.push(hashes);
            signed.push(rps);
        }
        let rss_after = rss_kb(pid);
        let (raw_m, signed_m) = (median(&raw), median(&signed));
        let ratio = if raw_m > 0.0 { signed_m / raw_m } else { 0.0 };
        let after_mib = rss_after as f64 / 1024.0;
        let mut section = format!(
            "- command: `bash benches/run.sh -s {} -d {} -w {} -c {}`; {threads} hashing threads \
             (H: `--hash-concurrency {threads}`, the per-minute sign-in limits lifted), {clients} \
             concurrent SignIn callers; load average {load_before} before, {} after\n\n\
             | Round | raw argon2id checks/s ({threads} threads) | SignIn/s | ratio | SignIn p50 ms | p99 ms | codes |\n\
             |---:|---:|---:|---:|---:|---:|---|\n",
            o.scenarios,
            o.duration,
            o.warmup,
            o.connections,
            loadavg(),
        );
        for row in &rows {
            section.push_str(row);
            section.push('\n');
        }
        section.push_str(&format!(
            "| median | {} | {} | **{ratio:.2}** (target ≥ 0.9) | | | |\n\n\
             Resident memory of H: {} MiB idle, {} MiB at most between rounds, {} MiB after the \
             flood ({}; target ≤ {MEMORY_TARGET_MIB:.0} MiB).",
            fmt_int(raw_m),
            fmt_int(signed_m),
            fmt_mib(rss_idle as i64),
            fmt_mib(peak_rss as i64),
            fmt_mib(rss_after as i64),
            if after_mib <= MEMORY_TARGET_MIB {
                "within"
            } else {
                "**over**"
            },
        ));
        log(format!(
            "signin: median {} sign-ins/s vs {} raw checks/s = {ratio:.2}; H {} MiB after",
            fmt_int(signed_m),
            fmt_int(raw_m),
            fmt_mib(rss_after as i64)
        ));
        report::with(|r| r.signin_section = Some(section));
        Ok(())
    }
}
