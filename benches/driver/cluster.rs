//! The throwaway PostgreSQL cluster, started by the tests' own code
//! (tests/integration/support/postgres.rs) with the benchmark's settings,
//! and the PostgreSQL client tools run against it.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use crate::{
    postgres::Cluster,
    procs::{self, Result, fail, log},
};

/// `postgresql.conf` lines on top of the tests' (fsync, full_page_writes
/// off, 127.0.0.1 only): no waiting for the WAL, room for every replica's
/// pool and pgbench's clients, and a bigger cache.
pub const SETTINGS: &str = "\n# identity benchmarks\nsynchronous_commit = off\n\
     max_connections = 300\nshared_buffers = 256MB\nmaintenance_work_mem = 256MB\n";

/// fleet_page's settings (its script never raised max_connections).
pub const FLEET_SETTINGS: &str = "\n# identity benchmarks\nsynchronous_commit = off\n\
     shared_buffers = 256MB\nmaintenance_work_mem = 256MB\n";

/// The running cluster (owned by the cleanup) as the driver sees it.
pub struct Db {
    bin: PathBuf,
    port: u16,
    data_dir: PathBuf,
}

impl Db {
    /// Starts the cluster with `settings` and creates the database `identity`.
    /// `BENCH_PG_SETTINGS`, when set, adds its lines (e.g.
    /// `shared_preload_libraries = 'pg_stat_statements'`, to see which
    /// statement a run spends its time in).
    pub fn start(settings: &str) -> Result<Self> {
        let extra = std::env::var("BENCH_PG_SETTINGS").unwrap_or_default();
        let cluster = Cluster::start_with(&format!("{settings}\n{extra}\n"));
        let db = Self {
            bin: cluster.bin_dir().to_owned(),
            port: cluster.port(),
            data_dir: cluster.data_dir().to_owned(),
        };
        procs::own_cluster(cluster);
        for tool in ["psql", "pgbench", "createdb", "postgres"] {
            if !db.bin.join(tool).is_file() {
                return fail(format!("{} is missing", db.bin.join(tool).display()));
            }
        }
        if !procs::run(db.tool("createdb").arg("identity"), None)? {
            return fail("createdb identity failed");
        }
        Ok(db)
    }

    /// The URL of the `identity` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/identity", self.port)
    }

    /// The postmaster's pid (0 if unknown).
    pub fn postmaster_pid(&self) -> u32 {
        fs::read_to_string(self.data_dir.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `postgres --version`'s version number.
    pub fn version(&self) -> String {
        Command::new(self.bin.join("postgres"))
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .nth(2)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "?".into())
    }

    /// A PostgreSQL client tool, pointed at the cluster.
    pub fn tool(&self, name: &str) -> Command {
        let mut command = Command::new(self.bin.join(name));
        command
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            .stdin(Stdio::null());
        command
    }

    /// `psql -X -q -v ON_ERROR_STOP=1 -d identity ARGS...`.
    pub fn psql(&self, args: &[&str]) -> Result<()> {
        let mut command = self.tool("psql");
        command.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "identity"]);
        command.args(args);
        if !procs::run(&mut command, None)? {
            return fail(format!("psql {args:?} failed"));
        }
        Ok(())
    }

    /// The value of one query.
    pub fn value(&self, sql: &str) -> Result<String> {
        let out = self
            .tool("psql")
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                "identity",
                "-c",
                sql,
            ])
            .output()?;
        if !out.status.success() {
            return fail(format!(
                "psql -c {sql:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Rows of the tokens table.
    pub fn token_rows(&self) -> Result<u64> {
        Ok(self.value("SELECT count(*) FROM tokens")?.parse()?)
    }

    /// Logs where it runs.
    pub fn announce(&self) {
        log(format!(
            "PostgreSQL ({}) on 127.0.0.1:{} (the tests' cluster code)",
            self.bin.display(),
            self.port
        ));
    }
}
