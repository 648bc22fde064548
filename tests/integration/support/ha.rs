//! A highly available PostgreSQL on loopback, built from Debian's packages
//! the way production builds one (README, "High availability"): one `etcd`
//! (the consensus store), two Patroni nodes each managing a PostgreSQL 15
//! server (`/usr/lib/postgresql/15/bin`), in synchronous mode (a commit is
//! acknowledged only once the synchronous standby has it), and HAProxy in
//! front, sending each new connection to whichever node Patroni's REST API
//! says is the primary (`GET /primary`) and cutting the sessions of a node
//! that stops being it. The failover test (`failover.rs`) points the
//! service at HAProxy and kills the primary's postmaster.
//!
//! Patroni is told to fail over rather than restart a crashed primary
//! (`primary_start_timeout: 0`) and to run its loop every second, so that a
//! failover takes seconds, not the minutes of the defaults. PostgreSQL and
//! etcd run as the `postgres` user when the tests run as root (PostgreSQL
//! refuses root).
//!
//! Every process dies with the test: [`HaCluster`]'s `Drop` kills them (and
//! PostgreSQL servers that Patroni restarted) and removes the directory; the
//! daemons started here get `SIGKILL` when the thread that started them
//! ends (`setpriv --pdeathsig`); and a watchdog (`sh`, in a process group of
//! its own) does the same once the test process is gone, however it ended.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng as _;
use rand::rngs::OsRng;
use sqlx::Connection as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long the topology may take to elect a primary with a synchronous
/// standby (two `initdb`/`pg_basebackup` runs on a loaded machine).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(90);
/// Pause between two readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The PostgreSQL binaries Patroni runs.
const POSTGRES_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Kills what the topology left running once the test process (`$2`) is
/// gone: the pids listed in `$1/pids` (etcd, Patroni, HAProxy), then every
/// node's postmaster (Patroni may have restarted one under a new pid), and
/// removes `$1`.
const WATCHDOG_SCRIPT: &str = r#"
root="$1"; testpid="$2"
while kill -0 "$testpid" 2>/dev/null; do sleep 0.5; done
[ -f "$root/pids" ] && for pid in $(cat "$root/pids"); do kill -KILL "$pid" 2>/dev/null; done
for pidfile in "$root"/node*/data/postmaster.pid; do
    [ -f "$pidfile" ] && kill -KILL "$(head -n 1 "$pidfile")" 2>/dev/null
done
rm -rf "$root"
"#;

/// One Patroni node and the PostgreSQL server it manages.
struct Node {
    name: String,
    pg_port: u16,
    rest_port: u16,
    dir: PathBuf,
    patroni: Child,
}

/// A running etcd, two Patroni nodes and HAProxy in front of them.
pub struct HaCluster {
    root: PathBuf,
    etcd: Child,
    nodes: Vec<Node>,
    haproxy: Child,
    haproxy_port: u16,
}

