//! The benchmark driver behind `bash benches/run.sh` and
//! `bash benches/fleet_page.sh` (BENCHMARKS.md): starts the PostgreSQL
//! cluster with the tests' own code, the identity replicas, drives h2load,
//! pgbench and the loadgen, samples /proc, computes the percentiles and
//! writes the Markdown report. Everything it starts is stopped, and the
//! cluster deleted, on every way out (see `procs`).
//!
//! `driver run [run.sh options]` and `driver fleet-page [--release]`;
//! anything else (as `cargo test --all-targets` and `cargo bench` run it)
//! checks the driver's parsers and does nothing else.
//!
//! Modules: `options` (run.sh's options and environment), `procs`
//! (children, log, cleanup, signals), `cluster` (PostgreSQL), `replicas`,
//! `generators` (h2load, pgbench, loadgen), `sampling` (/proc), `report`,
//! `scenarios` (run.sh's phases), `pooler` (`--pooler`), `fleet_page`.

use std::{collections::HashMap, panic, process::ExitCode, thread, time::Duration};

mod cluster;
mod fleet_page;
mod generators;
mod options;
#[allow(dead_code, reason = "the driver uses only the start and the URL")]
#[path = "../../tests/integration/support/pgbouncer.rs"]
mod pgbouncer;
mod pooler;
#[allow(
    dead_code,
    reason = "the driver uses only the Cluster of the tests' module"
)]
#[path = "../../tests/integration/support/postgres.rs"]
mod postgres;
mod procs;
mod replicas;
mod report;
mod sampling;
mod scenarios;
mod selftest;
mod signin;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, rest) = match args.split_first() {
        Some((mode, rest)) if mode == "run" || mode == "fleet-page" => {
            (mode.clone(), rest.to_vec())
        }
        _ => {
            selftest::run();
            eprintln!(
                "driver: nothing to do (arguments {args:?}); the benchmarks run with `bash benches/run.sh` \
                 and `bash benches/fleet_page.sh`"
            );
            return ExitCode::SUCCESS;
        }
    };
    let flow: Box<dyn FnOnce() -> procs::Result<()>> = if mode == "run" {
        let env: HashMap<String, String> = std::env::vars().collect();
        match options::parse(&rest, &env) {
            Ok(options::Parsed::Help) => {
                print!("{}", options::USAGE);
                return ExitCode::SUCCESS;
            }
            Err(message) => {
                eprintln!("{message}");
                return ExitCode::from(2);
            }
            Ok(options::Parsed::Run(o)) => {
                procs::init(None);
                Box::new(move || scenarios::run(*o))
            }
        }
    } else {
        procs::init(Some("fleet_page"));
        Box::new(move || fleet_page::run(&rest))
    };
    let rc = match panic::catch_unwind(panic::AssertUnwindSafe(flow)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            procs::log(format!("FAILED: {e}"));
            1
        }
        Err(_) => 1,
    };
    if rc != 0 {
        // A Ctrl-C also reaches the children of our process group: let the
        // signal watcher, not the failure it caused, decide the exit status.
        thread::sleep(Duration::from_millis(200));
    }
    procs::finish(rc)
}
