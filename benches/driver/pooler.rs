//! Set-ups compared side by side on the same cluster: `--pooler` and
//! `--read-replica`.
//!
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
//!
//! `--read-replica` (issue 16, "the cold path with reads on a replica,
//! against reads on the primary"): a streaming standby of the run's cluster
//! (the tests' own `Cluster::standby`), and two replicas measured the same
//! way: `RP` reading the primary, `RS` with `IDENTITY_DATABASE_READ_URL` at
//! the standby.

use std::{path::Path, process::Command};

use crate::{
    generators::{Kv, f},
    pgbouncer::PgBouncer,
    procs::{self, Result, fail, log},
    report::{self, fmt_int, median, us_ms},
    scenarios::Bench,
};

/// Rounds of the three set-ups, alternated: figures are medians.
const ROUNDS: usize = 2;

/// One set-up: its replica name prefix, how the section names it, and its
/// flags and environment.
struct Setup {
    name: &'static str,
    what: &'static str,
    flags: Vec<String>,
    env: Vec<(&'static str, &'static str)>,
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
        let off = ("IDENTITY_DATABASE_STATEMENT_CACHE", "off");
        let listen = ["--database-listen-url".to_owned(), direct.clone()];
        let setups = [
            Setup {
                name: "PD",
                what: "direct, statement cache on (default)",
                flags: vec![],
                env: vec![],
            },
            Setup {
                name: "PS",
                what: "direct, statement cache off",
                flags: listen.to_vec(),
                env: vec![off],
            },
            Setup {
                name: "PB",
                what: "PgBouncer (transaction mode), statement cache off",
                flags: [&listen[..], &["--database-url".to_owned(), pooled]].concat(),
                env: vec![off],
            },
        ];
        let (figures, rows) = self.side_by_side("pooler", &setups, verify, vf, auth, tokens)?;
        let o = &self.o;
        let section = format!(
            "- command: `bash benches/run.sh -s {} --pooler -d {} -w {} -c {}`; {version}, \
             `pool_mode = transaction`, `default_pool_size = {pool_size}`; {ROUNDS} rounds, \
             the set-ups alternated; hot = h2load `-c {c} -m 1` of one cached token, miss = \
             loadgen with `--cache-entries 0` cycling the small table's tokens at {c} clients \
             and at 1.\n\n{rows}",
            o.scenarios,
            o.duration,
            o.warmup,
            o.connections,
            c = o.connections,
        );
        let (miss0, one0) = (median(&figures[0].miss), median(&figures[0].one_p50_us));
        log(format!(
            "pooler: miss through PgBouncer / direct = {:.2}, 1-client p50 +{:.3} ms",
            median(&figures[2].miss) / miss0,
            (median(&figures[2].one_p50_us) - one0) / 1000.0
        ));
        drop(bouncer);
        report::with(|r| r.pooler_section = Some(section));
        Ok(())
    }

    /// Runs the standby comparison (`--read-replica`) and adds its section
    /// to the report; arguments as [`Self::pooler`].
    pub fn read_replica(
        &mut self,
        verify: &Path,
        vf: u64,
        auth: Option<&str>,
        tokens: &Path,
    ) -> Result<()> {
        let Some(port) = procs::start_standby() else {
            return fail("read-replica: no cluster to take a standby of");
        };
        let primary = self.r.database_url.clone();
        let Some((_, database)) = primary.rsplit_once('/') else {
            return fail("read-replica: the database URL names no database");
        };
        let standby = format!("postgres://postgres@127.0.0.1:{port}/{database}");
        log(format!("read-replica: a streaming standby on port {port}"));
        let setups = [
            Setup {
                name: "RP",
                what: "reads on the primary (default)",
                flags: vec![],
                env: vec![],
            },
            Setup {
                name: "RS",
                what: "reads on the standby (IDENTITY_DATABASE_READ_URL)",
                flags: vec!["--database-read-url".to_owned(), standby],
                env: vec![],
            },
        ];
        let before = self.standby_statements(port);
        let (figures, rows) =
            self.side_by_side("read-replica", &setups, verify, vf, auth, tokens)?;
        let served = self.standby_statements(port).saturating_sub(before);
        let o = &self.o;
        let section = format!(
            "- command: `bash benches/run.sh -s {} --read-replica -d {} -w {} -c {}`; a \
             standby of the run's cluster (`pg_basebackup -R`, streaming), {ROUNDS} rounds, \
             the set-ups alternated; hot = h2load `-c {c} -m 1` of one cached token, miss = \
             loadgen with `--cache-entries 0` cycling the small table's tokens at {c} clients \
             and at 1. How each standby read ended is counted in \
             `identity_read_replica_reads_total{{outcome}}` (the replicas' /metrics); the \
             standby ran {served} transactions meanwhile (two per standby read: the position, \
             then the lookup).\n\n{rows}",
            o.scenarios,
            o.duration,
            o.warmup,
            o.connections,
            c = o.connections,
        );
        log(format!(
            "read-replica: miss on the standby / on the primary = {:.2}",
            median(&figures[1].miss) / median(&figures[0].miss)
        ));
        report::with(|r| r.read_replica_section = Some(section));
        Ok(())
    }

    /// The transactions the standby on `port` has run (0 if unknown).
    fn standby_statements(&self, port: u16) -> u64 {
        self.db
            .tool("psql")
            .env("PGPORT", port.to_string())
            .args([
                "-X",
                "-At",
                "-d",
                "identity",
                "-c",
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            ])
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .unwrap_or(0)
    }

    /// Starts two replicas per set-up (cache on, and `--cache-entries 0`)
    /// and measures them in alternating rounds: the figures, and the
    /// section's table (ratios to the first set-up).
    fn side_by_side(
        &mut self,
        label: &str,
        setups: &[Setup],
        verify: &Path,
        vf: u64,
        auth: Option<&str>,
        tokens: &Path,
    ) -> Result<(Vec<Figures>, String)> {
        for setup in setups {
            let name = setup.name;
            for (suffix, cache) in [("", None), ("0", Some("0"))] {
                let mut flags: Vec<&str> = setup.flags.iter().map(String::as_str).collect();
                let env = &setup.env;
                if let Some(entries) = cache {
                    flags.extend(["--cache-entries", entries]);
                }
                let replica = format!("{name}{suffix}");
                if !self.r.start_with_env(&replica, &flags, env)? {
                    return fail(format!("replica {replica} did not start"));
                }
            }
        }
        let mut figures: Vec<Figures> = setups.iter().map(|_| Figures::default()).collect();
        let tokens = tokens.display().to_string();
        for round in 1..=ROUNDS {
            for (setup, fig) in setups.iter().zip(&mut figures) {
                let (name, what) = (setup.name, setup.what);
                let key = format!("{label}-hot-{name}-{round}");
                let url = self.r.url(name);
                self.h2load_run(
                    &key,
                    label,
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
                    &format!("{label}-miss-{name}-{round}"),
                    label,
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
                    &format!("{label}-miss1-{name}-{round}"),
                    label,
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
            return fail(format!("{label}: a run served nothing"));
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
        let mut rows = "| Set-up | hot calls/s (rounds) | hot / first | miss calls/s (rounds) | miss / first | miss p50 ms, all clients | miss p50 ms, 1 client (rounds) | 1-client p50 − first |\n\
             |---|---|---:|---|---:|---:|---|---:|\n"
            .to_owned();
        for (setup, fig) in setups.iter().zip(&figures) {
            let what = setup.what;
            let (hot, miss, one) = (median(&fig.hot), median(&fig.miss), median(&fig.one_p50_us));
            rows.push_str(&format!(
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
        Ok((figures, rows))
    }
}
