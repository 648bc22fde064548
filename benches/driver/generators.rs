//! The load generators: h2load and pgbench as subprocesses, whose output
//! and per-call logs are parsed here, and the loadgen (benches/loadgen.rs),
//! whose one `RESULT key=value ...` line is read into a map. Runs disturbed
//! by other processes' CPU are repeated (the retry-on-disturbance rule).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use crate::{
    procs::{self, Result, fail, log},
    report,
    scenarios::Bench,
};

/// The `key=value` pairs of a `RESULT ...` line.
pub type Kv = BTreeMap<String, String>;

/// The first `RESULT ` line of `text`, as a map.
pub fn result_line(text: &str) -> Kv {
    text.lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(|l| {
            l.split(' ')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// A value of `kv` ("" when absent).
pub fn s<'a>(kv: &'a Kv, key: &str) -> &'a str {
    kv.get(key).map_or("", String::as_str)
}

/// A number of `kv` (0 when absent or not a number, as awk reads it).
pub fn f(kv: &Kv, key: &str) -> f64 {
    s(kv, key).parse().unwrap_or(0.0)
}

/// Nearest-rank percentiles of every call.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub n: usize,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// Percentiles of column 3 (latency, microseconds) of h2load's
/// `--log-file` and of pgbench's per-transaction logs alike.
pub fn percentiles(texts: &[String]) -> Percentiles {
    let mut values: Vec<u64> = texts
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|line| {
            let v: f64 = line.split_whitespace().nth(2)?.parse().ok()?;
            Some(v as u64)
        })
        .collect();
    values.sort_unstable();
    let n = values.len();
    let pct = |p: f64| {
        if n == 0 {
            return 0;
        }
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
        values[rank - 1]
    };
    Percentiles {
        n,
        p50: pct(0.5),
        p90: pct(0.9),
        p99: pct(0.99),
        p999: pct(0.999),
        max: values.last().copied().unwrap_or(0),
    }
}

