#!/usr/bin/env bash
# Installs (apt, if missing) and starts on loopback the servers cachecar needs in development,
# tests and CI: PostgreSQL 15 (Debian cluster 15/main, via pg_ctlcluster, no systemd) and a
# Redis-protocol server (redis-server --daemonize yes). Creates the cachecar role and the demo
# and test databases. Safe to run again: it reuses whatever already runs.
#
# usage: deploy/local/services.sh [up|install|down]
set -euo pipefail

PG_VERSION=15
PG_CLUSTER=main
PG_PORT=${PG_PORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}
DB_USER=${DB_USER:-cachecar}
DB_PASSWORD=${DB_PASSWORD:-cachecar}
DB_NAME=${DB_NAME:-cachecar}
TEST_DB_NAME=${TEST_DB_NAME:-cachecar_test}
VAR_DIR=${VAR_DIR:-$(pwd)/var}
EXTRA_PACKAGES=${EXTRA_PACKAGES:-}

log() { printf 'services: %s\n' "$*" >&2; }

install() {
  local missing=()
  [ -x /usr/lib/postgresql/$PG_VERSION/bin/postgres ] || missing+=(postgresql-$PG_VERSION)
  command -v psql >/dev/null 2>&1 || missing+=(postgresql-client-$PG_VERSION)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
  for p in $EXTRA_PACKAGES; do
    command -v "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      log "missing ${missing[*]} and not root: install them with apt-get, or run as root"
      exit 1
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

pg_up() {
  if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$PG_VERSION $PG_CLUSTER"; then
    log "creating PostgreSQL cluster $PG_VERSION/$PG_CLUSTER on port $PG_PORT"
    pg_createcluster -p "$PG_PORT" "$PG_VERSION" "$PG_CLUSTER" >/dev/null
  fi
  local port status
  port=$(pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1==v && $2==c {print $3}')
  status=$(pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1==v && $2==c {print $4}')
  if [ "$port" != "$PG_PORT" ]; then
    log "cluster $PG_VERSION/$PG_CLUSTER listens on $port, not $PG_PORT; set PG_PORT=$port"
    exit 1
  fi
  # make bench times invalidation from each write's commit timestamp (pg_xact_commit_timestamp),
  # which PostgreSQL records only with track_commit_timestamp on. Set once; a running cluster is
  # restarted for it that one time.
  if [ "$(pg_conftool -s "$PG_VERSION" "$PG_CLUSTER" postgresql.conf show track_commit_timestamp 2>/dev/null)" != on ]; then
    pg_conftool "$PG_VERSION" "$PG_CLUSTER" postgresql.conf set track_commit_timestamp on
    if [ "$status" = online ]; then
      log "restarting PostgreSQL $PG_VERSION/$PG_CLUSTER once to turn on track_commit_timestamp"
      pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" restart
    fi
  fi
  if [ "$status" != online ]; then
    log "starting PostgreSQL $PG_VERSION/$PG_CLUSTER"
    pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start
  fi
  for _ in $(seq 1 50); do
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break
    sleep 0.2
  done
  pg_isready -q -h 127.0.0.1 -p "$PG_PORT" || { log "PostgreSQL did not come up on 127.0.0.1:$PG_PORT"; exit 1; }
  psql_admin -c "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER') THEN
        CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASSWORD';
      END IF;
    END \$\$;" >/dev/null
  for db in "$DB_NAME" "$TEST_DB_NAME"; do
    if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
      log "creating database $db"
      psql_admin -c "CREATE DATABASE $db OWNER $DB_USER" >/dev/null
    fi
  done
}

psql_admin() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" "$@"
  else
    psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"
  fi
}

redis_up() {
  if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
    return
  fi
  mkdir -p "$VAR_DIR/redis"
  log "starting redis-server on 127.0.0.1:$REDIS_PORT"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save '' --appendonly no \
    --dir "$VAR_DIR/redis" --pidfile "$VAR_DIR/redis/redis.pid" --logfile "$VAR_DIR/redis/redis.log"
  for _ in $(seq 1 50); do
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && return
    sleep 0.1
  done
  log "redis-server did not come up on 127.0.0.1:$REDIS_PORT; see $VAR_DIR/redis/redis.log"
  exit 1
}

down() {
  # Stops only what this script started: the redis-server by its pidfile, and the cluster.
  if [ -f "$VAR_DIR/redis/redis.pid" ]; then
    kill "$(cat "$VAR_DIR/redis/redis.pid")" 2>/dev/null || true
    rm -f "$VAR_DIR/redis/redis.pid"
  fi
  pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" stop 2>/dev/null || true
}

case "${1:-up}" in
  install) install ;;
  up) install; pg_up; redis_up ;;
  down) down ;;
  *) echo "usage: $0 [up|install|down]" >&2; exit 2 ;;
esac
