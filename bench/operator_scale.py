#!/usr/bin/env python3
"""`just bench-operator`: one `txrelay operator` with 100 TransactionRelays.

Starts what it needs and stops it again: a control plane of its own
(scripts/control-plane.sh, in .run/cp-bench), moto (scripts/moto.sh, on a free
port) and PostgreSQL (see below). Then, as the tests of the
real-cluster tier do, it installs the CRD from crds/ and the RBAC of deploy/,
runs the operator as its ServiceAccount (TokenRequest token) and applies 100
TransactionRelays in one `kubectl apply` of a List: each in its own schema of
one database, all on the same Secrets (one shared moto queue).

It measures
  - the time from that apply to every relay showing Ready=True for its
    generation (the API server polled directly every 250 ms);
  - reconcile p50 and p99, estimated from the buckets of the operator's
    txrelay_reconcile_duration_seconds histogram, and txrelay_reconcile_total;
  - the operator's RSS and CPU while idle (after a settling pause, over 60 s);
  - the operator's API requests while idle, from kube_client's debug line per
    request, by method and kind; then keeps counting for a few more minutes,
    past the 300 s requeue of every reconcile, to show what a steady state
    asks of the API server.
Prints a Markdown report and writes it, with the raw figures and the
operator's log, to .run/bench-operator/.

TXRELAY_BENCH_BINARY picks the txrelay binary (default: the release build).
PostgreSQL: TXRELAY_BENCH_ADMIN_URL when set; otherwise a throwaway cluster
of the bench's own (.run/bench-operator/pg, initdb'd as scripts/postgres.sh
does, the server's defaults but for max_connections, 1000 by default: a relay
holds about six connections, so the default 100 serves some 15 relays),
removed at the end; with --max-connections 0, what scripts/postgres.sh finds
or starts (the clone's cluster, the server's defaults).
"""

import argparse
import collections
import http.client
import json
import os
import pathlib
import platform
import re
import signal
import socket
import shutil
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = ROOT / ".run" / "bench-operator"
CONTROL_PLANE = ROOT / ".run" / "cp-bench"
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", pathlib.Path.home() / ".cache/txrelay/target"))
CRD = ROOT / "crds" / "transactionrelays.relay.mykobo.io.yaml"
RBAC = ROOT / "deploy" / "rbac.yaml"
LEADER_ELECTION = ROOT / "deploy" / "leader-election.yaml"
NAMESPACE = "txrelay-bench"
DATABASE = "txrelay_bench_operator"
QUEUE = "txrelay-bench-operator"
IDENTITY = "bench-operator"
REGION = "us-east-1"
TOKEN = "bench-ingest-token"
GROUP, VERSION, PLURAL = "relay.mykobo.io", "v1alpha1", "transactionrelays"
# The operator's default log filter, plus one debug line per request to the
# API server ("HTTP{http.method=GET http.url=...}: ...: requesting").
RUST_LOG = "info,sqlx=warn,aws_config=warn,aws_smithy_runtime=warn,kube=warn,tower=warn,kube_client=debug"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
REQUEST = re.compile(r"http\.method=(\S+) http\.url=(\S+).*kube_client::client::builder: requesting")
LEVEL = re.compile(r"^\S+\s+(WARN|ERROR)\s+(\S+?):\s+(.*)$")


