#!/usr/bin/env bash
# A 20-second window of where a running benchmark's PostgreSQL and
# processes spend their time, for diagnosing a soak (BENCHMARKS.md, "What
# the soak's decline was made of"):
#
#   bash benches/pg_window.sh OUT_DIR [PORT]
#
# PORT: the benchmark cluster's (default: the first postgres listening on
# 127.0.0.1). Writes, in OUT_DIR: table and index statistics, relation
# sizes, pg_stat_activity's waits, pg_stat_database before and after, the
# statements of the window (pg_stat_statements, reset at its start: run the
# benchmark with BENCH_PG_SETTINGS="shared_preload_libraries =
# 'pg_stat_statements'"), and a system-wide profile (perf record -a -g)
# with its report by process and by symbol. Run as root.
set -u
out=$1
mkdir -p "$out"
port=${2:-$(ss -ltnp | grep postgres | grep -o '127.0.0.1:[0-9]*' | head -n 1 | cut -d: -f2)}
[ -n "$port" ] || { echo "pg_window.sh: no PostgreSQL listening on 127.0.0.1" >&2; exit 1; }
q() {
  runuser -u postgres -- /usr/lib/postgresql/15/bin/psql -h 127.0.0.1 -p "$port" -d identity \
    -X -A -F ' | ' -c "$1"
}
{ echo "port=$port"; date -u; uptime; } > "$out/info"
q "SELECT relname, n_live_tup, n_dead_tup, n_tup_upd, n_tup_hot_upd, seq_scan, seq_tup_read,
   idx_scan, autovacuum_count, last_autovacuum FROM pg_stat_user_tables ORDER BY relname" \
  > "$out/tables.txt" 2>&1
q "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c
   JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' ORDER BY 2 DESC" \
  > "$out/sizes.txt" 2>&1
q "SELECT indexrelname, idx_scan, idx_tup_read, idx_tup_fetch FROM pg_stat_user_indexes
   ORDER BY 1" > "$out/indexes.txt" 2>&1
q "SELECT state, wait_event_type, wait_event, count(*) FROM pg_stat_activity
   GROUP BY 1, 2, 3 ORDER BY 4 DESC" > "$out/activity.txt" 2>&1
database="SELECT xact_commit, blks_hit, tup_returned, tup_fetched, tup_updated, tup_inserted
   FROM pg_stat_database WHERE datname = 'identity'"
q "$database" > "$out/database-before.txt" 2>&1
q "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" > /dev/null 2>&1
q "SELECT pg_stat_statements_reset()" > /dev/null 2>&1
perf record -a -g -F 299 -o "$out/perf.data" -- sleep 20 > /dev/null 2>&1
q "$database" > "$out/database-after.txt" 2>&1
q "SELECT calls, round(total_exec_time::numeric, 1) AS total_ms,
   round(mean_exec_time::numeric, 3) AS mean_ms, rows, shared_blks_hit,
   left(regexp_replace(query, '\s+', ' ', 'g'), 160) FROM pg_stat_statements
   ORDER BY total_exec_time DESC LIMIT 25" > "$out/statements.txt" 2>&1
perf report -i "$out/perf.data" --sort comm --stdio --no-children -g none 2>/dev/null |
  grep -v '^#' | grep -v '^$' | head -n 20 > "$out/by-process.txt"
perf report -i "$out/perf.data" --sort comm,sym --stdio --no-children -g none 2>/dev/null |
  grep -v '^#' | grep -v '^$' | head -n 120 > "$out/by-symbol.txt"
