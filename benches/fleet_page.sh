#!/usr/bin/env bash
# One page of the operators' fleet-wide views at a million tokens (issue 12).
#
#   bash benches/fleet_page.sh [--release]
#
# A thin wrapper around the benchmark driver's fleet-page scenario
# (benches/driver/fleet_page.rs): it starts a throwaway PostgreSQL cluster
# with the tests' code, migrates it with `identity migrate`, bootstraps an
# operator, loads 1000 robot accounts, 1,000,000 tokens (1000 per account,
# the accounts interleaved over the id range) and 1,000,000 audit events
# (one a second, the newest now) straight in with SQL generate_series,
# starts `identity serve` on it, and runs the client
# (benches/fleet_page.rs), which times BENCH_RUNS (50) calls of each case
# through a real tonic channel and prints medians, the ratio to the
# per-account listing and the EXPLAIN ANALYZE of the deep pages. Uses the
# debug build unless --release. Everything it starts is stopped and the
# cluster deleted when it exits. Not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo_flags=(--locked)
[ "${1:-}" = --release ] && cargo_flags+=(--release)
driver=$(cargo build "${cargo_flags[@]}" --bench driver --message-format=json |
  sed -n 's/.*"executable":"\([^"]*\/driver-[^"]*\)".*/\1/p' | tail -n 1)
[ -n "$driver" ] && [ -x "$driver" ] ||
  { echo "fleet_page.sh: building the driver failed" >&2; exit 1; }
exec "$driver" fleet-page "$@"
