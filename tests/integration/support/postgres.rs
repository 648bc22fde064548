//! A real PostgreSQL server for integration tests, with a fresh, empty
//! database per caller.
//!
//! If `DATABASE_URL` is set to a `postgres://` or `postgresql://` URL, that
//! server is used. Otherwise the first call starts one throwaway cluster for
//! the whole test process: it finds the newest `initdb` under
//! `/usr/lib/postgresql/*/bin` (or on `PATH`), initialises a data directory
//! in a temporary directory with `trust` authentication, and starts
//! `postgres` on a free loopback port with durability switched off (the data
//! is thrown away anyway). `initdb` refuses to run as root, so when the tests
//! run as root the cluster runs as the `postgres` user (via `runuser`, or
//! `su` when `runuser` is missing). A missing PostgreSQL installation is a
//! panic, not a skip: the PostgreSQL tests must fail loudly rather than pass
//! without having run.
//!
//! Cleanup uses a watchdog because Rust test binaries never run the
//! destructors of statics, so nothing in this process can be relied on to
//! stop the server at exit. Instead `postgres` is launched from a small
//! `sh` script, in its own process group and detached from the test's stdio,
//! that polls the test process's pid; once the test process is gone (however
//! it ended: success, panic, Ctrl-C), the script stops `postgres` with a fast
//! shutdown (`SIGINT`, escalating to an immediate shutdown after 15 s), waits
//! for it and deletes the temporary directory. When running as root the
//! script itself stays root, so it can signal the server and remove the
//! `postgres`-owned data directory.
//!
//! [`fresh_database_url`] creates a new database named `t_<random hex>` on
//! that server for every call, so tests never see each other's data.
//!
//! A test that must stop PostgreSQL starts a [`Cluster`] of its own instead
//! (always a local one, even when `DATABASE_URL` is set): same `initdb`, same
//! watchdog, but its own port and data directory, started and stopped with
//! `pg_ctl`.

use std::ffi::OsString;
use std::fs;
use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use rand::Rng;
use rand::rngs::OsRng;
use sqlx::{Connection, PgConnection};

/// How long the throwaway cluster may take to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Lines of the server log quoted when the server fails to start.
const LOG_TAIL_LINES: usize = 40;

/// Runs in the background for the lifetime of the throwaway cluster.
///
/// Positional parameters: `$1` temp directory (deleted at the end), `$2` pid
/// of the test process, `$3` data directory, then the command that runs
/// `postgres` (none for a [`Cluster`], whose server `pg_ctl` starts). The file `$1/exited` is created as soon as that command ends,
/// so that a server that dies during startup is reported at once instead of
/// after the startup timeout. The postmaster's pid is read from
/// `postmaster.pid` because, when running as root, the background job is
/// `runuser`/`su` rather than `postgres` itself.
const WATCHDOG_SCRIPT: &str = r#"
root="$1"; testpid="$2"; data="$3"; shift 3
child=
if [ "$#" -gt 0 ]; then
    ( "$@"; : > "$root/exited" ) &
    child=$!
