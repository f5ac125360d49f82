-- mixed.lua: wrk script for the memory scenario (m): GETs spread uniformly over several id
-- ranges of several paths, so that a load over more keys than the in-process tier holds keeps
-- the tier full and churning (entries evicted, others read back from Valkey).
-- usage: wrk ... -s bench/mixed.lua URL -- PREFIX FIRST LAST [PREFIX FIRST LAST ...]
--   e.g. -- /v1/courses/ 1 5000 /v1/dispatches/ 1 200000
-- Every id of every range is equally likely (a range of 200000 ids gets 40 times the requests of
-- one of 5000). Like random.lua it defines no response() callback, so that wrk spends no CPU on
-- reading answers into Lua.

local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + tid)
  -- Requests are built once; request() only picks one.
  reqs = {}
  local i = 1
  while args[i] ~= nil do
    local prefix, first, last = args[i], tonumber(args[i + 1]), tonumber(args[i + 2])
    if first == nil or last == nil then
      error("mixed.lua: want PREFIX FIRST LAST triples, got '" .. tostring(args[i]) .. "'")
    end
    for id = first, last do
      reqs[#reqs + 1] = wrk.format(nil, prefix .. id)
    end
    i = i + 3
  end
  nreqs = #reqs
  if nreqs == 0 then
    error("mixed.lua: no ids")
  end
end

function request()
  return reqs[math.random(nreqs)]
end
