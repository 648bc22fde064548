//! The processes the driver starts, its log, and the cleanup that runs on
//! every way out (normal exit, error, panic, SIGINT, SIGTERM): every child
//! still running is sent SIGTERM (SIGKILL after 5 s), the PostgreSQL cluster
//! is stopped and deleted, the work directory removed (unless `--keep`) and,
//! after a failure, the partial report written.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, ExitStatus},
    sync::{
        Mutex, MutexGuard, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::postgres::{Cluster, Standby};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error with `message`.
pub fn fail<T>(message: impl Into<String>) -> Result<T> {
    Err(message.into().into())
}

/// What the cleanup has to undo.
#[derive(Default)]
pub struct State {
    pids: Vec<u32>,
    cluster: Option<Cluster>,
    /// A streaming standby of `cluster` (`--read-replica`), stopped first.
    standby: Option<Standby>,
    work: Option<PathBuf>,
    keep: bool,
    /// Writes the partial report after a failure (exit status given).
    on_failure: Option<Box<dyn Fn(i32) + Send>>,
    /// The log prefix: `None` for run.sh's, `Some` for fleet_page's.
    prefix: Option<&'static str>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
static STARTED: OnceLock<Instant> = OnceLock::new();
static FINISHING: AtomicBool = AtomicBool::new(false);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    f(state().get_or_insert_with(State::default))
}

/// Starts the clock of the log and the signal watcher.
pub fn init(prefix: Option<&'static str>) {
    STARTED.get_or_init(Instant::now);
    with_state(|s| s.prefix = prefix);
    thread::spawn(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the signal watcher");
        let rc = runtime.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            }
        });
        finish(rc);
    });
}

/// Seconds since the driver started.
pub fn elapsed() -> u64 {
    STARTED.get_or_init(Instant::now).elapsed().as_secs()
}

/// Seconds since the Unix epoch.
pub fn epoch_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `(year, month, day, hour, minute, second)` in UTC of `secs` since the epoch.
pub fn civil(secs: u64) -> (i64, u32, u32, u64, u64, u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, rem / 60 % 60, rem % 60)
}

/// `date -u +%Y-%m-%dT%H:%M:%SZ`.
pub fn utc_now() -> String {
    let (y, mo, d, h, mi, s) = civil(epoch_secs());
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `HH:MM:SS` (UTC).
pub fn clock() -> String {
    let (_, _, _, h, mi, s) = civil(epoch_secs());
    format!("{h:02}:{mi:02}:{s:02}")
}

/// One progress line on stderr.
pub fn log(message: impl AsRef<str>) {
    let prefix = state().as_ref().and_then(|s| s.prefix);
    match prefix {
        Some(p) => eprintln!("[{p} {}] {}", clock(), message.as_ref()),
        None => eprintln!("[{} +{:>3}s] {}", clock(), elapsed(), message.as_ref()),
    }
}

/// Hands the cluster to the cleanup (which stops and deletes it).
pub fn own_cluster(cluster: Cluster) {
    with_state(|s| s.cluster = Some(cluster));
}

/// Starts a streaming standby of the cluster, owned by the cleanup: its
/// port, or `None` without a cluster.
pub fn start_standby() -> Option<u16> {
    with_state(|s| {
        let standby = s.cluster.as_ref()?.standby();
        let port = standby.port();
        s.standby = Some(standby);
        Some(port)
    })
}

/// The work directory, removed by the cleanup unless `keep`.
pub fn own_work_dir(work: PathBuf, keep: bool) {
    with_state(|s| {
        s.work = Some(work);
        s.keep = keep;
    });
}

/// What to do after a failure, before exiting (the partial report).
pub fn on_failure(f: impl Fn(i32) + Send + 'static) {
    with_state(|s| s.on_failure = Some(Box::new(f)));
}

/// Starts `command` and registers it for the cleanup.
pub fn spawn(command: &mut Command) -> Result<Child> {
    let program = command.get_program().to_string_lossy().into_owned();
    let child = command
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    with_state(|s| s.pids.push(child.id()));
    Ok(child)
}

fn forget(pid: u32) {
    with_state(|s| s.pids.retain(|p| *p != pid));
}

/// Waits for `child` (at most `timeout`, after which it gets SIGTERM, as
/// `timeout(1)` does) and unregisters it.
pub fn wait(child: &mut Child, timeout: Option<Duration>) -> Result<ExitStatus> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            stop(child);
            forget(child.id());
            return fail(format!(
                "{} timed out after {}s",
                child.id(),
                timeout.unwrap_or_default().as_secs()
            ));
        }
        thread::sleep(Duration::from_millis(20));
    };
    forget(child.id());
    Ok(status)
}

/// Runs `command` to its end (at most `timeout`); whether it succeeded.
pub fn run(command: &mut Command, timeout: Option<Duration>) -> Result<bool> {
    let mut child = spawn(command)?;
    Ok(wait(&mut child, timeout)?.success())
}

/// SIGTERM, up to 5 s, then SIGKILL; reaps it.
pub fn stop(child: &mut Child) {
    signal(child.id(), "-TERM");
    for _ in 0..250 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            forget(child.id());
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    forget(child.id());
}

fn signal(pid: u32, sig: &str) {
    if our_child(pid) {
        let _ = Command::new("kill")
            .args([sig, &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `(state, ppid)` of `pid` from /proc.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` is (still) a child of this process and not yet reaped:
/// only those are signalled, so that a recycled pid never hits another
/// process.
pub fn our_child(pid: u32) -> bool {
    stat(pid).is_some_and(|(_, ppid)| ppid == std::process::id())
}

/// Whether child `pid` is still running (not exited, not a zombie).
pub fn running(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, ppid)| ppid == std::process::id() && state != 'Z')
}

fn stop_all(pids: &[u32]) {
    let live: Vec<u32> = pids.iter().copied().filter(|p| our_child(*p)).collect();
    for &pid in &live {
        signal(pid, "-TERM");
    }
    for &pid in &live {
        for _ in 0..50 {
            if !running(pid) {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        if running(pid) {
            signal(pid, "-KILL");
        }
        // Not reaped here: this process exits next, and init reaps them.
    }
}

/// Cleans up and exits with `rc`. Only the first caller cleans up (the
/// signal watcher or the main thread); a second one waits for the exit.
pub fn finish(rc: i32) -> ! {
    if FINISHING.swap(true, Ordering::SeqCst) {
        loop {
            thread::park();
        }
    }
    let state = state().take().unwrap_or_default();
    stop_all(&state.pids);
    let cluster_log = state.cluster.as_ref().map(|c| c.log_path().to_owned());
    if let (Some(work), Some(log), true) = (&state.work, &cluster_log, state.keep) {
        let _ = fs::copy(log, work.join("postgres.log"));
    }
    drop(state.standby);
    drop(state.cluster);
    if let Some(work) = &state.work {
        if state.keep {
            eprintln!(
                "[{} +{:>3}s] kept {} (logs and raw output)",
                clock(),
                elapsed(),
                work.display()
            );
        } else {
            let _ = fs::remove_dir_all(work);
        }
    }
    if let (true, Some(f)) = (rc != 0, &state.on_failure) {
        f(rc);
    }
    std::process::exit(rc)
}
