#!/usr/bin/env bash
# Makes PostgreSQL, Redis and a Kafka-protocol broker (Nisshi) available on
# loopback, idempotently: reuse what is already running; else start what is
# installed; else install it (apt-get for PostgreSQL and Redis, cargo for
# Nisshi).
#
#   scripts/services.sh up        bring all three up (and create database `rtap`)
#   scripts/services.sh cluster   also a Redis Cluster on loopback: 6 nodes,
#                                 3 primaries and 3 replicas (reused if up)
#   scripts/services.sh cluster-node PORT
#                                 restart one stopped node of that cluster (it
#                                 rejoins from its nodes.conf; tests kill nodes)
#   scripts/services.sh down      stop what this script started
#   scripts/services.sh status    say what is reachable
#
# Ports: RTAP_POSTGRES_PORT (5432), RTAP_REDIS_PORT (6379), RTAP_KAFKA_PORT
# (9092), RTAP_REDIS_CLUSTER_PORT (7000: the cluster's nodes take 7000-7005).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN_DIR=${RTAP_RUN_DIR:-$ROOT/.run}
PG_PORT=${RTAP_POSTGRES_PORT:-5432}
REDIS_PORT=${RTAP_REDIS_PORT:-6379}
KAFKA_PORT=${RTAP_KAFKA_PORT:-9092}
CLUSTER_PORT=${RTAP_REDIS_CLUSTER_PORT:-7000}
CLUSTER_NODES=6
NISSHI_VERSION=0.7.0-pre.2
export PGPASSWORD=${PGPASSWORD:-postgres}

log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() { # port name seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$1" && return 0
    sleep 0.1
  done
  die "$2 did not open port $1 within $3 s (see $RUN_DIR/*.log)"
}

