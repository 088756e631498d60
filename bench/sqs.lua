-- wrk script sending SendMessage (BENCH_BATCH=1) or SendMessageBatch (BENCH_BATCH=10)
-- straight to the SQS emulator, to measure what it accepts without txrelay.
local queue = os.getenv("BENCH_QUEUE_URL")
local batch = tonumber(os.getenv("BENCH_BATCH") or "1")
local counter = 0
local payload = string.rep("x", 600)

function request()
  counter = counter + 1
  local body
  if batch == 1 then
    body = string.format('{"QueueUrl":"%s","MessageBody":"%s-%d"}', queue, payload, counter)
    return wrk.format("POST", "/", {["Content-Type"] = "application/x-amz-json-1.0",
      ["X-Amz-Target"] = "AmazonSQS.SendMessage"}, body)
  end
  local entries = {}
  for i = 1, batch do
    entries[i] = string.format('{"Id":"%d","MessageBody":"%s-%d-%d"}', i, payload, counter, i)
  end
  body = string.format('{"QueueUrl":"%s","Entries":[%s]}', queue, table.concat(entries, ","))
  return wrk.format("POST", "/", {["Content-Type"] = "application/x-amz-json-1.0",
    ["X-Amz-Target"] = "AmazonSQS.SendMessageBatch"}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
