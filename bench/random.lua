-- random.lua: wrk script for the fixedjson, directpg and cachecar-hit scenarios.
-- Every request is GET /v1/courses/{id} with id drawn uniformly from FIRST..LAST.
-- usage: wrk ... -s bench/random.lua URL -- FIRST LAST
-- It defines no response() callback on purpose: with one, wrk keeps every response's headers
-- and body for Lua, which costs load-generator CPU that the server under test then loses.

local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  local first = tonumber(args[1]) or 1
  local last = tonumber(args[2]) or 5000
  -- A different sequence per thread and per run.
  math.randomseed(os.time() * 1000 + tid)
  -- Requests are built once; request() only picks one, so Lua costs the same in every scenario.
  reqs = {}
  for id = first, last do
    reqs[#reqs + 1] = wrk.format(nil, "/v1/courses/" .. id)
  end
  nreqs = #reqs
end

function request()
  return reqs[math.random(nreqs)]
end
