//! Checks of the driver's own parsers and arithmetic, run by
//! `cargo test --all-targets` (which runs the driver without arguments): a
//! bench target with `harness = false` has no #[test] runner, so these are
//! plain assertions, in milliseconds, with no I/O.

use std::collections::HashMap;

use crate::{
    generators::{H2load, grpc_frame, h2load_check, parse_h2load, percentiles, result_line},
    options::{Parsed, parse},
    procs::civil,
};

const H2LOAD: &str = "\
finished in 3.00s, 41802.33 req/s, 2.51MB/s
requests: 125407 total, 125423 started, 125407 done, 125407 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 125407 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 7.54MB (7906290) total, 1.80MB (1881105) headers (space savings 95.12%), 2.15MB (2257344) data
";

fn percentile_checks() {
    // Nearest rank: p50 of 1..=10 is the 5th value, p99 and p99.9 the 10th.
    let log: String = (1..=10).map(|i| format!("0 200 {}\n", i * 100)).collect();
    let p = percentiles(&[log]);
    assert_eq!(
        (p.n, p.p50, p.p90, p.p99, p.p999, p.max),
        (10, 500, 900, 1000, 1000, 1000)
    );
    // Several files, unsorted, a short line ignored, fractions truncated.
    let p = percentiles(&["1 0 30.9\n1 0 10\nshort\n".into(), "1 0 20\n".into()]);
    assert_eq!((p.n, p.p50, p.max), (3, 20, 30));
    assert_eq!(percentiles(&[]).p99, 0);
    // 1000 values: p99.9 is the 999th.
    let log: String = (1..=1000).map(|i| format!("a b {i}\n")).collect();
    assert_eq!(percentiles(&[log]).p999, 999);
}

fn h2load_checks() {
    let h = parse_h2load(H2LOAD);
    assert_eq!(
        h,
        H2load {
            rps: 41802.33,
            done: 125_407,
            succeeded: 125_407,
            failed: 0,
            codes: "125407 2xx, 0 3xx, 0 4xx, 0 5xx".into(),
            data: 2_257_344,
        }
    );
    // 2257344 / 18 = 125408: one answer more than calls done (in flight).
    assert_eq!(
        h2load_check(&h, 18),
        "OK: every response 18 B (+1 in flight at the end)"
    );
    let exact = H2load {
        succeeded: 10,
        data: 180,
        ..H2load::default()
    };
    assert_eq!(
        h2load_check(&exact, 18),
        "OK: every response 18 B (a success)"
    );
    // Two calls without a response message: gRPC errors.
    let short = H2load {
        succeeded: 10,
        data: 144,
        codes: "10 2xx".into(),
        ..H2load::default()
    };
    assert_eq!(
        h2load_check(&short, 18),
        "**MISMATCH**: 14.40 B/resp vs 18 B success frame, 2 calls without a response message; 0 failed; 10 2xx"
    );
}

fn other_checks() {
    assert_eq!(grpc_frame(&[]), vec![0, 0, 0, 0, 0]);
    assert_eq!(
        grpc_frame(&[(1, "ab")]),
        vec![0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b']
    );
    let long = "x".repeat(200);
    let frame = grpc_frame(&[(1, &long)]);
    assert_eq!(&frame[..8], &[0, 0, 0, 0, 203, 0x0a, 0xc8, 0x01]);
    let kv = result_line("noise\nRESULT requests=5 rps=2.5 codes=OK:5\nRESULT x=1\n");
    assert_eq!(kv.get("codes").map(String::as_str), Some("OK:5"));
    assert!(!kv.contains_key("x"));
    assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
    assert_eq!(civil(951_782_400 + 3661), (2000, 2, 29, 1, 1, 1));
    assert_eq!(civil(1_798_761_599), (2026, 12, 31, 23, 59, 59));
}

fn option_checks() {
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let env: HashMap<String, String> = [
        ("BENCH_DURATION".into(), "7".into()),
        ("BENCH_KEEP".into(), "1".into()),
    ]
    .into();
    let Ok(Parsed::Run(o)) = parse(
        &args(&["-s", "all", "-d", "3", "--soak-duration", "10m"]),
        &env,
    ) else {
        panic!("the options parse");
    };
    assert_eq!(
        (o.duration, o.warmup, o.connections, o.keep),
        (3, 1, 16, true)
    );
    assert_eq!(o.scenarios, "hot,cold,scale,isolation,propagation,memory");
    assert!(o.want("memory") && !o.want("soak"));
    assert_eq!((o.soak_secs, o.soak_duration.as_str()), (600, "10m"));
    assert_eq!((o.scale_small, o.scale_large), (1000, 1_000_000));
    assert_eq!(o.streams, ["1", "8"]);
    let Ok(Parsed::Run(o)) = parse(&args(&["--soak-duration", "90"]), &HashMap::new()) else {
        panic!("the options parse");
    };
    assert_eq!(
        (o.soak_secs, o.soak_duration.as_str(), o.duration, o.keep),
        (90, "90s", 10, false)
    );
    assert!(!o.pooler);
    let Ok(Parsed::Run(o)) = parse(&args(&["-s", "hot,cold", "--pooler"]), &HashMap::new()) else {
        panic!("the options parse");
    };
    assert!(o.pooler && o.want("cold"));
    assert!(!o.memory_accounts_each);
    let Ok(Parsed::Run(o)) = parse(
        &args(&["-s", "memory", "--memory-accounts-each"]),
        &HashMap::new(),
    ) else {
        panic!("--memory-accounts-each parses");
    };
    assert!(o.memory_accounts_each && o.want("memory"));
    for (bad, message) in [
        (&["-d", "0"][..], "run.sh: --duration must be at least 1"),
        (&["-d", "x"][..], "run.sh: expected a whole number, got 'x'"),
        (&["-s", "hot,warm"][..], "run.sh: unknown scenario 'warm'"),
        (
            &["--bogus"][..],
            "run.sh: unknown option --bogus (see --help)",
        ),
        (
            &["--scale-sizes", "5,5"][..],
            "run.sh: --scale-sizes wants SMALL,LARGE (e.g. 1000,1000000)",
        ),
        (
            &["--soak-duration", "1d"][..],
            "run.sh: --soak-duration wants SECS or a number with s, m or h (e.g. 10m), got '1d'",
        ),
    ] {
        assert_eq!(
            parse(&args(bad), &HashMap::new()).err().as_deref(),
            Some(message),
            "{bad:?}"
        );
    }
    assert!(matches!(
        parse(&args(&["--help"]), &HashMap::new()),
        Ok(Parsed::Help)
    ));
}

/// Runs every check (panics on the first that fails).
pub fn run() {
    percentile_checks();
    h2load_checks();
    other_checks();
    option_checks();
}
