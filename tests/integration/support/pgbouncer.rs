//! A real PgBouncer (Debian's `pgbouncer` package) on loopback in front of
//! the test PostgreSQL server, in transaction mode: what the pooler tests
//! (`pooler.rs`) put the server behind. It runs as the `postgres` user when
//! the tests run as root (PgBouncer refuses root), and dies with the test.

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection as _;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A running PgBouncer in transaction mode.
pub struct PgBouncer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Starts one in transaction mode in front of the PostgreSQL server of
    /// `database_url` (user `postgres`, trusted, as the test cluster is),
    /// with at most `pool_size` server connections per database, and waits
    /// until a query passes through it.
    pub async fn transaction_mode(database_url: &str, pool_size: u32) -> Self {
        let (host, port) = host_and_port(database_url);
        let dir = tempfile::tempdir().expect("a temporary directory for pgbouncer");
        let listen_port = free_port();
        let d = dir.path().display();
        let ini = format!(
            "[databases]\n\
             * = host={host} port={port} user=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {listen_port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {d}/userlist.txt\n\
             pool_mode = transaction\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 500\n\
             ignore_startup_parameters = extra_float_digits\n\
             pidfile = {d}/pgbouncer.pid\n\
             logfile = {d}/pgbouncer.log\n"
        );
        fs::write(dir.path().join("pgbouncer.ini"), ini).expect("write pgbouncer.ini");
        fs::write(dir.path().join("userlist.txt"), "\"postgres\" \"\"\n")
            .expect("write userlist.txt");
        let as_root = is_root();
        if as_root {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(
                status.success(),
                "cannot give the pgbouncer directory to postgres"
            );
        }
        let program = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|path| Path::new(path).is_file())
            .expect("pgbouncer is not installed (apt-get install pgbouncer)");
        // `setpriv` execs PgBouncer itself (the child is PgBouncer), as
        // `postgres` when root, and has it killed when this test's thread
        // ends, should the test die before dropping it.
        let mut command = Command::new("setpriv");
        command.arg("--pdeathsig=KILL");
        if as_root {
            command.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]);
        }
        let child = command
            .arg(program)
            .arg(dir.path().join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let bouncer = Self {
            child,
            port: listen_port,
            dir,
        };
        bouncer.wait_until_ready(database_url).await;
        bouncer
    }

    /// `database_url` with its host and port replaced by this pooler's.
    pub fn url_for(&self, database_url: &str) -> String {
        let (host, port) = host_and_port(database_url);
        database_url.replacen(
            &format!("{host}:{port}"),
            &format!("127.0.0.1:{}", self.port),
            1,
        )
    }

    /// What PgBouncer logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }

    async fn wait_until_ready(&self, database_url: &str) {
        let url = self.url_for(database_url);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(mut conn) = sqlx::PgConnection::connect(&url).await
                && sqlx::raw_sql("SELECT 1").execute(&mut conn).await.is_ok()
            {
                let _ = conn.close().await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not pass a query within {STARTUP_TIMEOUT:?}; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host and port of a `postgres://user@host:port/db` URL.
fn host_and_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").expect("a URL").1;
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = host_port.rsplit_once(':').unwrap_or((host_port, "5432"));
    (host.to_owned(), port.parse().expect("a numeric port"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free TCP port for pgbouncer")
        .port()
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}
