-- session_put.lua: wrk script for the session-write scenario i.
-- Every request is PUT /v1/sessions/{sid} with sid PREFIX<n>, n drawn uniformly from
-- 0..COUNT-1 (a bounded pool: the run rewrites existing sessions, as express-session saves a
-- session after a request that changed it), and a realistic express-session body of about 400
-- bytes whose cookie expires a day after the run starts: the same shape as bench/sessions'.
-- usage: wrk ... -s bench/session_put.lua URL -- PREFIX COUNT
-- cachecar answers 204 once PostgreSQL's upsert has committed and Valkey has the session (or
-- once it committed, with X-Session-Store: postgres, when Valkey failed).
-- Answers are counted by X-Session-Store and by status (response() costs wrk some CPU per
-- answer). Output for bench/run.sh, one line each:
--   SESSION_STORE postgres=n valkey=n ...   (none = no X-Session-Store header)
--   SESSION_STATUS 204=n ...

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

local function body(i, expires)
  local csrf = string.format("%08x%08x", (i * 2654435761) % 4294967296, (i * 40503 + 12345) % 4294967296)
  return string.format('{"cookie":{"originalMaxAge":86400000,"expires":"%s","secure":false,"httpOnly":true,"path":"/","sameSite":"lax"},' ..
    '"passport":{"user":"u%06d"},"user":{"id":"u%06d","name":"Bench User %d","email":"user%d@example.test","roles":["student"],"tenant":%d},' ..
    '"cart":[{"course":%d,"qty":1,"price":4900},{"course":%d,"qty":1,"price":12900}],' ..
    '"csrfSecret":"%s","flash":{},"views":%d}',
    expires, i, i, i, i, 1 + i % 10, 1 + i % 5000, 1 + (i * 7 + 13) % 5000, csrf, (i + tid) % 50)
end

function init(args)
  local prefix = args[1] or "bench-"
  local count = tonumber(args[2]) or 2000
  math.randomseed(os.time() * 1000 + tid)
  -- express-session serialises cookie.expires as an ISO date with milliseconds.
  local expires = os.date("!%Y-%m-%dT%H:%M:%S.000Z", os.time() + 86400)
  local headers = { ["Content-Type"] = "application/json" }
  -- Requests are built once; request() only picks one.
  reqs = {}
  for n = 0, count - 1 do
    reqs[#reqs + 1] = wrk.format("PUT", "/v1/sessions/" .. prefix .. n, headers, body(n, expires))
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
