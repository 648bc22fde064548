#!/usr/bin/env bash
# Benchmark harness for the issue "VerifyToken at the speed of a no-op RPC".
#
#   bash benches/run.sh [options]
#
# Self-contained on one Linux machine (run as root or as a user that can run
# initdb): installs h2load (apt package nghttp2-client) if it is missing,
# builds `target/release/identity` and the load generator
# (benches/loadgen.rs, `cargo build --release --bench loadgen`), starts a
# throwaway PostgreSQL 15 cluster (fsync=off, 127.0.0.1, a free port, a temp
# directory; as the `postgres` user via runuser when run as root) and the
# identity replicas on 127.0.0.1 ports chosen by the kernel, runs the
# scenarios with bounded durations, prints a Markdown report and writes it to
# target/bench-results.md. Every process it starts is stopped, and the
# cluster deleted, when it exits (normally, on error or on Ctrl-C).
#
# Options (each has an environment variable; options win):
#   -d, --duration SECS       measured seconds per run             BENCH_DURATION (10)
#   -w, --warmup SECS         unmeasured seconds before each run   BENCH_WARMUP (1)
#   -c, --connections N       HTTP/2 connections of every generator, and
#                             pgbench clients                      BENCH_CONNECTIONS (16)
#   -m, --streams LIST        h2load streams per connection for the hot
#                             path, comma-separated                BENCH_STREAMS (1,8)
#   -s, --scenarios LIST      comma-separated subset of: hot, cold, scale,
#                             isolation, propagation, memory, soak; or all
#                             (every one but soak)                 BENCH_SCENARIOS (all)
#       --cold-tokens N       distinct tokens for the cold run, each used at
#                             most once                            BENCH_COLD_TOKENS (100000)
#       --scale-sizes A,B     tokens stored in the small and large scale
#                             runs                                 BENCH_SCALE_SIZES (1000,1000000)
#       --revocations N       revocations in the propagation run   BENCH_REVOCATIONS (200)
#       --signin-concurrency N  parallel sign-ins (isolation)      BENCH_SIGNIN_CONCURRENCY (4)
#       --pgbench-scale N     pgbench -i -s (N x 100,000 rows)     BENCH_PGBENCH_SCALE (1)
#       --out FILE            Markdown report                      BENCH_OUT (target/bench-results.md)
#       --keep                keep the work directory (server logs, raw
#                             generator output); the cluster is still
#                             stopped                              BENCH_KEEP=1
#       --no-build            use the binaries already built       BENCH_NO_BUILD=1
#       --max-other-cpu PCT   a run during which processes the harness did
#                             not start (a build...) used this share of the
#                             CPU or more is repeated               BENCH_MAX_OTHER_CPU (10)
#       --retries N           ... at most N times (not the runs that spend
#                             tokens: cold, cache fill, isolation)  BENCH_RETRIES (2)
#       --soak-duration T     soak: how long (SECS, or with a unit:
#                             90s, 10m, 1h)                        BENCH_SOAK_DURATION (600)
#       --soak-connections N  soak: HTTP/2 connections in all, half
#                             to each replica; one call in flight
#                             per connection                       BENCH_SOAK_CONNECTIONS (64)
#       --soak-mix MIX        soak: percentages of calls per operation
#                                                                  BENCH_SOAK_MIX
#                             (verify:90,verify-revoked:4,use-revoked:1,create:2.45,revoke:2.45,sign-in:0.1)
#       --soak-cache-entries N  soak: the replicas' --cache-entries
#                             (small, so that the cache is full
#                             early and memory can be judged)      BENCH_SOAK_CACHE_ENTRIES (5000)
#   -h, --help
#
# Any IDENTITY_* variable in the environment (e.g. IDENTITY_CACHE_ENTRIES,
# IDENTITY_DB_MAX_CONNECTIONS) reaches every replica; DATABASE_URL and
# IDENTITY_LISTEN_ADDR are always set by the harness, and IDENTITY_METRICS_ADDR
# defaults to a free port per replica (set it to off to measure without metrics). BENCH_SERVER_LOG sets the
# replicas' log filter (default warn,identity::app=info).
#
# Scenarios (each reports throughput and p50/p99/p99.9 latency):
#   hot          VerifyToken of one valid token (same token every call) vs
#                grpc.health.v1.Health/Check on the same server, both with
#                h2load (-c CONNECTIONS -m M for each M in --streams;
#                percentiles from h2load --log-file); success is checked by
#                comparing h2load's data bytes per request with the size of
#                a successful answer (loadgen probe), plus probes before and
#                after. When the binary has a cache, VerifyToken also runs
#                against a replica with --cache-entries 0 (what the hot path
#                costs without it). A loadgen run of both calls cross-checks
#                the generator, and a loadgen run with a realistic mix
#                (valid:90,unknown:5,revoked:5) checks every verdict.
#   cold         VerifyToken of --cold-tokens distinct valid tokens, each used
#                at most once (no cache can hit), with the loadgen, vs
#                pgbench -S -M prepared on the same database, same clients.
#   scale        hot and cold with the two --scale-sizes tokens stored (the
#                large size filled with generate_series rows); "cold" here
#                cycles through the small size's real tokens on a replica
#                with the cache turned off (--cache-entries 0), when the
#                binary has a cache. The large-table runs use fresh replicas,
#                like the small-table ones, so that only the table differs.
#   isolation    the hot path (h2load, -m 1) while the loadgen signs in at full
#                speed in parallel, vs the idle hot path.
#   propagation  three replicas on one database; revoke on A, poll B and C
#                until both answer active: false (loadgen propagation).
#   memory       VmRSS of replica A after the hot and cold runs, and of a fresh
#                replica before and after verifying as many distinct tokens as
#                the default cache holds (with a long --cache-ttl so nothing
#                expires during the fill).
#   soak         (not part of "all"; 10 minutes by default) two fresh replicas
#                S0 and S1 on the database; `loadgen soak` sends a realistic
#                mix from --soak-connections connections, each call to a
#                random replica: VerifyToken of valid tokens, VerifyToken of
#                and GetToken with tokens it revoked, CreateToken,
#                RevokeToken, SignIn. Reports throughput and p50/p90/p99/max
#                per operation, unexpected errors by gRPC code, the replicas'
#                VmRSS over time, and fails (exit 1) on any unexpected error,
#                wrong verdict, revoked token accepted after its revocation
#                was acknowledged (by the revoking replica at all, by the
#                other one 1 s or more after), or memory that keeps growing.
#                The rules are in benches/soak/mod.rs and BENCHMARKS.md.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

