-- wrk script for POST /new with a unique transaction per request.
-- BENCH_PREFIX makes every run's references distinct; BENCH_TOKEN is the ingest token.
local counter = 0
local prefix
local token = os.getenv("BENCH_TOKEN") or "bench-token"
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  prefix = (os.getenv("BENCH_PREFIX") or "run") .. "-" .. tostring(tid) .. "-"
end

local template = '{"wallet_address":"W%d","ledger_payload":{"meta_data":{"source":"DAPP","instruction_type":"Transaction",'
  .. '"created_at":"2026-11-26T10:00:00Z","token":"svc-token","idempotency_key":"K%s","ip_address":"203.0.113.7"},'
  .. '"payload":{"external_reference":"E%s","source":"ANCHOR_SOLANA","reference":"R%s","first_name":"Ada",'
  .. '"last_name":"Lovelace","transaction_type":"DEPOSIT","status":"PENDING_PAYER","incoming_currency":"EUR",'
  .. '"outgoing_currency":"EURC","value":"100.00","fee":"1.50","payer":"user-1","payee":null}}}'

function request()
  counter = counter + 1
  local id = prefix .. counter
  local body = string.format(template, counter % 1000, id, id, id)
  return wrk.format("POST", "/new", {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
