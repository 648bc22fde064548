//! Samples of /proc: resident memory of a process, and the share of the
//! machine's CPU that processes the driver did not start used during a run
//! (the machine is shared: a build running next to the benchmark halves it).

use std::{collections::HashMap, fs, time::Instant};

/// VmRSS of `pid`, in KiB (0 when it cannot be read).
pub fn rss_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// `kb` in MiB, one decimal.
pub fn fmt_mib(kb: i64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

/// One sample: CPU ticks charged to processes (user + nice + system; interrupt
/// time, mostly the benchmark's own loopback traffic, is charged to nobody,
/// and steal time is another virtual machine's), ticks of ours, and when.
#[derive(Debug, Clone, Copy)]
struct Sample {
    busy: u64,
    ours: u64,
    at: Instant,
}

/// Measures other processes' CPU between [`Sampler::mark`] and
/// [`Sampler::foreign`].
pub struct Sampler {
    /// Our process trees: the driver and the postmaster (which `pg_ctl`
    /// detached from us).
    roots: Vec<u32>,
    hz: f64,
    cores: f64,
    mark: Option<Sample>,
}

impl Sampler {
    pub fn new(roots: Vec<u32>) -> Self {
        let getconf = |name: &str| {
            std::process::Command::new("getconf")
                .arg(name)
                .output()
                .ok()
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .trim()
                        .parse::<i64>()
                        .ok()
                })
                .unwrap_or(1)
        };
        let (hz, cores) = (getconf("CLK_TCK"), getconf("_NPROCESSORS_ONLN"));
        Self {
            roots,
            hz: hz.max(1) as f64,
            cores: cores.max(1) as f64,
            mark: None,
        }
    }

    fn sample(&self) -> Sample {
        let busy = fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                let v: Vec<u64> = stat
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .take(3)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                Some(v.iter().sum())
            })
            .unwrap_or(0);
        // pid -> (ppid, utime + stime, cutime + cstime)
        let mut procs: HashMap<u32, (u32, u64, u64)> = HashMap::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let Ok(text) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some(close) = text.rfind(')') else {
                continue;
            };
            let rest: Vec<&str> = text[close + 2..].split_whitespace().collect();
            if rest.len() < 15 {
                continue;
            }
            let num = |i: usize| rest[i].parse::<u64>().unwrap_or(0);
            procs.insert(pid, (num(1) as u32, num(11) + num(12), num(13) + num(14)));
        }
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (&pid, &(ppid, _, _)) in &procs {
            children.entry(ppid).or_default().push(pid);
        }
        let mut ours = 0;
        let mut seen = std::collections::HashSet::new();
        let mut stack = self.roots.clone();
        while let Some(pid) = stack.pop() {
            if !seen.insert(pid) {
                continue;
            }
            let Some(&(_, own, _)) = procs.get(&pid) else {
                continue;
            };
            ours += own;
            stack.extend(children.get(&pid).into_iter().flatten());
        }
        // Reaped children (finished generators, closed backends) count for
        // their parent.
        ours += self
            .roots
            .iter()
            .filter_map(|r| procs.get(r))
            .map(|p| p.2)
            .sum::<u64>();
        Sample {
            busy,
            ours,
            at: Instant::now(),
        }
    }

    /// Before a measured run.
    pub fn mark(&mut self) {
        self.mark = Some(self.sample());
    }

    /// After it: the percentage of the machine's CPU time other processes
    /// used since the mark.
    pub fn foreign(&self) -> i64 {
        let now = self.sample();
        let Some(mark) = self.mark else {
            return 0;
        };
        let other = now.busy as f64 - mark.busy as f64 - (now.ours as f64 - mark.ours as f64);
        let secs = now.at.duration_since(mark.at).as_secs_f64();
        let f = other / self.hz / (secs * self.cores) * 100.0;
        if f.is_finite() && f > 0.0 {
            f.round() as i64
        } else {
            0
        }
    }
}