fi
while kill -0 "$testpid" 2>/dev/null; do sleep 0.2; done
pm=$(head -n 1 "$data/postmaster.pid" 2>/dev/null)
if [ -n "$pm" ]; then
    kill -INT "$pm" 2>/dev/null
    i=0
    while kill -0 "$pm" 2>/dev/null && [ "$i" -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 "$pm" 2>/dev/null; then kill -QUIT "$pm" 2>/dev/null; fi
fi
if [ -n "$child" ]; then wait "$child"; fi
rm -rf "$root"
"#;

static SERVER_URL: OnceLock<String> = OnceLock::new();

/// Returns a connection URL for a brand-new, empty database, unique to the caller.
pub async fn fresh_database_url() -> String {
    create_database(server_url()).await
}

/// Creates a database named `t_<random hex>` on the server of the
/// maintenance URL `server` and returns its URL.
async fn create_database(server: &str) -> String {
    let name = format!("t_{:032x}", OsRng.r#gen::<u128>());

    let mut conn = PgConnection::connect(server)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL server {server}: {e}"));
    sqlx::raw_sql(&format!(r#"CREATE DATABASE "{name}""#))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {name} on {server}: {e}"));
    conn.close()
        .await
        .expect("closing the maintenance connection to the test PostgreSQL server failed");

    with_database(server, &name)
}

/// Returns the URL of the server's maintenance db (postgres) — the base cluster URL.
///
/// With an external `DATABASE_URL`, that URL with its database replaced by
/// `postgres`; otherwise the URL of this process's throwaway cluster, which
/// is started by the first call.
pub fn server_url() -> &'static str {
    SERVER_URL.get_or_init(|| match external_server_url() {
        Some(url) => with_database(&url, "postgres"),
        None => start_throwaway_cluster(),
    })
}

/// `DATABASE_URL`, if it is set and points at a PostgreSQL server.
fn external_server_url() -> Option<String> {
    let url = std::env::var("DATABASE_URL").ok()?;
    (url.starts_with("postgres://") || url.starts_with("postgresql://")).then_some(url)
}

/// Replaces the database (path) component of a PostgreSQL URL, keeping the
/// scheme, credentials, host, port and query parameters.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.find(['?', '#']) {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let authority_start = base
        .find("://")
        .map(|i| i + 3)
        .expect("a PostgreSQL URL has a scheme");
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    format!("{}/{database}{query}", &base[..authority_end])
}

/// A cluster's files: an initialised data directory, its socket directory
/// and log, all in one temporary directory that the watchdog removes.
struct Layout {
    bin_dir: PathBuf,
    as_root: bool,
    root: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
}

/// Creates a temporary directory (owned by the `postgres` user when running
/// as root) and runs `initdb` in it.
fn init_cluster() -> Layout {
    let bin_dir = postgres_bin_dir();
    let as_root = running_as_root();

    let root = tempfile::Builder::new()
        .prefix("identity-pg-")
        .tempdir()
        .expect("cannot create a temporary directory for the test PostgreSQL cluster")
        // The watchdog deletes it once the test process has exited.
        .keep();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
        .expect("cannot make the test PostgreSQL directory world-traversable");
    let data_dir = root.join("data");
    let socket_dir = root.join("socket");
    fs::create_dir(&socket_dir).expect("cannot create the test PostgreSQL socket directory");
    let log_path = root.join("postgres.log");
    if as_root {
        let status = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(&root)
            .status()
            .expect("cannot run chown");
        assert!(
            status.success(),
            "chown of {} to the postgres user failed ({status}); running the tests as root \
             needs a `postgres` system user",
            root.display()
        );
    }

    let initdb = run_as_cluster_owner(
        as_root,
        &bin_dir.join("initdb"),
        &[
            "-D".into(),
            data_dir.clone().into(),
            "-A".into(),
            "trust".into(),
            "-U".into(),
            "postgres".into(),
            "--no-sync".into(),
            "-E".into(),
            "UTF8".into(),
            "--locale=C".into(),
        ],
    );
    let output = Command::new(&initdb[0])
        .args(&initdb[1..])
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run initdb");
    assert!(
        output.status.success(),
        "initdb failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Layout {
        bin_dir,
        as_root,
        root,
        data_dir,
        socket_dir,
        log_path,
    }
}

/// Starts the watchdog that stops the cluster and removes `layout.root` once
/// this process has exited, running `postgres` (the server's argv) if given.
fn spawn_watchdog(layout: &Layout, postgres: &[OsString]) {
    let log =
        fs::File::create(&layout.log_path).expect("cannot create the test PostgreSQL log file");
    if layout.as_root {
        // `pg_ctl` appends to the log as the `postgres` user.
        let _ = Command::new("chown")
            .arg("postgres:")
            .arg(&layout.log_path)
            .status();
    }
    #[allow(
        clippy::zombie_processes,
        reason = "the watchdog must outlive this process; it is never waited for"
    )]
    let _watchdog = Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG_SCRIPT)
        .arg("identity-pg-watchdog")
        .arg(&layout.root)
        .arg(std::process::id().to_string())
        .arg(&layout.data_dir)
        .args(postgres)
        .current_dir(&layout.root)
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .expect("cannot duplicate the log file handle"),
        )
        .stderr(log)
        // Own process group: a Ctrl-C aimed at the test run must not kill the
        // watchdog before it has cleaned up.
        .process_group(0)
        .spawn()
        .expect("cannot start the test PostgreSQL watchdog (sh)");
}