/// A gRPC length-prefixed frame of a protobuf message of string fields.
pub fn grpc_frame(fields: &[(u32, &str)]) -> Vec<u8> {
    fn varint(mut n: u64, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let mut msg = Vec::new();
    for (field, value) in fields {
        varint(u64::from(*field) << 3 | 2, &mut msg);
        varint(value.len() as u64, &mut msg);
        msg.extend_from_slice(value.as_bytes());
    }
    let mut frame = vec![0];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    frame
}

/// The summary lines of one h2load run.
#[derive(Debug, Default, PartialEq)]
pub struct H2load {
    pub rps: f64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub codes: String,
    pub data: u64,
}

/// Parses h2load's summary (stdout).
pub fn parse_h2load(text: &str) -> H2load {
    let mut h = H2load::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 3.00s, 12345.67 req/s, 1.2MB/s"
            if let Some(r) = rest
                .split(", ")
                .nth(1)
                .and_then(|x| x.strip_suffix(" req/s"))
            {
                h.rps = r.parse().unwrap_or(0.0);
            }
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // "N total, N started, N done, N succeeded, N failed, ..."
            for part in rest.split(", ") {
                let mut words = part.split(' ');
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let n = n.parse().unwrap_or(0);
                match what {
                    "done" => h.done = n,
                    "succeeded" => h.succeeded = n,
                    "failed" => h.failed = n,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            h.codes = rest.to_owned();
        } else if let Some(rest) = line
            .strip_prefix("traffic: ")
            .and_then(|r| r.strip_suffix(") data"))
            && let Some(open) = rest.rfind('(')
        {
            h.data = rest[open + 1..].parse().unwrap_or(0);
        }
    }
    h
}

/// The "Success check" of an h2load run. h2load sees only HTTP statuses
/// (always 200 for gRPC). A successful call returns exactly one response
/// frame of `frame` bytes; a gRPC error is a trailers-only response with no
/// data. So data bytes / frame size counts the successful calls; "missing"
/// ones are gRPC errors (negative: data of calls still in flight when the
/// run stopped).
pub fn h2load_check(h: &H2load, frame: u64) -> String {
    let missing = (h.succeeded as f64 - h.data as f64 / frame as f64) as i64;
    let per = if h.succeeded > 0 {
        format!("{:.2}", h.data as f64 / h.succeeded as f64)
    } else {
        "0".into()
    };
    let mut ok = format!("OK: every response {frame} B (a success)");
    if missing < 0 {
        ok = format!(
            "OK: every response {frame} B (+{} in flight at the end)",
            -missing
        );
    }
    if h.failed != 0 || h.succeeded == 0 || missing > 0 {
        ok = format!(
            "**MISMATCH**: {per} B/resp vs {frame} B success frame, {missing} calls without a response message; {} failed; {}",
            h.failed, h.codes
        );
    }
    ok
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// A file for stdout and stderr both.
fn both(path: &Path) -> Result<(Stdio, Stdio)> {
    let file = fs::File::create(path)?;
    Ok((file.try_clone()?.into(), file.into()))
}

impl Bench {
    /// `loadgen SUBCOMMAND` with the bench's tokens in its environment.
    pub fn loadgen(&self, subcommand: &str) -> Command {
        let mut command = Command::new(&self.loadgen);
        command
            .arg(subcommand)
            .envs(self.lg_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        command
    }

    /// Runs `command` (a loadgen subcommand) with stderr passed through and
    /// returns its `RESULT` line; fails with `what` if it fails.
    pub fn result_of(&self, command: &mut Command, what: &str) -> Result<Kv> {
        let out = command.stderr(Stdio::inherit()).output()?;
        if !out.status.success() {
            return fail(format!("{what} failed ({})", out.status));
        }
        Ok(result_line(&String::from_utf8_lossy(&out.stdout)))
    }

    /// `loadgen` with stdout to `raw` and stderr to `raw.err`, at most
    /// `timeout`; whether it succeeded.
    pub fn loadgen_to(
        &self,
        command: &mut Command,
        raw: &Path,
        timeout: Option<Duration>,
    ) -> Result<bool> {
        command
            .stdout(fs::File::create(raw)?)
            .stderr(fs::File::create(err_path(raw))?);
        procs::run(command, timeout)
    }

    /// True (after a pause) when the run just measured should be repeated
    /// because other processes took too much of the CPU.
    fn contended(&self, key: &str, attempt: u64, retries: u64) -> bool {
        let foreign = report::with(|r| r.foreign.unwrap_or(0));
        if foreign < self.o.max_other_cpu as i64 || attempt >= retries {
            return false;
        }
        log(format!(
            "{key}: other processes used {foreign}% of the CPU during the run: repeating it in 5 s ({}/{retries})",
            attempt + 1
        ));
        thread::sleep(Duration::from_secs(5));
        true
    }

    fn mark(&mut self) {
        self.sampler.mark();
    }

    fn foreign(&mut self) {
        let f = self.sampler.foreign();
        report::with(|r| r.foreign = Some(f));
    }

    /// One h2load run (a discarded warm-up run first), recorded as `key`.
    #[allow(clippy::too_many_arguments, reason = "the shape of one run")]
    pub fn h2load_run(
        &mut self,
        key: &str,
        scenario: &str,
        run: &str,
        path: &str,
        body: &Path,
        frame: u64,
        m: &str,
        url: Option<&str>,
        auth: Option<&str>,
    ) -> Result<()> {
        let url = url.map_or_else(|| self.r.url("A"), str::to_owned);
        let raw = self.work.join(format!("h2load-{key}.txt"));
        let logf = self.work.join(format!("h2load-{key}.log"));
        let c = self.o.connections.to_string();
        let mut headers = vec![
            "-H".to_owned(),
            "content-type: application/grpc".into(),
            "-H".into(),
            "te: trailers".into(),
        ];
        if let Some(auth) = auth {
            headers.extend(["-H".into(), format!("authorization: Bearer {auth}")]);
        }
        let target = format!("{url}{path}");
        let h2load = |secs: u64| {
            let mut command = Command::new("h2load");
            command
                .args(["-c", &c, "-m", m, "-t", "1", "-D", &secs.to_string(), "-d"])
                .arg(body)
                .args(&headers)
                .stdin(Stdio::null());
            command
        };
        for attempt in 0..=self.retries {
            // The warm-up is a separate, discarded run: h2load 1.52 counts
            // the data bytes of its own --warm-up-time in the totals, which
            // would spoil the bytes-per-response check.
            if self.o.warmup > 0 {
                let warm = PathBuf::from(format!("{}.warmup", raw.display()));
                let (out, err) = both(&warm)?;
                let mut command = h2load(self.o.warmup);
                command.arg(&target).stdout(out).stderr(err);
                if !procs::run(&mut command, Some(Duration::from_secs(self.o.warmup + 60)))? {
                    eprintln!("{}", read(&warm));
                    return fail(format!("h2load {key} (warm-up) failed"));
                }
            }
            self.mark();
            let (out, err) = both(&raw)?;
            let mut command = h2load(self.o.duration);
            command
                .arg("--log-file")
                .arg(&logf)
                .arg(&target)
                .stdout(out)
                .stderr(err);
            if !procs::run(
                &mut command,
                Some(Duration::from_secs(self.o.duration + 60)),
            )? {
                eprintln!("{}", read(&raw));
                return fail(format!("h2load {key} failed"));
            }
            self.foreign();
            if !self.contended(key, attempt, self.retries) {
                break;
            }
        }
        let h = parse_h2load(&read(&raw));
        let ok = h2load_check(&h, frame);
        let pc = percentiles(&[read(&logf)]);
        let generator = format!("h2load -c {c} -m {m}");
        report::with(|r| {
            r.record(
                key,
                scenario,
                run,
                &generator,
                h.rps,
                pc.p50 as f64,
                pc.p99 as f64,
                pc.p999 as f64,
                &ok,
                &format!("{} calls", h.done),
            )
        });
        Ok(())
    }

    /// One `loadgen load` run, recorded as `key`.
    pub fn loadgen_run(
        &mut self,
        key: &str,
        scenario: &str,
        run: &str,
        notes: &str,
        args: &[String],
    ) -> Result<Kv> {
        let raw = self.work.join(format!("loadgen-{key}.txt"));
        // A run that uses each token once cannot be repeated: the tokens are
        // spent (and cached).
        let tries = if args.iter().any(|a| a == "--once") {
            0
        } else {
            self.retries
        };
        let o = &self.o;
        let timeout = Duration::from_secs(o.duration + o.warmup + 600);
        let mut base = vec![
            "--duration".to_owned(),
            format!("{}s", o.duration),
            "--warmup".into(),
            format!("{}s", o.warmup),
        ];
        // A run may name its own concurrency (the cold path at one client).
        if !args.iter().any(|a| a == "--concurrency") {
            base.extend(["--concurrency".into(), o.connections.to_string()]);
        }
        for attempt in 0..=tries {
            self.mark();
            let mut command = self.loadgen("load");
            command.args(&base).args(args);
            if !self.loadgen_to(&mut command, &raw, Some(timeout))? {
                eprintln!("{}", read(&err_path(&raw)));
                return fail(format!("loadgen {key} failed"));
            }
            self.foreign();
            if attempt >= tries || !self.contended(key, attempt, tries) {
                break;
            }
        }
        eprint!("{}", read(&err_path(&raw)));
        let kv = result_line(&read(&raw));
        let (errors, wrong, codes) = (s(&kv, "errors"), s(&kv, "wrong"), s(&kv, "codes"));
        let mut ok = format!("OK: codes {codes}; verdicts {}", s(&kv, "verdicts"));
        if errors != "0" || wrong != "0" {
            ok = format!("**ERRORS**: codes {codes}; wrong verdicts {wrong}");
        }
        let mut notes = notes.to_owned();
        if s(&kv, "exhausted") == "true" {
            if !notes.is_empty() {
                notes.push_str("; ");
            }
            notes.push_str(&format!(
                "every token used: stopped after {} s",
                s(&kv, "seconds")
            ));
        }
        let mut calls = format!("{} calls", s(&kv, "requests"));
        if !notes.is_empty() {
            calls.push_str(&format!("; {notes}"));
        }
        // The concurrency the run used: its own if it named one.
        let concurrency = args
            .iter()
            .position(|a| a == "--concurrency")
            .and_then(|i| args.get(i + 1))
            .map_or_else(|| self.o.connections.to_string(), Clone::clone);
        let generator = format!("loadgen -c {concurrency}");
        report::with(|r| {
            r.record(
                key,
                scenario,
                run,
                &generator,
                f(&kv, "rps"),
                f(&kv, "p50_us"),
                f(&kv, "p99_us"),
                f(&kv, "p999_us"),
                &ok,
                &calls,
            )
        });
        Ok(kv)
    }

    /// Generates `count` valid (or revoked) tokens of `account` into `file`
    /// and bulk-loads their rows.
    pub fn add_tokens(
        &self,
        account: &str,
        prefix: &str,
        count: u64,
        file: &Path,
        revoked: bool,
    ) -> Result<()> {
        if count == 0 {
            fs::write(file, "")?;
            return Ok(());
        }
        let csv = PathBuf::from(format!("{}.csv", file.display()));
        let mut command = self.loadgen("gen-tokens");
        command
            .args([
                "--count",
                &count.to_string(),
                "--account-id",
                account,
                "--name-prefix",
                prefix,
            ])
            .arg("--tokens-out")
            .arg(file)
            .arg("--csv-out")
            .arg(&csv);
        if revoked {
            command.arg("--revoked");
        }
        let kv = self.result_of(&mut command, "loadgen gen-tokens")?;
        self.db.psql(&[
            "-c",
            &format!(
                "\\copy tokens ({}) FROM '{}' WITH (FORMAT csv)",
                s(&kv, "columns"),
                csv.display()
            ),
        ])?;
        let _ = fs::remove_file(&csv);
        Ok(())
    }

    /// pgbench -i, a warm-up, and the measured `pgbench -S` run (recorded as
    /// "pgbench").
    pub fn pgbench_run(&mut self) -> Result<()> {
        let o = self.o.clone();
        let c = o.connections.to_string();
        let init = self.work.join("pgbench-init.txt");
        let (out, err) = both(&init)?;
        let mut command = self.db.tool("pgbench");
        command
            .args(["-i", "-q", "-s", &o.pgbench_scale.to_string(), "identity"])
            .stdout(out)
            .stderr(err);
        if !procs::run(&mut command, None)? {
            eprintln!("{}", read(&init));
            return fail("pgbench -i failed");
        }
        let mut command = self.db.tool("pgbench");
        command
            .args([
                "-S",
                "-M",
                "prepared",
                "-n",
                "-c",
                &c,
                "-j",
                "2",
                "-T",
                &o.warmup.to_string(),
                "identity",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = procs::run(&mut command, None)?;
        let dir = self.work.join("pgbench-log");
        fs::create_dir_all(&dir)?;
        let raw = self.work.join("pgbench.txt");
        for attempt in 0..=self.retries {
            for entry in fs::read_dir(&dir)?.flatten() {
                let _ = fs::remove_file(entry.path());
            }
            self.mark();
            let (out, err) = both(&raw)?;
            let mut command = self.db.tool("pgbench");
            command
                .args(["-S", "-M", "prepared", "-n", "-c", &c, "-j", "2"])
                .args([
                    "-T",
                    &o.duration.to_string(),
                    "-l",
                    "--log-prefix=pgb",
                    "identity",
                ])
                .current_dir(&dir)
                .stdout(out)
                .stderr(err);
            if !procs::run(&mut command, Some(Duration::from_secs(o.duration + 60)))? {
                eprintln!("{}", read(&raw));
                return fail("pgbench -S failed");
            }
            self.foreign();
            if !self.contended("pgbench", attempt, self.retries) {
                break;
            }
        }
        let text = read(&raw);
        let tps: f64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("tps = ")?
                    .strip_suffix(" (without initial connection time)")
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let failed = text
            .lines()
            .find_map(|l| l.strip_prefix("number of failed transactions: "))
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or("0")
            .to_owned();
        let logs: Vec<String> = fs::read_dir(&dir)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("pgb."))
            .map(|e| read(&e.path()))
            .collect();
        let pc = percentiles(&logs);
        report::with(|r| {
            r.record(
                "pgbench",
                "cold",
                &format!(
                    "pgbench -S (1 indexed SELECT), {} rows",
                    o.pgbench_scale * 100_000
                ),
                &format!("pgbench -c {c} -j 2 -M prepared"),
                tps,
                pc.p50 as f64,
                pc.p99 as f64,
                pc.p999 as f64,
                &format!("OK: {failed} failed"),
                &format!("{} transactions", pc.n),
            )
        });
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }
}

/// `RAW.err`.
pub fn err_path(raw: &Path) -> PathBuf {
    PathBuf::from(format!("{}.err", raw.display()))
}
