#!/usr/bin/env bash
# Installs PostgreSQL from Debian's packages, starts a throw-away server on 127.0.0.1 (as the postgres
# user, data in a temp dir, fsync off: test data only) and writes .ci/postgres.env with
# CZREG_TEST_POSTGRES_URL for the registry tests. Safe to run twice: a server it started earlier is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${CZREG_PG_PORT:-54329}"
DATA="${CZREG_PG_DATA:-${TMPDIR:-/tmp}/czreg-postgres-$PORT}"
DB=czreg_test
ENV_FILE=.ci/postgres.env

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    as_root apt-get update -q
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q postgresql
fi
BIN="$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)")"

# The server refuses to run as root: run it as the postgres user the Debian package created.
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    pg() { (cd / && runuser -u postgres -- "$@"); }  # from /: the checkout may be closed to postgres
else
    pg() { "$@"; }
fi

if ! pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    rm -rf "$DATA"
    mkdir -p "$DATA"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$DATA"
    pg "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --no-sync >/dev/null
    pg "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$DATA -c fsync=off \
            -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" >/dev/null
fi

"$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" \
    | grep -q 1 || "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"

echo "CZREG_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$PORT/$DB" > "$ENV_FILE"
echo "PostgreSQL ready: $(cat "$ENV_FILE")"
