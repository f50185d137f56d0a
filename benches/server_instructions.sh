#!/usr/bin/env bash
# Server instructions per `append_in` call, counted by callgrind: repeatable to a
# fraction of a percent whatever else the machine does, unlike the load generator's
# timings. It measures what one statement costs the server, not round trips, commits
# to disk or concurrency: use it to compare statement shapes, and the load generator
# for throughput.
#
#   bash benches/server_instructions.sh [schema.sql] [calls]
#
# For each function below, a single-user PostgreSQL backend (no network, no other
# session) runs 500 warm-up calls, then `calls` more (default 2000), each its own
# transaction, with one event for one of 1,000 streams; the script prints the
# instructions of the extra calls divided by their number, and the ratio of "raw" to
# each. "raw" is the load generator's raw side for the A workloads: one INSERT that
# computes the next stream version, into a table with the same keys, in a PL/pgSQL
# function that returns the same 13 columns.
#
# Needs valgrind and the PostgreSQL server binaries (initdb, postgres, pg_ctl: taken
# from `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin). As root it runs
# them as the user `postgres`. Nothing outside a temporary directory is touched.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
schema_file=$(realpath "${1:-$here/schema/eventstore.sql}")
calls=${2:-2000}
bin=$(pg_config --bindir 2>/dev/null || true)
if [ ! -x "$bin/initdb" ]; then
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }

work=$(mktemp -d /tmp/server-instructions.XXXXXX)
trap 'rm -rf "$work"' EXIT
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
[ "$(id -u)" = 0 ] && chown postgres "$work"

as_pg "$bin/initdb" -D "$work/base" -A trust -U postgres >/dev/null
as_pg "$bin/pg_ctl" -D "$work/base" -l "$work/log" -w \
  -o "-p 5433 -k $work -c listen_addresses=''" start >/dev/null
psql=(psql -X -q -v ON_ERROR_STOP=1 -h "$work" -p 5433 -U postgres postgres)
"${psql[@]}" -f "$schema_file" >/dev/null
"${psql[@]}" >/dev/null <<'SQL'
CREATE SCHEMA raw;
CREATE TABLE raw.events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    stream_id text NOT NULL,
    version bigint NOT NULL,
    event_type text NOT NULL,
    data jsonb NOT NULL,
    metadata jsonb,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_id, version));
CREATE FUNCTION raw.append_in(text, uuid[], text[], jsonb[], jsonb[], integer, bigint, text)
RETURNS TABLE (inserted bigint, first_position bigint, last_position bigint, head bigint,
               tx_events bigint, dup_streams text[], dup_versions bigint[],
               dup_positions bigint[], dup_index bigint[], dup_same boolean,
               order_conflict boolean, behind_floor boolean, watched bigint)
LANGUAGE plpgsql VOLATILE AS $body$
BEGIN
    RETURN QUERY INSERT INTO raw.events AS e (event_id, stream_id, version, event_type, data, metadata)
        SELECT $2[1], $1, COALESCE(max(r.version), -1) + 1, $3[1], $4[1], $5[1]
          FROM raw.events r WHERE r.stream_id = $1
        RETURNING 1::bigint, e.id, e.id, e.version - 1, 1::bigint,
                  NULL::text[], NULL::bigint[], NULL::bigint[], NULL::bigint[], NULL::boolean,
                  false, false, 0::bigint;
END
$body$;
SQL
as_pg "$bin/pg_ctl" -D "$work/base" -w stop >/dev/null

# Instructions of a backend that runs 500 warm-up calls of $1 and then $2 more.
count() {
  local run="$work/run-$2"
  rm -rf "$run"
  as_pg cp -a "$work/base" "$run"
  local loop='DO $$ DECLARE s text; BEGIN FOR i IN 1..%d LOOP s := '"'"'s-'"'"' || (i %% 1000); PERFORM * FROM %s(s, ARRAY[gen_random_uuid()], ARRAY['"'"'E'"'"'], ARRAY['"'"'{"a":1}'"'"'::jsonb], ARRAY[NULL::jsonb], 0, 0, '"'"'c'"'"'); COMMIT; END LOOP; END $$;\n'
  {
    printf "$loop" 500 "$1"
    [ "$2" -gt 0 ] && printf "$loop" "$2" "$1"
  } >"$run.sql"
  as_pg valgrind --tool=callgrind --callgrind-out-file="$run.out" \
    "$bin/postgres" --single -D "$run" -c fsync=off -c synchronous_commit=off \
    -c full_page_writes=off postgres <"$run.sql" >"$run.log" 2>&1
  if grep -q "ERROR" "$run.log"; then
    grep "ERROR" "$run.log" >&2
    exit 1
  fi
  grep -o "Collected : [0-9]*" "$run.log" | awk '{print $3}'
  as_pg rm -rf "$run"
}

printf "%-38s %12s %10s\n" function "instr/call" "raw/this"
raw=0
for f in raw.append_in eventstore.append_in_events eventstore.append_in_any; do
  per=$((($(count "$f" "$calls") - $(count "$f" 0)) / calls))
  [ "$raw" = 0 ] && raw=$per
  printf "%-38s %12d %10.3f\n" "$f" "$per" "$(echo "$raw / $per" | bc -l)"
done
