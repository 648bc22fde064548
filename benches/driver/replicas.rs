//! The identity replicas: `identity serve` on a port the kernel picks, its
//! address read from its own log line ("serving ... addr=").

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use crate::procs::{self, Result, log};

/// One running replica.
pub struct Replica {
    pub pid: u32,
    pub url: String,
    _child: Child,
}

/// The replicas of a run, by name (A, N, M, L, L0, B, C, S0, S1).
pub struct Replicas {
    pub identity: PathBuf,
    pub work: PathBuf,
    pub database_url: String,
    pub server_log: String,
    pub running: BTreeMap<String, Replica>,
}

/// `env` or `default`.
fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.into())
}

/// The address in the first line of `log` that contains `marker`.
pub fn serving_addr(log: &Path, marker: &str) -> Option<String> {
    let text = fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.contains(marker))?;
    let start = line.find(" addr=")? + " addr=".len();
    let addr: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    (!addr.is_empty()).then_some(addr)
}

/// Waits (up to 30 s) until `child` logs `marker` with its address; `None`
/// if it exits first or never does.
pub fn wait_serving(child: &mut Child, log: &Path, marker: &str) -> Option<String> {
    for _ in 0..300 {
        if let Some(addr) = serving_addr(log, marker) {
            return Some(addr);
        }
        if !procs::running(child.id()) {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
    None
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Replicas {
    /// Starts replica `name` with `flags`; `false` (after stopping it) if it
    /// does not come up.
    pub fn start(&mut self, name: &str, flags: &[&str]) -> Result<bool> {
        self.start_with_env(name, flags, &[])
    }

    /// [`Self::start`], with `env` set for this replica alone (after the
    /// harness's own variables, so it wins over them).
    pub fn start_with_env(
        &mut self,
        name: &str,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> Result<bool> {
        let log_path = self.work.join(format!("replica-{name}.log"));
        let log_file = fs::File::create(&log_path)?;
        let mut command = Command::new(&self.identity);
        // The benchmarks create tokens for one account far beyond the
        // per-account limits (a cap on live tokens, a creation rate); those
        // are not measured.
        command
            .arg("serve")
            .args(flags)
            .env("DATABASE_URL", &self.database_url)
            .env("IDENTITY_LISTEN_ADDR", "127.0.0.1:0")
            .env("IDENTITY_LOG", &self.server_log)
            .env(
                "IDENTITY_METRICS_ADDR",
                env_or("IDENTITY_METRICS_ADDR", "127.0.0.1:0"),
            )
            .env(
                "IDENTITY_MAX_TOKENS_PER_ACCOUNT",
                env_or("IDENTITY_MAX_TOKENS_PER_ACCOUNT", "1000000"),
            )
            .env(
                "IDENTITY_TOKEN_CREATIONS_PER_MINUTE",
                env_or("IDENTITY_TOKEN_CREATIONS_PER_MINUTE", "1000000"),
            )
            // Replicas run side by side: none may take the page's default
            // port (and the page is not what is measured).
            .env("IDENTITY_WEB_ADDR", env_or("IDENTITY_WEB_ADDR", "off"))
            .env("IDENTITY_DRAIN_TIMEOUT", "2s")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let mut child = procs::spawn(&mut command)?;
        let Some(addr) = wait_serving(&mut child, &log_path, "serving") else {
            log(format!("replica {name} did not start; its log:"));
            eprintln!("{}", tail(&log_path, 20));
            procs::stop(&mut child);
            return Ok(false);
        };
        let pid = child.id();
        let extra = if flags.is_empty() {
            String::new()
        } else {
            format!(" ({})", flags.join(" "))
        };
        log(format!("replica {name}: pid {pid} on {addr}{extra}"));
        self.running.insert(
            name.to_owned(),
            Replica {
                pid,
                url: format!("http://{addr}"),
                _child: child,
            },
        );
        Ok(true)
    }

    /// Starts replica `name` or fails.
    pub fn require(&mut self, name: &str, flags: &[&str]) -> Result<()> {
        if self.start(name, flags)? {
            Ok(())
        } else {
            procs::fail(format!("replica {name} did not start"))
        }
    }

    pub fn url(&self, name: &str) -> String {
        self.running[name].url.clone()
    }

    pub fn pid(&self, name: &str) -> u32 {
        self.running[name].pid
    }

    pub fn has(&self, name: &str) -> bool {
        self.running.contains_key(name)
    }
}
