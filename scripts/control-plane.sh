#!/usr/bin/env bash
# Runs a real Kubernetes control plane (etcd + kube-apiserver, no nodes, no
# controllers) on loopback ports, for tests.
#
#   scripts/control-plane.sh start DIR              build once (cached), start etcd + kube-apiserver,
#                                                   write DIR/kubeconfig and DIR/bin/kubectl
#   scripts/control-plane.sh stop DIR               stop exactly the processes recorded in DIR
#   scripts/control-plane.sh env DIR                print `export KUBECONFIG=...` lines (eval them)
#   scripts/control-plane.sh stop-apiserver DIR     stop only kube-apiserver (etcd keeps running)
#   scripts/control-plane.sh start-apiserver DIR    start kube-apiserver again, same flags and port
#   scripts/control-plane.sh restart-apiserver DIR  stop-apiserver + start-apiserver
#   scripts/control-plane.sh status DIR             exit 0 when both processes run
#   scripts/control-plane.sh build                  only build (or find) the binaries
#   scripts/control-plane.sh bin-dir                print the directory holding the binaries
#
# `start` creates a fresh cluster each time (it replaces DIR's etcd data and
# certificates). Nothing but `env` and `bin-dir` prints on stdout; progress and
# errors go to stderr, the servers' output to DIR/etcd.log and
# DIR/kube-apiserver.log.
#
# The binaries are built from the Go modules pinned in tools/control-plane/
# (kube/ for kube-apiserver and kubectl, etcd/ for etcd) and cached under
# ${TXRELAY_CONTROL_PLANE_CACHE:-~/.cache/txrelay/control-plane}/<version>/bin;
# when they are there, no Go build runs.
set -euo pipefail

K8S_VERSION=v1.37.2
ETCD_VERSION=v3.7.3
VERSION_TAG="k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}"

READY_TIMEOUT=${CONTROL_PLANE_READY_TIMEOUT:-60}
STOP_TIMEOUT=${CONTROL_PLANE_STOP_TIMEOUT:-20}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
TOOLS_DIR="$REPO_ROOT/tools/control-plane"
CACHE_ROOT=${TXRELAY_CONTROL_PLANE_CACHE:-${HOME:-/root}/.cache/txrelay/control-plane}
BIN_DIR="$CACHE_ROOT/$VERSION_TAG/bin"