def log(message):
    print(f"[bench-operator] {message}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, stdin=None, timeout=120, check=True):
    out = subprocess.run([str(a) for a in args], input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout


def psql(url, sql):
    return run(["psql", "-qtAX", "-v", "ON_ERROR_STOP=1", url, "-c", sql]).strip()


class ThrowawayPostgres:
    """A cluster of the bench's own, set up as scripts/postgres.sh sets up
    the clone's (trust, TLS on, loopback only, the server's defaults) but for
    max_connections; run as `postgres` when the bench runs as root."""

    def __init__(self, max_connections):
        self.max_connections = max_connections
        self.dir = RUN / "pg"
        self.data = self.dir / "data"
        self.port = free_port()
        bindirs = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
        if not bindirs:
            raise RuntimeError("no PostgreSQL server under /usr/lib/postgresql: install the Debian package postgresql, "
                               "or set TXRELAY_BENCH_ADMIN_URL")
        self.bin = bindirs[-1]
        self.root = os.getuid() == 0

    def as_server(self, *args):
        command = ["runuser", "-u", "postgres", "--", *map(str, args)] if self.root else list(map(str, args))
        out = subprocess.run(command, cwd="/", capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{out.stdout}\n{out.stderr}")

    def start(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        self.data.mkdir(parents=True)
        if self.root:
            shutil.chown(self.dir, "postgres")
            shutil.chown(self.data, "postgres")
        self.data.chmod(0o700)
        self.as_server(self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                       "--locale=C.UTF-8")
        run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj",
             "/CN=txrelay-bench-postgres", "-keyout", self.data / "server.key", "-out", self.data / "server.crt"])
        (self.data / "server.key").chmod(0o600)
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            conf.write(f"ssl = on\nmax_connections = {self.max_connections}\n")
        for name in ("server.key", "server.crt", "postgresql.auto.conf"):
            if self.root:
                shutil.chown(self.data / name, "postgres")
        log_file = self.dir / "server.log"
        log_file.touch()
        if self.root:
            shutil.chown(log_file, "postgres")
        self.as_server(self.bin / "pg_ctl", "-D", self.data, "-l", log_file, "-w", "-t", "60", "start", "-o",
                       f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories=''")
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self):
        if (self.data / "postmaster.pid").exists():
            self.as_server(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


class Stack:
    """Everything the run starts, stopped in reverse order whatever happens."""

    def __init__(self):
        self.stops = []

    def on_exit(self, label, action):
        self.stops.append((label, action))

    def close(self):
        for label, action in reversed(self.stops):
            try:
                action()
            except Exception as error:  # keep stopping the rest
                log(f"stopping {label} failed: {error}")
        self.stops.clear()


class Kubectl:
    def __init__(self, kubectl, kubeconfig):
        self.kubectl, self.kubeconfig = kubectl, kubeconfig

    def __call__(self, *args, stdin=None, check=True):
        return run([self.kubectl, "--kubeconfig", self.kubeconfig, "--request-timeout=30s", *args], stdin=stdin,
                   check=check)


class Api:
    """The admin's direct HTTPS connection to the API server, for polling
    without starting a kubectl process four times a second."""

    def __init__(self, kubeconfig, ca):
        text = pathlib.Path(kubeconfig).read_text()
        server = re.search(r"server: (\S+)", text).group(1)
        self.token = re.search(r"token: (\S+)", text).group(1)
        parsed = urllib.parse.urlparse(server)
        self.host, self.port = parsed.hostname, parsed.port
        self.context = ssl.create_default_context(cafile=str(ca))
        self.connection = None

    def get(self, path):
        for attempt in range(2):
            try:
                if self.connection is None:
                    self.connection = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=10)
                self.connection.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
                response = self.connection.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
                return json.loads(body)
            except (OSError, http.client.HTTPException):
                self.connection = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def ready_for_generation(relay):
    status = relay.get("status") or {}
    if status.get("observedGeneration") != relay["metadata"].get("generation"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                pass
    return values


def histogram(values, name):
    """[(upper bound, cumulative count)], sorted, +Inf last."""
    buckets = []
    for key, count in values.items():
        match = re.fullmatch(re.escape(name) + r'_bucket\{le="([^"]+)"\}', key)
        if match:
            buckets.append((float(match.group(1)), count))
    return sorted(buckets)


def quantile(q, buckets):
    """histogram_quantile as Prometheus computes it: linear within the
    bucket that holds the q-th observation."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound  # beyond the largest finite bucket
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return None


def bucket_delta(after, before):
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]


def proc_cpu_seconds(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def proc_rss_mib(pid, key="VmRSS"):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None


def psql_or_none(url, sql):
    """A measurement query; None when the server refuses (a full server
    refuses the superuser too once the relays hold every slot)."""
    try:
        return psql(url, sql)
    except RuntimeError as error:
        log(f"measurement query failed: {str(error).strip().splitlines()[-1]}")
        return None


def postmaster_pid(admin_url):
    data = psql_or_none(admin_url, "SHOW data_directory")
    try:
        return int(pathlib.Path(data, "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError, TypeError):
        return None  # not readable from here (another user's, or remote)


def server_cpu_seconds(postmaster):
    """CPU time of the postmaster and its children (backends, WAL writer,
    checkpointer...), the exited ones included (the postmaster's cutime)."""
    if postmaster is None:
        return None
    ticks = 0
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if pid == postmaster:
            ticks += sum(int(f) for f in fields[11:15])
        elif int(fields[1]) == postmaster:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def transactions(admin_url):
    count = psql_or_none(admin_url, "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                                    f"WHERE datname = '{DATABASE}'")
    return None if count is None else int(count)


def kind_of(method, url):
    """A request's kind: what it asks for, without names and versions."""
    parsed = urllib.parse.urlparse(url)
    query = urllib.parse.parse_qs(parsed.query)
    parts = [p for p in parsed.path.split("/") if p]
    watch = query.get("watch", ["false"])[0] in ("true", "1")
    for resource in ("leases", "transactionrelays", "secrets", "events"):
        if resource in parts:
            rest = parts[parts.index(resource) + 1:]
            if resource == "events":
                return f"{method} events"
            if rest[1:] == ["status"]:
                return f"{method} {resource}/status"
            if rest:
                return f"{method} {resource}/NAME"
            return f"{method} {resource} {'watch' if watch else 'list'}"
    return f"{method} {parsed.path}"


class OperatorLog:
    def __init__(self, path):
        self.path = path

    def offset(self):
        return self.path.stat().st_size

    def lines(self, start=0, end=None):
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(None if end is None else end - start)
        return [ANSI.sub("", line) for line in data.decode(errors="replace").splitlines()]

    def requests(self, start, end):
        counts = collections.Counter()
        samples = {}
        for line in self.lines(start, end):
            match = REQUEST.search(line)
            if match:
                kind = kind_of(match.group(1), match.group(2))
                counts[kind] += 1
                samples.setdefault(kind, line.strip())
        return counts, samples

    def problems(self, start=0, end=None):
        """WARN and ERROR lines, grouped with relay names and numbers masked."""
        groups = collections.Counter()
        first = {}
        for line in self.lines(start, end):
            match = LEVEL.match(line.strip())
            if match:
                shape = re.sub(r"\br\d{3}\b", "rNNN", f"{match.group(1)} {match.group(2)}: {match.group(3)}")
                shape = re.sub(r"\d+", "N", shape)
                groups[shape] += 1
                first.setdefault(shape, line.strip())
        return groups, first


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) // 1024 // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, {platform.system()} {platform.release()}"


def relay_manifest(name, schema):
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TransactionRelay",
        "metadata": {"name": name},
        "spec": {
            "database": {"secretRef": {"name": "db", "key": "url"}, "schema": schema},
            "queue": {"secretRef": {"name": "sqs"}},
            "ingest": {"tokenSecretRef": {"name": "tokens"}},
        },
    }


def secret(name, data):
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque", "stringData": data}


def create_queue(endpoint, name):
    body = json.dumps({"QueueName": name}).encode()
    request = urllib.request.Request(endpoint + "/", data=body, method="POST", headers={
        "Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "AmazonSQS.CreateQueue",
        "Authorization": f"AWS4-HMAC-SHA256 Credential=bench/20260101/{REGION}/sqs/aws4_request"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["QueueUrl"]


def install(kubectl, operator_kubeconfig, admin_kubeconfig):
    """The CRD, deploy/'s ClusterRole bound to the ServiceAccount `txrelay`
    of the bench namespace, the Lease Role there, and a kubeconfig with that
    ServiceAccount's token (as tests/integration/real_cluster does)."""
    kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=txrelay-bench", "-f", CRD)
    kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/{PLURAL}.{GROUP}")
    documents = RBAC.read_text().split("\n---\n")
    role = next(d for d in documents if "kind: ClusterRole\n" in d)
    binding = next(d for d in documents if "kind: ClusterRoleBinding" in d)
    kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=txrelay-bench", "-f", "-", stdin=role)
    kubectl("create", "namespace", NAMESPACE)
    kubectl("create", "serviceaccount", "txrelay", "-n", NAMESPACE)
    binding = binding.replace("namespace: txrelay-system", f"namespace: {NAMESPACE}")
    if f"namespace: {NAMESPACE}" not in binding or "name: txrelay\n" not in binding:
        raise RuntimeError(f"deploy/rbac.yaml's ClusterRoleBinding changed shape; adapt {__file__}")
    kubectl("apply", "-f", "-", stdin=binding)
    lease_role = LEADER_ELECTION.read_text().replace("namespace: txrelay-system", f"namespace: {NAMESPACE}")
    kubectl("apply", "-f", "-", stdin=lease_role)
    token = kubectl("create", "token", "txrelay", "-n", NAMESPACE, "--duration=2h").strip()
    lines = []
    for line in pathlib.Path(admin_kubeconfig).read_text().splitlines():
        if line.lstrip().startswith("token: "):
            line = f"    token: {token}"
        lines.append(line.replace("namespace: default", f"namespace: {NAMESPACE}"))
    operator_kubeconfig.write_text("\n".join(lines) + "\n")
    operator_kubeconfig.chmod(0o600)


class Operator:
    def __init__(self, binary, kubeconfig, log_path):
        self.api, self.metrics = free_port(), free_port()
        self.log = OperatorLog(log_path)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "KUBECONFIG": str(kubeconfig),
            "POD_NAME": IDENTITY,
            "POD_NAMESPACE": NAMESPACE,
            "RUST_LOG": RUST_LOG,
            "NO_COLOR": "1",
        }
        self.stderr = open(log_path, "wb")
        self.process = subprocess.Popen(
            [str(binary), "operator", "--namespace", NAMESPACE, "--listen", f"127.0.0.1:{self.api}",
             "--metrics-listen", f"127.0.0.1:{self.metrics}"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr)
        self.pid = self.process.pid

    def wait_leading(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the operator exited ({self.process.returncode}); see {self.log.path}")
            if any("leadership changed" in l and "leading=true" in l for l in self.log.lines()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the operator did not take the Lease within {timeout} s; see {self.log.path}")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log("the operator did not stop within 30 s of SIGTERM; killing it")
                self.process.kill()
                self.process.wait()
        self.stderr.close()


def sample_idle(operator, windows, admin_url, postmaster, on_tick=None):
    """Samples RSS every second over consecutive windows (seconds each); at
    every window's edge records the log offset, CPU seconds and metrics."""
    edges = []

    def edge():
        edges.append({"t": time.monotonic(), "offset": operator.log.offset(),
                      "cpu": proc_cpu_seconds(operator.pid), "metrics": metrics(operator.metrics),
                      "pg_cpu": server_cpu_seconds(postmaster), "xacts": transactions(admin_url)})

    edge()
    rss = []
    for length in windows:
        end = edges[-1]["t"] + length
        samples = []
        while time.monotonic() < end:
            if operator.process.poll() is not None:
                raise RuntimeError(f"the operator exited during the idle measurement; see {operator.log.path}")
            samples.append(proc_rss_mib(operator.pid))
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        edge()
        rss.append(samples)
        if on_tick:
            on_tick(len(rss))
    return edges, rss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--relays", type=int, default=int(os.environ.get("TXRELAY_BENCH_RELAYS", "100")))
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for all Ready")
    parser.add_argument("--settle", type=float, default=30, help="seconds after all Ready before measuring idle")
    parser.add_argument("--idle", type=float, default=60, help="the idle window (RSS, CPU, requests)")
    parser.add_argument("--observe", type=float, default=300,
                        help="further seconds of counting requests after the idle window, to pass the operator's "
                             "300 s requeue (0: skip)")
    parser.add_argument("--max-connections", type=int, default=1000,
                        help="max_connections of the throwaway PostgreSQL cluster (0: the clone's, scripts/postgres.sh)")
    parser.add_argument("--binary", default=os.environ.get("TXRELAY_BENCH_BINARY", str(TARGET / "release" / "txrelay")))
    args = parser.parse_args()

    binary = pathlib.Path(args.binary)
    if not binary.is_file():
        sys.exit(f"no txrelay binary at {binary} (build it, or set TXRELAY_BENCH_BINARY)")
    has_histogram = b"txrelay_reconcile_duration_seconds" in binary.read_bytes()
    if not has_histogram:
        log("this binary has no txrelay_reconcile_duration_seconds histogram: reconcile quantiles will be missing")
    RUN.mkdir(parents=True, exist_ok=True)

    # SIGTERM (and SIGINT) unwind through the finally below, so everything started is stopped.
    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    stack = Stack()
    result = {"relays": args.relays, "binary": str(binary), "machine": machine(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        result.update(measure(args, binary, has_histogram, stack))
    finally:
        stack.close()
    report = render(result)
    (RUN / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RUN / "results.md").write_text(report)
    print(report)
    log(f"written to {RUN / 'results.md'} and results.json; the operator's log is {RUN / 'operator.log'}")


def measure(args, binary, has_histogram, stack):
    r = {}
    # PostgreSQL: TXRELAY_BENCH_ADMIN_URL, else a throwaway cluster, else (--max-connections 0) the clone's.
    admin_url = os.environ.get("TXRELAY_BENCH_ADMIN_URL")
    if args.max_connections and not admin_url:
        server = ThrowawayPostgres(args.max_connections)
        stack.on_exit("the throwaway PostgreSQL", server.stop)
        admin_url = server.start()
        r["postgres_state"] = f"throwaway cluster, max_connections={args.max_connections}"
    elif not admin_url:
        admin_url, state = run([ROOT / "scripts/postgres.sh", "ensure"], timeout=300).split()
        if state == "started":
            stack.on_exit("PostgreSQL", lambda: run([ROOT / "scripts/postgres.sh", "stop"], timeout=120))
        r["postgres_state"] = state
    db_url = admin_url.rsplit("/", 1)[0] + "/" + DATABASE
    psql(admin_url, f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    psql(admin_url, f"CREATE DATABASE {DATABASE}")
    stack.on_exit("the bench database", lambda: psql(admin_url, f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
    r["postgres"] = {name: psql(admin_url, f"SHOW {name}") for name in (
        "server_version", "max_connections", "superuser_reserved_connections", "shared_buffers", "fsync",
        "synchronous_commit", "ssl")}
    log(f"PostgreSQL {r['postgres']['server_version']} at {admin_url} "
        f"(max_connections {r['postgres']['max_connections']}); database {DATABASE}")

    # moto, one queue shared by every relay (they share the Secret `sqs`).
    moto_port = free_port()
    run([ROOT / "scripts/moto.sh", "start", moto_port], timeout=60)
    stack.on_exit("moto", lambda: run([ROOT / "scripts/moto.sh", "stop", moto_port]))
    endpoint = f"http://127.0.0.1:{moto_port}"
    queue_url = create_queue(endpoint, QUEUE)
    log(f"moto on {endpoint}, queue {queue_url}")

    # The control plane.
    log(f"starting the control plane in {CONTROL_PLANE}")
    stack.on_exit("the control plane", lambda: run([ROOT / "scripts/control-plane.sh", "stop", CONTROL_PLANE], timeout=120))
    run([ROOT / "scripts/control-plane.sh", "start", CONTROL_PLANE], timeout=1800)
    admin_kubeconfig = CONTROL_PLANE / "kubeconfig"
    kubectl = Kubectl(CONTROL_PLANE / "bin" / "kubectl", admin_kubeconfig)
    r["kube_version"] = json.loads(kubectl("get", "--raw", "/version"))["gitVersion"]
    operator_kubeconfig = RUN / "operator.kubeconfig"
    install(kubectl, operator_kubeconfig, admin_kubeconfig)
    kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        secret("db", {"url": db_url}),
        secret("sqs", {"queueUrl": queue_url, "region": REGION, "endpointUrl": endpoint,
                       "accessKeyId": "bench", "secretAccessKey": "bench"}),
        secret("tokens", {"tokens": TOKEN}),
    ]}))
    api = Api(admin_kubeconfig, CONTROL_PLANE / "pki" / "ca.crt")
    relays_path = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"

    # The operator, as its ServiceAccount, leading before anything is applied.
    operator = Operator(binary, operator_kubeconfig, RUN / "operator.log")
    stack.on_exit("the operator", operator.stop)
    operator.wait_leading()
    time.sleep(2)
    r["rss_before_apply_mib"] = proc_rss_mib(operator.pid)
    cpu_before = proc_cpu_seconds(operator.pid)
    before = metrics(operator.metrics)
    offset_before = operator.log.offset()
    log(f"operator pid {operator.pid} leads; RSS {r['rss_before_apply_mib']:.1f} MiB before the apply")

    # One apply of a List of N relays; then poll until every one is Ready for its generation.
    names = [f"r{i:03d}" for i in range(args.relays)]
    manifest = json.dumps({"apiVersion": "v1", "kind": "List",
                           "items": [relay_manifest(n, f"bench_{n}") for n in names]})
    log(f"applying {args.relays} TransactionRelays")
    t0 = time.monotonic()
    kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=manifest)
    r["apply_seconds"] = time.monotonic() - t0
    first_seen = {}
    timeline = []
    ready_count = 0
    deadline = t0 + args.ready_timeout
    while True:
        now = time.monotonic()
        items = api.get(relays_path)["items"]
        ready = {i["metadata"]["name"] for i in items if ready_for_generation(i)}
        for name in ready:
            first_seen.setdefault(name, now - t0)
        if len(ready) != ready_count:
            ready_count = len(ready)
            timeline.append((round(now - t0, 2), ready_count))
        if ready_count == args.relays or now > deadline:
            break
        if operator.process.poll() is not None:
            raise RuntimeError(f"the operator exited ({operator.process.returncode}); see {operator.log.path}")
        time.sleep(max(0.0, 0.25 - (time.monotonic() - now)))
    r["all_ready"] = ready_count == args.relays
    r["ready_seconds_waited"] = time.monotonic() - t0
    r["ready_count"] = ready_count
    r["ready_timeline"] = timeline
    times = sorted(first_seen.values())

    def at_fraction(f):
        n = max(1, int(round(f * args.relays)))
        return times[n - 1] if len(times) >= n else None

    r["ready_seconds"] = {"first": times[0] if times else None, "half": at_fraction(0.5),
                          "ninety": at_fraction(0.9), "all": at_fraction(1.0)}
    if not r["all_ready"]:
        not_ready = sorted(set(names) - ready)
        r["not_ready"] = not_ready
        r["ever_ready"] = len(first_seen)
        by_name = {i["metadata"]["name"]: i for i in items}
        reasons = collections.Counter()
        for name in not_ready:
            conditions = (by_name.get(name, {}).get("status") or {}).get("conditions") or []
            ready_condition = next((c for c in conditions if c.get("type") == "Ready"), {})
            reasons[f"{ready_condition.get('reason', 'no status')}: {ready_condition.get('message', '')[:200]}"] += 1
        r["not_ready_reasons"] = dict(reasons)
        log(f"only {ready_count} of {args.relays} Ready after {args.ready_timeout:.0f} s ({len(first_seen)} were "
            f"Ready at some point): {dict(reasons)}")
    else:
        log(f"all {args.relays} Ready {r['ready_seconds']['all']:.2f} s after the apply began")

    at_ready = metrics(operator.metrics)
    r["rss_at_ready_mib"] = proc_rss_mib(operator.pid)
    r["cpu_seconds_apply_to_ready"] = proc_cpu_seconds(operator.pid) - cpu_before
    offset_ready = operator.log.offset()
    ramp, _ = operator.log.requests(offset_before, offset_ready)
    r["ramp_requests"] = dict(ramp)
    r["reconcile_total_at_ready"] = at_ready.get("txrelay_reconcile_total", 0) - before.get("txrelay_reconcile_total", 0)
    r["reconcile_errors_at_ready"] = {k: v for k, v in at_ready.items() if k.startswith("txrelay_reconcile_errors_total")}
    buckets = bucket_delta(histogram(at_ready, "txrelay_reconcile_duration_seconds"),
                           histogram(before, "txrelay_reconcile_duration_seconds"))
    r["reconcile_buckets"] = buckets
    r["reconcile_count"] = buckets[-1][1] if buckets else None
    r["reconcile_sum_seconds"] = (at_ready.get("txrelay_reconcile_duration_seconds_sum", 0)
                                  - before.get("txrelay_reconcile_duration_seconds_sum", 0)) if has_histogram else None
    r["reconcile_p50"] = quantile(0.5, buckets)
    r["reconcile_p99"] = quantile(0.99, buckets)
    r["db_connections_at_ready"] = psql_or_none(admin_url, f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{DATABASE}'")

    # Idle: settle, then the idle window, then the longer observation minute by minute.
    log(f"settling {args.settle:.0f} s, then measuring idle for {args.idle:.0f} s"
        + (f" and counting requests for {args.observe:.0f} s more" if args.observe else ""))
    time.sleep(args.settle)
    windows = [args.idle]
    remaining = args.observe
    while remaining > 0:
        windows.append(min(60.0, remaining))
        remaining -= 60.0
    postmaster = postmaster_pid(admin_url)
    edges, rss = sample_idle(operator, windows, admin_url, postmaster,
                             on_tick=lambda n: log(f"idle minute {n} of {len(windows)} done"))
    idle = {"seconds": edges[1]["t"] - edges[0]["t"]}
    idle["rss_mib_mean"] = sum(rss[0]) / len(rss[0])
    idle["rss_mib_max"] = max(rss[0])
    idle["cpu_percent"] = 100 * (edges[1]["cpu"] - edges[0]["cpu"]) / idle["seconds"]
    if edges[0]["pg_cpu"] is not None:
        idle["postgres_cpu_percent"] = 100 * (edges[1]["pg_cpu"] - edges[0]["pg_cpu"]) / idle["seconds"]
    if edges[0]["xacts"] is not None and edges[1]["xacts"] is not None:
        idle["transactions_per_second"] = (edges[1]["xacts"] - edges[0]["xacts"]) / idle["seconds"]
    counts, samples = operator.log.requests(edges[0]["offset"], edges[1]["offset"])
    idle["requests"] = dict(counts)
    idle["requests_per_minute"] = sum(counts.values()) * 60 / idle["seconds"]
    idle["request_samples"] = samples
    idle["reconciles"] = edges[1]["metrics"].get("txrelay_reconcile_total", 0) - edges[0]["metrics"].get(
        "txrelay_reconcile_total", 0)
    r["idle"] = idle
    minutes = []
    for a, b, samples_rss in zip(edges, edges[1:], rss):
        c, _ = operator.log.requests(a["offset"], b["offset"])
        minutes.append({
            "seconds": b["t"] - a["t"], "requests": dict(c), "total": sum(c.values()),
            "cpu_percent": 100 * (b["cpu"] - a["cpu"]) / (b["t"] - a["t"]),
            "rss_mib_max": max(samples_rss),
            "reconciles": b["metrics"].get("txrelay_reconcile_total", 0) - a["metrics"].get("txrelay_reconcile_total", 0),
        })
    r["observed"] = minutes
    whole, whole_samples = operator.log.requests(edges[0]["offset"], edges[-1]["offset"])
    r["observed_total"] = {"seconds": edges[-1]["t"] - edges[0]["t"], "requests": dict(whole),
                           "per_minute": sum(whole.values()) * 60 / (edges[-1]["t"] - edges[0]["t"]),
                           "samples": whole_samples}
    r["db_connections_idle"] = psql_or_none(admin_url, f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{DATABASE}'")
    final = metrics(operator.metrics)
    later = bucket_delta(histogram(final, "txrelay_reconcile_duration_seconds"),
                         histogram(at_ready, "txrelay_reconcile_duration_seconds"))
    r["later_reconciles"] = {"count": later[-1][1] if later else None, "p50": quantile(0.5, later),
                             "p99": quantile(0.99, later)}
    r["reconcile_total_final"] = final.get("txrelay_reconcile_total", 0) - before.get("txrelay_reconcile_total", 0)
    r["reconcile_errors_final"] = {k: v for k, v in final.items() if k.startswith("txrelay_reconcile_errors_total")}
    groups, first = operator.log.problems()
    r["log_problems"] = {shape: {"count": n, "first": first[shape]} for shape, n in groups.most_common()}
    r["log_lines"] = len(operator.log.lines())
    return r


def fmt(value, pattern="{:.2f}", missing="n/a"):
    return missing if value is None else pattern.format(value)


def requests_table(counts, seconds):
    rows = ["| request | count | per minute |", "|---|---:|---:|"]
    for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        rows.append(f"| `{kind}` | {n} | {n * 60 / seconds:.1f} |")
    total = sum(counts.values())
    rows.append(f"| **all** | {total} | {total * 60 / seconds:.1f} |")
    return "\n".join(rows)


def render(r):
    pg = r.get("postgres", {})
    s = r.get("ready_seconds", {})
    out = [
        f"Operator scale: {r['relays']} TransactionRelays, one operator ({r['started']})",
        "",
        f"Machine: {r['machine']}. kube-apiserver {r.get('kube_version', '?')} (etcd, no nodes). "
        f"PostgreSQL {pg.get('server_version', '?')}: max_connections {pg.get('max_connections')}, "
        f"shared_buffers {pg.get('shared_buffers')}, fsync {pg.get('fsync')}, synchronous_commit "
        f"{pg.get('synchronous_commit')}, ssl {pg.get('ssl')} ({r.get('postgres_state', 'TXRELAY_BENCH_ADMIN_URL')}). "
        f"Binary: {r['binary']}.",
        "",
        "| Apply to Ready | value |",
        "|---|---:|",
        f"| `kubectl apply` of the List returned | {fmt(r.get('apply_seconds'))} s |",
        f"| first relay Ready | {fmt(s.get('first'))} s |",
        f"| half Ready | {fmt(s.get('half'))} s |",
        f"| 90 % Ready | {fmt(s.get('ninety'))} s |",
        f"| all {r['relays']} Ready (for their generation) | {fmt(s.get('all'), missing='not reached: ' + str(r.get('ready_count')) + ' Ready')} s |",
        f"| reconciles until then (`txrelay_reconcile_total`) | {r.get('reconcile_total_at_ready', 0):.0f} |",
        f"| reconcile p50 / p99 (estimated from histogram buckets) | {fmt(r.get('reconcile_p50'), '{:.3f}')} s / {fmt(r.get('reconcile_p99'), '{:.3f}')} s |",
        f"| reconcile mean (sum / count) | {fmt((r.get('reconcile_sum_seconds') or 0) / r['reconcile_count'] if r.get('reconcile_count') else None, '{:.3f}')} s |",
        f"| operator CPU from apply to all Ready | {fmt(r.get('cpu_seconds_apply_to_ready'), '{:.1f}')} s |",
        f"| operator RSS before the apply / at all Ready | {fmt(r.get('rss_before_apply_mib'), '{:.1f}')} / {fmt(r.get('rss_at_ready_mib'), '{:.1f}')} MiB |",
        f"| database connections (pg_stat_activity) at all Ready / idle | {r.get('db_connections_at_ready')} / {r.get('db_connections_idle')} |",
        "",
    ]
    if r.get("reconcile_errors_at_ready") or r.get("not_ready_reasons"):
        out += ["Reconcile errors until all Ready: " + json.dumps(r.get("reconcile_errors_at_ready")),
                f"Not Ready at the deadline ({r.get('ever_ready')} were Ready at some point; Ready count over time "
                f"(seconds, Ready), last changes: {(r.get('ready_timeline') or [])[-12:]}): " + json.dumps(r.get("not_ready_reasons")), ""]
    if r.get("ramp_requests"):
        ramp_seconds = s.get("all") or r.get("ready_seconds_waited") or 1
        out += [f"Operator API requests from the apply until all Ready ({ramp_seconds:.1f} s):", "",
                requests_table(r["ramp_requests"], ramp_seconds), ""]
    idle = r.get("idle")
    if idle:
        out += [
            f"Idle ({idle['seconds']:.0f} s, after a settling pause): RSS {idle['rss_mib_mean']:.1f} MiB "
            f"(max {idle['rss_mib_max']:.1f}), CPU {idle['cpu_percent']:.2f} % of one core, "
            f"{idle['requests_per_minute']:.1f} API requests per minute, {idle['reconciles']:.0f} reconciles; "
            f"PostgreSQL {fmt(idle.get('postgres_cpu_percent'), '{:.2f}')} % of one core, "
            f"{fmt(idle.get('transactions_per_second'), '{:.1f}')} transactions/s in the bench database.",
            "",
            requests_table(idle["requests"], idle["seconds"]),
            "",
        ]
        observed = r.get("observed", [])
        if len(observed) > 1:
            total = r["observed_total"]
            out += [
                f"The same and the following minutes ({total['seconds']:.0f} s in all, {total['per_minute']:.1f} "
                f"requests per minute):",
                "",
                "| minute | requests | reconciles | CPU % | RSS max MiB | by kind |",
                "|---:|---:|---:|---:|---:|---|",
            ]
            for i, m in enumerate(observed, 1):
                kinds = ", ".join(f"{k} {n}" for k, n in sorted(m["requests"].items(), key=lambda kv: -kv[1]))
                out.append(f"| {i} | {m['total']} | {m['reconciles']:.0f} | {m['cpu_percent']:.2f} | "
                           f"{m['rss_mib_max']:.1f} | {kinds} |")
            out += ["", requests_table(total["requests"], total["seconds"]), ""]
    later = r.get("later_reconciles") or {}
    out.append(f"Reconciles in all: {r.get('reconcile_total_final', 0):.0f} ({fmt(later.get('count'), '{:.0f}')} after "
               f"all Ready: p50 {fmt(later.get('p50'), '{:.3f}')} s, p99 {fmt(later.get('p99'), '{:.3f}')} s); "
               f"reconcile errors: {json.dumps(r.get('reconcile_errors_final'))}")
    problems = r.get("log_problems") or {}
    out.append(f"Operator log: {r.get('log_lines')} lines, {sum(p['count'] for p in problems.values())} WARN/ERROR")
    for shape, p in list(problems.items())[:10]:
        out.append(f"  {p['count']} x {p['first'][:300]}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
