#!/usr/bin/env bash
# Server instructions per appending transaction, as a client sends it over the protocol
# (Parse/Bind/Execute, begin and commit included), counted by callgrind in the backend
# that serves it. Where `server_instructions.sh` counts one `append_in` call in a
# single-user backend, this counts what a real connection costs the server for each
# path, next to the load generator's raw statements:
#
#   bash benches/protocol_instructions.sh [mode ...]
#
# Modes (default all): raw-in-tx, append-in, prepared-appends (the A workloads' paths:
# one event in a transaction of its own, `ExpectedVersion::Any`), raw-autocommit and
# pool-exact (W1's: a single append with the version known), as described at the top of
# `benches/protocol_client.rs`, which is the client. For each mode the client runs 300
# and then 1,300 appends on a fresh schema, and the script prints the difference of the
# serving backend's instructions divided by 1,000. It repeats to about 0.1 % whatever
# else the machine does; it counts no disk flush (`fsync` is off), no waiting and no
# client work, so use the load generator for throughput.
#
# Needs valgrind and the PostgreSQL server binaries (as `server_instructions.sh`); runs
# the server as `postgres` when run as root, on port 5434 of 127.0.0.1, in a temporary
# directory that it removes. Takes about a minute per mode.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(raw-in-tx prepared-appends append-in raw-autocommit pool-exact)
bin=$(pg_config --bindir 2>/dev/null || true)
if [ ! -x "$bin/initdb" ]; then
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
port=5434

(cd "$here" && cargo build -q --release --bench protocol_client)
client() { (cd "$here" && cargo bench -q --bench protocol_client -- "$@"); }

work=$(mktemp -d /tmp/protocol-instructions.XXXXXX)
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
stop() {
  as_pg "$bin/pg_ctl" -D "$work/base" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap stop EXIT
[ "$(id -u)" = 0 ] && chown postgres "$work"
as_pg mkdir "$work/cg"
as_pg "$bin/initdb" -D "$work/base" -A trust -U postgres >/dev/null
# The postmaster under callgrind, which follows its forks: one file per backend.
as_pg setsid -f bash -c "exec valgrind --tool=callgrind --trace-children=yes \
  --callgrind-out-file=$work/cg/cg.%p $bin/postgres -D $work/base -p $port -k $work \
  -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
  -c full_page_writes=off -c autovacuum=off >$work/log 2>&1 </dev/null"
export PROTOCOL_CLIENT_URL="postgres://postgres@127.0.0.1:$port/postgres"
psql=(psql -X -q -h 127.0.0.1 -p "$port" -U postgres postgres)
for _ in $(seq 1 120); do "${psql[@]}" -c "SELECT 1" >/dev/null 2>&1 && break; sleep 1; done

# The instructions of backend `$1`, once it has ended and callgrind has written them.
instructions() {
  local file="$work/cg/cg.$1"
  for _ in $(seq 1 120); do
    if [ -f "$file" ] && grep -q "^totals:" "$file"; then
      grep "^totals:" "$file" | awk '{print $2}'
      return
    fi
    sleep 1
  done
  echo "no count for backend $1" >&2
  exit 1
}

printf "%-18s %14s\n" mode "instr/append"
for mode in "${modes[@]}"; do
  declare -A total=()
  for n in 300 1300; do
    "${psql[@]}" -c "DROP SCHEMA IF EXISTS eventstore CASCADE" >/dev/null 2>&1
    pid=$(client "$mode" "$n" | tail -1)
    total[$n]=$(instructions "$pid")
  done
  printf "%-18s %14d\n" "$mode" $(((total[1300] - total[300]) / 1000))
done