/// Starts this process's throwaway cluster and returns its maintenance URL.
fn start_throwaway_cluster() -> String {
    let layout = init_cluster();
    let Layout {
        bin_dir,
        as_root,
        root,
        data_dir,
        socket_dir,
        log_path,
    } = &layout;
    let as_root = *as_root;
    let port = free_port();
    let postgres = run_as_cluster_owner(
        as_root,
        &bin_dir.join("postgres"),
        &[
            "-D".into(),
            data_dir.clone().into(),
            "-p".into(),
            port.to_string().into(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-k".into(),
            socket_dir.into(),
            "-c".into(),
            "fsync=off".into(),
            "-c".into(),
            "synchronous_commit=off".into(),
            "-c".into(),
            "full_page_writes=off".into(),
            "-c".into(),
            "max_connections=300".into(),
            "-c".into(),
            "shared_buffers=128MB".into(),
        ],
    );
    spawn_watchdog(&layout, &postgres);
    wait_until_ready(bin_dir, port, root, log_path);
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

/// The `bin` directory of the newest PostgreSQL installation.
fn postgres_bin_dir() -> PathBuf {
    let newest = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version: Vec<u32> = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max();
    if let Some((_, bin)) = newest {
        return bin;
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
        })
        .expect(
            "PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb and no \
             initdb/postgres on PATH. Install the PostgreSQL server (e.g. `apt-get install \
             postgresql`) or set DATABASE_URL=postgres://... to an existing server.",
        )
}

/// Whether this process's effective uid is 0.
fn running_as_root() -> bool {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        // "Uid:\t<real>\t<effective>\t<saved>\t<fs>"
        if let Some(euid) = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
        {
            return euid == "0";
        }
    }
    let output = Command::new("id")
        .arg("-u")
        .output()
        .expect("cannot determine the current uid (no /proc/self/status, cannot run `id -u`)");
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// The argv that runs `program args...` as the owner of the cluster: this
/// user, or the `postgres` user when running as root.
fn run_as_cluster_owner(as_root: bool, program: &Path, args: &[OsString]) -> Vec<OsString> {
    let direct: Vec<OsString> = std::iter::once(program.as_os_str().to_owned())
        .chain(args.iter().cloned())
        .collect();
    if !as_root {
        return direct;
    }
    if let Some(runuser) = ["/usr/sbin/runuser", "/sbin/runuser"]
        .into_iter()
        .find(|path| Path::new(path).is_file())
    {
        return [runuser, "-u", "postgres", "--"]
            .map(OsString::from)
            .into_iter()
            .chain(direct)
            .collect();
    }
    let command = direct
        .iter()
        .map(|arg| shell_quote(arg.to_str().expect("PostgreSQL arguments are UTF-8")))
        .collect::<Vec<_>>()
        .join(" ");
    ["su", "postgres", "-s", "/bin/sh", "-c"]
        .map(OsString::from)
        .into_iter()
        .chain([format!("exec {command}").into()])
        .collect()
}

/// Quotes `arg` as a single `sh` word.
fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("cannot find a free TCP port for the test PostgreSQL server")
        .port()
}

/// Polls the server with `pg_isready` until it accepts connections; panics
/// with the tail of the server log if it exits or does not come up in time.
fn wait_until_ready(bin_dir: &Path, port: u16, root: &Path, log_path: &Path) {
    let pg_isready = Some(bin_dir.join("pg_isready"))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("pg_isready"));
    let port = port.to_string();
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let probe = Command::new(&pg_isready)
            .args(["-q", "-t", "1", "-h", "127.0.0.1", "-p", &port])
            .args(["-U", "postgres", "-d", "postgres"])
            .stdin(Stdio::null())
            .status();
        match probe {
            Ok(status) if status.success() => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                panic!(
                    "{} not found: the PostgreSQL client tools are not installed",
                    pg_isready.display()
                )
            }
            Err(e) => panic!("cannot run {}: {e}", pg_isready.display()),
        }
        if root.join("exited").exists() {
            panic!(
                "the test PostgreSQL server exited during startup; log {}:\n{}",
                log_path.display(),
                log_tail(log_path)
            );
        }
        if Instant::now() >= deadline {
            panic!(
                "the test PostgreSQL server did not accept connections on port {port} within \
                 {STARTUP_TIMEOUT:?}; log {}:\n{}",
                log_path.display(),
                log_tail(log_path)
            );
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// The last lines of the server log, for failure messages.
fn log_tail(log_path: &Path) -> String {
    match fs::read_to_string(log_path) {
        Ok(log) => {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read the log: {e})"),
    }
}

/// How a [`Cluster`] is stopped (`pg_ctl stop -m <mode>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnects every client and shuts down cleanly.
    Fast,
    /// Kills every server process at once, as a crash would; the next start
    /// runs crash recovery.
    Immediate,
}

