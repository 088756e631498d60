#!/usr/bin/env bash
# moto.sh start PORT | stop PORT: the moto SQS server on 127.0.0.1:PORT,
# with its pid and log under .run/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
run="$root/.run"
mkdir -p "$run"
command=$1
port=$2
pidfile="$run/moto-$port.pid"
case "$command" in
    start)
        if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            exit 0
        fi
        "$root/.venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$run/moto-$port.log" 2>&1 &
        echo $! >"$pidfile"
        for _ in $(seq 1 150); do
            if curl -fsS "http://127.0.0.1:$port/moto-api/data.json" >/dev/null 2>&1; then
                exit 0
            fi
            sleep 0.1
        done
        echo "moto did not start on port $port; see $run/moto-$port.log" >&2
        exit 1
        ;;
    stop)
        if [ -f "$pidfile" ]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            rm -f "$pidfile"
        fi
        ;;
    *)
        echo "usage: $0 start|stop PORT" >&2
        exit 2
        ;;
esac