log() { printf 'control-plane: %s\n' "$*" >&2; }
die() { printf 'control-plane: error: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------- build ----

find_go() {
  if command -v go >/dev/null 2>&1; then
    command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then
    echo /usr/local/go/bin/go
  else
    die "no Go toolchain found (need go >= 1.26 on PATH or at /usr/local/go/bin/go)"
  fi
}

have_binaries() {
  [[ -x "$BIN_DIR/kube-apiserver" && -x "$BIN_DIR/kubectl" && -x "$BIN_DIR/etcd" ]]
}

build_binaries() {
  have_binaries && return 0
  mkdir -p "$CACHE_ROOT"
  # One build at a time, even across concurrent `start`s.
  exec 9>"$CACHE_ROOT/.build.lock"
  flock 9
  if have_binaries; then exec 9>&-; return 0; fi

  local go; go=$(find_go)
  grep -q "k8s.io/kubernetes $K8S_VERSION" "$TOOLS_DIR/kube/go.mod" ||
    die "$TOOLS_DIR/kube/go.mod does not require k8s.io/kubernetes $K8S_VERSION"
  grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION" "$TOOLS_DIR/etcd/go.mod" ||
    die "$TOOLS_DIR/etcd/go.mod does not require go.etcd.io/etcd/server/v3 $ETCD_VERSION"

  local tmp="$CACHE_ROOT/$VERSION_TAG/bin.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  local buildlog="$CACHE_ROOT/$VERSION_TAG/build.log"
  : >"$buildlog"

  local major=${K8S_VERSION#v}; major=${major%%.*}
  local minor=${K8S_VERSION#v*.}; minor=${minor%%.*}
  local ldflags="-s -w"
  local pkg key val
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    for key in gitVersion=$K8S_VERSION gitMajor=$major gitMinor=$minor gitTreeState=clean gitCommit=; do
      ldflags+=" -X $pkg.$key"
    done
  done

  local start=$SECONDS
  log "building kube-apiserver, kubectl ($K8S_VERSION) and etcd ($ETCD_VERSION); this takes a while the first time (log: $buildlog)"
  (
    export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=readonly -trimpath -buildvcs=false"
    cd "$TOOLS_DIR/kube"
    nice -n 19 "$go" build -ldflags "$ldflags" -o "$tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
    cd "$TOOLS_DIR/etcd"
    nice -n 19 "$go" build -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
  ) >>"$buildlog" 2>&1 || { rm -rf "$tmp"; die "Go build failed; see $buildlog"; }

  [[ -x "$tmp/kube-apiserver" && -x "$tmp/kubectl" && -x "$tmp/etcd" ]] ||
    { rm -rf "$tmp"; die "Go build produced no binaries; see $buildlog"; }
  rm -rf "$BIN_DIR"
  mv "$tmp" "$BIN_DIR"
  exec 9>&-
  log "built in $((SECONDS - start))s into $BIN_DIR"
}

# ------------------------------------------------------------- helpers ----

abs_dir() {
  mkdir -p "$1"
  (cd "$1" && pwd)
}

free_port() {
  python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# pid_alive PIDFILE: true when PIDFILE names a running process whose
# executable is the one recorded next to it (guards against reused PIDs).
pid_alive() {
  local pidfile=$1 pid exe want
  [[ -s "$pidfile" ]] || return 1
  pid=$(sed -n 1p "$pidfile")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  want=$(sed -n 2p "$pidfile")
  [[ -z "$want" ]] && return 0
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  exe=${exe% (deleted)}
  [[ "$exe" == "$want" ]]
}

# stop_proc NAME DIR: TERM the recorded process, wait, then KILL.
stop_proc() {
  local name=$1 dir=$2 pidfile="$2/$1.pid" pid i
  if ! pid_alive "$pidfile"; then
    rm -f "$pidfile"
    return 0
  fi
  pid=$(sed -n 1p "$pidfile")
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    pid_alive "$pidfile" || break
    sleep 0.1
  done
  if pid_alive "$pidfile"; then
    log "$name (pid $pid) still running after ${STOP_TIMEOUT}s; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      pid_alive "$pidfile" || break
      sleep 0.1
    done
  fi
  pid_alive "$pidfile" && die "could not stop $name (pid $pid)"
  rm -f "$pidfile"
}

# launch NAME DIR BINARY ARGS...: start BINARY in the background, detached from
# our stdin/stdout/stderr, output appended to DIR/NAME.log, pid in DIR/NAME.pid.
launch() {
  local name=$1 dir=$2 bin=$3; shift 3
  printf '\n==== %s starting %s\n' "$(date -u +%FT%TZ)" "$name" >>"$dir/$name.log"
  "$bin" "$@" </dev/null >>"$dir/$name.log" 2>&1 &
  local pid=$! exe want i
  want=$(readlink -f "$bin")
  printf '%s\n%s\n' "$pid" "$want" >"$dir/$name.pid"
  # Until the forked shell has exec'd the binary, /proc/PID/exe is bash.
  for ((i = 0; i < 100; i++)); do
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || break
    [[ "${exe% (deleted)}" == "$want" ]] && return 0
    sleep 0.05
  done
  return 0
}

fail_with_log() {
  local name=$1 dir=$2 msg=$3
  printf 'control-plane: error: %s; last lines of %s:\n' "$msg" "$dir/$name.log" >&2
  tail -n 20 "$dir/$name.log" | sed 's/^/    /' >&2 || true
  exit 1
}

wait_etcd() {
  local dir=$1 port=$2 deadline=$((SECONDS + READY_TIMEOUT))
  while :; do
    pid_alive "$dir/etcd.pid" || fail_with_log etcd "$dir" "etcd exited during startup"
    if python3 - "$port" 2>/dev/null <<'EOF'
import json, sys, urllib.request
with urllib.request.urlopen("http://127.0.0.1:%s/health" % sys.argv[1], timeout=2) as r:
    sys.exit(0 if json.load(r).get("health") == "true" else 1)
EOF
    then return 0; fi
    ((SECONDS < deadline)) || fail_with_log etcd "$dir" "etcd not healthy after ${READY_TIMEOUT}s"
    sleep 0.2
  done
}

wait_apiserver() {
  local dir=$1 deadline=$((SECONDS + READY_TIMEOUT)) out
  while :; do
    pid_alive "$dir/kube-apiserver.pid" ||
      fail_with_log kube-apiserver "$dir" "kube-apiserver exited during startup"
    out=$("$BIN_DIR/kubectl" --kubeconfig "$dir/kubeconfig" --request-timeout=2s get --raw /readyz 2>&1) || true
    [[ "$out" == ok ]] && return 0
    ((SECONDS < deadline)) ||
      fail_with_log kube-apiserver "$dir" "kube-apiserver not ready after ${READY_TIMEOUT}s (last /readyz: ${out:0:300})"
    sleep 0.3
  done
}

# ----------------------------------------------------------------- pki ----

gen_pki() {
  local pki=$1
  rm -rf "$pki"; mkdir -p "$pki"; chmod 700 "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
      -keyout ca.key -out ca.crt -subj "/CN=txrelay-test-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
    openssl req -newkey rsa:2048 -nodes -sha256 \
      -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver"
    cat >apiserver.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -days 3650 -sha256 -extfile apiserver.ext -out apiserver.crt
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
    rm -f apiserver.csr apiserver.ext ca.srl
  ) >"$pki/openssl.log" 2>&1 || { cat "$pki/openssl.log" >&2; die "openssl failed (see $pki/openssl.log)"; }
}

# ------------------------------------------------------------- commands ----

start_apiserver() {
  local dir=$1
  [[ -f "$dir/kube-apiserver.args" ]] || die "$dir/kube-apiserver.args missing; run '$0 start $dir' first"
  pid_alive "$dir/etcd.pid" || die "etcd is not running for $dir; run '$0 start $dir'"
  pid_alive "$dir/kube-apiserver.pid" && die "kube-apiserver already running for $dir (pid $(sed -n 1p "$dir/kube-apiserver.pid"))"
  local APISERVER_ARGS
  # shellcheck disable=SC1091
  source "$dir/kube-apiserver.args"
  log "starting kube-apiserver on https://127.0.0.1:$(<"$dir/apiserver.port")"
  launch kube-apiserver "$dir" "$BIN_DIR/kube-apiserver" "${APISERVER_ARGS[@]}"
  wait_apiserver "$dir"
  log "kube-apiserver ready"
}

STARTING_DIR=
on_start_exit() {
  local rc=$?
  if ((rc != 0)) && [[ -n "$STARTING_DIR" ]]; then
    log "start failed; stopping what it started (logs stay in $STARTING_DIR)"
    stop_proc kube-apiserver "$STARTING_DIR" || true
    stop_proc etcd "$STARTING_DIR" || true
  fi
  exit "$rc"
}

cmd_start() {
  local dir; dir=$(abs_dir "$1")
  if pid_alive "$dir/etcd.pid" || pid_alive "$dir/kube-apiserver.pid"; then
    die "a control plane is already running in $dir; run '$0 stop $dir' first"
  fi
  command -v openssl >/dev/null || die "openssl is required"
  command -v python3 >/dev/null || die "python3 is required"

  build_binaries

  # Should anything below fail, stop whatever this run started.
  STARTING_DIR=$dir
  trap on_start_exit EXIT

  rm -rf "$dir/etcd-data"
  rm -f "$dir"/{etcd,kube-apiserver}.log "$dir/kube-apiserver.args" "$dir/kubeconfig"
  mkdir -p "$dir/bin"
  gen_pki "$dir/pki"

  local token; token=$(openssl rand -hex 32)
  printf '%s,txrelay-admin,txrelay-admin,"system:masters"\n' "$token" >"$dir/tokens.csv"
  chmod 600 "$dir/tokens.csv"

  local etcd_port peer_port api_port
  etcd_port=$(free_port); peer_port=$(free_port)
  while [[ "$peer_port" == "$etcd_port" ]]; do peer_port=$(free_port); done
  api_port=$(free_port)
  while [[ "$api_port" == "$etcd_port" || "$api_port" == "$peer_port" ]]; do api_port=$(free_port); done
  echo "$etcd_port" >"$dir/etcd.port"
  echo "$api_port" >"$dir/apiserver.port"

  log "starting etcd $ETCD_VERSION on http://127.0.0.1:$etcd_port"
  launch etcd "$dir" "$BIN_DIR/etcd" \
    --name=txrelay-test \
    --data-dir="$dir/etcd-data" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" \
    --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-cluster="txrelay-test=http://127.0.0.1:$peer_port" \
    --initial-cluster-state=new \
    --unsafe-no-fsync \
    --log-level=warn
  wait_etcd "$dir" "$etcd_port"
  log "etcd ready"

  local APISERVER_ARGS=(
    --etcd-servers="http://127.0.0.1:$etcd_port"
    --bind-address=127.0.0.1
    --advertise-address=127.0.0.1
    --secure-port="$api_port"
    --tls-cert-file="$dir/pki/apiserver.crt"
    --tls-private-key-file="$dir/pki/apiserver.key"
    --client-ca-file="$dir/pki/ca.crt"
    --token-auth-file="$dir/tokens.csv"
    --authorization-mode=RBAC
    --endpoint-reconciler-type=none
    --disable-admission-plugins=ServiceAccount
    --service-cluster-ip-range=10.0.0.0/24
    --service-account-issuer=https://kubernetes.default.svc.cluster.local
    --service-account-key-file="$dir/pki/sa.pub"
    --service-account-signing-key-file="$dir/pki/sa.key"
    --allow-privileged=true
    --profiling=false
    --v=1
  )
  declare -p APISERVER_ARGS >"$dir/kube-apiserver.args"

  local ca_data; ca_data=$(base64 -w0 <"$dir/pki/ca.crt")
  cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: txrelay-test
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority-data: $ca_data
users:
- name: txrelay-admin
  user:
    token: $token
contexts:
- name: txrelay-test
  context:
    cluster: txrelay-test
    user: txrelay-admin
    namespace: default
current-context: txrelay-test
EOF
  chmod 600 "$dir/kubeconfig"
  ln -f "$BIN_DIR/kubectl" "$dir/bin/kubectl" 2>/dev/null || cp -f "$BIN_DIR/kubectl" "$dir/bin/kubectl"

  start_apiserver "$dir"
  trap - EXIT
  log "control plane up: KUBECONFIG=$dir/kubeconfig, kubectl at $dir/bin/kubectl"
}

cmd_stop() {
  local dir=$1
  [[ -d "$dir" ]] || return 0
  dir=$(cd "$dir" && pwd)
  stop_proc kube-apiserver "$dir"
  stop_proc etcd "$dir"
}

cmd_env() {
  local dir; dir=$(cd "$1" 2>/dev/null && pwd) || die "no such directory: $1"
  [[ -f "$dir/kubeconfig" ]] || die "$dir/kubeconfig missing; run '$0 start $dir' first"
  printf 'export KUBECONFIG=%q\n' "$dir/kubeconfig"
  printf 'export PATH=%q:"$PATH"\n' "$dir/bin"
}

cmd_status() {
  local dir=$1 ok=0 name
  for name in etcd kube-apiserver; do
    if pid_alive "$dir/$name.pid"; then
      log "$name running (pid $(sed -n 1p "$dir/$name.pid"))"
    else
      log "$name not running"; ok=1
    fi
  done
  return $ok
}

need_dir() { [[ $# -ge 1 && -n "$1" ]] || usage; }

main() {
  [[ $# -ge 1 ]] || usage
  local cmd=$1; shift
  case "$cmd" in
    start)             need_dir "$@"; cmd_start "$1" ;;
    stop)              need_dir "$@"; cmd_stop "$1" ;;
    env)               need_dir "$@"; cmd_env "$1" ;;
    status)            need_dir "$@"; cmd_status "$1" ;;
    stop-apiserver)    need_dir "$@"; stop_proc kube-apiserver "$(abs_dir "$1")" ;;
    start-apiserver)   need_dir "$@"; start_apiserver "$(abs_dir "$1")" ;;
    restart-apiserver) need_dir "$@"; local d; d=$(abs_dir "$1"); stop_proc kube-apiserver "$d"; start_apiserver "$d" ;;
    build)             build_binaries ;;
    bin-dir)           build_binaries; echo "$BIN_DIR" ;;
    -h|--help|help)    usage ;;
    *)                 usage ;;
  esac
}

main "$@"
