#!/usr/bin/env bash
# Benchmark harness for the issue "VerifyToken at the speed of a no-op RPC".
#
#   bash benches/run.sh [options]        (bash benches/run.sh --help lists them)
#
# A thin wrapper: builds the benchmark driver (benches/driver, a Rust bench
# target) in release and runs it with these arguments. The driver builds
# target/release/identity and the load generator (benches/loadgen.rs), starts
# the PostgreSQL cluster with the tests' code
# (tests/integration/support/postgres.rs), the replicas, h2load, pgbench and
# the loadgen, and writes target/bench-results.md; every option and
# environment variable (BENCH_*, IDENTITY_*) is the driver's, as documented
# by --help and BENCHMARKS.md. With --no-build (or BENCH_NO_BUILD=1) the
# binaries already built are used.
set -euo pipefail
cd "$(dirname "$0")/.."

no_build=${BENCH_NO_BUILD:-0}
for arg in "$@"; do [ "$arg" = --no-build ] && no_build=1; done
if [ "$no_build" = 1 ]; then
  driver=$(ls -t target/release/deps/driver-* 2>/dev/null | grep -v '\.d$' | head -n 1 || true)
else
  driver=$(cargo build --release --locked --bench driver --message-format=json |
    sed -n 's/.*"executable":"\([^"]*\/driver-[^"]*\)".*/\1/p' | tail -n 1)
fi
[ -n "$driver" ] && [ -x "$driver" ] ||
  { echo "run.sh: building the driver failed (cargo build --release --bench driver)" >&2; exit 1; }
exec "$driver" run "$@"
