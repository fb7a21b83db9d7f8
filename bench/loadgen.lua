-- wrk script: POST a rotating set of distinct photos as multipart `file` fields, so no cache can
-- help, and print the run's figures as one JSON line at the end.
--   wrk -t2 -c16 -d20s --timeout 30s -s bench/loadgen.lua URL -- LIST_FILE
-- LIST_FILE names one JPEG per line.

local boundary = "phototagbenchboundary7MA4YWxkTrZu0gW"
local bodies = {}
local next_index = 1
local threads = {}

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

local function multipart(path, data)
  local name = path:match("([^/]+)$")
  return "--" .. boundary .. "\r\n"
    .. 'Content-Disposition: form-data; name="file"; filename="' .. name .. '"\r\n'
    .. "Content-Type: image/jpeg\r\n\r\n"
    .. data .. "\r\n--" .. boundary .. "--\r\n"
end

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_index", #threads)
end

function init(args)
  for path in io.lines(args[1]) do
    if #path > 0 then
      table.insert(bodies, multipart(path, read_file(path)))
    end
  end
  -- threads start at different photos so they never send the same one in lockstep
  next_index = ((thread_index or 1) - 1) * 7 % #bodies + 1
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
end

function request()
  local body = bodies[next_index]
  next_index = next_index % #bodies + 1
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "mean_us": %.1f, '
      .. '"errors_connect": %d, "errors_read": %d, "errors_write": %d, "errors_status": %d, '
      .. '"errors_timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
