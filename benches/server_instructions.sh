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
# Two tables: the calls made from a PL/pgSQL loop, planned once (what each function
# costs), and the calls as top-level statements with their arguments as literals (what
# `append_in` costs, which sends its call unprepared: parse, analysis and plan
# included), next to raw's INSERT prepared once and run with `EXECUTE`.
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

# Instructions of a single-user backend that reads the statements that `$1` prints for
# `$2` calls (500 warm-up calls first, which are also counted alone and subtracted),
# divided by `$2`.
count() {
  local run="$work/run"
  per_call() {
    rm -rf "$run"
    as_pg cp -a "$work/base" "$run"
    "$1" "$2" >"$run.sql"
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
  echo $((($(per_call "$1" $((500 + $2))) - $(per_call "$1" 500)) / $2))
}

# `$1` calls of `$call` from a PL/pgSQL loop, each its own transaction: the call is
# planned once, so this is what the function itself costs.
call=
in_loop() {
  printf 'DO $$ DECLARE s text; BEGIN FOR i IN 1..%d LOOP s := %s; PERFORM %s; COMMIT; END LOOP; END $$;\n' \
    "$1" "'s-' || (i % 1000)" "$call"
}

# `$1` top-level statements `$statement` (with `%d`, the stream's number), each its own
# transaction: what a client that sends the call unprepared costs the server, parse,
# analysis and plan included.
statement=
top_level() {
  [ -n "${prepare:-}" ] && echo "$prepare"
  for i in $(seq 1 "$1"); do printf "$statement\n" $((i % 1000)); done
}

echo "Inside a PL/pgSQL loop (the call planned once: the function's own work)"
printf "%-38s %12s %10s\n" function "instr/call" "raw/this"
raw=0
for f in raw.append_in eventstore.append_in_events eventstore.append_in_any \
  eventstore.append_in_events_record eventstore.append_in_any_record; do
  fargs="s, ARRAY[gen_random_uuid()], ARRAY['E'], ARRAY['{\"a\":1}'::jsonb], ARRAY[NULL::jsonb], 0, 0, 'c'"
  case "$f" in
    *_record) call="$f($fargs)" ;;
    *) call="* FROM $f($fargs)" ;;
  esac
  per=$(count in_loop "$calls")
  [ "$raw" = 0 ] && raw=$per
  printf "%-38s %12d %10.3f\n" "$f" "$per" "$(echo "$raw / $per" | bc -l)"
done

echo
echo "As top-level statements, the arguments as literals (what append_in sends, parsed"
echo "and planned at every call; raw as a prepared INSERT that computes the next version)"
printf "%-38s %12s %10s\n" statement "instr/call" "raw/this"
prepare="PREPARE raw_insert(uuid, text, text, jsonb, jsonb) AS INSERT INTO raw.events (event_id, stream_id, version, event_type, data, metadata) SELECT \$1, \$2, COALESCE(max(version), -1) + 1, \$3, \$4, \$5 FROM raw.events WHERE stream_id = \$2;"
statement="EXECUTE raw_insert(gen_random_uuid(), 's-%d', 'E', '{\"a\":1}', NULL);"
raw=$(count top_level "$calls")
printf "%-38s %12d %10.3f\n" "EXECUTE raw_insert" "$raw" 1
prepare=
for f in "SELECT * FROM eventstore.append_in_any" "SELECT eventstore.append_in_any_record"; do
  statement="$f('s-%d'::text, ARRAY[gen_random_uuid()], ARRAY['E'], ARRAY['{\"a\":1}'::jsonb], ARRAY[NULL::jsonb], 0, 0::bigint, 'c'::text);"
  per=$(count top_level "$calls")
  printf "%-38s %12d %10.3f\n" "$f" "$per" "$(echo "$raw / $per" | bc -l)"
done
