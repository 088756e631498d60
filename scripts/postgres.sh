#!/usr/bin/env bash
# postgres.sh ensure | start | stop | status
#
# The PostgreSQL the recipes use, so that a bare machine needs nothing running.
#
#   ensure  prints "ADMIN_URL STATE" on stdout, where STATE says who owns the
#           server: "external" (DATABASE_URL is set, or something already
#           answers at 127.0.0.1:5432), "reused" (this clone's private cluster
#           was already running) or "started" (this call started it, so the
#           caller stops it when done).
#   start   the private cluster, kept running (`just db`); prints its URL.
#   stop    stops the private cluster if it runs (`just down`).
#   status  says whether the private cluster runs, and where.
#
# The private cluster lives under .run/pg (data, log, port): initdb'd with
# the server's defaults, TLS on, trust authentication for the user `postgres`,
# listening on 127.0.0.1 only, on 5432 when that is free and on a free port
# otherwise. Run as root, the server runs as the unprivileged `postgres` user
# (PostgreSQL refuses to run as root). When its binaries are missing, the
# Debian package `postgresql` is installed (as root or with sudo).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
state="$root/.run/pg"
mkdir -p "$state"

say() { echo "postgres.sh: $*" >&2; }

default_answers() { pg_isready -q -h 127.0.0.1 -p 5432 -t 2 2>/dev/null; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_free() {
    # SO_REUSEADDR as the server sets it: a port in TIME_WAIT is free to it.
    python3 -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null
}

# The newest installed server's bin directory, installing the package if none.
bindir() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -z "$dir" ] && command -v initdb >/dev/null; then
        dir="$(dirname "$(readlink -f "$(command -v initdb)")")"
    fi
    if [ -z "$dir" ] || [ ! -x "$dir/initdb" ]; then
        say "no PostgreSQL server binaries; installing the Debian package postgresql"
        "$root/scripts/system-packages.sh" initdb=postgresql >&2 || {
            say "install the Debian package postgresql (sudo apt-get install postgresql), or set DATABASE_URL"
            exit 1
        }
        dir="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
    fi
    echo "$dir"
}

# Run as the server's user: root hands the server to `postgres`.
as_server_user() {
    if [ "$(id -u)" -eq 0 ]; then
        if ! id postgres >/dev/null 2>&1; then
            useradd --system --home-dir /var/lib/postgresql --shell /usr/sbin/nologin postgres
        fi
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# The data directory: under the clone when the server's user can reach it,
# otherwise (a clone under /root, say) in /var/tmp under a name of the clone.
datadir() {
    if [ "$(id -u)" -ne 0 ] || runuser -u postgres -- test -w "$state" 2>/dev/null; then
        echo "$state/data"
    else
        echo "/var/tmp/txrelay-pg-$(printf '%s' "$root" | md5sum | cut -c1-12)"
    fi
}

# The server's log, where its user can write it: beside the data.
logfile() {
    local data
    data="$(datadir)"
    if [ "$data" = "$state/data" ]; then echo "$state/server.log"; else echo "$data.log"; fi
}

private_port() { cat "$state/port" 2>/dev/null || true; }

private_running() {
    local port
    port="$(private_port)"
    [ -n "$port" ] && [ -f "$(datadir)/postmaster.pid" ] && pg_isready -q -h 127.0.0.1 -p "$port" -t 2 2>/dev/null
}

url_for() { echo "postgres://postgres@127.0.0.1:$1/postgres"; }

start_private() {
    local bin data port
    bin="$(bindir)"
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || as_server_user true
        # The server's user must be able to write its state directory.
        chown postgres "$state"
        chmod 0755 "$root/.run"
    fi
    data="$(datadir)"
    if [ ! -f "$data/PG_VERSION" ]; then
        say "initdb $data ($("$bin/postgres" --version))"
        mkdir -p "$data"
        [ "$(id -u)" -eq 0 ] && chown postgres "$data"
        chmod 0700 "$data"
        (cd / && as_server_user "$bin/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8) \
            >"$state/initdb.log" 2>&1 || {
            say "initdb failed; see $state/initdb.log"
            exit 1
        }
        # TLS as in production, with a self-signed certificate (for a name
        # that is not 127.0.0.1, so sslmode=verify-full is rightly refused).
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=txrelay-private-postgres" \
            -keyout "$data/server.key" -out "$data/server.crt" >/dev/null 2>&1
        chmod 0600 "$data/server.key"
        [ "$(id -u)" -eq 0 ] && chown postgres "$data/server.key" "$data/server.crt"
        echo "ssl = on" >>"$data/postgresql.auto.conf"
    fi
    port="$(private_port)"
    if [ -z "$port" ] || ! port_free "$port"; then
        if port_free 5432; then port=5432; else port="$(free_port)"; fi
        echo "$port" >"$state/port"
    fi
    local log
    log="$(logfile)"
    touch "$log"
    [ "$(id -u)" -eq 0 ] && chown postgres "$log"
    # 9>&-: the server must not inherit (and so hold forever) the lock.
    say "starting PostgreSQL on 127.0.0.1:$port (data $data, log $log)"
    # The server's defaults otherwise (autovacuum, fsync and synchronous_commit
    # on): the benchmarks and tests see what production sees.
    # From /: the server's user may not be able to enter the clone.
    (cd / && as_server_user "$bin/pg_ctl" -D "$data" -l "$log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=''" >&2 9>&-) || {
        say "PostgreSQL did not start; see $log"
        exit 1
    }
}

stop_private() {
    local bin data
    data="$(datadir)"
    if [ -f "$data/postmaster.pid" ]; then
        bin="$(bindir)"
        (cd / && as_server_user "$bin/pg_ctl" -D "$data" -m fast -w -t 60 stop >&2) || true
        say "stopped the private PostgreSQL"
    fi
}

command="${1:-}"
"$root/scripts/system-packages.sh" psql=postgresql-client pg_isready=postgresql-client flock=util-linux openssl=openssl
case "$command" in
    ensure)
        if [ -n "${DATABASE_URL:-}" ]; then
            echo "${DATABASE_URL%/*}/postgres external"
            exit 0
        fi
        exec 9>"$state/lock"
        flock 9
        if private_running; then
            echo "$(url_for "$(private_port)") reused"
        elif default_answers; then
            echo "$(url_for 5432) external"
        else
            start_private
            echo "$(url_for "$(private_port)") started"
        fi
        ;;
    start)
        exec 9>"$state/lock"
        flock 9
        private_running || start_private
        url_for "$(private_port)"
        ;;
    stop)
        exec 9>"$state/lock"
        flock 9
        stop_private
        ;;
    status)
        if private_running; then
            echo "running: $(url_for "$(private_port)") (data $(datadir))"
        else
            echo "not running"
            exit 3
        fi
        ;;
    *)
        echo "usage: $0 ensure|start|stop|status" >&2
        exit 2
        ;;
esac
