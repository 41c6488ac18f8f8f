#!/usr/bin/env bash
# Makes sure Redis 7 and PostgreSQL with the pgvector extension answer on 127.0.0.1, installing and starting
# them when missing, and that Prometheus and promtool are installed. Idempotent and quick when everything is
# already up.
#
# - Where a Docker engine answers: `docker compose -f deploy/compose.services.yml up -d --wait`.
# - Otherwise from the distribution's packages (Debian/Ubuntu, as root or with sudo). pgvector has no package on
#   Debian bookworm, so it is built from Debian trixie's source package against postgresql-server-dev.
#
# Environment: REDIS_PORT (6379), PGPORT (5432), PGUSER (postgres).
set -euo pipefail

REDIS_PORT=${REDIS_PORT:-6379}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}
export PGPORT PGUSER
export PGOPTIONS="-c client_min_messages=warning"
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

say() { printf '[services] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# apt-get one at a time: two set-ups at once (two clones' `make test`) would otherwise fail on dpkg's lock. The
# project's scripts queue on a lock of their own; anything else holding dpkg's is waited for up to 10 minutes.
apt_get() { as_root flock /var/lock/upload-pipeline-apt.lock apt-get -o DPkg::Lock::Timeout=600 "$@"; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    say "apt-get update"
    apt_get update -qq >/dev/null
    apt_updated=1
  fi
  say "installing $*"
  DEBIAN_FRONTEND=noninteractive apt_get install -y -qq --no-install-recommends "$@" >/dev/null
}

wait_until() { # wait_until <seconds> <command...>
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -q -h 127.0.0.1 -p "$PGPORT"; }
psql_q() { psql -h 127.0.0.1 -p "$PGPORT" -U "$PGUSER" -d postgres -v ON_ERROR_STOP=1 -qAtc "$1"; }

# Prometheus and promtool: the observability tests scrape a running fleet with a real Prometheus and check the
# rules and every /metrics with promtool. Debian's package ships both (on systemd hosts it also starts a service
# on :9090; the tests use servers of their own).
command -v promtool >/dev/null && command -v prometheus >/dev/null || apt_install prometheus

if docker info >/dev/null 2>&1; then
  say "a Docker engine answers: starting Postgres (pgvector) and Redis with compose"
  docker compose -f "$root/deploy/compose.services.yml" up -d --wait
  exit 0
fi

# The demo and contract scripts talk to the services with curl; the TLS tests make their certificates with openssl.
command -v curl >/dev/null || apt_install curl ca-certificates
command -v openssl >/dev/null || apt_install openssl

# ---- Redis --------------------------------------------------------------------------------------------------
if ! redis_up; then
  command -v redis-server >/dev/null || apt_install redis-server redis-tools
  say "starting redis-server on 127.0.0.1:$REDIS_PORT"
  mkdir -p /tmp/upload-pipeline-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
    --dir /tmp/upload-pipeline-redis --logfile /tmp/upload-pipeline-redis/redis.log
  wait_until 15 redis_up || { say "Redis did not answer on port $REDIS_PORT"; exit 1; }
fi
redis_version=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" info server | sed -n 's/^redis_version:\([0-9]*\).*/\1/p' | tr -d '\r')
if [ "${redis_version:-0}" -lt 7 ]; then
  say "Redis $redis_version answers on port $REDIS_PORT, but the queue needs Redis 7 or newer"; exit 1
fi

# ---- PostgreSQL ---------------------------------------------------------------------------------------------
start_postgres() {
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  [ -n "$version" ] || return 1
  say "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_until 30 pg_up
}
if ! pg_up; then
  command -v pg_ctlcluster >/dev/null && ls /etc/postgresql/*/main >/dev/null 2>&1 || apt_install postgresql postgresql-client
  start_postgres || { say "PostgreSQL did not start"; exit 1; }
fi
if ! psql_q 'select 1' >/dev/null 2>&1; then
  # A fresh package install authenticates TCP clients by password; allow local trust for development.
  hba=$(as_root su postgres -c "psql -qAtc 'show hba_file'")
  say "allowing trust authentication from 127.0.0.1 in $hba"
  as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  as_root su postgres -c "psql -qAtc 'select pg_reload_conf()'" >/dev/null
  wait_until 10 psql_q 'select 1' || { say "cannot connect to PostgreSQL as $PGUSER"; exit 1; }
fi

# ---- pgvector -----------------------------------------------------------------------------------------------
has_vector() { [ "$(psql_q "select count(*) from pg_available_extensions where name = 'vector'")" = 1 ]; }
if ! has_vector; then
  major=$(psql_q 'show server_version_num' | cut -c1-2)
  say "pgvector is missing: building it for PostgreSQL $major"
  apt_install "postgresql-server-dev-$major" build-essential dpkg-dev
  if ! grep -rqs 'trixie main' /etc/apt/sources.list.d/upload-pipeline-src.list; then
    echo 'deb-src http://deb.debian.org/debian trixie main' | as_root tee /etc/apt/sources.list.d/upload-pipeline-src.list >/dev/null
    apt_get update -qq >/dev/null
  fi
  build=$(mktemp -d)
  (cd "$build" && apt-get source --download-only pgvector >/dev/null 2>&1)
  tarball=$(ls "$build"/pgvector_*.orig.tar.* | head -n 1)
  tar -xf "$tarball" -C "$build"
  src=$(find "$build" -maxdepth 1 -mindepth 1 -type d | head -n 1)
  make -C "$src" -s PG_CONFIG="/usr/lib/postgresql/$major/bin/pg_config" >/dev/null
  as_root make -C "$src" -s install PG_CONFIG="/usr/lib/postgresql/$major/bin/pg_config" >/dev/null
  rm -rf "$build"
  # Installing the server-dev package can upgrade and stop the running server.
  pg_up || start_postgres || { say "PostgreSQL did not come back after the pgvector install"; exit 1; }
  has_vector || { say "pgvector still unavailable after the build"; exit 1; }
fi
# Prove the extensions load, in a scratch database of this run's own (two runs may set up at once): pgvector, and
# btree_gin (contrib, shipped with the server packages and the pgvector image) for keyword search's (user_id,
# tsv) index.
check_db="upload_pipeline_setup_check_$$"
psql_q "drop database if exists $check_db" >/dev/null
psql_q "create database $check_db" >/dev/null
psql -h 127.0.0.1 -p "$PGPORT" -U "$PGUSER" -d "$check_db" -v ON_ERROR_STOP=1 -qAtc \
  "create extension vector; create extension btree_gin; select '[1,2,3]'::vector <=> '[1,2,4]'::vector" >/dev/null
psql_q "drop database $check_db" >/dev/null

say "ready: Redis $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" info server | sed -n 's/^redis_version://p' | tr -d '\r') on :$REDIS_PORT, PostgreSQL $(psql_q 'show server_version' | cut -d' ' -f1) with pgvector $(psql_q "select default_version from pg_available_extensions where name = 'vector'") on :$PGPORT"
