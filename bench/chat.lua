-- wrk script: POST one OpenAI chat request per call, report in JSON at the end.
-- Environment: BENCH_MODEL (model name), BENCH_STREAM=1 for a streaming request
-- (which also asks for the usage chunk, as the proxy does upstream anyway).

local model = os.getenv("BENCH_MODEL") or "bench-model"
local stream = os.getenv("BENCH_STREAM") == "1"
local extra = ""
if stream then
  extra = ',"stream":true,"stream_options":{"include_usage":true}'
end

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user",'
  .. '"content":"Say hello to the benchmark."}],"max_tokens":32' .. extra .. '}'

-- Latencies are in microseconds; one line the harness can parse without
-- depending on wrk's human-readable units.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,'
      .. '"errors_connect":%d,"errors_read":%d,"errors_write":%d,'
      .. '"errors_status":%d,"errors_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