impl HaCluster {
    /// Starts the topology and waits until a primary serves through HAProxy
    /// with the other node as its synchronous standby.
    pub async fn start() -> Self {
        let as_root = is_root();
        let root = tempfile::Builder::new()
            .prefix("identity-ha-")
            .tempdir()
            .expect("a temporary directory for the HA cluster")
            // Removed by `Drop`, or by the watchdog.
            .keep();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
            .expect("make the HA directory traversable");
        spawn_watchdog(&root);

        let scope = format!("identity-{:016x}", OsRng.r#gen::<u64>());
        let etcd_client = free_port();
        let etcd_peer = free_port();
        let nodes: Vec<(String, u16, u16, PathBuf)> = (1..=2)
            .map(|n| {
                let name = format!("node{n}");
                let dir = root.join(&name);
                fs::create_dir(&dir).expect("a node directory");
                (name, free_port(), free_port(), dir)
            })
            .collect();
        for (name, pg_port, rest_port, dir) in &nodes {
            fs::write(
                dir.join("patroni.yml"),
                patroni_config(&scope, name, *pg_port, *rest_port, etcd_client, dir),
            )
            .expect("write patroni.yml");
        }
        let haproxy_port = free_port();
        fs::write(
            root.join("haproxy.cfg"),
            haproxy_config(
                haproxy_port,
                &nodes
                    .iter()
                    .map(|(name, pg, rest, _)| (name.as_str(), *pg, *rest))
                    .collect::<Vec<_>>(),
            ),
        )
        .expect("write haproxy.cfg");
        if as_root {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&root)
                .status()
                .expect("run chown");
            assert!(status.success(), "cannot give the HA directory to postgres");
        }

        let etcd = spawn(
            &root,
            as_root,
            "etcd",
            Command::new(find_program("etcd", &["/usr/bin/etcd"])).args([
                "--name".into(),
                "etcd".into(),
                "--data-dir".into(),
                root.join("etcd").display().to_string(),
                "--listen-client-urls".into(),
                format!("http://127.0.0.1:{etcd_client}"),
                "--advertise-client-urls".into(),
                format!("http://127.0.0.1:{etcd_client}"),
                "--listen-peer-urls".into(),
                format!("http://127.0.0.1:{etcd_peer}"),
                "--initial-advertise-peer-urls".into(),
                format!("http://127.0.0.1:{etcd_peer}"),
                "--initial-cluster".into(),
                format!("etcd=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync".into(),
            ]),
        );
        let haproxy = spawn(
            &root,
            false,
            "haproxy",
            Command::new(find_program("haproxy", &["/usr/sbin/haproxy"]))
                .arg("-db")
                .arg("-f")
                .arg(root.join("haproxy.cfg")),
        );
        let mut cluster = Self {
            root,
            etcd,
            nodes: Vec::new(),
            haproxy,
            haproxy_port,
        };
        // The first node bootstraps (initdb) and becomes the primary; the
        // second then clones it, so that neither waits on the other's
        // initdb for the leader key.
        for (i, (name, pg_port, rest_port, dir)) in nodes.into_iter().enumerate() {
            let patroni = spawn(
                &cluster.root,
                as_root,
                &name,
                Command::new(find_program("patroni", &["/usr/bin/patroni"]))
                    .arg(dir.join("patroni.yml")),
            );
            cluster.nodes.push(Node {
                name,
                pg_port,
                rest_port,
                dir,
                patroni,
            });
            if i == 0 {
                cluster
                    .wait_for(
                        "a first primary",
                        |c| async move { c.primary().await.is_some() },
                    )
                    .await;
            }
        }
        cluster
            .wait_for("a synchronous standby", |c| async move {
                c.has_sync_standby().await
            })
            .await;
        cluster
            .wait_for("a query through HAProxy", |c| async move {
                c.answers(&c.url("postgres")).await
            })
            .await;
        cluster
    }

    /// The URL of `database` through HAProxy (user `postgres`, trusted).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}",
            self.haproxy_port
        )
    }

    /// Creates an empty database through HAProxy and returns its URL.
    pub async fn create_database(&self) -> String {
        let name = format!("t_{:032x}", OsRng.r#gen::<u128>());
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect through HAProxy");
        sqlx::raw_sql(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut conn)
            .await
            .expect("create a database on the HA cluster");
        let _ = conn.close().await;
        self.url(&name)
    }

    /// The index of the node whose Patroni says it is the primary, if one
    /// does.
    pub async fn primary(&self) -> Option<usize> {
        for (i, node) in self.nodes.iter().enumerate() {
            if http_status(node.rest_port, "/primary").await == Some(200) {
                return Some(i);
            }
        }
        None
    }

    /// The name of node `index`.
    pub fn name(&self, index: usize) -> &str {
        &self.nodes[index].name
    }

    /// A direct URL (not through HAProxy) of `database` on node `index`.
    pub fn node_url(&self, index: usize, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}",
            self.nodes[index].pg_port
        )
    }

    /// Kills node `index`'s postmaster with SIGKILL: PostgreSQL crashes (its
    /// backends exit when they see the postmaster gone), and its Patroni,
    /// told not to restart a crashed primary, hands the leader key over.
    pub fn kill_postmaster(&self, index: usize) {
        let pid = postmaster_pid(&self.nodes[index].dir).expect("the primary's postmaster.pid");
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "cannot kill postmaster {pid}");
    }

    /// Whether some node is the primary and another its synchronous
    /// standby, as Patroni's `/cluster` reports them.
    pub async fn has_sync_standby(&self) -> bool {
        for node in &self.nodes {
            if let Some(body) = http_body(node.rest_port, "/cluster").await
                && body.contains("\"sync_standby\"")
                && body.contains("\"leader\"")
            {
                return true;
            }
        }
        false
    }

    /// What etcd, Patroni, PostgreSQL and HAProxy logged, for a failure's
    /// message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut files = vec![self.root.join("etcd.log"), self.root.join("haproxy.log")];
        for node in &self.nodes {
            files.push(self.root.join(format!("{}.log", node.name)));
            files.push(node.dir.join("patroni.log"));
        }
        for file in files {
            let text = fs::read_to_string(&file).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("--- {} (last lines)\n", file.display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    async fn answers(&self, url: &str) -> bool {
        match sqlx::PgConnection::connect(url).await {
            Ok(mut conn) => {
                let ok = sqlx::raw_sql("SELECT 1").execute(&mut conn).await.is_ok();
                let _ = conn.close().await;
                ok
            }
            Err(_) => false,
        }
    }

    async fn wait_for<'a, F, Fut>(&'a self, what: &str, check: F)
    where
        F: Fn(&'a Self) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while !check(self).await {
            assert!(
                Instant::now() < deadline,
                "the HA cluster had no {what} within {STARTUP_TIMEOUT:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        // Patroni first, so that it restarts nothing; then the servers it
        // managed, then the rest.
        for node in &mut self.nodes {
            let _ = node.patroni.kill();
            let _ = node.patroni.wait();
        }
        for node in &self.nodes {
            if let Some(pid) = postmaster_pid(&node.dir) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        let _ = self.haproxy.kill();
        let _ = self.haproxy.wait();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        let _ = fs::remove_file(self.root.join("pids"));
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A node's Patroni configuration: PostgreSQL on `pg_port`, the REST API
/// on `rest_port`, the cluster state in etcd's v3 API on `etcd_port`.
fn patroni_config(
    scope: &str,
    name: &str,
    pg_port: u16,
    rest_port: u16,
    etcd_port: u16,
    dir: &Path,
) -> String {
    let d = dir.display();
    format!(
        "scope: {scope}
name: {name}
log:
  dir: {d}
  level: INFO
restapi:
  listen: 127.0.0.1:{rest_port}
  connect_address: 127.0.0.1:{rest_port}
etcd3:
  hosts: 127.0.0.1:{etcd_port}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 3
    synchronous_mode: true
    primary_start_timeout: 0
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        max_connections: 100
        fsync: 'off'
  initdb:
    - encoding: UTF8
    - auth: trust
postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {d}/data
  bin_dir: {POSTGRES_BIN}
  pgpass: {d}/pgpass
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host replication replicator 127.0.0.1/32 trust
  authentication:
    superuser:
      username: postgres
      password: postgres
    replication:
      username: replicator
      password: replicator
    rewind:
      username: postgres
      password: postgres
  parameters:
    unix_socket_directories: '{d}'
"
    )
}

/// HAProxy in TCP mode on `port`: each new connection goes to the node
/// whose Patroni answers `GET /primary` with 200, checked every 100 ms; a
/// node that fails one check has its sessions cut.
fn haproxy_config(port: u16, nodes: &[(&str, u16, u16)]) -> String {
    let mut cfg = format!(
        "global
    maxconn 1000
defaults
    mode tcp
    timeout connect 1s
    timeout client 30m
    timeout server 30m
    timeout check 1s
listen primary
    bind 127.0.0.1:{port}
    option httpchk GET /primary
    http-check expect status 200
    default-server inter 100ms fall 1 rise 1 on-marked-down shutdown-sessions
"
    );
    for (name, pg_port, rest_port) in nodes {
        cfg.push_str(&format!(
            "    server {name} 127.0.0.1:{pg_port} maxconn 200 check port {rest_port}\n"
        ));
    }
    cfg
}

/// Starts `command` (as `postgres` when `as_user` is set), killed when the
/// starting thread ends, its output in `<root>/<label>.log`, and records
/// its pid for the watchdog.
fn spawn(root: &Path, as_user: bool, label: &str, command: &mut Command) -> Child {
    let log = fs::File::create(root.join(format!("{label}.log"))).expect("create a log file");
    let mut setpriv = Command::new("setpriv");
    setpriv.arg("--pdeathsig=KILL");
    if as_user {
        setpriv.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]);
    }
    let child = setpriv
        .arg(command.get_program())
        .args(command.get_args())
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("duplicate the log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
    let pids = root.join("pids");
    let mut listed = fs::read_to_string(&pids).unwrap_or_default();
    listed.push_str(&format!("{}\n", child.id()));
    fs::write(&pids, listed).expect("record a pid");
    child
}

fn spawn_watchdog(root: &Path) {
    #[allow(
        clippy::zombie_processes,
        reason = "the watchdog must outlive this process; it is never waited for"
    )]
    let _watchdog = Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG_SCRIPT)
        .arg("identity-ha-watchdog")
        .arg(root)
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start the HA cluster's watchdog (sh)");
}

fn postmaster_pid(node_dir: &Path) -> Option<u32> {
    fs::read_to_string(node_dir.join("data").join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn find_program(name: &str, paths: &[&str]) -> PathBuf {
    paths
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed (apt-get install patroni etcd-server haproxy; see .ci/test)"
            )
        })
}

/// The status code of `GET path` on the REST API at `port`, if it answers.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let response = http_get(port, path).await?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// The body of a 200 answer to `GET path` on the REST API at `port`.
async fn http_body(port: u16, path: &str) -> Option<String> {
    let response = http_get(port, path).await?;
    let status: u16 = response.split_whitespace().nth(1)?.parse().ok()?;
    (status == 200)
        .then(|| {
            response
                .split_once("\r\n\r\n")
                .map(|(_, body)| body.to_owned())
        })
        .flatten()
}

/// One HTTP/1.0 `GET` on loopback, bounded in time: the whole response.
async fn http_get(port: u16, path: &str) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(2), async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        Some(String::from_utf8_lossy(&response).into_owned())
    })
    .await
    .ok()
    .flatten()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free TCP port for the HA cluster")
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
