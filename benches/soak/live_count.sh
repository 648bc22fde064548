#!/usr/bin/env bash
# The token limit's count of an account's live tokens (COUNT_LIVE_TOKENS in
# src/storage/sql/tokens.rs, run by every CreateToken) against the number of
# revoked tokens the account has: the statement before postgres migration
# 0013 (one scan of all the account's tokens) and after it (two ranges of
# tokens_account_live_idx), with 1,000 and with 400,000 revoked tokens, as
# the soak leaves its one bench account.
#
#   bash benches/soak/live_count.sh            # PGHOST, PGPORT, PGUSER as for psql
#
# Needs a PostgreSQL server it may create a database on (the one of
# `bash benches/run.sh --keep` will do, or any scratch cluster), psql and
# pgbench. It creates a scratch database, applies migrations/postgres with
# psql, loads the tokens, runs each statement for BENCH_SECS (5) seconds
# with pgbench (one client, prepared statements, as sqlx runs them), prints
# the mean latency of each, and drops the database.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${BENCH_SECS:-5}
db=identity_live_count_$$
createdb "$db"
trap 'dropdb --if-exists "$db"' EXIT
q() { psql -X -q -v ON_ERROR_STOP=1 -d "$db" "$@"; }
for f in migrations/postgres/00{01..11}_*.sql; do q -f "$f"; done
q <<'SQL'
INSERT INTO accounts (account_id, username, username_key, kind, role, create_time)
SELECT 'acct-' || g, 'u' || g, 'u' || g, 'person', 'user', 0 FROM generate_series(0, 99) g;
-- 1,000 live tokens of the measured account, 900 of each of 99 others.
INSERT INTO tokens (token_id, account_id, name, live_name, digest, create_time, family_id)
SELECT id, 'acct-0', 'l-' || g, 'l-' || g, sha256(convert_to(id, 'UTF8')), 3000000 + g, id
FROM (SELECT g, gen_random_uuid()::text AS id FROM generate_series(1, 1000) g) s;
INSERT INTO tokens (token_id, account_id, name, live_name, digest, create_time, family_id)
SELECT id, 'acct-' || (1 + g % 99), 'p-' || g, 'p-' || g, sha256(convert_to(id, 'UTF8')), 3000000 + g, id
FROM (SELECT g, gen_random_uuid()::text AS id FROM generate_series(1, 99 * 900) g) s;
SQL
old='SELECT count(*) FROM tokens WHERE account_id = $1 AND replaced_by IS NULL AND (revoke_time IS NULL OR revoke_time > $2) AND (expire_time IS NULL OR expire_time > $2) AND (uses_remaining IS NULL OR uses_remaining > 0)'
# The statement as src/storage/sql/tokens.rs has it now.
new=$(sed -n '/^pub(super) const COUNT_LIVE_TOKENS/,/";$/p' src/storage/sql/tokens.rs |
  sed -e '1s/.*= "//' -e 's/\\$//' -e 's/";$//' | tr -s ' \n' ' ')
run() { # label, statement
  local script
  script=$(mktemp)
  printf '%s\n' "\\set now 5000000000" \
    "$(printf '%s' "$2" | sed -e "s/\\\$1/'acct-0'/g" -e 's/\$2/:now/g');" >"$script"
  local lat
  lat=$(pgbench -n -M prepared -c 1 -T "$secs" -f "$script" "$db" 2>/dev/null |
    sed -n 's/^latency average = //p')
  rm -f "$script"
  printf '| %s | %s |\n' "$1" "$lat"
}
echo "| COUNT_LIVE_TOKENS, account with 1,000 live tokens | mean latency |"
echo "|---|---:|"
for revoked in 1000 400000; do
  q -c "INSERT INTO tokens (token_id, account_id, name, digest, create_time, revoke_time, family_id)
    SELECT id, 'acct-0', 'r-' || g, sha256(convert_to(id, 'UTF8')), 1000 + g, 2000000 + g, id
    FROM (SELECT g, gen_random_uuid()::text AS id
          FROM generate_series((SELECT count(*) FROM tokens WHERE revoke_time IS NOT NULL) + 1, $revoked) g) s"
  q -c 'VACUUM ANALYZE tokens'
  run "$revoked revoked, before 0013 (one scan of the account's tokens)" "$old"
  q -f migrations/postgres/0013_tokens_live_count_idx.sql
  q -c 'ANALYZE tokens'
  run "$revoked revoked, after 0013 (two ranges of tokens_account_live_idx)" "$new"
  q -c 'DROP INDEX tokens_account_live_idx'
done