duration=${BENCH_DURATION:-10}
warmup=${BENCH_WARMUP:-1}
connections=${BENCH_CONNECTIONS:-16}
streams=${BENCH_STREAMS:-1,8}
scenarios=${BENCH_SCENARIOS:-all}
cold_tokens=${BENCH_COLD_TOKENS:-100000}
scale_sizes=${BENCH_SCALE_SIZES:-1000,1000000}
revocations=${BENCH_REVOCATIONS:-200}
signin_concurrency=${BENCH_SIGNIN_CONCURRENCY:-4}
pgbench_scale=${BENCH_PGBENCH_SCALE:-1}
out=${BENCH_OUT:-}
keep=${BENCH_KEEP:-0}
no_build=${BENCH_NO_BUILD:-0}
server_log=${BENCH_SERVER_LOG:-warn,identity::app=info}
max_other_cpu=${BENCH_MAX_OTHER_CPU:-10}
retries=${BENCH_RETRIES:-2}
soak_duration=${BENCH_SOAK_DURATION:-600}
soak_connections=${BENCH_SOAK_CONNECTIONS:-64}
soak_mix=${BENCH_SOAK_MIX:-}
soak_cache_entries=${BENCH_SOAK_CACHE_ENTRIES:-5000}

while [ $# -gt 0 ]; do
  case "$1" in
    -d|--duration) duration=$2; shift 2 ;;
    -w|--warmup) warmup=$2; shift 2 ;;
    -c|--connections) connections=$2; shift 2 ;;
    -m|--streams) streams=$2; shift 2 ;;
    -s|--scenarios) scenarios=$2; shift 2 ;;
    --cold-tokens) cold_tokens=$2; shift 2 ;;
    --scale-sizes) scale_sizes=$2; shift 2 ;;
    --revocations) revocations=$2; shift 2 ;;
    --signin-concurrency) signin_concurrency=$2; shift 2 ;;
    --pgbench-scale) pgbench_scale=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --no-build) no_build=1; shift ;;
    --max-other-cpu) max_other_cpu=$2; shift 2 ;;
    --retries) retries=$2; shift 2 ;;
    --soak-duration) soak_duration=$2; shift 2 ;;
    --soak-connections) soak_connections=$2; shift 2 ;;
    --soak-mix) soak_mix=$2; shift 2 ;;
    --soak-cache-entries) soak_cache_entries=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

for n in "$duration" "$warmup" "$connections" "$cold_tokens" "$revocations" "$signin_concurrency" "$pgbench_scale" \
  "$max_other_cpu" "$retries" "$soak_connections" "$soak_cache_entries"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "run.sh: expected a whole number, got '$n'" >&2; exit 2; }
done
[ "$duration" -ge 1 ] || { echo "run.sh: --duration must be at least 1" >&2; exit 2; }
[[ "$soak_duration" =~ ^[0-9]+(s|m|h)?$ ]] ||
  { echo "run.sh: --soak-duration wants SECS or a number with s, m or h (e.g. 10m), got '$soak_duration'" >&2; exit 2; }
[[ "$soak_duration" =~ [smh]$ ]] || soak_duration=${soak_duration}s
case "$soak_duration" in
  *h) soak_secs=$(( ${soak_duration%h} * 3600 )) ;;
  *m) soak_secs=$(( ${soak_duration%m} * 60 )) ;;
  *) soak_secs=${soak_duration%s} ;;
esac
[ "$soak_secs" -ge 1 ] || { echo "run.sh: --soak-duration must be at least 1s" >&2; exit 2; }
IFS=, read -r scale_small scale_large <<<"$scale_sizes"
[[ "${scale_small:-}" =~ ^[0-9]+$ && "${scale_large:-}" =~ ^[0-9]+$ && $scale_small -lt $scale_large ]] ||
  { echo "run.sh: --scale-sizes wants SMALL,LARGE (e.g. 1000,1000000)" >&2; exit 2; }
[ "$scenarios" = all ] && scenarios=hot,cold,scale,isolation,propagation,memory
want() { [[ ",$scenarios," == *",$1,"* ]]; }
for s in ${scenarios//,/ }; do
  case "$s" in hot|cold|scale|isolation|propagation|memory|soak) ;; *)
    echo "run.sh: unknown scenario '$s'" >&2; exit 2 ;; esac
done

