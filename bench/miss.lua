-- miss.lua: wrk script for the cachecar-miss scenario (run against a fresh namespace).
-- Every request asks for an id that no earlier request of the run asked for: FIRST..LAST is split
-- into one disjoint slice per thread, each thread walks its slice once, in order, then stops.
-- Answers are counted by X-Cache so that the run shows it really measured misses.
-- usage: wrk ... -s bench/miss.lua URL -- FIRST LAST THREADS [DONE_DIR]
-- THREADS must equal wrk's -t. With DONE_DIR, each thread leaves a file there when its slice is
-- done and the last one sends SIGINT to wrk, which then ends the run early instead of idling
-- until -d; wrk's own Requests/sec stays close, but the MISS_RESULT line below is the exact figure.
-- Output for bench/run.sh, one line each:
--   MISS_RESULT requests=N window_us=W rps=R complete=0|1 threads=T
--   MISS_XCACHE MISS=n HIT=n ...   (none = no X-Cache header)
--   MISS_STATUS 200=n ...

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

-- now_us is wall-clock time: wrk's Lua has no sub-second clock of its own. It forks once at the
-- start and once at the end of a thread's slice, never per request.
local function now_us()
  local p = io.popen("date +%s%N")
  local ns = p:read("*l")
  p:close()
  return math.floor(tonumber(ns) / 1000)
end

function init(args)
  local first = tonumber(args[1]) or 1
  local last = tonumber(args[2]) or 5000
  local nthreads = tonumber(args[3]) or 1
  done_dir = args[4]
  wanted_threads = nthreads
  local total = last - first + 1
  local per = math.floor(total / nthreads)
  local rem = total % nthreads
  slice_first = first + tid * per + math.min(tid, rem)
  slice_last = slice_first + per - 1
  if tid < rem then
    slice_last = slice_last + 1
  end
  next_id = slice_first
  completed = 0
  xcache = {}
  statuses = {}
end

-- finish records the end of this thread's slice and, when every thread is done, ends wrk's run.
local function finish()
  t_end = now_us()
  if done_dir == nil or done_dir == "" then
    return
  end
  local f = io.open(done_dir .. "/done." .. tid, "w")
  if f then
    f:close()
  end
  for i = 0, wanted_threads - 1 do
    local g = io.open(done_dir .. "/done." .. i, "r")
    if not g then
      return
    end
    g:close()
  end
  -- $PPID of the shell is wrk itself. Not os.execute: system(3) ignores SIGINT in the caller
  -- while the command runs, so the signal would be lost.
  local k = io.popen("kill -INT $PPID")
  if k then
    k:close()
  end
end

function request()
  if next_id > slice_last then
    if t_end == nil then
      finish()
      wrk.thread:stop()
    end
    -- wrk needs a request here, but the thread stops at the end of this event-loop turn,
    -- before any answer to it can be read, so it is never counted.
    return wrk.format(nil, "/v1/courses/" .. slice_last)
  end
  if t_start == nil then
    t_start = now_us()
  end
  local id = next_id
  next_id = id + 1
  return wrk.format(nil, "/v1/courses/" .. id)
end

function response(status, headers, body)
  completed = completed + 1
  local x = headers["X-Cache"] or headers["x-cache"] or "none"
  xcache[x] = (xcache[x] or 0) + 1
  local s = tostring(status)
  statuses[s] = (statuses[s] or 0) + 1
end

local function add(into, from)
  for k, v in pairs(from or {}) do
    into[k] = (into[k] or 0) + v
  end
end

local function fmt(counts)
  local keys = {}
  for k in pairs(counts) do
    keys[#keys + 1] = k
  end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do
    parts[#parts + 1] = k .. "=" .. counts[k]
  end
  return table.concat(parts, " ")
end

function done(summary, latency, requests)
  local first_start, last_end, n, complete = nil, nil, 0, 1
  local xc, st = {}, {}
  for _, t in ipairs(threads) do
    local s, e = t:get("t_start"), t:get("t_end")
    if s ~= nil and (first_start == nil or s < first_start) then
      first_start = s
    end
    if e == nil then
      complete = 0 -- this thread ran out of time (-d) before the end of its slice
    elseif last_end == nil or e > last_end then
      last_end = e
    end
    n = n + (t:get("completed") or 0)
    add(xc, t:get("xcache"))
    add(st, t:get("statuses"))
  end
  local window = summary.duration
  if complete == 1 and first_start ~= nil and last_end ~= nil and last_end > first_start then
    window = last_end - first_start
  end
  local rps = 0
  if window > 0 then
    rps = n / (window / 1e6)
  end
  io.write(string.format("MISS_RESULT requests=%d window_us=%d rps=%.2f complete=%d threads=%d\n",
    n, window, rps, complete, #threads))
  io.write("MISS_XCACHE " .. fmt(xc) .. "\n")
  io.write("MISS_STATUS " .. fmt(st) .. "\n")
end
