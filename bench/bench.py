#!/usr/bin/env python3
"""`just bench`: txrelay beside the physical limits of this machine, in one run.

Starts a throwaway database on the local PostgreSQL and the rustack SQS
emulator, then measures ingest (wrk), the baselines (pgbench, wrk straight to
the emulator), drain and recovery with one and two relay processes, and the
relay's memory and CPU. Prints a table with the ratios and writes it to
.run/bench/results.md.
"""

import json
import os
import pathlib
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = ROOT / ".run" / "bench"
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", pathlib.Path.home() / ".cache/txrelay/target"))
BINARY = TARGET / "release" / "txrelay"
RUSTACK = pathlib.Path(os.environ.get("TXRELAY_RUSTACK", pathlib.Path.home() / ".cache/txrelay/tools/bin/rustack"))
ADMIN_URL = os.environ.get("TXRELAY_BENCH_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DATABASE = "txrelay_bench"
DB_URL = ADMIN_URL.rsplit("/", 1)[0] + "/" + DATABASE
SECONDS = int(os.environ.get("TXRELAY_BENCH_SECONDS", "10"))
WARMUP = 3
DRAIN_ROWS = int(os.environ.get("TXRELAY_BENCH_DRAIN_ROWS", "20000"))
# Every figure is the median of this many whole runs, shown with its range.
RUNS = int(os.environ.get("TXRELAY_BENCH_RUNS", "3"))
GROUP = 10
TOKEN = "bench-token"


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


def psql(sql, url=DB_URL):
    out = subprocess.run(["psql", "-qtAX", "-v", "ON_ERROR_STOP=1", url, "-c", sql], check=True, capture_output=True, text=True)
    return out.stdout.strip()


class Session:
    """One psql connection kept open, for polling without a new process and
    TLS handshake every time."""

    def __init__(self, url=DB_URL):
        self.process = subprocess.Popen(["psql", "-qtAX", url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        bufsize=1)

    def query(self, sql):
        self.process.stdin.write(sql.rstrip(";") + ";\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self):
        self.process.stdin.close()
        self.process.wait()


class HeldSnapshot:
    """A psql session in `BEGIN ISOLATION LEVEL REPEATABLE READ`, its
    snapshot taken by a first SELECT and held until close(): the backend's
    xmin then keeps every row version deleted or updated since from being
    vacuumed away in this database (a long report, a forgotten psql)."""

    def __init__(self, url=DB_URL):
        self.process = subprocess.Popen(["psql", "-qtAX", "-v", "ON_ERROR_STOP=1", url], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)
        self.process.stdin.write("BEGIN ISOLATION LEVEL REPEATABLE READ;\nSELECT pg_backend_pid();\n")
        self.process.stdin.flush()
        self.pid = int(self.process.stdout.readline().strip())

    def close(self):
        """Ends the transaction; returns how long it was held, in seconds
        (None if the session did not survive until now)."""
        held = None
        try:
            self.process.stdin.write("SELECT extract(epoch FROM clock_timestamp() - now());\nCOMMIT;\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline().strip()
            held = float(line) if line else None
            self.process.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return held


def txrelay(*args, schema):
    env = dict(os.environ, DATABASE_URL=DB_URL, TXRELAY_SCHEMA=schema)
    subprocess.run([str(BINARY), *args], check=True, env=env, capture_output=True)


class Rustack:
    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self):
        env = dict(os.environ, GATEWAY_LISTEN=f"127.0.0.1:{self.port}", LOG_LEVEL="error")
        self.process = subprocess.Popen([str(RUSTACK)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self):
        if self.process:
            self.process.terminate()
            self.process.wait()
            self.process = None

    def cpu_seconds(self):
        return process_cpu_seconds(self.process.pid)

    def create_queue(self, name):
        body = json.dumps({"QueueName": name}).encode()
        request = urllib.request.Request(self.endpoint + "/", data=body, method="POST", headers={
            "Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "AmazonSQS.CreateQueue"})
        with urllib.request.urlopen(request) as response:
            return json.load(response)["QueueUrl"]


class Relay:
    """A release `txrelay run` on its own ports."""

    def __init__(self, schema, queue_url, endpoint, manifest=None, label="relay"):
        self.api = free_port()
        self.metrics = free_port()
        env = dict(os.environ, DATABASE_URL=DB_URL, TXRELAY_SCHEMA=schema, SQS_QUEUE_URL=queue_url,
                   AWS_ENDPOINT_URL=endpoint, AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="bench",
                   AWS_SECRET_ACCESS_KEY="bench", RELAY_API_TOKENS=TOKEN, RELAY_ADMIN_TOKENS=TOKEN,
                   RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        args = [str(BINARY), "run", "--listen", f"127.0.0.1:{self.api}", "--metrics-listen", f"127.0.0.1:{self.metrics}"]
        if manifest:
            args += ["--config", str(manifest)]
        self.log = open(RUN / f"{label}.log", "w")
        self.process = subprocess.Popen(args, env=env, stdout=self.log, stderr=self.log)
        wait_for_port(self.metrics)

    def cpu_seconds(self):
        return process_cpu_seconds(self.process.pid)

    def peak_rss_mib(self):
        for line in pathlib.Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def wrk(url, script, connections, seconds, env):
    threads = max(1, min(2, connections))
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script), url],
        check=True, capture_output=True, text=True, env=dict(os.environ, **env))
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    result = json.loads(line)
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def pgbench(script, clients, seconds):
    out = subprocess.run(
        ["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds),
         "-f", str(script), DB_URL], check=True, capture_output=True, text=True,
        # As the relay's own connections: the triggers that keep
        # unsent_transactions in step for other writers stay out of the way,
        # so the baselines are the statements alone.
        env={**os.environ, "PGOPTIONS": "-c txrelay.relay_writes=on"})
    for line in out.stdout.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError(out.stdout + out.stderr)


def process_cpu_seconds(pid):
    """User and system CPU time of one process so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds():
    """CPU time of every PostgreSQL process so far (backends, WAL writer,
    checkpointer), with the backends that exited meanwhile: the postmaster
    holds theirs as its children's time."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        if name.startswith("postgres"):
            fields = text.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / ticks


def fill_unsent(schema, rows):
    psql(f"""
        INSERT INTO {schema}.transactions (reference, external_reference, idempotency_key, transaction_type, status, source,
            instruction_type, incoming_currency, outgoing_currency, value, fee, wallet_address, payload, next_attempt_at)
        SELECT 'R' || g, 'E' || g, 'K' || g, 'DEPOSIT', 'PENDING_PAYER', 'ANCHOR_SOLANA', 'Transaction', 'EUR', 'EURC', 100, 1.5,
            'W' || (g % 1000),
            ('{{"meta_data":{{"source":"DAPP","instruction_type":"Transaction","idempotency_key":"K' || g
             || '"}},"payload":{{"reference":"R' || g || '","external_reference":"E' || g
             || '","source":"ANCHOR_SOLANA","transaction_type":"DEPOSIT","status":"PENDING_PAYER","incoming_currency":"EUR","outgoing_currency":"EURC","value":"100.00","fee":"1.50","first_name":"Ada","last_name":"Lovelace","payer":"user-1","payee":null}}}}')::json,
            now()
        FROM generate_series(1, {rows}) AS g""")
    psql(f"VACUUM ANALYZE {schema}.transactions, {schema}.unsent_transactions")


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) // 1024 // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    pg = psql("SHOW server_version", ADMIN_URL)
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, {platform.system()} {platform.release()}, PostgreSQL {pg}"


def drain(processes, rustack, queue_name, manifest, schema=None, rows=None, fill=None, held=False):
    """Rows wait while the queue is down; the queue comes back; time until every row is sent.

    `rows` and `fill` (default DRAIN_ROWS, fill_unsent) pick the backlog;
    `held` keeps a REPEATABLE READ transaction open from before the relays
    start until they stop (sustained mode)."""
    schema = schema or f"drain{processes}"
    rows = rows or DRAIN_ROWS
    txrelay("migrate", schema=schema)
    (fill or fill_unsent)(schema, rows)
    snapshot = HeldSnapshot() if held else None
    rustack.stop()
    queue_url = f"{rustack.endpoint}/000000000000/{queue_name}"
    relays = [Relay(schema, queue_url, rustack.endpoint, manifest, f"drain{processes}-{i}") for i in range(processes)]
    time.sleep(2)
    rustack.start()
    rustack.create_queue(queue_name)
    up = time.time()
    pg_before = postgres_cpu_seconds()
    relays_before = sum(relay.cpu_seconds() for relay in relays)
    emulator_before = rustack.cpu_seconds()
    first = None
    session = Session()
    while True:
        # Polled cheaply (the narrow table the relay keeps in step, then the
        # first delivery only until it is seen): the poll's own database CPU
        # is counted against the drain.
        if first is None:
            first_sent = session.query(f"SELECT extract(epoch FROM min(queue_sent_at)) FROM {schema}.transactions")
            first = float(first_sent) if first_sent else None
        unsent = session.query(f"SELECT count(*) FROM {schema}.unsent_transactions")
        if int(unsent) == 0:
            unsent = session.query(
                f"SELECT count(*) FROM {schema}.transactions WHERE message_id IS NULL AND failed_at IS NULL")
        if int(unsent) == 0:
            break
        if time.time() - up > 300:
            raise RuntimeError(f"drain of {schema} did not finish: {unsent} unsent")
        time.sleep(0.1)
    pg_cpu = postgres_cpu_seconds() - pg_before
    relays_cpu = sum(relay.cpu_seconds() for relay in relays) - relays_before
    emulator_cpu = rustack.cpu_seconds() - emulator_before
    session.close()
    first_sent, last = (float(v) for v in psql(
        f"SELECT extract(epoch FROM min(queue_sent_at)), extract(epoch FROM max(queue_sent_at)) "
        f"FROM {schema}.transactions").split("|"))
    for relay in relays:
        relay.stop()
    if snapshot:
        snapshot.close()
    # `rows_per_s` counts from the queue's return (recovery included, as
    # the drain targets always have); `sending_rows_per_s` from the first
    # row recorded sent to the last: the rate the claim+mark baseline,
    # which has no queue to wait for, is compared with.
    if first is None:  # drained between two polls: the first send is the earliest recorded
        first = first_sent
    return {"seconds": last - up, "rows_per_s": rows / (last - up), "first_delivery_s": first - up,
            "sending_rows_per_s": rows / max(last - first_sent, 1e-3),
            "pg_cpu_ms_per_row": pg_cpu / rows * 1000, "relay_cpu_ms_per_row": relays_cpu / rows * 1000,
            "emulator_cpu_ms_per_row": emulator_cpu / rows * 1000}


def drain_only():
    """TXRELAY_BENCH_ONLY=drain: just the drains, for iterating on the relay loop."""
    RUN.mkdir(parents=True, exist_ok=True)
    psql(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)", ADMIN_URL)
    psql(f"CREATE DATABASE {DATABASE}", ADMIN_URL)
    rustack = Rustack()
    rustack.start()
    manifest = ROOT / "bench" / "relay.yaml"
    for n in (1, 2):
        print(n, drain(n, rustack, f"drain-{n}", manifest))
    rustack.stop()


def median_of(runs):
    """The median of every number across runs, with `<key>_range` (min, max) beside it."""
    first = runs[0]
    if isinstance(first, dict):
        out = {}
        for key in first:
            values = [run[key] for run in runs]
            out[key] = median_of(values)
            if all(isinstance(v, (int, float)) for v in values):
                out[f"{key}_range"] = (min(values), max(values))
        return out
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return sorted(runs)[len(runs) // 2]
    return first


def main():
    if not BINARY.exists() or not RUSTACK.exists():
        sys.exit(f"missing {BINARY} or {RUSTACK}: run `just bench`, which builds them")
    RUN.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in range(RUNS):
        log(f"run {n + 1} of {RUNS}")
        runs.append(measure())
    results = median_of(runs)
    results["runs"] = RUNS
    (RUN / "results.json").write_text(json.dumps({"median": results, "runs": runs}, indent=2, default=str))
    table = render(results)
    (RUN / "results.md").write_text(table)
    print(table)


def measure():
    psql(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)", ADMIN_URL)
    psql(f"CREATE DATABASE {DATABASE}", ADMIN_URL)
    results = {"machine": machine(), "seconds": SECONDS}
    rustack = Rustack()
    rustack.start()
    manifest = ROOT / "bench" / "relay.yaml"

    log("baselines: pgbench single-row INSERT")
    txrelay("migrate", schema="pgbench_ref")
    psql("CREATE SEQUENCE pgbench_ref.bench_seq")
    results["pgbench_insert"] = {}
    for clients in (1, 32):
        cpu_before = postgres_cpu_seconds()
        tps = pgbench(ROOT / "bench/insert.sql", clients, SECONDS)
        results["pgbench_insert"][clients] = tps
        if clients == 32:
            results["pg_cpu_ms_per_pgbench_insert"] = (postgres_cpu_seconds() - cpu_before) / (tps * SECONDS) * 1000
    log(f"baselines: pgbench INSERT of {GROUP} rows per statement (a /new group)")
    results["pgbench_group_insert_rows_per_s"] = pgbench(ROOT / "bench/insert_group.sql", 32, SECONDS) * GROUP

    log("baselines: pgbench marking 100 pre-filled rows sent per UPDATE")
    txrelay("migrate", schema="pgbench_drain")
    fill_unsent("pgbench_drain", 400_000)
    cpu_before = postgres_cpu_seconds()
    results["pgbench_mark_sent_rows_per_s"] = pgbench(ROOT / "bench/mark_sent.sql", 4, SECONDS) * 100
    results["pg_cpu_ms_per_mark_sent_row"] = (postgres_cpu_seconds() - cpu_before) / (
        results["pgbench_mark_sent_rows_per_s"] * SECONDS) * 1000

    log("baselines: the emulator alone (wrk, 32 connections)")
    raw_queue = rustack.create_queue("raw")
    single = wrk(rustack.endpoint + "/", ROOT / "bench/sqs.lua", 32, SECONDS, {"BENCH_QUEUE_URL": raw_queue, "BENCH_BATCH": "1"})
    batch = wrk(rustack.endpoint + "/", ROOT / "bench/sqs.lua", 32, SECONDS, {"BENCH_QUEUE_URL": raw_queue, "BENCH_BATCH": "10"})
    sequential = wrk(rustack.endpoint + "/", ROOT / "bench/sqs.lua", 1, SECONDS, {"BENCH_QUEUE_URL": raw_queue, "BENCH_BATCH": "10"})
    results["emulator_send_msgs_per_s"] = single["rps"]
    results["emulator_batch_msgs_per_s"] = batch["rps"] * 10
    results["emulator_sequential_batch_msgs_per_s"] = sequential["rps"] * 10
    rustack.stop()
    rustack.start()

    log("ingest: POST /new at 1, 32 and 256 connections")
    txrelay("migrate", schema="ingest")
    queue = rustack.create_queue("ingest")
    relay = Relay("ingest", queue, rustack.endpoint, manifest, "ingest")
    time.sleep(2)
    results["rss_idle_mib"] = relay.peak_rss_mib()
    results["ingest"] = {}
    for connections in (1, 32, 256):
        env = {"BENCH_TOKEN": TOKEN}
        wrk(f"http://127.0.0.1:{relay.api}/new", ROOT / "bench/new.lua", connections, WARMUP,
            dict(env, BENCH_PREFIX=f"warm{connections}"))
        cpu_before = relay.cpu_seconds()
        pg_before = postgres_cpu_seconds()
        run = wrk(f"http://127.0.0.1:{relay.api}/new", ROOT / "bench/new.lua", connections, SECONDS,
                  dict(env, BENCH_PREFIX=f"run{connections}"))
        run["cpu_s_per_1000"] = (relay.cpu_seconds() - cpu_before) / run["requests"] * 1000
        run["pg_cpu_ms_per_request"] = (postgres_cpu_seconds() - pg_before) / run["requests"] * 1000
        results["ingest"][connections] = run
        log(f"  {connections:>3} connections: {run['rps']:.0f} req/s, p99 {run['p99_us'] / 1000:.1f} ms, {run['errors']} errors")
    results["rss_load_mib"] = relay.peak_rss_mib()
    unsent = int(psql("SELECT count(*) FROM ingest.transactions WHERE message_id IS NULL"))
    results["ingest_unsent_after"] = unsent
    relay.stop()

    log(f"drain: {DRAIN_ROWS} rows, queue down then up, one relay process")
    results["drain_1"] = drain(1, rustack, "drain-one", manifest)
    log(f"drain: {DRAIN_ROWS} rows, two relay processes")
    results["drain_2"] = drain(2, rustack, "drain-two", manifest)
    log(f"drain: {DRAIN_ROWS} rows, one process sending one batch of 10 at a time")
    results["drain_sequential"] = drain(1, rustack, "drain-seq", ROOT / "bench/relay-sequential.yaml", "drainseq")
    rustack.stop()
    return results


def render(r):
    ingest32 = r["ingest"][32]
    insert32 = r["pgbench_insert"][32]
    drain_limit = min(r["pgbench_mark_sent_rows_per_s"], r["emulator_batch_msgs_per_s"])
    lines = [
        f"Machine: {r['machine']}",
        f"Each measurement: {r['seconds']} s after a {WARMUP} s warm-up; drains of {DRAIN_ROWS} rows; "
        f"every figure is the median of {r['runs']} whole runs, [min-max] beside it.",
        "",
        "| Ingest `POST /new` | req/s | p50 | p99 | p99.9 | errors | CPU s / 1000 req |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    def span(d, key, scale=1, fmt="{:.0f}"):
        low, high = d.get(f"{key}_range", (d[key], d[key]))
        return f"{fmt.format(d[key] / scale)} [{fmt.format(low / scale)}-{fmt.format(high / scale)}]"

    for c, run in r["ingest"].items():
        if not isinstance(run, dict):
            continue
        lines.append(f"| {c} connections | {span(run, 'rps')} | {span(run, 'p50_us', 1000, '{:.1f}')} ms | "
                     f"{span(run, 'p99_us', 1000, '{:.1f}')} ms | {run['p999_us'] / 1000:.1f} ms | {run['errors']} | "
                     f"{run['cpu_s_per_1000']:.2f} |")
    lines += [
        "",
        "| Baseline (same run) | rate |",
        "|---|---:|",
        f"| pgbench single-row INSERT, 1 client | {r['pgbench_insert'][1]:.0f} inserts/s |",
        f"| pgbench single-row INSERT, 32 clients | {insert32:.0f} inserts/s |",
        f"| pgbench INSERT of {GROUP} rows per statement, 32 clients | {r['pgbench_group_insert_rows_per_s']:.0f} rows/s |",
        f"| PostgreSQL CPU per pgbench INSERT (32 clients) | {r['pg_cpu_ms_per_pgbench_insert']:.3f} ms |",
        f"| PostgreSQL CPU per `/new` (32 connections) | {ingest32['pg_cpu_ms_per_request']:.3f} ms |",
        f"| pgbench mark 100 unsent rows sent per UPDATE, 4 clients | {r['pgbench_mark_sent_rows_per_s']:.0f} rows/s |",
        f"| PostgreSQL CPU per row marked sent by pgbench | {r['pg_cpu_ms_per_mark_sent_row']:.3f} ms |",
        f"| PostgreSQL CPU per row drained (1 process: claim, send, record) | {r['drain_1']['pg_cpu_ms_per_row']:.3f} ms |",
        f"| emulator SendMessage, wrk 32 connections | {r['emulator_send_msgs_per_s']:.0f} msgs/s |",
        f"| emulator SendMessageBatch (10), wrk 32 connections | {r['emulator_batch_msgs_per_s']:.0f} msgs/s |",
        f"| emulator SendMessageBatch (10), one sender, one call at a time | {r['emulator_sequential_batch_msgs_per_s']:.0f} msgs/s |",
        "",
        "| Drain (queue down, then up) | time | rows/s | first delivery after the queue returns |",
        "|---|---:|---:|---:|",
    ]
    for key, label in (("drain_1", "1 relay process"), ("drain_2", "2 relay processes"),
                       ("drain_sequential", "1 process, one batch of 10 at a time")):
        d = r[key]
        lines.append(f"| {DRAIN_ROWS} rows, {label} | {d['seconds']:.2f} s | "
                     f"{d['rows_per_s']:.0f} | {d['first_delivery_s']:.2f} s |")
    lines += [
        "",
        "| Resources | value |",
        "|---|---:|",
        f"| peak RSS, idle | {r['rss_idle_mib']:.1f} MiB |",
        f"| peak RSS, after 256 connections | {r['rss_load_mib']:.1f} MiB |",
        f"| CPU seconds per 1000 requests at 32 connections | {ingest32['cpu_s_per_1000']:.2f} |",
        "",
        "| Ratio | value | target |",
        "|---|---:|---:|",
        f"| ingest req/s ÷ pgbench inserts/s (32) | {ingest32['rps'] / insert32:.1%} | ≥ 50 % |",
        f"| ingest p99 at 32 connections | {ingest32['p99_us'] / 1000:.1f} ms | ≤ 25 ms |",
        f"| ingest p50 at 1 connection | {r['ingest'][1]['p50_us'] / 1000:.1f} ms | no worse than 1.4 ms |",
        f"| PostgreSQL CPU per `/new` ÷ per pgbench INSERT | "
        f"{ingest32['pg_cpu_ms_per_request'] / r['pg_cpu_ms_per_pgbench_insert']:.1f}× | ≤ 2× |",
        f"| drain rows/s ÷ lower drain limit ({drain_limit:.0f}/s), 1 process | {r['drain_1']['rows_per_s'] / drain_limit:.1%} | ≥ 50 % |",
        f"| drain rows/s ÷ lower drain limit, 2 processes | {r['drain_2']['rows_per_s'] / drain_limit:.1%} | not slower than 1 |",
        f"| drain rows/s ÷ the same relay sending one batch of 10 at a time | "
        f"{r['drain_1']['rows_per_s'] / r['drain_sequential']['rows_per_s']:.0%} | ≥ 100 % |",
        f"| recovery: first delivery after the queue returns | {r['drain_1']['first_delivery_s']:.2f} s | ≤ 2 s |",
        f"| peak RSS idle / under 256 connections | {r['rss_idle_mib']:.0f} / {r['rss_load_mib']:.0f} MiB | ≤ 50 / ≤ 200 MiB |",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Sustained mode: `scripts/bench.sh sustained` (or TXRELAY_BENCH_MODE=sustained).
#
# Ten minutes of POST /new at 32 connections, reported per minute (req/s,
# p50, p99, and the bookkeeping table's dead tuples, size and autovacuums);
# the same with a REPEATABLE READ transaction held open from the start; a
# 50,000-row backlog drained with and without that transaction; and, in the
# same run, the baselines the ratios are taken against: pgbench single-row
# INSERT and bench/claim_mark.sql (the least SQL a correct relay runs per
# batch). PostgreSQL at its defaults: the run refuses a server with
# autovacuum, fsync or synchronous_commit off.

SUSTAINED_SECONDS = int(os.environ.get("TXRELAY_BENCH_SUSTAINED_SECONDS", "600"))
SUSTAINED_WINDOW = int(os.environ.get("TXRELAY_BENCH_SUSTAINED_WINDOW", "60"))
SUSTAINED_CONNECTIONS = int(os.environ.get("TXRELAY_BENCH_SUSTAINED_CONNECTIONS", "32"))
SUSTAINED_DRAIN_ROWS = int(os.environ.get("TXRELAY_BENCH_SUSTAINED_DRAIN_ROWS", "50000"))
# pgbench clients for the claim+mark baseline, and its sessions'
# synchronous_commit: `off` is what the relay's own bookkeeping connections
# set for claims and results (src/store/mod.rs), so the ratio is taken
# against those; `on` (the server's default) is shown beside them.
CLAIM_MARK_CLIENTS = [int(c) for c in os.environ.get("TXRELAY_BENCH_CLAIM_MARK_CLIENTS", "1,4").split(",")]
CLAIM_MARK_SYNC = os.environ.get("TXRELAY_BENCH_CLAIM_MARK_SYNC", "off,on").split(",")
SETTINGS = ("autovacuum", "fsync", "synchronous_commit", "autovacuum_vacuum_scale_factor",
            "autovacuum_vacuum_cost_delay", "shared_buffers", "max_connections")
MUST_BE_ON = ("autovacuum", "fsync", "synchronous_commit")
TARGETS = {"steady": 0.90, "p99_ms": 15.0, "held_steady": 0.70, "held_drain": 0.60, "baseline_drain": 0.50,
           "ingest_vs_insert": 0.80}


def server_settings():
    """`SHOW` of the settings the issue names, with where each value comes from."""
    names = ",".join(f"'{n}'" for n in SETTINGS)
    rows = psql(f"SELECT name, current_setting(name), source FROM pg_settings WHERE name IN ({names})")
    found = {name: (value, source) for name, value, source in (line.split("|") for line in rows.splitlines())}
    return {name: {"value": found[name][0], "source": found[name][1]} for name in SETTINGS}


def fill_unsent_fast(schema, rows, prefix="fill"):
    """`rows` unsent rows in both tables in one statement (bench/fill_unsent.sql), then VACUUM ANALYZE."""
    subprocess.run(["psql", "-qX", "-v", "ON_ERROR_STOP=1", "-v", f"schema={schema}", "-v", f"rows={rows}",
                    "-v", f"prefix={prefix}", "-f", str(ROOT / "bench/fill_unsent.sql"), DB_URL],
                   check=True, capture_output=True, text=True)


def table_stats(session, schema):
    """The bookkeeping table as pg_stat_user_tables sees it, the backlog, and
    the oldest snapshot and transaction in this database (this session's own
    excluded) and in the whole cluster."""
    line = session.query(f"""
        SELECT s.n_dead_tup, s.n_live_tup, pg_total_relation_size(s.relid), s.autovacuum_count,
            coalesce(to_char(s.last_autovacuum, 'HH24:MI:SS'), '-'),
            (SELECT count(*) FROM {schema}.unsent_transactions),
            (SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = '{schema}' AND relname = 'transactions'),
            (SELECT coalesce(max(age(backend_xmin)), 0) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()),
            (SELECT coalesce(extract(epoch FROM now() - min(xact_start)), 0)::float8 FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()),
            (SELECT coalesce(max(age(backend_xmin)), 0) FROM pg_stat_activity WHERE pid <> pg_backend_pid())
        FROM pg_stat_user_tables s WHERE s.schemaname = '{schema}' AND s.relname = 'unsent_transactions'""")
    f = line.split("|")
    return {"dead_tup": int(f[0]), "live_tup": int(f[1]), "size_bytes": int(f[2]), "autovacuum_count": int(f[3]),
            "last_autovacuum": f[4], "backlog": int(f[5]), "transactions_dead_tup": int(f[6] or 0),
            "xmin_age": int(f[7]), "oldest_xact_s": float(f[8]), "cluster_xmin_age": int(f[9])}


def purge_queue(rustack, queue_url):
    """Empties the emulator's queue so ten minutes of messages do not pile
    up in its memory (and slow it) during the measurement. Best effort."""
    body = json.dumps({"QueueUrl": queue_url}).encode()
    request = urllib.request.Request(rustack.endpoint + "/", data=body, method="POST", headers={
        "Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "AmazonSQS.PurgeQueue"})
    try:
        with urllib.request.urlopen(request, timeout=5):
            return True
    except Exception as error:  # noqa: BLE001 - an emulator without PurgeQueue only keeps the messages
        log(f"  (PurgeQueue refused: {error})")
        return False


def steady(rustack, manifest, held):
    """SUSTAINED_SECONDS of POST /new at SUSTAINED_CONNECTIONS, one wrk per window."""
    schema = "steadyheld" if held else "steady"
    txrelay("migrate", schema=schema)
    queue = rustack.create_queue(schema)
    relay = Relay(schema, queue, rustack.endpoint, manifest, schema)
    time.sleep(2)
    url = f"http://127.0.0.1:{relay.api}/new"
    env = {"BENCH_TOKEN": TOKEN}
    count = max(1, round(SUSTAINED_SECONDS / SUSTAINED_WINDOW))
    session = Session()
    # Held from the start: opened before the first request.
    snapshot = HeldSnapshot() if held else None
    windows = {}
    try:
        wrk(url, ROOT / "bench/new.lua", SUSTAINED_CONNECTIONS, WARMUP, dict(env, BENCH_PREFIX=f"{schema}-warm"))
        purging = True
        for i in range(1, count + 1):
            run = wrk(url, ROOT / "bench/new.lua", SUSTAINED_CONNECTIONS, SUSTAINED_WINDOW,
                      dict(env, BENCH_PREFIX=f"{schema}-{i}"))
            run.update(table_stats(session, schema))
            windows[i] = run
            log(f"  {schema} window {i}/{count}: {run['rps']:.0f} req/s, p50 {run['p50_us'] / 1000:.1f} ms, "
                f"p99 {run['p99_us'] / 1000:.1f} ms, dead {run['dead_tup']}, {run['size_bytes'] / 1048576:.1f} MiB, "
                f"autovacuums {run['autovacuum_count']}, xmin age {run['xmin_age']}")
            if purging:
                purging = purge_queue(rustack, queue)
    finally:
        # NaN, not None, when the held session died: medians sort these.
        held_s = (snapshot.close() or float("nan")) if snapshot else None
        session.close()
        relay.stop()
    psql(f"DROP SCHEMA {schema} CASCADE")
    requests = sum(w["requests"] for w in windows.values())
    seconds = sum(w["duration_us"] for w in windows.values()) / 1e6
    return {"windows": windows, "last_over_first": windows[count]["rps"] / windows[1]["rps"],
            "worst_p99_us": max(w["p99_us"] for w in windows.values()), "mean_rps": requests / seconds,
            "errors": sum(w["errors"] for w in windows.values()), "held_s": held_s}


def drain_backlog(rustack, manifest, held):
    """SUSTAINED_DRAIN_ROWS loaded by SQL, drained by one relay (the default drain)."""
    schema = "backlogheld" if held else "backlog"
    result = drain(1, rustack, schema, manifest, schema, rows=SUSTAINED_DRAIN_ROWS,
                   fill=lambda s, rows: fill_unsent_fast(s, rows, s), held=held)
    session = Session()
    stats = table_stats(session, schema)
    session.close()
    result.update({k: stats[k] for k in ("dead_tup", "size_bytes", "autovacuum_count", "transactions_dead_tup")})
    psql(f"DROP SCHEMA {schema} CASCADE")
    return result


def claim_mark_baseline(rows, clients, sync):
    """bench/claim_mark.sql on `rows` pre-filled rows until none is unsent:
    rows / (last mark - start), and 100 x the transactions/s pgbench counts."""
    schema = "claimmark"
    psql(f"TRUNCATE {schema}.transactions")
    fill_unsent_fast(schema, rows, f"c{clients}{sync}")
    env = {**os.environ, "PGOPTIONS": f"-c search_path={schema} -c txrelay.relay_writes=on -c synchronous_commit={sync}"}
    start = time.time()
    remaining = rows
    tps = None
    for _ in range(10):
        per_client = -(-remaining // (100 * clients)) + 2
        out = subprocess.run(["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)),
                              "-t", str(per_client), "-f", str(ROOT / "bench/claim_mark.sql"), DB_URL],
                             check=True, capture_output=True, text=True, env=env)
        if tps is None:
            tps = next(float(l.split()[2]) for l in out.stdout.splitlines() if l.startswith("tps = "))
        remaining = int(psql(f"SELECT count(*) FROM {schema}.unsent_transactions"))
        if remaining == 0:
            break
    else:
        raise RuntimeError(f"claim_mark.sql left {remaining} rows unsent")
    last, sent, most = psql(f"SELECT extract(epoch FROM max(queue_sent_at)), count(*) FILTER (WHERE message_id IS NOT NULL), "
                            f"max(attempts) FROM {schema}.transactions").split("|")
    if int(sent) != rows or int(most) != 1:
        raise RuntimeError(f"claim_mark.sql: {sent} of {rows} rows sent, up to {most} attempts")
    return {"seconds": float(last) - start, "rows_per_s": rows / (float(last) - start), "pgbench_rows_per_s": tps * 100,
            "clients": clients, "sync": sync}


def sustained_measure(options, manifest):
    psql(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)", ADMIN_URL)
    psql(f"CREATE DATABASE {DATABASE}", ADMIN_URL)
    results = {"machine": machine(), "settings": server_settings(), "load_before": os.getloadavg()}
    log("PostgreSQL: " + ", ".join(f"{k} = {v['value']} ({v['source']})" for k, v in results["settings"].items()))
    off = [n for n in MUST_BE_ON if results["settings"][n]["value"] != "on"]
    if off and os.environ.get("TXRELAY_BENCH_ALLOW_NONDEFAULT") != "1":
        sys.exit(f"{', '.join(off)} off on this server: the sustained bench runs at the server's defaults "
                 "(unset TXRELAY_BENCH_ADMIN_URL for the private cluster, or TXRELAY_BENCH_ALLOW_NONDEFAULT=1)")
    variants = [v for v in (False, True) if (v and not options.unheld) or (not v and not options.held)]
    rustack = Rustack()
    rustack.start()
    try:
        if not options.no_baselines:
            log(f"baseline: pgbench single-row INSERT, {SUSTAINED_CONNECTIONS} clients, {SECONDS} s")
            txrelay("migrate", schema="pgbench_ref")
            psql("CREATE SEQUENCE pgbench_ref.bench_seq")
            results["pgbench_insert"] = pgbench(ROOT / "bench/insert.sql", SUSTAINED_CONNECTIONS, SECONDS)
            psql("DROP SCHEMA pgbench_ref CASCADE")
            txrelay("migrate", schema="claimmark")
            results["claim_mark"] = {}
            for sync in CLAIM_MARK_SYNC:
                for clients in CLAIM_MARK_CLIENTS:
                    log(f"baseline: claim_mark.sql draining {SUSTAINED_DRAIN_ROWS} rows, {clients} clients, "
                        f"synchronous_commit={sync}")
                    run = claim_mark_baseline(SUSTAINED_DRAIN_ROWS, clients, sync)
                    results["claim_mark"][f"c{clients} sync={sync}"] = run
                    log(f"  {run['rows_per_s']:.0f} rows/s ({run['seconds']:.2f} s)")
            psql("DROP SCHEMA claimmark CASCADE")
        for held in variants if not options.no_steady else ():
            log(f"steady: {SUSTAINED_SECONDS} s of POST /new at {SUSTAINED_CONNECTIONS} connections, "
                f"{SUSTAINED_WINDOW} s windows{', REPEATABLE READ transaction held' if held else ''}")
            results["steady_held" if held else "steady"] = steady(rustack, manifest, held)
            rustack.stop()  # a fresh emulator for what follows
            rustack.start()
        for held in variants if not options.no_drain else ():
            log(f"drain: {SUSTAINED_DRAIN_ROWS} rows{', REPEATABLE READ transaction held' if held else ''}")
            results["drain_held" if held else "drain"] = run = drain_backlog(rustack, manifest, held)
            log(f"  {run['rows_per_s']:.0f} rows/s ({run['seconds']:.2f} s; {run['sending_rows_per_s']:.0f} rows/s "
                f"from the first row sent), CPU ms per row: PostgreSQL {run['pg_cpu_ms_per_row']:.3f}, relay "
                f"{run['relay_cpu_ms_per_row']:.3f}, emulator {run['emulator_cpu_ms_per_row']:.3f}; dead {run['dead_tup']}")
    finally:
        rustack.stop()
    results["load_after"] = os.getloadavg()
    sustained_ratios(results)
    return results


def sustained_ratios(r):
    """The six figures the issue sets targets for, per run (medians are taken of these)."""
    ratios = {}
    if "steady" in r:
        ratios["steady"] = r["steady"]["last_over_first"]
        ratios["p99_ms"] = r["steady"]["worst_p99_us"] / 1000
    if "steady_held" in r:
        ratios["held_steady"] = r["steady_held"]["last_over_first"]
    if "drain" in r and "drain_held" in r:
        # From the queue's return, both: as this ratio was first measured.
        ratios["held_drain"] = r["drain_held"]["rows_per_s"] / r["drain"]["rows_per_s"]
    if "drain" in r and r.get("claim_mark"):
        # Against the best baseline whose sessions commit as the relay's
        # bookkeeping does (synchronous_commit off), else the best of all.
        same = {k: v for k, v in r["claim_mark"].items() if k.endswith("sync=off")} or r["claim_mark"]
        best = max(same, key=lambda k: same[k]["rows_per_s"])
        r["claim_mark_best"] = best
        # The drain from its first row recorded sent to its last: the
        # baseline has no queue to wait for, and the recovery before the
        # first send (up to the relay's 1 s probe interval) is no part of a
        # drain's rate. (Until 2026-12-03 this ratio counted it: 27 %.)
        ratios["baseline_drain"] = r["drain"]["sending_rows_per_s"] / same[best]["rows_per_s"]
    if "steady" in r and "pgbench_insert" in r:
        ratios["ingest_vs_insert"] = r["steady"]["mean_rps"] / r["pgbench_insert"]
    r["ratios"] = ratios


def sustained_render(r, options):
    def span(d, key, scale=1.0, fmt="{:.0f}"):
        low, high = d.get(f"{key}_range", (d[key], d[key]))
        if fmt.format(low / scale) == fmt.format(high / scale):
            return fmt.format(d[key] / scale)
        return f"{fmt.format(d[key] / scale)} [{fmt.format(low / scale)}-{fmt.format(high / scale)}]"

    settings = ", ".join(f"{k} = {v['value']}" + ("" if v["source"] == "default" else f" ({v['source']})")
                         for k, v in r["settings"].items())
    lines = [
        f"Machine: {r['machine']}",
        f"PostgreSQL settings (SHOW): {settings}.",
        "The relay's own bookkeeping connections (claims, results) set synchronous_commit = off per session; "
        "its /new INSERTs commit at the server's setting.",
        f"Load average (1/5/15 min) before / after: {' '.join(f'{x:.2f}' for x in r['load_before'])} / "
        f"{' '.join(f'{x:.2f}' for x in r['load_after'])} (a build or test beside the bench shows here).",
        f"POST /new at {SUSTAINED_CONNECTIONS} connections for {SUSTAINED_SECONDS} s in {SUSTAINED_WINDOW} s windows "
        f"(one wrk per window, after a {WARMUP} s warm-up); drains of {SUSTAINED_DRAIN_ROWS} rows loaded by SQL; "
        f"every figure is the median of {r['runs']} whole runs, [min-max] beside it.",
        "",
    ]
    for key, title in (("steady", "Sustained POST /new"),
                       ("steady_held", "Sustained POST /new, REPEATABLE READ transaction held from the start")):
        if key not in r:
            continue
        s = r[key]
        lines += [
            f"| {title} | req/s | p50 | p99 | errors | backlog | dead tuples | live tuples | size | "
            "autovacuums (last) | xmin age | oldest xact |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, w in s["windows"].items():
            if not isinstance(w, dict):
                continue
            lines.append(
                f"| {(i - 1) * SUSTAINED_WINDOW}-{i * SUSTAINED_WINDOW} s | {span(w, 'rps')} | "
                f"{span(w, 'p50_us', 1000, '{:.1f}')} ms | {span(w, 'p99_us', 1000, '{:.1f}')} ms | {w['errors']} | "
                f"{w['backlog']} | {span(w, 'dead_tup')} | {w['live_tup']} | {w['size_bytes'] / 1048576:.1f} MiB | "
                f"{w['autovacuum_count']} ({w['last_autovacuum']}) | {w['xmin_age']} | {w['oldest_xact_s']:.0f} s |")
        held = f"; transaction held {s['held_s']:.0f} s" if s.get("held_s") else ""
        lines += [f"Whole run: {s['mean_rps']:.0f} req/s, {s['errors']} errors{held}.", ""]
    if "claim_mark" in r or "drain" in r or "drain_held" in r:
        lines += ["| Drain of a backlog | time | rows/s from the queue's return | rows/s sending (txrelay: first row "
                  "recorded sent to last; pgbench: start to last mark) | "
                  "CPU ms per row: PostgreSQL / relay / emulator | dead tuples after | size after |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for key, label in (("drain", "txrelay, 1 process"), ("drain_held", "txrelay, 1 process, transaction held")):
            if key in r:
                d = r[key]
                lines.append(f"| {label} | {d['seconds']:.2f} s | {span(d, 'rows_per_s')} | "
                             f"{span(d, 'sending_rows_per_s')} | {d['pg_cpu_ms_per_row']:.3f} / "
                             f"{d['relay_cpu_ms_per_row']:.3f} / {d['emulator_cpu_ms_per_row']:.3f} | "
                             f"{d['dead_tup']} | {d['size_bytes'] / 1048576:.1f} MiB |")
        for d in r.get("claim_mark", {}).values():
            lines.append(f"| bench/claim_mark.sql, pgbench, {d['clients']} client(s), synchronous_commit "
                         f"{d['sync']} | {d['seconds']:.2f} s | | {span(d, 'rows_per_s')} "
                         f"(pgbench's count: {d['pgbench_rows_per_s']:.0f}) | | | |")
        lines.append("")
    if "pgbench_insert" in r:
        lines += [f"pgbench single-row INSERT (bench/insert.sql), {SUSTAINED_CONNECTIONS} clients, {r['seconds']} s: "
                  f"{r['pgbench_insert']:.0f} inserts/s.", ""]
    labels = {
        "steady": "last ÷ first window req/s, c=32",
        "p99_ms": "worst per-window p99, c=32",
        "held_steady": "last ÷ first window req/s, transaction held",
        "held_drain": "drain rows/s (from the queue's return), held ÷ not held",
        "baseline_drain": f"drain rows/s (first row sent to last) ÷ claim+mark baseline ({r.get('claim_mark_best', '?')})",
        "ingest_vs_insert": "whole-run /new req/s ÷ pgbench single-row INSERT (32)",
    }
    lines += ["| Target | value | target | met |", "|---|---:|---:|:---:|"]
    ratios = r.get("ratios", {})
    for key, label in labels.items():
        if key not in ratios:
            lines.append(f"| {label} | n/a | | |")
            continue
        value, target = ratios[key], TARGETS[key]
        if key == "p99_ms":
            lines.append(f"| {label} | {span(ratios, key, 1, '{:.1f}')} ms | ≤ {target:.0f} ms | "
                         f"{'yes' if value <= target else 'no'} |")
        else:
            lines.append(f"| {label} | {span(ratios, key, 0.01, '{:.0f}')} % | ≥ {target * 100:.0f} % | "
                         f"{'yes' if value >= target else 'no'} |")
    lines.append("")
    return "\n".join(lines)


def sustained_medians(runs):
    """The median of every figure across whole runs, as the report shows them."""
    results = median_of(runs)
    results["runs"] = len(runs)
    results["seconds"] = SECONDS
    return results


def sustained_main(argv):
    import argparse
    parser = argparse.ArgumentParser(prog="bench.py sustained", description=(
        "Sustained ingest, a held snapshot and a drain against its baseline. Environment: "
        "TXRELAY_BENCH_SUSTAINED_SECONDS (600), TXRELAY_BENCH_SUSTAINED_WINDOW (60), "
        "TXRELAY_BENCH_SUSTAINED_CONNECTIONS (32), TXRELAY_BENCH_SUSTAINED_DRAIN_ROWS (50000), "
        "TXRELAY_BENCH_CLAIM_MARK_CLIENTS (1,4), TXRELAY_BENCH_CLAIM_MARK_SYNC (off,on), TXRELAY_BENCH_RUNS (3)."))
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--held", action="store_true", help="only the variants with the REPEATABLE READ transaction held")
    which.add_argument("--unheld", action="store_true", help="only the variants without it")
    parser.add_argument("--no-steady", action="store_true", help="skip the sustained POST /new runs")
    parser.add_argument("--no-drain", action="store_true", help="skip the relay drains")
    parser.add_argument("--no-baselines", action="store_true", help="skip pgbench INSERT and claim_mark.sql")
    parser.add_argument("--render", metavar="JSON", help="measure nothing: recompute the ratios and tables of an "
                        "earlier run's sustained.json (after a change to how they are taken)")
    options = parser.parse_args(argv)
    if options.render:
        runs = json.loads(pathlib.Path(options.render).read_text())["runs"]
        for run in runs:
            for key in ("steady", "steady_held"):
                if key in run:  # JSON made the window numbers strings
                    run[key]["windows"] = {int(i): w for i, w in run[key]["windows"].items()}
            sustained_ratios(run)
        print(sustained_render(sustained_medians(runs), options))
        return
    if not BINARY.exists() or not RUSTACK.exists():
        sys.exit(f"missing {BINARY} or {RUSTACK}: run `scripts/bench.sh sustained`, which builds them")
    RUN.mkdir(parents=True, exist_ok=True)
    manifest = ROOT / "bench" / "relay.yaml"
    runs = []
    for n in range(RUNS):
        log(f"sustained run {n + 1} of {RUNS}")
        runs.append(sustained_measure(options, manifest))
    results = sustained_medians(runs)
    (RUN / "sustained.json").write_text(json.dumps({"median": results, "runs": runs}, indent=2, default=str))
    table = sustained_render(results, options)
    (RUN / "sustained.md").write_text(table)
    print(table)



if __name__ == "__main__":
    if os.environ.get("TXRELAY_BENCH_ONLY") == "drain":
        drain_only()
    elif sys.argv[1:2] == ["sustained"] or os.environ.get("TXRELAY_BENCH_MODE") == "sustained":
        sustained_main([a for a in sys.argv[1:] if a != "sustained"])
    else:
        main()
