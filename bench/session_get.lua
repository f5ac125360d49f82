-- session_get.lua: wrk script for the session-read scenarios h (Valkey) and j (Valkey down).
-- Every request is GET /v1/sessions/{sid} with sid PREFIX<n>, n drawn uniformly from
-- 0..COUNT-1: the sessions bench/sessions -put wrote before the run.
-- usage: wrk ... -s bench/session_get.lua URL -- PREFIX COUNT
-- Answers are counted by X-Session-Store and by status, so that the run shows which store
-- answered. This needs a response() callback, which costs wrk some CPU per answer (as d's
-- miss.lua does). Output for bench/run.sh, one line each:
--   SESSION_STORE postgres=n valkey=n ...   (none = no X-Session-Store header)
--   SESSION_STATUS 200=n ...

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  local prefix = args[1] or "bench-"
  local count = tonumber(args[2]) or 2000
  -- A different sequence per thread and per run.
  math.randomseed(os.time() * 1000 + tid)
  -- Requests are built once; request() only picks one.
  reqs = {}
  for n = 0, count - 1 do
    reqs[#reqs + 1] = wrk.format("GET", "/v1/sessions/" .. prefix .. n)
  end
  nreqs = #reqs
  stores = {}
  statuses = {}
end

function request()
  return reqs[math.random(nreqs)]
end

function response(status, headers, body)
  local st = headers["X-Session-Store"] or headers["x-session-store"] or "none"
  stores[st] = (stores[st] or 0) + 1
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
  local st, ss = {}, {}
  for _, t in ipairs(threads) do
    add(st, t:get("stores"))
    add(ss, t:get("statuses"))
  end
  io.write("SESSION_STORE " .. fmt(st) .. "\n")
  io.write("SESSION_STATUS " .. fmt(ss) .. "\n")
end
