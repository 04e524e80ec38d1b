#!/usr/bin/env bash
# Redis + N `pcache serve` replicas + `pcache route`, as plain processes on one machine.
#
#   deploy/run-cluster.sh [start]   start them (logs and pids under $RUN_DIR), wait until healthy
#   deploy/run-cluster.sh stop      stop what start started (SIGTERM: requests in flight finish)
#   deploy/run-cluster.sh status    the router's /health
#
# Settings, from the environment (defaults in brackets):
#   REPLICAS [3]  MODEL [models/SmolLM2-135M-Instruct.Q4_1.gguf]  PCACHE [build/pcache]
#   HOST [127.0.0.1]  ROUTER_PORT [8090]  BASE_PORT [8081: replicas on 8081, 8082 ...]
#   REDIS_PORT [6390]  REDIS_PASSWORD [none; passed to every process in the environment]
#   KV_MEM [512M per replica]  THREADS [cores / replicas, at least 1]  POLICY [cache]
#   API_KEYS ["": space-separated keys required by the router and the replicas]
#   RUN_DIR [/tmp/pcache-cluster]  EXTRA_SERVE / EXTRA_ROUTE [more options for each]
# Clients then use http://$HOST:$ROUTER_PORT/v1 (OpenAI) or http://$HOST:$ROUTER_PORT (Anthropic).
set -euo pipefail
cd "$(dirname "$0")/.."
REPLICAS=${REPLICAS:-3}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
PCACHE=${PCACHE:-build/pcache}
HOST=${HOST:-127.0.0.1}
ROUTER_PORT=${ROUTER_PORT:-8090}
BASE_PORT=${BASE_PORT:-8081}
REDIS_PORT=${REDIS_PORT:-6390}
KV_MEM=${KV_MEM:-512M}
POLICY=${POLICY:-cache}
RUN_DIR=${RUN_DIR:-/tmp/pcache-cluster}
cores=$(nproc 2>/dev/null || echo 2)
THREADS=${THREADS:-$(( cores / REPLICAS > 0 ? cores / REPLICAS : 1 ))}
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export REDIS_PASSWORD=${REDIS_PASSWORD:-}

keys=()
for k in ${API_KEYS:-}; do keys+=(--api-key "$k"); done

wait_health() {   # url pidfile name
  for _ in $(seq 1 600); do
    if curl -fsS "$1/health" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$(cat "$2")" 2>/dev/null; then echo "$3 exited; see $RUN_DIR/$3.log" >&2; tail -5 "$RUN_DIR/$3.log" >&2; return 1; fi
    sleep 0.2
  done
  echo "$3 not healthy after 120 s" >&2
  return 1
}

start() {
  [ -x "$PCACHE" ] || { echo "$PCACHE not built (make)" >&2; exit 1; }
  [ -f "$MODEL" ] || { echo "$MODEL missing (make model)" >&2; exit 1; }
  command -v redis-server >/dev/null || { echo "redis-server not installed (apt-get install redis-server)" >&2; exit 1; }
  mkdir -p "$RUN_DIR"
  if [ -n "$(ls "$RUN_DIR"/*.pid 2>/dev/null)" ]; then echo "already running ($RUN_DIR); stop first" >&2; exit 1; fi
  # Redis: no persistence (the events are rebuilt by the replicas on reconnect); the shared KV
  # tier's keys expire, so volatile-lru bounds it without touching the events stream.
  redis_args=(--port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$RUN_DIR"
              --maxmemory "${REDIS_MAXMEMORY:-1gb}" --maxmemory-policy volatile-lru)
  [ -n "$REDIS_PASSWORD" ] && redis_args+=(--requirepass "$REDIS_PASSWORD")
  redis-server "${redis_args[@]}" >"$RUN_DIR/redis.log" 2>&1 &
  echo $! >"$RUN_DIR/redis.pid"
  replicas=()
  for i in $(seq 1 "$REPLICAS"); do
    port=$((BASE_PORT + i - 1))
    # shellcheck disable=SC2086
    "$PCACHE" serve -m "$MODEL" --host "$HOST" --port "$port" --kv-mem "$KV_MEM" -t "$THREADS" \
      --redis "$REDIS_URL" "${keys[@]}" ${EXTRA_SERVE:-} >"$RUN_DIR/replica$i.log" 2>&1 &
    echo $! >"$RUN_DIR/replica$i.pid"
    replicas+=(--replica "http://$HOST:$port")
  done
  for i in $(seq 1 "$REPLICAS"); do
    wait_health "http://$HOST:$((BASE_PORT + i - 1))" "$RUN_DIR/replica$i.pid" "replica$i"
  done
  # shellcheck disable=SC2086
  "$PCACHE" route -m "$MODEL" --host "$HOST" --port "$ROUTER_PORT" --redis "$REDIS_URL" --policy "$POLICY" \
    "${replicas[@]}" "${keys[@]}" ${EXTRA_ROUTE:-} >"$RUN_DIR/router.log" 2>&1 &
  echo $! >"$RUN_DIR/router.pid"
  wait_health "http://$HOST:$ROUTER_PORT" "$RUN_DIR/router.pid" router
  echo "pcache cluster: router http://$HOST:$ROUTER_PORT, $REPLICAS replicas from :$BASE_PORT, redis :$REDIS_PORT (logs: $RUN_DIR)"
}

stop() {
  # router first (it drains), then the replicas (they drain), then Redis
  for name in router $(for i in $(seq 1 64); do echo replica$i; done) redis; do
    f="$RUN_DIR/$name.pid"
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$f"
  done
  echo "pcache cluster stopped"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) curl -fsS "http://$HOST:$ROUTER_PORT/health"; echo ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
