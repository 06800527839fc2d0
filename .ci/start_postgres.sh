#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the shared-Optuna-study tests.
#   bash .ci/start_postgres.sh         install postgresql if its binaries are missing (apt-get, as
#                                      root), start a server on 127.0.0.1 with its data under /tmp,
#                                      create a user and a database, print the SQLAlchemy URL
#   bash .ci/start_postgres.sh stop    stop that server (the data folder stays for the next start)
# Idempotent: a server already running from the same data folder is reused. Progress goes to
# stderr; stdout carries the URL alone, so that .ci/run can do
#   url="$(bash .ci/start_postgres.sh)" && export SUMM_TEST_POSTGRES_URL="$url"
# Settings (environment): SUMM_PG_DATA (/tmp/summ-postgres), SUMM_PG_PORT (5433; the next free
# port when taken by something else), SUMM_PG_USER / SUMM_PG_PASSWORD (summ / summ),
# SUMM_PG_DB (summ_test), SUMM_PG_DRIVER (psycopg: SQLAlchemy's psycopg 3 dialect).
set -euo pipefail

DATA="${SUMM_PG_DATA:-/tmp/summ-postgres}"
PORT="${SUMM_PG_PORT:-5433}"
DB_USER="${SUMM_PG_USER:-summ}"
DB_PASSWORD="${SUMM_PG_PASSWORD:-summ}"
DB_NAME="${SUMM_PG_DB:-summ_test}"
DRIVER="${SUMM_PG_DRIVER:-psycopg}"

say() { echo "start_postgres: $*" >&2; }

find_bindir() {  # the newest PostgreSQL server binaries: Debian's layout first, then PATH
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x "$dir/pg_ctl" && -x "$dir/initdb" && -x "$dir/postgres" ]] && { echo "$dir"; return 0; }
    done
    if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return 0
    fi
    return 1
}

BIN="$(find_bindir || true)"
if [[ -z "$BIN" ]]; then
    [[ "$(id -u)" == 0 ]] || { say "PostgreSQL is not installed; run as root or: apt-get install postgresql"; exit 1; }
    say "installing postgresql (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends postgresql >&2
    BIN="$(find_bindir)" || { say "no pg_ctl after installing postgresql"; exit 1; }
fi

# The server refuses to run as root: as root, run it as the `postgres` system user (Debian's
# package creates it; created here when only the binaries are present).
if [[ "$(id -u)" == 0 ]]; then
    RUN_AS=postgres
    id -u "$RUN_AS" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$RUN_AS"
    as_owner() { runuser -u "$RUN_AS" -- "$@"; }
else
    as_owner() { "$@"; }
fi
pg() { as_owner "$BIN/pg_ctl" -D "$DATA" "$@"; }

if [[ "${1:-}" == stop ]]; then
    if [[ -f "$DATA/postmaster.pid" ]] && pg status >/dev/null 2>&1; then
        pg -m fast -w stop >&2
    else
        say "no server running from $DATA"
    fi
    exit 0
fi

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [[ -f "$DATA/PG_VERSION" ]] && pg status >/dev/null 2>&1; then
    PORT="$(sed -n 4p "$DATA/postmaster.pid")"
    say "reusing the server running from $DATA on 127.0.0.1:$PORT"
else
    if [[ ! -f "$DATA/PG_VERSION" ]]; then
        say "initdb $DATA"
        rm -rf "$DATA"
        mkdir -p "$DATA"
        if [[ "$(id -u)" == 0 ]]; then chown "$RUN_AS:" "$DATA"; fi
        chmod 700 "$DATA"
        # local (socket) connections trust the OS user; TCP needs a password (scram-sha-256)
        as_owner "$BIN/initdb" -D "$DATA" --username=postgres --encoding=UTF8 --no-locale \
            --auth-local=trust --auth-host=scram-sha-256 >"$DATA.initdb.log" 2>&1 \
            || { cat "$DATA.initdb.log" >&2; exit 1; }
    fi
    for _ in $(seq 50); do
        port_in_use "$PORT" || break
        say "port $PORT is taken; trying $((PORT + 1))"
        PORT=$((PORT + 1))
    done
    # a test server: loopback only, its socket in its own folder, durability traded for speed
    cat >"$DATA/postgresql.auto.conf" <<EOF
# written by .ci/start_postgres.sh at each start
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DATA'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    if [[ "$(id -u)" == 0 ]]; then chown "$RUN_AS:" "$DATA/postgresql.auto.conf"; fi
    say "starting PostgreSQL ($BIN) on 127.0.0.1:$PORT"
    pg -l "$DATA/server.log" -w -t 60 start >&2 || { tail -n 30 "$DATA/server.log" >&2; exit 1; }
fi

psql_admin() {
    as_owner "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DATA" -p "$PORT" -U postgres -d postgres "$@"
}
psql_admin -v user="$DB_USER" -v password="$DB_PASSWORD" -v db="$DB_NAME" >&2 <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'user', :'password')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'user', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL

# what the tests will do: a password login over TCP
PGPASSWORD="$DB_PASSWORD" "$BIN/psql" -X -q -At -h 127.0.0.1 -p "$PORT" -U "$DB_USER" -d "$DB_NAME" \
    -c 'SELECT 1' >/dev/null || { say "cannot log in as $DB_USER over TCP"; exit 1; }
say "ready: database $DB_NAME, user $DB_USER on 127.0.0.1:$PORT"
echo "postgresql+$DRIVER://$DB_USER:$DB_PASSWORD@127.0.0.1:$PORT/$DB_NAME"
