#!/usr/bin/env bash
# One page of the operators' fleet-wide views at a million tokens (issue 12).
#
#   bash benches/fleet_page.sh [--release]
#
# Starts a throwaway PostgreSQL cluster (initdb under /tmp, fsync off, as the
# `postgres` user when run as root), migrates it with `identity migrate`,
# bootstraps an operator, loads 1000 robot accounts, 1,000,000 tokens (1000
# per account, the accounts interleaved over the id range) and 1,000,000
# audit events (one a second, the newest now) straight in with SQL
# generate_series, starts `identity serve` on it, and runs the client
# (benches/fleet_page.rs), which times BENCH_RUNS (50) calls of each case
# through a real tonic channel and prints medians, the ratio to the
# per-account listing and the EXPLAIN ANALYZE of the deep pages. Uses the
# debug build unless --release. Everything it starts is stopped and the
# cluster deleted when it exits. Not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=debug
[ "${1:-}" = --release ] && profile=release
pgbin=/usr/lib/postgresql/15/bin
[ -x "$pgbin/initdb" ] || { echo "fleet_page.sh: PostgreSQL 15 binaries not found in $pgbin" >&2; exit 1; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
log() { echo "[fleet_page $(date +%T)] $*" >&2; }

work=$(mktemp -d /tmp/fleet-page.XXXXXX)
chmod 755 "$work"
[ "$(id -u)" = 0 ] && chown postgres "$work"
server_pid=""
pg_started=0
cleanup() {
  set +e
  [ -n "$server_pid" ] && kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  [ "$pg_started" = 1 ] && as_pg "$pgbin/pg_ctl" -D "$work/data" -m fast stop >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

# --- build --------------------------------------------------------------------
cargo_flags=(--locked)
[ "$profile" = release ] && cargo_flags+=(--release)
log "build identity and the client ($profile)"
cargo build "${cargo_flags[@]}" --bin identity >&2
client=$(cargo build "${cargo_flags[@]}" --bench fleet_page --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "fleet_page" and m.get("executable"):
        print(m["executable"])')
identity_bin=target/$profile/identity

# --- database -----------------------------------------------------------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log "initdb + start PostgreSQL on 127.0.0.1:$port"
as_pg "$pgbin/initdb" -D "$work/data" -A trust -U postgres --no-sync -E UTF8 --locale=C >"$work/initdb.log" 2>&1
pg_started=1
as_pg "$pgbin/pg_ctl" -D "$work/data" -l "$work/postgres.log" -w -t 60 \
  -o "-p $port -c listen_addresses=127.0.0.1 -k $work -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=256MB -c maintenance_work_mem=256MB" \
  start >/dev/null
export PGHOST=127.0.0.1 PGPORT=$port PGUSER=postgres
"$pgbin/createdb" identity
export DATABASE_URL="postgres://postgres@127.0.0.1:$port/identity"
IDENTITY_LOG=warn "$identity_bin" migrate
ops=$(IDENTITY_LOG=warn "$identity_bin" bootstrap-operator --username bench-ops)

now_us=$(( $(date +%s) * 1000000 ))
log "load 1000 accounts, 1,000,000 tokens and 1,000,000 audit events"
load_started=$(date +%s)
"$pgbin/psql" -X -q -v ON_ERROR_STOP=1 -d identity -v now="$now_us" <<'SQL'
INSERT INTO accounts (account_id, username, username_key, kind, role, create_time)
SELECT '00000000-0000-7000-a000-' || lpad(to_hex(a), 12, '0'), 'bench-robot-' || a,
       'bench-robot-' || a, 'robot', 'user', :now
FROM generate_series(1, 1000) AS a;
INSERT INTO tokens (token_id, account_id, name, live_name, digest, scopes, create_time,
                    expire_time, family_id)
SELECT id, '00000000-0000-7000-a000-' || lpad(to_hex(i % 1000 + 1), 12, '0'), 'bulk-' || i,
       'bulk-' || i, decode(md5(i::text) || md5('x' || i), 'hex'), 'project:read',
       :now - (1000000 - i)::bigint * 1000000, :now + (i % 90 + 1) * 86400000000, id
FROM (SELECT i, '00000000-0000-7000-8000-' || lpad(to_hex(i), 12, '0') AS id
      FROM generate_series(1, 1000000) AS i) AS n;
INSERT INTO audit_events (event_id, event_time, event_type, outcome, actor_account_id,
                          subject_account_id, subject_credential_id)
SELECT '00000000-0000-7000-9000-' || lpad(to_hex(i), 12, '0'), :now - (1000000 - i)::bigint * 1000000,
       'token.created', 'success', '00000000-0000-7000-a000-' || lpad(to_hex(i % 1000 + 1), 12, '0'),
       '00000000-0000-7000-a000-' || lpad(to_hex(i % 1000 + 1), 12, '0'),
       '00000000-0000-7000-8000-' || lpad(to_hex(i), 12, '0')
FROM generate_series(1, 1000000) AS i;
VACUUM ANALYZE;
SQL
log "loaded in $(( $(date +%s) - load_started ))s"

# --- server and client ----------------------------------------------------------
IDENTITY_LISTEN_ADDR=127.0.0.1:0 IDENTITY_LOG=info IDENTITY_METRICS_ADDR=off \
  "$identity_bin" serve >"$work/server.log" 2>&1 &
server_pid=$!
addr=""
for _ in $(seq 300); do
  addr=$(grep 'identity::app: serving' "$work/server.log" | grep -o ' addr=[0-9.:]*' | head -n 1 | cut -d= -f2 || true)
  [ -n "$addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/server.log" >&2; exit 1; }
log "server ($profile) on $addr; timing"
BENCH_TARGET=http://$addr BENCH_OPERATOR_TOKEN=$ops \
  BENCH_ACCOUNT=00000000-0000-7000-a000-000000000001 "$client"
