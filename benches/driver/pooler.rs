//! `--pooler` (issue 16, "Measure: the hot and cold paths through
//! PgBouncer, against direct connections, side by side"): a real PgBouncer
//! in transaction mode (Debian's, started by the tests' own code,
//! tests/integration/support/pgbouncer.rs) in front of the run's cluster,
//! and three fresh replicas that differ only in how they reach it:
//!
//! - `PD`: direct, the statement cache on (the default);
//! - `PS`: direct, the statement cache off (every statement unnamed, in a
//!   transaction of its own; the listen URL the same direct one, as `off`
//!   requires): what turning the cache off costs by itself;
//! - `PB`: through PgBouncer, the statement cache off, the change channel
//!   on a direct listen URL: the supported pooler set-up.
//!
//! Each runs twice: with the verification cache on (the hot path, h2load,
//! one token, which reaches the database never) and with it off
//! (`--cache-entries 0`, so that every `VerifyToken` is a miss that reads
//! the database: the cold path's database work, repeatable, cycling the
//! small table's tokens), at the run's clients and at one client (the
//! latency a pooler adds to one miss). The three alternate in rounds
//! (PD PS PB, PD PS PB), and the section gives each round and the medians
//! as ratios to `PD`.

use std::{path::Path, process::Command};

use crate::{
    generators::{Kv, f},
    pgbouncer::PgBouncer,
    procs::{Result, fail, log},
    report::{self, fmt_int, us_ms},
    scenarios::Bench,
};

/// Rounds of the three set-ups, alternated: figures are medians.
const ROUNDS: usize = 2;

/// The set-ups, by replica name prefix, as the section names them.
const SETUPS: [(&str, &str); 3] = [
    ("PD", "direct, statement cache on (default)"),
    ("PS", "direct, statement cache off"),
    ("PB", "PgBouncer (transaction mode), statement cache off"),
];

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Figures of one set-up, one value per round.
#[derive(Default)]
struct Figures {
    hot: Vec<f64>,
    miss: Vec<f64>,
    miss_p50_us: Vec<f64>,
    one_p50_us: Vec<f64>,
}