cd "$(dirname "$0")/.."
repo=$PWD
out=${out:-$repo/target/bench-results.md}
mkdir -p "$(dirname "$out")"
started_at=$(date +%s)
loadavg_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
log() { printf '[%s +%3ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - started_at ))" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# --- state cleaned up by the EXIT trap ----------------------------------------
work=""
pg_data=""
pg_started=0
pids=()
reported=0
results_rows=()
memory_rows=()
propagation_line=""
soak_section=""
as_root=0
[ "$(id -u)" = 0 ] && as_root=1

as_pg() { if [ "$as_root" = 1 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# Whether PID is (still) a child of this script: only those are signalled,
# so that a recycled pid can never hit someone else's process.
our_child() { [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f2)" = "$$" ]; }
# run_fg COMMAND...: runs COMMAND in the background and waits for it, so that a
# SIGTERM (or Ctrl-C) reaches the trap at once rather than after the command.
fg_pid=""
run_fg() {
  "$@" &
  fg_pid=$!
  local rc=0
  wait "$fg_pid" || rc=$?
  fg_pid=""
  return "$rc"
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  local live=()
  for pid in $fg_pid "${pids[@]}"; do our_child "$pid" && live+=("$pid"); done
  for pid in "${live[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${live[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    our_child "$pid" && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [ "$pg_started" = 1 ]; then
    as_pg "$pgbin/pg_ctl" -D "$pg_data" -m fast -t 30 stop >/dev/null 2>&1 ||
      as_pg "$pgbin/pg_ctl" -D "$pg_data" -m immediate stop >/dev/null 2>&1
  fi
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ "$keep" = 1 ]; then
      rm -rf "$work/pg/data"
      log "kept $work (logs and raw output)"
    else
      rm -rf "$work"
    fi
  fi
  if [ "$rc" != 0 ] && [ "$reported" = 0 ] && [ ${#results_rows[@]} -gt 0 ] && declare -F write_report >/dev/null; then
    write_report "FAILED (exit status $rc), partial" 2>/dev/null && log "partial report: $out"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- prerequisites -------------------------------------------------------------
pgbin=/usr/lib/postgresql/15/bin
[ -x "$pgbin/initdb" ] || pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$pgbin" ] && [ -x "$pgbin/initdb" ] || die "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin"
for tool in pg_ctl psql pgbench pg_isready createdb; do
  [ -x "$pgbin/$tool" ] || die "$pgbin/$tool is missing"
done
command -v python3 >/dev/null || die "python3 is required"
command -v cargo >/dev/null || die "cargo is required"
if [ "$as_root" = 1 ]; then
  command -v runuser >/dev/null || die "runuser is required when running as root"
  id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' system user"
fi
if ! command -v h2load >/dev/null; then
  [ "$as_root" = 1 ] && command -v apt-get >/dev/null || die "h2load is missing (apt-get install nghttp2-client)"
  log "installing h2load (nghttp2-client)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null
fi

# --- build ---------------------------------------------------------------------
identity_bin=$repo/target/release/identity
loadgen=""
if [ "$no_build" = 1 ]; then
  loadgen=$(ls -t "$repo"/target/release/deps/loadgen-* 2>/dev/null | grep -v '\.d$' | head -n 1 || true)
else
  log "cargo build --release (identity and the loadgen bench)"
  run_fg cargo build --release --bin identity >&2
  loadgen=$(cargo build --release --bench loadgen --message-format=json |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "loadgen" and m.get("executable"):
        print(m["executable"])') || true
fi
[ -n "$loadgen" ] && [ -x "$loadgen" ] || die "building the loadgen failed (cargo build --release --bench loadgen)"
[ -x "$identity_bin" ] || die "$identity_bin is missing (drop --no-build)"

help_text=$("$identity_bin" --help)
cache_flag=0
cache_capacity=0
if grep -q -- '--cache-entries' <<<"$help_text"; then
  cache_flag=1
  cache_capacity=${IDENTITY_CACHE_ENTRIES:-$(grep -A3 -- '--cache-entries' <<<"$help_text" |
    grep -o 'default: [0-9]*' | head -n 1 | grep -o '[0-9]*$' || true)}
  cache_capacity=${cache_capacity:-0}
fi
cache_ttl_flag=0
grep -q -- '--cache-ttl' <<<"$help_text" && cache_ttl_flag=1
if [ "$cache_flag" = 1 ]; then
  log "the binary has a verification cache: --cache-entries (capacity here: $cache_capacity)"
else
  log "the binary has no verification cache (no --cache-entries flag)"
fi

# --- PostgreSQL ------------------------------------------------------------------
work=$(mktemp -d /tmp/identity-bench.XXXXXX)
chmod 755 "$work"
mkdir -p "$work/pg/socket"
pg_data=$work/pg/data
[ "$as_root" = 1 ] && chown -R postgres: "$work/pg"
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
pg_port=$(free_port)
log "initdb + start PostgreSQL ($pgbin) on 127.0.0.1:$pg_port in $work/pg"
as_pg "$pgbin/initdb" -D "$pg_data" -A trust -U postgres --no-sync -E UTF8 --locale=C >"$work/initdb.log" 2>&1 ||
  { cat "$work/initdb.log" >&2; die "initdb failed"; }
pg_started=1
as_pg "$pgbin/pg_ctl" -D "$pg_data" -l "$work/pg/postgres.log" -w -t 60 \
  -o "-p $pg_port -c listen_addresses=127.0.0.1 -k $work/pg/socket -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 -c shared_buffers=256MB -c maintenance_work_mem=256MB" \
  start >/dev/null || { tail -n 30 "$work/pg/postgres.log" >&2; die "PostgreSQL did not start"; }
export PGHOST=127.0.0.1 PGPORT=$pg_port PGUSER=postgres
"$pgbin/createdb" identity
database_url="postgres://postgres@127.0.0.1:$pg_port/identity"
psql_q() { "$pgbin/psql" -X -q -v ON_ERROR_STOP=1 -d identity "$@"; }
psql_v() { "$pgbin/psql" -X -q -A -t -v ON_ERROR_STOP=1 -d identity "$@"; }

# --- replicas --------------------------------------------------------------------
declare -A replica_pid replica_url
# start_replica NAME [identity flags...]: starts `identity serve` on a free
# port; returns non-zero (after stopping it) if it does not come up.
start_replica() {
  local name=$1; shift
  local logf=$work/replica-$name.log
  # The benchmarks create tokens for one account far beyond the per-account
  # limits (a cap on live tokens, a creation rate); those are not measured.
  DATABASE_URL=$database_url IDENTITY_LISTEN_ADDR=127.0.0.1:0 IDENTITY_LOG=$server_log \
    IDENTITY_METRICS_ADDR=${IDENTITY_METRICS_ADDR:-127.0.0.1:0} \
    IDENTITY_MAX_TOKENS_PER_ACCOUNT=${IDENTITY_MAX_TOKENS_PER_ACCOUNT:-1000000} \
    IDENTITY_TOKEN_CREATIONS_PER_MINUTE=${IDENTITY_TOKEN_CREATIONS_PER_MINUTE:-1000000} \
    IDENTITY_DRAIN_TIMEOUT=2s "$identity_bin" serve "$@" >"$logf" 2>&1 &
  local pid=$!
  pids+=("$pid")
  local addr=""
  for _ in $(seq 300); do
    addr=$(grep 'serving' "$logf" 2>/dev/null | grep -o ' addr=[0-9.:]*' | head -n 1 | cut -d= -f2 || true)
    [ -n "$addr" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$addr" ]; then
    log "replica $name did not start; its log:"
    tail -n 20 "$logf" >&2
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 1
  fi
  replica_pid[$name]=$pid
  replica_url[$name]=http://$addr
  log "replica $name: pid $pid on $addr${*:+ ($*)}"
}
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
fmt_mib() { awk -v kb="$1" 'BEGIN { printf "%.1f", kb / 1024 }'; }

log "migrate, bootstrap an operator, start replica A"
DATABASE_URL=$database_url IDENTITY_LOG=warn "$identity_bin" migrate
ops_token=$(DATABASE_URL=$database_url IDENTITY_LOG=warn "$identity_bin" bootstrap-operator --username bench-ops)
start_replica A || die "replica A did not start"
rss_a_idle=$(rss_kb "${replica_pid[A]}")
export BENCH_OPERATOR_TOKEN=$ops_token
eval "$("$loadgen" setup --target "${replica_url[A]}" | grep -E '^[A-Z_]+=[A-Za-z0-9_.:-]*$')"
: "${PERSON_ID:?} ${ROBOT_ID:?} ${VERIFIER:?} ${HOT_TOKEN:?}"
export BENCH_VERIFIER_TOKEN=$VERIFIER

# write_report [STATUS]: the Markdown report (also on failure, with what ran).
write_report() {
  local status=${1:-complete}
  local elapsed=$(( $(date +%s) - started_at )) m
  ratio_rows=()
  ratio() { # "what" KEY_A KEY_B
    [ -n "${rps[$2]:-}" ] && [ -n "${rps[$3]:-}" ] || return 0
    ratio_rows+=("| $1 | $(fmt_ratio "${rps[$2]}" "${rps[$3]}") | $(fmt_ratio "${p99[$2]}" "${p99[$3]}") |")
  }
  for m in ${streams//,/ }; do
    ratio "hot, -m $m: VerifyToken / Health" "verify-m$m" "health-m$m"
  done
  ratio "hot, -m 1, cache off: VerifyToken / Health" verify-m1-nocache health-m1
  ratio "hot, loadgen: VerifyToken / Health" lg-verify lg-health
  ratio "cold: VerifyToken (each token once) / pgbench -S" cold pgbench
  ratio "scale hot: $scale_large stored / $scale_small stored" verify-large verify-m1
  ratio "scale cold: $scale_large stored / $scale_small stored" cold-large cold-small
  ratio "isolation: hot during sign-ins / hot idle" verify-signin verify-idle

  cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
  {
    echo "# identity benchmark: VerifyToken at the speed of a no-op RPC"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$repo" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted changes in src/')"
    echo "- machine: $(nproc) cores ($cpu_model), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); server, PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}') (fsync=off) and generators share it"
    echo "- verification cache: $([ "$cache_flag" = 1 ] && echo "present, capacity $cache_capacity" || echo "absent (no --cache-entries flag)")"
    echo "- load average before the run: $loadavg_at_start; total wall time: ${elapsed}s; run: $status"
    if [ ${#results_rows[@]} -gt 0 ]; then
      echo "- each run: ${duration}s measured after ${warmup}s warm-up; $connections connections; latencies in ms (nearest-rank percentiles of every call)"
      echo "- \"Other processes' CPU\" is the share of the machine's CPU time used during each run by processes the harness did not start (a concurrent build, say); runs at ${max_other_cpu}% or more (in bold, after $retries repeats) are not comparable"
      echo "- hot: the same token every call (a cache hit when there is a cache). cold: each token used once (a miss). Every VerifyToken also authenticates its caller (the verifier token, a hit when cached): with the cache off it is two indexed lookups, against pgbench's one"
      echo "- h2load sees only HTTP statuses: its runs are checked by data bytes / size of a successful answer, and by probes before and after; the loadgen counts gRPC codes and verdicts itself. The loadgen (a tonic client) needs more CPU than h2load on the shared cores: compare loadgen runs with loadgen runs"
    fi
    echo
    if [ ${#results_rows[@]} -gt 0 ]; then
      echo "| Scenario | Run | Generator | Calls/s | p50 | p99 | p99.9 | Success check | Other processes' CPU | Notes |"
      echo "|---|---|---|---:|---:|---:|---:|---|---:|---|"
      printf '%s\n' "${results_rows[@]}"
    fi
    if [ ${#ratio_rows[@]} -gt 0 ]; then
      echo
      echo "| Ratio | Throughput | p99 latency |"
      echo "|---|---:|---:|"
      printf '%s\n' "${ratio_rows[@]}"
    fi
    if [ -n "$propagation_line" ]; then
      echo
      echo "Revocation propagation (3 replicas; delay from RevokeToken returning on A until B and C both answer active: false, polling back to back; ms):"
      echo
      echo "| Revocations | p50 | p99 | max | inactive at first poll | timeouts | still active on A | polls of B and C | status |"
      echo "|---:|---:|---:|---:|---:|---:|---:|---:|---|"
      echo "$propagation_line"
    fi
    if [ ${#memory_rows[@]} -gt 0 ]; then
      echo
      echo "| Resident memory (VmRSS) | MiB | Notes |"
      echo "|---|---:|---|"
      printf '%s\n' "${memory_rows[@]}"
    fi
    if [ -n "$soak_section" ]; then
      echo
      echo "## Soak"
      echo
      printf '%s\n' "$soak_section"
    fi
  } >"$out.tmp"
  mv "$out.tmp" "$out"
}

# --- helpers -----------------------------------------------------------------------
# kv KEY < text: the value of KEY=value in a `RESULT ...` line.
kv() { grep '^RESULT ' | tr ' ' '\n' | sed -n "s/^$1=//p" | head -n 1; }
# Percentiles (nearest rank) of column 3 (latency, microseconds) of h2load's
# --log-file and of pgbench's per-transaction logs alike.
percentiles() {
  python3 - "$@" <<'EOF'
import math, sys
values = []
for path in sys.argv[1:]:
    with open(path) as f:
        for line in f:
            cols = line.split()
            if len(cols) >= 3:
                values.append(int(float(cols[2])))
values.sort()
def pct(p):
    if not values:
        return 0
    return values[min(len(values), max(1, math.ceil(p * len(values)))) - 1]
mean = sum(values) / len(values) if values else 0
print(f"n={len(values)} p50={pct(.5)} p90={pct(.9)} p99={pct(.99)} p999={pct(.999)} max={values[-1] if values else 0} mean={mean:.0f}")
EOF
}
# grpc_frame FILE [field:value ...]: a gRPC length-prefixed frame of a
# protobuf message made of string fields.
grpc_frame() {
  python3 - "$@" <<'EOF'
import struct, sys
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
msg = b""
for arg in sys.argv[2:]:
    field, value = arg.split(":", 1)
    data = value.encode()
    msg += varint(int(field) << 3 | 2) + varint(len(data)) + data
with open(sys.argv[1], "wb") as f:
    f.write(b"\x00" + struct.pack(">I", len(msg)) + msg)
EOF
}
fmt_int() { awk -v v="$1" 'BEGIN { printf "%.0f", v }'; }
fmt_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'; }
us_ms() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }

# CPU used by processes this script did not start, during a measurement:
# the machine is shared (a build running next to the benchmark halves it).
# cpu_mark before, cpu_foreign after; the share of the machine's CPU time
# that went to others is reported next to each run.
cpu_sample() {
  python3 - "$$" "$(head -n 1 "$pg_data/postmaster.pid" 2>/dev/null || echo 0)" <<'EOF'
import os, sys, time
roots = [int(p) for p in sys.argv[1:] if int(p) > 0]
with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:9]]
# user + nice + system: time charged to processes. Interrupt time (mostly
# the loopback traffic of the benchmark itself) is charged to nobody, and
# steal time is another virtual machine's, so neither counts.
busy = v[0] + v[1] + v[2]
procs = {}
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        with open(f"/proc/{d}/stat") as f:
            st = f.read()
    except OSError:
        continue
    rest = st[st.rindex(")") + 2:].split()
    procs[int(d)] = (int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14]))
children = {}
for pid, (ppid, _, _) in procs.items():
    children.setdefault(ppid, []).append(pid)
ours, seen, stack = 0, set(), list(roots)
while stack:
    pid = stack.pop()
    if pid in seen or pid not in procs:
        continue
    seen.add(pid)
    ours += procs[pid][1]
    stack.extend(children.get(pid, []))
# Reaped children (finished generators, closed backends) count for their parent.
ours += sum(procs[r][2] for r in roots if r in procs)
print(busy, ours, time.monotonic(), os.cpu_count())
EOF
}
# contended KEY ATTEMPT: true (after a pause) when the run just measured
# should be repeated because other processes took too much of the CPU.
contended() {
  [ "${foreign_pct:-0}" -ge "$max_other_cpu" ] || return 1
  [ "$2" -lt "$retries" ] || return 1
  log "$1: other processes used ${foreign_pct}% of the CPU during the run: repeating it in 5 s ($(( $2 + 1 ))/$retries)"
  sleep 5
}
cpu_mark() { read -r mark_busy mark_ours mark_time _ < <(cpu_sample); }
foreign_pct=""
cpu_foreign() {
  local busy ours now cores
  read -r busy ours now cores < <(cpu_sample)
  foreign_pct=$(awk -v b=$((busy - mark_busy)) -v o=$((ours - mark_ours)) -v t="$now" -v t0="$mark_time" \
    -v c="$cores" -v hz="$(getconf CLK_TCK)" 'BEGIN { f = (b - o) / hz / ((t - t0) * c) * 100; if (f < 0) f = 0; printf "%.0f", f }')
}

declare -A rps p50 p99 p999 check
# record KEY "scenario" "run" "generator" RPS P50 P99 P999 "check" "notes"
record() {
  local key=$1
  rps[$key]=$5; p50[$key]=$6; p99[$key]=$7; p999[$key]=$8; check[$key]=$9
  local other="${foreign_pct:-?}%"
  [ "${foreign_pct:-0}" -ge "$max_other_cpu" ] && other="**$other**"
  results_rows+=("| $2 | $3 | $4 | $(fmt_int "$5") | $(us_ms "$6") | $(us_ms "$7") | $(us_ms "$8") | $9 | $other | ${10} |")
  log "$2 / $3: $(fmt_int "$5")/s p50 $(us_ms "$6") ms p99 $(us_ms "$7") ms p99.9 $(us_ms "$8") ms [$9] (other processes: ${foreign_pct:-?}% of the CPU)"
}

frame_dir=$work/frames
mkdir -p "$frame_dir"
grpc_frame "$frame_dir/health.bin"
grpc_frame "$frame_dir/verify-hot.bin" "1:$HOT_TOKEN"
probe_health=$("$loadgen" probe --target "${replica_url[A]}" --rpc health)
probe_verify=$("$loadgen" probe --target "${replica_url[A]}" --token "$HOT_TOKEN" --expect active)
health_frame=$(kv frame_bytes <<<"$probe_health")
verify_frame=$(kv frame_bytes <<<"$probe_verify")
log "a successful answer is $health_frame bytes (Health/Check) and $verify_frame bytes (VerifyToken, active)"

# h2load_run KEY "scenario" "run" PATH BODY EXPECTED_FRAME STREAMS [url] [authorization]
h2load_run() {
  local key=$1 scenario=$2 run=$3 path=$4 body=$5 frame=$6 m=$7 url=${8:-${replica_url[A]}} auth=${9:-}
  local raw=$work/h2load-$key.txt logf=$work/h2load-$key.log
  local -a headers=(-H 'content-type: application/grpc' -H 'te: trailers')
  [ -n "$auth" ] && headers+=(-H "authorization: Bearer $auth")
  # The warm-up is a separate, discarded run: h2load 1.52 counts the data
  # bytes of its own --warm-up-time in the totals, which would spoil the
  # bytes-per-response check below.
  local attempt
  for attempt in $(seq 0 "$retries"); do
    if [ "$warmup" -gt 0 ]; then
      run_fg timeout $((warmup + 60)) h2load -c "$connections" -m "$m" -t 1 -D "$warmup" -d "$body" \
        "${headers[@]}" "$url$path" >"$raw.warmup" 2>&1 || { cat "$raw.warmup" >&2; die "h2load $key (warm-up) failed"; }
    fi
    cpu_mark
    run_fg timeout $((duration + 60)) h2load -c "$connections" -m "$m" -t 1 \
      -D "$duration" -d "$body" "${headers[@]}" \
      --log-file "$logf" "$url$path" >"$raw" 2>&1 || { cat "$raw" >&2; die "h2load $key failed"; }
    cpu_foreign
    contended "$key" "$attempt" || break
  done
  local r ndone succeeded failed codes data per
  r=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$raw")
  read -r ndone succeeded failed < <(sed -n 's/^requests: [0-9]* total, [0-9]* started, \([0-9]*\) done, \([0-9]*\) succeeded, \([0-9]*\) failed.*/\1 \2 \3/p' "$raw")
  codes=$(sed -n 's/^status codes: //p' "$raw")
  data=$(sed -n 's/^traffic: .*(\([0-9]*\)) data$/\1/p' "$raw")
  # h2load sees only HTTP statuses (always 200 for gRPC). A successful call
  # returns exactly one response frame of $frame bytes; a gRPC error is a
  # trailers-only response with no data. So data bytes / frame size counts
  # the successful calls; "missing" ones are gRPC errors (negative: data of
  # calls still in flight when the run stopped).
  local missing
  missing=$(awk -v d="$data" -v n="$succeeded" -v f="$frame" 'BEGIN { printf "%d", n - d / f }')
  per=$(awk -v d="$data" -v n="$succeeded" 'BEGIN { if (n > 0) printf "%.2f", d / n; else print 0 }')
  local ok="OK: every response $frame B (a success)"
  if [ "$missing" -lt 0 ]; then
    ok="OK: every response $frame B (+$(( -missing )) in flight at the end)"
  fi
  if [ "$failed" != 0 ] || [ "$succeeded" = 0 ] || [ "$missing" -gt 0 ]; then
    ok="**MISMATCH**: $per B/resp vs $frame B success frame, $missing calls without a response message; $failed failed; $codes"
  fi
  local pc
  pc=$(percentiles "$logf")
  record "$key" "$scenario" "$run" "h2load -c $connections -m $m" "$r" \
    "$(echo "$pc" | tr ' ' '\n' | sed -n 's/^p50=//p')" \
    "$(echo "$pc" | tr ' ' '\n' | sed -n 's/^p99=//p')" \
    "$(echo "$pc" | tr ' ' '\n' | sed -n 's/^p999=//p')" "$ok" "$ndone calls"
}

# loadgen_run KEY "scenario" "run" "notes" [loadgen load args...]
loadgen_run() {
  local key=$1 scenario=$2 run=$3 notes=$4; shift 4
  local raw=$work/loadgen-$key.txt attempt tries=$retries
  # A run that uses each token once cannot be repeated: the tokens are spent
  # (and cached).
  [[ " $* " == *" --once "* ]] && tries=0
  for attempt in $(seq 0 "$tries"); do
    cpu_mark
    run_fg timeout $((duration + warmup + 600)) "$loadgen" load --duration "${duration}s" --warmup "${warmup}s" \
      --concurrency "$connections" "$@" >"$raw" 2>"$raw.err" || { cat "$raw.err" >&2; die "loadgen $key failed"; }
    cpu_foreign
    [ "$attempt" -lt "$tries" ] || break
    contended "$key" "$attempt" || break
  done
  cat "$raw.err" >&2
  local errors wrong codes ok exhausted
  errors=$(kv errors <"$raw"); wrong=$(kv wrong <"$raw"); codes=$(kv codes <"$raw")
  exhausted=$(kv exhausted <"$raw")
  ok="OK: codes $codes; verdicts $(kv verdicts <"$raw")"
  [ "$errors" = 0 ] && [ "$wrong" = 0 ] || ok="**ERRORS**: codes $codes; wrong verdicts $wrong"
  if [ "$exhausted" = true ]; then
    notes="${notes:+$notes; }every token used: stopped after $(kv seconds <"$raw") s"
  fi
  record "$key" "$scenario" "$run" "loadgen -c $connections" "$(kv rps <"$raw")" "$(kv p50_us <"$raw")" \
    "$(kv p99_us <"$raw")" "$(kv p999_us <"$raw")" "$ok" "$(kv requests <"$raw") calls${notes:+; $notes}"
}

# add_tokens ACCOUNT PREFIX COUNT TOKENS_FILE [--revoked]: generates COUNT
# valid (or revoked) tokens and bulk-loads their rows.
add_tokens() {
  local account=$1 prefix=$2 count=$3 file=$4; shift 4
  [ "$count" -gt 0 ] || { : >"$file"; return 0; }
  local res columns
  res=$("$loadgen" gen-tokens --count "$count" --account-id "$account" --name-prefix "$prefix" \
    --tokens-out "$file" --csv-out "$file.csv" "$@")
  columns=$(kv columns <<<"$res")
  psql_q -c "\\copy tokens ($columns) FROM '$file.csv' WITH (FORMAT csv)"
  rm -f "$file.csv"
}
token_rows() { psql_v -c 'SELECT count(*) FROM tokens'; }

# Replica with the cache off (for the scale scenario's cold runs): A itself
# when the binary has no cache.
nocache=A
nocache_note="no cache in this binary"
ensure_nocache_replica() {
  [ "$cache_flag" = 1 ] || return 0
  [ -n "${replica_pid[N]:-}" ] && return 0
  if start_replica N --cache-entries 0; then
    nocache=N
    nocache_note="replica started with --cache-entries 0"
  else
    nocache_note="**--cache-entries 0 refused: ran on A, cache on (hits possible)**"
  fi
}

# =============================================================================
# Phase 1: the small table (scale_small tokens stored).
# =============================================================================
tokens_dir=$work/tokens
mkdir -p "$tokens_dir"
# 100 revoked tokens for the mixed run, then valid ones up to scale_small.
add_tokens "$PERSON_ID" revoked 100 "$tokens_dir/revoked.txt" --revoked
small_fill=$(( scale_small - $(token_rows) ))
[ "$small_fill" -ge 1 ] || die "--scale-sizes small size must exceed the $(token_rows) tokens setup creates"
log "phase 1: $scale_small tokens stored ($small_fill generated)"
add_tokens "$PERSON_ID" scale "$small_fill" "$tokens_dir/scale.txt"
psql_q -c 'VACUUM ANALYZE'
echo "$HOT_TOKEN" >"$tokens_dir/hot.txt"

ran_hot_m1=0
hot_m1() {
  # Hot path with one stream per connection: shared by hot, scale and isolation.
  [ "$ran_hot_m1" = 1 ] && return 0
  h2load_run health-m1 "hot" "Health/Check (baseline)" /grpc.health.v1.Health/Check \
    "$frame_dir/health.bin" "$health_frame" 1
  h2load_run verify-m1 "hot" "VerifyToken, 1 token, $scale_small stored" /identity.v1.TokensService/VerifyToken \
    "$frame_dir/verify-hot.bin" "$verify_frame" 1 "" "$VERIFIER"
  ran_hot_m1=1
}

if want hot || want scale; then
  log "hot path: h2load, -c $connections, streams $streams"
  hot_m1
fi
if want hot; then
  for m in ${streams//,/ }; do
    [ "$m" = 1 ] && continue
    h2load_run "health-m$m" "hot" "Health/Check (baseline)" /grpc.health.v1.Health/Check \
      "$frame_dir/health.bin" "$health_frame" "$m"
    h2load_run "verify-m$m" "hot" "VerifyToken, 1 token" /identity.v1.TokensService/VerifyToken \
      "$frame_dir/verify-hot.bin" "$verify_frame" "$m" "" "$VERIFIER"
  done
  if [ "$cache_flag" = 1 ]; then
    ensure_nocache_replica
    if [ "$nocache" = N ]; then
      h2load_run verify-m1-nocache "hot" "VerifyToken, 1 token, cache off (replica N)" \
        /identity.v1.TokensService/VerifyToken "$frame_dir/verify-hot.bin" "$verify_frame" 1 \
        "${replica_url[N]}" "$VERIFIER"
    fi
  fi
  log "hot path cross-check with the loadgen"
  loadgen_run lg-health "hot" "Health/Check (baseline)" "" --target "${replica_url[A]}" --rpc health
  loadgen_run lg-verify "hot" "VerifyToken, 1 token" "" --target "${replica_url[A]}" \
    --tokens-file "$tokens_dir/hot.txt"
  log "hot path with a realistic mix (loadgen)"
  loadgen_run lg-mix "hot" "VerifyToken, mix valid:90,unknown:5,revoked:5 over $small_fill tokens" "" \
    --target "${replica_url[A]}" --tokens-file "$tokens_dir/scale.txt" \
    --revoked-file "$tokens_dir/revoked.txt" --mix valid:90,unknown:5,revoked:5
  "$loadgen" probe --target "${replica_url[A]}" --token "$HOT_TOKEN" --expect active >/dev/null ||
    die "the hot token is not active after the hot runs"
fi
rss_a_hot=$(rss_kb "${replica_pid[A]}")

if want scale; then
  ensure_nocache_replica
  log "scale: cold path with $scale_small tokens stored (replica $nocache)"
  loadgen_run cold-small "scale" "VerifyToken cold, cycling $small_fill tokens, $scale_small stored" \
    "$nocache_note" --target "${replica_url[$nocache]}" --tokens-file "$tokens_dir/scale.txt"
fi

# =============================================================================
# Phase 2: the cold path (a pool of tokens each used at most once).
# =============================================================================
pool_size=0
if want cold; then pool_size=$cold_tokens; fi
if want memory && [ "$cache_capacity" -gt "$pool_size" ]; then pool_size=$cache_capacity; fi
if [ "$pool_size" -gt 0 ]; then
  log "phase 2: generating and loading $pool_size distinct tokens"
  add_tokens "$PERSON_ID" cold "$pool_size" "$tokens_dir/cold.txt"
  psql_q -c 'VACUUM ANALYZE tokens'
  head -n "$cold_tokens" "$tokens_dir/cold.txt" >"$tokens_dir/cold-run.txt"
fi

if want cold; then
  log "cold path: $cold_tokens distinct tokens, each used at most once"
  loadgen_run cold "cold" "VerifyToken, each token once, $(token_rows) stored" "" \
    --target "${replica_url[A]}" --tokens-file "$tokens_dir/cold-run.txt" --once
  log "pgbench -i -s $pgbench_scale, then pgbench -S -c $connections -j 2 -T $duration"
  run_fg "$pgbin/pgbench" -i -q -s "$pgbench_scale" identity >"$work/pgbench-init.txt" 2>&1 ||
    { cat "$work/pgbench-init.txt" >&2; die "pgbench -i failed"; }
  run_fg "$pgbin/pgbench" -S -M prepared -n -c "$connections" -j 2 -T "$warmup" identity >/dev/null 2>&1 || true
  pgb_dir=$work/pgbench-log
  mkdir -p "$pgb_dir"
  for attempt in $(seq 0 "$retries"); do
    rm -f "$pgb_dir"/pgb.*
    cpu_mark
    run_fg timeout $((duration + 60)) sh -c 'cd "$1" && shift && exec "$@"' pgbench "$pgb_dir" \
      "$pgbin/pgbench" -S -M prepared -n -c "$connections" -j 2 \
      -T "$duration" -l --log-prefix=pgb identity >"$work/pgbench.txt" 2>&1 ||
      { cat "$work/pgbench.txt" >&2; die "pgbench -S failed"; }
    cpu_foreign
    contended pgbench "$attempt" || break
  done
  pgb_tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$work/pgbench.txt")
  pgb_failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$work/pgbench.txt")
  pc=$(percentiles "$pgb_dir"/pgb.*)
  record pgbench "cold" "pgbench -S (1 indexed SELECT), $((pgbench_scale * 100000)) rows" \
    "pgbench -c $connections -j 2 -M prepared" "$pgb_tps" \
    "$(echo "$pc" | tr ' ' '\n' | sed -n 's/^p50=//p')" "$(echo "$pc" | tr ' ' '\n' | sed -n 's/^p99=//p')" \
    "$(echo "$pc" | tr ' ' '\n' | sed -n 's/^p999=//p')" "OK: ${pgb_failed:-0} failed" \
    "$(echo "$pc" | tr ' ' '\n' | sed -n 's/^n=//p') transactions"
  rm -rf "$pgb_dir"
fi
rss_a_cold=$(rss_kb "${replica_pid[A]}")

if want memory; then
  memory_rows+=("| A, just started (idle) | $(fmt_mib "$rss_a_idle") | |")
  memory_rows+=("| A, after the hot runs | $(fmt_mib "$rss_a_hot") | |")
  memory_rows+=("| A, after the cold run | $(fmt_mib "$rss_a_cold") | $(want cold && echo "$(kv used <"$work/loadgen-cold.txt") distinct tokens verified (warm-up included)" || echo "cold not run") |")
  if [ "$cache_flag" = 1 ] && [ "$cache_capacity" -gt 0 ]; then
    fill_args=()
    [ "$cache_ttl_flag" = 1 ] && fill_args=(--cache-ttl 1h)
    if ! start_replica M "${fill_args[@]}"; then
      fill_args=()
      start_replica M || die "replica M did not start"
    fi
    rss_m_idle=$(rss_kb "${replica_pid[M]}")
    head -n "$cache_capacity" "$tokens_dir/cold.txt" >"$tokens_dir/fill.txt"
    log "memory: filling replica M's cache with $cache_capacity distinct tokens"
    fill_raw=$work/loadgen-fill.txt
    run_fg timeout 900 "$loadgen" load --target "${replica_url[M]}" --tokens-file "$tokens_dir/fill.txt" --once \
      --concurrency "$connections" --duration 600s --warmup 0s >"$fill_raw" 2>"$fill_raw.err" ||
      { cat "$fill_raw.err" >&2; die "the cache fill failed"; }
    cat "$fill_raw.err" >&2
    rss_m_full=$(rss_kb "${replica_pid[M]}")
    memory_rows+=("| M (${fill_args[*]:-default settings}), just started | $(fmt_mib "$rss_m_idle") | |")
    memory_rows+=("| M, after verifying $cache_capacity distinct tokens (= cache capacity) | $(fmt_mib "$rss_m_full") | +$(fmt_mib $((rss_m_full - rss_m_idle))) MiB, $(awk -v d=$((rss_m_full - rss_m_idle)) -v n="$cache_capacity" 'BEGIN { printf "%.0f", d * 1024 / n }') B/entry; fill took $(kv seconds <"$fill_raw") s at $(fmt_int "$(kv rps <"$fill_raw")")/s, errors $(kv errors <"$fill_raw") |")
  else
    memory_rows+=("| (cache fill) | n/a | no cache in this binary: the cold-run figure above is the one to compare |")
  fi
fi

if want isolation; then
  log "isolation: hot path idle, then while signing in at full speed ($signin_concurrency in parallel)"
  h2load_run verify-idle "isolation" "VerifyToken, 1 token, idle (reference)" \
    /identity.v1.TokensService/VerifyToken "$frame_dir/verify-hot.bin" "$verify_frame" 1 "" "$VERIFIER"
  signin_raw=$work/loadgen-signin.txt
  "$loadgen" load --target "${replica_url[A]}" --rpc sign-in --concurrency "$signin_concurrency" \
    --duration "$((duration + 2 * warmup + 2))s" --warmup 0s >"$signin_raw" 2>"$signin_raw.err" &
  signin_pid=$!
  pids+=("$signin_pid")
  sleep "$((warmup + 1))"
  # No repeat: the sign-ins would be over.
  saved_retries=$retries
  retries=0
  h2load_run verify-signin "isolation" "VerifyToken, 1 token, during sign-ins" \
    /identity.v1.TokensService/VerifyToken "$frame_dir/verify-hot.bin" "$verify_frame" 1 "" "$VERIFIER"
  retries=$saved_retries
  wait "$signin_pid" || { cat "$signin_raw.err" >&2; die "the sign-in generator failed"; }
  cat "$signin_raw.err" >&2
  signin_ok="OK: codes $(kv codes <"$signin_raw")"
  [ "$(kv errors <"$signin_raw")" = 0 ] || signin_ok="**ERRORS**: codes $(kv codes <"$signin_raw")"
  record signin "isolation" "SignIn in parallel (argon2id)" "loadgen -c $signin_concurrency" \
    "$(kv rps <"$signin_raw")" "$(kv p50_us <"$signin_raw")" "$(kv p99_us <"$signin_raw")" \
    "$(kv p999_us <"$signin_raw")" "$signin_ok" "$(kv requests <"$signin_raw") sign-ins"
  if want memory; then
    memory_rows+=("| A, after the isolation run | $(fmt_mib "$(rss_kb "${replica_pid[A]}")") | $(kv requests <"$signin_raw") sign-ins: argon2id (19 MiB per hash) on the blocking pool |")
  fi
fi

# =============================================================================
# Phase 3: the large table.
# =============================================================================
if want scale; then
  current=$(token_rows)
  filler=$(( scale_large - current ))
  if [ "$filler" -gt 0 ]; then
    log "phase 3: inserting $filler filler rows (generate_series) to reach $scale_large tokens"
    now_us=$(( $(date +%s) * 1000000 ))
    # Filler rows: random digests (SHA-256 of a random UUID), owned by the robot.
    cat >"$work/filler.sql" <<'SQL'
INSERT INTO tokens (token_id, account_id, name, live_name, digest, scopes, create_time, expire_time, family_id)
SELECT id, :'acct', 'filler-' || g, 'filler-' || g, sha256(convert_to(id, 'UTF8')), '', :now, :exp, id
FROM (SELECT g, gen_random_uuid()::text AS id FROM generate_series(1, :n) AS g) AS s;
VACUUM ANALYZE tokens;
SQL
    run_fg psql_q -v acct="$ROBOT_ID" -v n="$filler" -v now="$now_us" \
      -v exp="$(( now_us + 30 * 86400 * 1000000 ))" -f "$work/filler.sql"
  else
    log "phase 3: $current tokens already stored (>= $scale_large): no filler"
  fi
  stored=$(token_rows)
  log "scale: $stored tokens stored"
  # Fresh replicas, as A and N were when they measured the small table, so
  # that only the table differs (A has served the cold run and the sign-ins
  # since).
  start_replica L || die "replica L did not start"
  h2load_run verify-large "scale" "VerifyToken, 1 token, $stored stored (fresh replica L)" \
    /identity.v1.TokensService/VerifyToken "$frame_dir/verify-hot.bin" "$verify_frame" 1 \
    "${replica_url[L]}" "$VERIFIER"
  large_cold=L
  large_note=$nocache_note
  if [ "$nocache" = N ]; then
    start_replica L0 --cache-entries 0 || die "replica L0 did not start"
    large_cold=L0
    large_note="fresh replica started with --cache-entries 0"
  fi
  loadgen_run cold-large "scale" "VerifyToken cold, cycling $small_fill tokens, $stored stored" \
    "$large_note" --target "${replica_url[$large_cold]}" --tokens-file "$tokens_dir/scale.txt"
fi

if want propagation; then
  start_replica B || die "replica B did not start"
  start_replica C || die "replica C did not start"
  log "propagation: $revocations revocations on A, polled on B and C"
  prop_raw=$work/loadgen-propagation.txt
  prop_status=OK
  run_fg timeout 900 "$loadgen" propagation --targets "${replica_url[A]},${replica_url[B]},${replica_url[C]}" \
    --account-id "$PERSON_ID" --count "$revocations" >"$prop_raw" 2>"$prop_raw.err" || prop_status="**FAILED**"
  cat "$prop_raw.err" >&2
  [ -n "$(kv revocations <"$prop_raw")" ] || die "the propagation run produced no result"
  propagation_line="| $(kv revocations <"$prop_raw") | $(us_ms "$(kv p50_us <"$prop_raw")") | $(us_ms "$(kv p99_us <"$prop_raw")") | $(us_ms "$(kv max_us <"$prop_raw")") | $(kv first_poll <"$prop_raw") | $(kv timeouts <"$prop_raw") | $(kv stale_on_revoker <"$prop_raw") | $(kv polls <"$prop_raw") | $prop_status |"
fi

if want soak; then
  soak_flags=()
  soak_cache=0
  if [ "$cache_flag" = 1 ]; then
    soak_flags=(--cache-entries "$soak_cache_entries")
    soak_cache=$soak_cache_entries
  fi
  start_replica S0 "${soak_flags[@]}" || die "replica S0 did not start"
  start_replica S1 "${soak_flags[@]}" || die "replica S1 did not start"
  soak_cmd="bash benches/run.sh -s $scenarios --soak-duration $soak_duration --soak-connections $soak_connections${soak_mix:+ --soak-mix $soak_mix} --soak-cache-entries $soak_cache_entries"
  log "soak: $soak_duration against replicas S0 and S1 ($soak_connections connections, --cache-entries $soak_cache)"
  soak_raw=$work/loadgen-soak.txt
  soak_rc=0
  soak_load_before=$(cut -d' ' -f1-3 /proc/loadavg)
  soak_started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  cpu_mark
  run_fg timeout $((soak_secs + 600)) "$loadgen" soak \
    --targets "${replica_url[S0]},${replica_url[S1]}" --pids "${replica_pid[S0]},${replica_pid[S1]}" \
    --account-id "$PERSON_ID" --tokens-file "$tokens_dir/scale.txt" --duration "$soak_duration" \
    --connections "$soak_connections" ${soak_mix:+--mix "$soak_mix"} --cache-entries "$soak_cache" \
    --report "$work/soak.md" >"$soak_raw" 2>"$soak_raw.err" || soak_rc=$?
  cpu_foreign
  # The replicas' own complaints during the soak (WARN and ERROR lines).
  soak_logs=""
  for r in S0 S1; do
    f=$work/replica-$r.log
    soak_logs+="$r: $(grep -c ' WARN ' "$f" || true) WARN, $(grep -c ' ERROR ' "$f" || true) ERROR; "
    our_child "${replica_pid[$r]}" || soak_logs+="**$r is no longer running**; "
  done
  soak_section="- command: \`$soak_cmd\`; started $soak_started; commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')
- machine: $(nproc) cores, shared: the two replicas, PostgreSQL and the generator run on it, and processes the harness did not start used ${foreign_pct:-?}% of the CPU during the soak (load average $soak_load_before before, $(cut -d' ' -f1-3 /proc/loadavg) after)
- replicas' logs: ${soak_logs%; }
"
  if [ -s "$work/soak.md" ]; then
    soak_section+=$'\n'"$(cat "$work/soak.md")"
  else
    soak_section+=$'\n'"**the soak produced no report**: $(tail -n 5 "$soak_raw.err")"
  fi
  if [ "$soak_rc" != 0 ]; then
    tail -n 20 "$soak_raw.err" >&2
    write_report "FAILED: the soak failed"
    reported=1
    cat "$out"
    die "the soak failed (exit status $soak_rc): $(kv status <"$soak_raw" || true) - see the Soak section of $out"
  fi
  log "soak passed: $(grep '^RESULT ' "$soak_raw")"
fi

# =============================================================================
# Report.
# =============================================================================
write_report
reported=1
cat "$out"
log "report written to $out ($(( $(date +%s) - started_at ))s)"