apt_install() {
  command -v apt-get >/dev/null || die "cannot install $*: no apt-get here; install it by hand"
  log "installing $* with apt-get"
  if [[ ! -f "$RUN_DIR/.apt-updated" ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    touch "$RUN_DIR/.apt-updated"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2 || die "apt-get install $* failed"
}

pg_ready() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; }

postgres_up() {
  if ! command -v pg_ctlcluster >/dev/null; then
    apt_install postgresql postgresql-client
    touch "$RUN_DIR/postgres.installed"
  fi
  if ! pg_ready; then
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    [[ -n $version ]] || die "PostgreSQL is installed but has no cluster in /etc/postgresql"
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 \
      || die "PostgreSQL $version did not start (see /var/log/postgresql/)"
    touch "$RUN_DIR/postgres.started"
    local i
    for ((i = 0; i < 100; i++)); do pg_ready && break; sleep 0.1; done
    pg_ready || die "PostgreSQL did not accept connections on port $PG_PORT"
  fi
  # A freshly installed server has password auth on TCP: give the `postgres`
  # role the password of the default DATABASE_URL (a no-op under trust auth).
  if [[ -f "$RUN_DIR/postgres.installed" && ! -f "$RUN_DIR/postgres.password" ]]; then
    runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'" >&2 \
      || die "cannot set the postgres password"
    touch "$RUN_DIR/postgres.password"
  fi
  local psql=(psql -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tA)
  if [[ $("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'rtap'") != 1 ]]; then
    "${psql[@]}" -c 'CREATE DATABASE rtap' >&2 || die "cannot create database rtap"
    log "created database rtap"
  fi
  log "PostgreSQL ready on 127.0.0.1:$PG_PORT"
}

redis_up() {
  if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    log "Redis ready on 127.0.0.1:$REDIS_PORT"
    return
  fi
  if ! command -v redis-server >/dev/null; then
    apt_install redis-server redis-tools
    # The package may have started a server of its own.
    if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
      log "Redis ready on 127.0.0.1:$REDIS_PORT"
      return
    fi
  fi
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$RUN_DIR" --logfile "$RUN_DIR/redis.log" --pidfile "$RUN_DIR/redis.pid" >&2 \
    || die "Redis did not start (see $RUN_DIR/redis.log)"
  touch "$RUN_DIR/redis.started"
  wait_for_port "$REDIS_PORT" Redis 10
  log "Redis ready on 127.0.0.1:$REDIS_PORT"
}

cluster_ports() { seq "$CLUSTER_PORT" $((CLUSTER_PORT + CLUSTER_NODES - 1)); }

cluster_ok() {
  redis-cli -h 127.0.0.1 -p "$CLUSTER_PORT" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

# Whether every primary has its replica and no node is failing: what the
# failover tests need.
cluster_whole() {
  local nodes
  nodes=$(redis-cli -h 127.0.0.1 -p "$CLUSTER_PORT" cluster nodes 2>/dev/null) || return 1
  ! grep -q 'fail' <<<"$nodes" || return 1
  [[ $(awk '$3 ~ /master/ && NF > 8' <<<"$nodes" | wc -l) -eq $((CLUSTER_NODES / 2)) ]] || return 1
  [[ $(awk '$3 ~ /slave/ { print $4 }' <<<"$nodes" | sort -u | wc -l) -eq $((CLUSTER_NODES / 2)) ]]
}

# A Redis Cluster of six redis-server processes (3 primaries, 3 replicas)
# with a short node timeout, so tests can fail a primary over in seconds.
# Nodes a test stopped rejoin; a cluster that does not come back whole (a
# primary and its replica both lost) is made again from scratch.
cluster_up() {
  command -v redis-server >/dev/null || apt_install redis-server redis-tools
  local port i
  if [[ -d $RUN_DIR/cluster ]]; then
    for port in $(cluster_ports); do
      port_open "$port" || cluster_node "$port"
      # Replicas fail over however long they were apart from their primary.
      redis-cli -h 127.0.0.1 -p "$port" config set cluster-replica-validity-factor 0 >/dev/null 2>&1 || true
    done
    for ((i = 0; i < 100; i++)); do cluster_ok && cluster_whole && break; sleep 0.1; done
    if cluster_ok && cluster_whole; then
      log "Redis Cluster ready on 127.0.0.1:$CLUSTER_PORT-$((CLUSTER_PORT + CLUSTER_NODES - 1))"
      return
    fi
    log "the Redis Cluster is not whole; making it again"
    for port in $(cluster_ports); do
      redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
    done
    for port in $(cluster_ports); do
      for ((i = 0; i < 50; i++)); do port_open "$port" || break; sleep 0.1; done
    done
    rm -rf "$RUN_DIR/cluster"
  elif cluster_ok; then
    log "Redis Cluster ready on 127.0.0.1:$CLUSTER_PORT-$((CLUSTER_PORT + CLUSTER_NODES - 1))"
    return
  fi
  local nodes=()
  for port in $(cluster_ports); do
    nodes+=("127.0.0.1:$port")
    port_open "$port" && die "port $port is taken by something that is not this cluster"
    cluster_node "$port"
  done
  log "creating the Redis Cluster"
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$RUN_DIR/cluster-create.log" 2>&1 \
    || die "redis-cli --cluster create failed (see $RUN_DIR/cluster-create.log)"
  for ((i = 0; i < 100; i++)); do cluster_ok && break; sleep 0.1; done
  cluster_ok || die "the Redis Cluster did not reach cluster_state:ok"
  log "Redis Cluster ready on 127.0.0.1:$CLUSTER_PORT-$((CLUSTER_PORT + CLUSTER_NODES - 1))"
}

# Starts the cluster node on port $1 (as a new node, or rejoining from the
# nodes.conf it left).
cluster_node() {
  local port=$1 dir="$RUN_DIR/cluster/$1"
  port_open "$port" && return 0
  mkdir -p "$dir"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" --cluster-node-timeout 2000 \
    --cluster-replica-validity-factor 0 \
    --dir "$dir" --logfile "$dir/redis.log" --pidfile "$dir/redis.pid" >&2 \
    || die "Redis Cluster node $port did not start (see $dir/redis.log)"
  touch "$RUN_DIR/cluster.started"
  wait_for_port "$port" "Redis Cluster node" 10
}

cluster_down() {
  [[ -f $RUN_DIR/cluster.started ]] || return 0
  log "stopping the Redis Cluster"
  local port
  for port in $(cluster_ports); do
    redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
  done
  rm -rf "$RUN_DIR/cluster" "$RUN_DIR/cluster.started"
}

nisshi_installed() { nisshi --version 2>/dev/null | grep -qF "$NISSHI_VERSION"; }

kafka_up() {
  export PATH="$HOME/.cargo/bin:$PATH"
  if port_open "$KAFKA_PORT"; then
    log "Kafka broker ready on 127.0.0.1:$KAFKA_PORT"
    return
  fi
  if ! nisshi_installed; then
    log "installing Nisshi $NISSHI_VERSION with cargo (8-9 minutes, once)"
    cargo install nisshi --version "$NISSHI_VERSION" --locked --features dynostore,libsql >&2 \
      || die "cargo install nisshi failed"
  fi
  # Nisshi reads a .env in its working directory: give it an empty one.
  local dir="$RUN_DIR/nisshi"
  mkdir -p "$dir"
  log "starting Nisshi on 127.0.0.1:$KAFKA_PORT (memory storage)"
  (
    cd "$dir"
    nohup nisshi broker \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --storage-engine memory://rtap/ >"$RUN_DIR/nisshi.log" 2>&1 &
    echo $! >"$RUN_DIR/nisshi.pid"
  )
  wait_for_port "$KAFKA_PORT" Nisshi 30
  log "Kafka broker (Nisshi) ready on 127.0.0.1:$KAFKA_PORT"
}

up() {
  mkdir -p "$RUN_DIR"
  postgres_up
  redis_up
  kafka_up
}

down() {
  cluster_down
  if [[ -f $RUN_DIR/nisshi.pid ]]; then
    local pid
    pid=$(cat "$RUN_DIR/nisshi.pid")
    if kill -INT "$pid" 2>/dev/null; then
      log "stopping Nisshi ($pid)"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$RUN_DIR/nisshi.pid"
  fi
  if [[ -f $RUN_DIR/redis.started ]]; then
    log "stopping Redis"
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    rm -f "$RUN_DIR/redis.started"
  fi
  if [[ -f $RUN_DIR/postgres.started ]]; then
    log "stopping PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main stop || true
    rm -f "$RUN_DIR/postgres.started"
  fi
}

status() {
  local failed=0
  if pg_ready; then echo "postgres: up (127.0.0.1:$PG_PORT)"; else echo "postgres: down"; failed=1; fi
  if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    echo "redis:    up (127.0.0.1:$REDIS_PORT)"
  else
    echo "redis:    down"; failed=1
  fi
  if port_open "$KAFKA_PORT"; then echo "kafka:    up (127.0.0.1:$KAFKA_PORT)"; else echo "kafka:    down"; failed=1; fi
  if cluster_ok; then echo "cluster:  up (127.0.0.1:$CLUSTER_PORT-$((CLUSTER_PORT + CLUSTER_NODES - 1)))"; fi
  return "$failed"
}

case "${1:-}" in
  up) up ;;
  cluster) up; cluster_up ;;
  cluster-node) mkdir -p "$RUN_DIR"; cluster_node "${2:?usage: $0 cluster-node PORT}" ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|cluster|cluster-node PORT|down|status" >&2; exit 2 ;;
esac