impl Bench {
    /// Runs the pooler comparison and adds its section to the report.
    /// `verify` is the hot token's request body (`vf` bytes answered),
    /// `tokens` the small table's tokens.
    pub fn pooler(
        &mut self,
        verify: &Path,
        vf: u64,
        auth: Option<&str>,
        tokens: &Path,
    ) -> Result<()> {
        let o = self.o.clone();
        let direct = self.r.database_url.clone();
        // As many server connections as one replica's pool may want: the
        // pooler is then never what a call queues for.
        let pool_size = std::env::var("IDENTITY_DB_MAX_CONNECTIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16u32);
        log(format!(
            "pooler: PgBouncer in transaction mode, default_pool_size {pool_size}, in front of the cluster"
        ));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let bouncer = runtime.block_on(PgBouncer::transaction_mode(&direct, pool_size));
        let pooled = bouncer.url_for(&direct);
        let version = Command::new("/usr/sbin/pgbouncer")
            .arg("--version")
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default();
        for (name, _) in SETUPS {
            for (suffix, cache) in [("", None), ("0", Some("0"))] {
                let mut flags: Vec<&str> = Vec::new();
                // The statement cache through the environment: the
                // `--database-statement-cache` flag takes no value (a bool
                // flag without `ArgAction::Set`), so `off` cannot be given
                // on the command line.
                let mut env: Vec<(&str, &str)> = Vec::new();
                if name != "PD" {
                    env.push(("IDENTITY_DATABASE_STATEMENT_CACHE", "off"));
                    flags.extend(["--database-listen-url", &direct]);
                }
                if name == "PB" {
                    flags.extend(["--database-url", &pooled]);
                }
                if let Some(entries) = cache {
                    flags.extend(["--cache-entries", entries]);
                }
                let replica = format!("{name}{suffix}");
                if !self.r.start_with_env(&replica, &flags, &env)? {
                    return fail(format!("replica {replica} did not start"));
                }
            }
        }
        let mut figures: Vec<Figures> = SETUPS.iter().map(|_| Figures::default()).collect();
        let tokens = tokens.display().to_string();
        for round in 1..=ROUNDS {
            for ((name, what), fig) in SETUPS.iter().zip(&mut figures) {
                let key = format!("pooler-hot-{name}-{round}");
                let url = self.r.url(name);
                self.h2load_run(
                    &key,
                    "pooler",
                    &format!("VerifyToken, 1 token (cached), {what}, round {round}"),
                    crate::scenarios::VERIFY,
                    verify,
                    vf,
                    "1",
                    Some(&url),
                    auth,
                )?;
                let hot = report::with(|r| r.figures.get(&key).map_or(0.0, |v| v.0));
                fig.hot.push(hot);
                let url = self.r.url(&format!("{name}0"));
                let kv: Kv = self.loadgen_run(
                    &format!("pooler-miss-{name}-{round}"),
                    "pooler",
                    &format!(
                        "VerifyToken, every call a miss (--cache-entries 0), {what}, round {round}"
                    ),
                    "",
                    &[
                        "--target".into(),
                        url.clone(),
                        "--tokens-file".into(),
                        tokens.clone(),
                    ],
                )?;
                fig.miss.push(f(&kv, "rps"));
                fig.miss_p50_us.push(f(&kv, "p50_us"));
                let kv = self.loadgen_run(
                    &format!("pooler-miss1-{name}-{round}"),
                    "pooler",
                    &format!("VerifyToken, every call a miss, 1 client, {what}, round {round}"),
                    "",
                    &[
                        "--target".into(),
                        url,
                        "--tokens-file".into(),
                        tokens.clone(),
                        "--concurrency".into(),
                        "1".into(),
                        "--connections".into(),
                        "1".into(),
                    ],
                )?;
                fig.one_p50_us.push(f(&kv, "p50_us"));
            }
        }
        if figures.iter().any(|fig| fig.miss.iter().any(|&v| v <= 0.0)) {
            return fail("pooler: a run served nothing");
        }
        let base = &figures[0];
        let (hot0, miss0, one0) = (
            median(&base.hot),
            median(&base.miss),
            median(&base.one_p50_us),
        );
        let join = |values: &[f64], show: &dyn Fn(f64) -> String| {
            values
                .iter()
                .map(|&v| show(v))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let mut section = format!(
            "- command: `bash benches/run.sh -s {} --pooler -d {} -w {} -c {}`; {version}, \
             `pool_mode = transaction`, `default_pool_size = {pool_size}`; {ROUNDS} rounds, \
             the set-ups alternated; hot = h2load `-c {c} -m 1` of one cached token, miss = \
             loadgen with `--cache-entries 0` cycling the small table's tokens at {c} clients \
             and at 1.\n\n\
             | Set-up | hot calls/s (rounds) | hot / direct | miss calls/s (rounds) | miss / direct | miss p50 ms, {c} clients | miss p50 ms, 1 client (rounds) | 1-client p50 − direct |\n\
             |---|---|---:|---|---:|---:|---|---:|\n",
            o.scenarios,
            o.duration,
            o.warmup,
            o.connections,
            c = o.connections,
        );
        for ((_, what), fig) in SETUPS.iter().zip(&figures) {
            let (hot, miss, one) = (median(&fig.hot), median(&fig.miss), median(&fig.one_p50_us));
            section.push_str(&format!(
                "| {what} | {} | {:.2} | {} | {:.2} | {} | {} | {:+.3} ms |\n",
                join(&fig.hot, &|v| fmt_int(v)),
                hot / hot0,
                join(&fig.miss, &|v| fmt_int(v)),
                miss / miss0,
                us_ms(median(&fig.miss_p50_us)),
                join(&fig.one_p50_us, &|v| us_ms(v)),
                (one - one0) / 1000.0,
            ));
        }
        log(format!(
            "pooler: miss through PgBouncer / direct = {:.2}, 1-client p50 +{:.3} ms",
            median(&figures[2].miss) / miss0,
            (median(&figures[2].one_p50_us) - one0) / 1000.0
        ));
        drop(bouncer);
        report::with(|r| r.pooler_section = Some(section));
        Ok(())
    }
}