/// A throwaway PostgreSQL cluster of the caller's own, on its own port and
/// data directory, that can be stopped and started again on the same port:
/// for fault tests, which must never stop the cluster every other test
/// shares (that of [`server_url`]).
///
/// It is started with `pg_ctl` as the cluster owner, with `fsync` off (the
/// machine does not crash during a test) but `synchronous_commit` on, so that
/// a commit the service acknowledged survives an immediate stop exactly as
/// it would in production. The same watchdog as the shared cluster's stops
/// it and removes its files if this process dies; dropping it does both at
/// once.
pub struct Cluster {
    layout: Layout,
    port: u16,
}

impl Cluster {
    /// Initialises a new cluster and starts it on a free port.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Like [`Cluster::start`], with `extra` (`postgresql.conf` lines)
    /// appended after the defaults, so that its settings win: the benchmark
    /// driver (benches/driver) runs its cluster with this code too.
    pub fn start_with(extra: &str) -> Self {
        let layout = init_cluster();
        let port = free_port();
        let settings = format!(
            "\n# identity fault tests\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nfsync = off\nfull_page_writes = off\n\
             synchronous_commit = on\nmax_connections = 100\nshared_buffers = 32MB\n",
            layout.socket_dir.display()
        );
        let conf = layout.data_dir.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).expect("cannot read postgresql.conf");
        text.push_str(&settings);
        text.push_str(extra);
        fs::write(&conf, text).expect("cannot write postgresql.conf");
        spawn_watchdog(&layout, &[]);
        let cluster = Self { layout, port };
        cluster.resume();
        cluster
    }

    /// The URL of its maintenance database (`postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PostgreSQL installation's `bin` directory (psql, pgbench...).
    pub fn bin_dir(&self) -> &Path {
        &self.layout.bin_dir
    }

    /// Its data directory (`postmaster.pid` names the server's pid).
    pub fn data_dir(&self) -> &Path {
        &self.layout.data_dir
    }

    /// Its server log.
    pub fn log_path(&self) -> &Path {
        &self.layout.log_path
    }

    /// A URL for a brand-new, empty database on it.
    pub async fn fresh_database_url(&self) -> String {
        create_database(&self.url()).await
    }

    /// Stops the server with `pg_ctl stop -m <mode>` and waits until it has
    /// exited.
    pub fn stop(&self, mode: StopMode) {
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        self.pg_ctl(&["stop", "-m", mode, "-w", "-t", "30"]);
    }

    /// Starts the stopped server again, on the same port, and waits until it
    /// accepts connections.
    pub fn resume(&self) {
        let log = self.layout.log_path.clone();
        self.pg_ctl(&[
            "start",
            "-w",
            "-t",
            "30",
            "-l",
            log.to_str().expect("UTF-8 path"),
        ]);
        wait_until_ready(
            &self.layout.bin_dir,
            self.port,
            &self.layout.root,
            &self.layout.log_path,
        );
    }

    /// Runs `pg_ctl -D <data> args...` as the cluster owner; panics with the
    /// server log if it fails.
    fn pg_ctl(&self, args: &[&str]) {
        let mut argv: Vec<OsString> = vec!["-D".into(), self.layout.data_dir.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        let command = run_as_cluster_owner(
            self.layout.as_root,
            &self.layout.bin_dir.join("pg_ctl"),
            &argv,
        );
        // The server inherits nothing of ours: its output goes to the log,
        // and its own process group keeps a Ctrl-C of the test run from it
        // (the watchdog stops it).
        let status = Command::new(&command[0])
            .args(&command[1..])
            .current_dir(&self.layout.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .status()
            .expect("cannot run pg_ctl");
        assert!(
            status.success(),
            "pg_ctl {args:?} failed ({status}); log {}:\n{}",
            self.layout.log_path.display(),
            log_tail(&self.layout.log_path)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut argv: Vec<OsString> = vec!["-D".into(), self.layout.data_dir.clone().into()];
        argv.extend(["stop", "-m", "immediate", "-w"].map(OsString::from));
        let command = run_as_cluster_owner(
            self.layout.as_root,
            &self.layout.bin_dir.join("pg_ctl"),
            &argv,
        );
        let _ = Command::new(&command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.layout.root);
    }
}

/// A streaming hot standby of a [`Cluster`]: `pg_basebackup -R` of it into
/// a data directory of its own, started on another port, for the read
/// replica tests (`read_replica.rs`). Stopped and removed when dropped,
/// and by the same watchdog as the cluster's if this process dies.
pub struct Standby {
    layout: Layout,
    port: u16,
}

impl Cluster {
    /// Takes a base backup of this cluster and starts it as a streaming
    /// standby; returns once it accepts connections and is in recovery.
    pub fn standby(&self) -> Standby {
        let bin_dir = postgres_bin_dir();
        let as_root = running_as_root();
        let root = tempfile::Builder::new()
            .prefix("identity-pg-standby-")
            .tempdir()
            .expect("cannot create a temporary directory for the standby")
            .keep();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
            .expect("cannot make the standby directory world-traversable");
        let data_dir = root.join("data");
        let socket_dir = root.join("socket");
        fs::create_dir(&socket_dir).expect("cannot create the standby socket directory");
        if as_root {
            let _ = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&root)
                .status();
        }
        let backup = run_as_cluster_owner(
            as_root,
            &bin_dir.join("pg_basebackup"),
            &[
                "-D".into(),
                data_dir.clone().into(),
                "-R".into(),
                "-X".into(),
                "stream".into(),
                "-c".into(),
                "fast".into(),
                "-h".into(),
                "127.0.0.1".into(),
                "-p".into(),
                self.port.to_string().into(),
                "-U".into(),
                "postgres".into(),
            ],
        );
        let output = Command::new(&backup[0])
            .args(&backup[1..])
            .current_dir(&root)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run pg_basebackup");
        assert!(
            output.status.success(),
            "pg_basebackup failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let port = free_port();
        let conf = data_dir.join("postgresql.conf");
        let mut text =
            fs::read_to_string(&conf).expect("cannot read the standby's postgresql.conf");
        text.push_str(&format!(
            "\n# identity standby\nport = {port}\nunix_socket_directories = '{}'\n",
            socket_dir.display()
        ));
        fs::write(&conf, text).expect("cannot write the standby's postgresql.conf");
        let layout = Layout {
            bin_dir,
            as_root,
            log_path: root.join("postgres.log"),
            root,
            data_dir,
            socket_dir,
        };
        spawn_watchdog(&layout, &[]);
        let standby = Standby { layout, port };
        standby.start();
        standby
    }
}

impl Standby {
    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `url` (a database of the primary) as read on this standby.
    pub fn url_of(&self, url: &str) -> String {
        let (_, rest) = url
            .rsplit_once(':')
            .expect("a postgres://user@127.0.0.1:port/db URL");
        let (_, database) = rest.split_once('/').expect("a database in the URL");
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops it (fast) and waits until it has exited.
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "30"]);
    }

    /// Starts it and waits until it accepts connections in recovery.
    fn start(&self) {
        let log = self
            .layout
            .log_path
            .to_str()
            .expect("UTF-8 path")
            .to_owned();
        self.pg_ctl(&["start", "-w", "-t", "30", "-l", &log]);
        wait_until_ready(
            &self.layout.bin_dir,
            self.port,
            &self.layout.root,
            &self.layout.log_path,
        );
        let psql = self.layout.bin_dir.join("psql");
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let output = Command::new(&psql)
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", "postgres", "-d", "postgres", "-At", "-c"])
                .arg("SELECT pg_is_in_recovery()")
                .stdin(Stdio::null())
                .output()
                .expect("cannot run psql");
            if String::from_utf8_lossy(&output.stdout).trim() == "t" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the standby never reported itself in recovery; log {}:\n{}",
                self.layout.log_path.display(),
                log_tail(&self.layout.log_path)
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn pg_ctl(&self, args: &[&str]) {
        let mut argv: Vec<OsString> = vec!["-D".into(), self.layout.data_dir.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        let command = run_as_cluster_owner(
            self.layout.as_root,
            &self.layout.bin_dir.join("pg_ctl"),
            &argv,
        );
        let status = Command::new(&command[0])
            .args(&command[1..])
            .current_dir(&self.layout.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .status()
            .expect("cannot run pg_ctl");
        assert!(
            status.success(),
            "pg_ctl {args:?} on the standby failed ({status}); log {}:\n{}",
            self.layout.log_path.display(),
            log_tail(&self.layout.log_path)
        );
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let mut argv: Vec<OsString> = vec!["-D".into(), self.layout.data_dir.clone().into()];
        argv.extend(["stop", "-m", "immediate", "-w"].map(OsString::from));
        let command = run_as_cluster_owner(
            self.layout.as_root,
            &self.layout.bin_dir.join("pg_ctl"),
            &argv,
        );
        let _ = Command::new(&command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.layout.root);
    }
}
