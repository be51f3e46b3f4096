-- init_worker: copy lua/lib/peers.lua into ngx.shared.lb. Shared dicts
-- survive reloads, so changes made through the admin API are kept across
-- reloads -- until peers.lua itself changes: then it wins again.
local dict = ngx.shared.lb
-- read peers.lua afresh on each run: a reload keeps the worker's Lua state,
-- and with it whatever `require` loaded before
package.loaded.peers = nil
local peers = require "peers"

local wanted, seed = {}, {}
for _, p in ipairs(peers) do
    wanted["peer:" .. p.name] = p.addr
    seed[#seed + 1] = p.name .. "=" .. p.addr
end
table.sort(seed)
seed = table.concat(seed, ",")

if dict:get("seed") ~= seed then
    -- set before deleting: a worker running this at the same time never
    -- sees an empty ring
    for key, addr in pairs(wanted) do
        dict:set(key, addr)
    end
    for _, key in ipairs(dict:get_keys(0)) do
        if key:find("^peer:") and not wanted[key] then
            dict:delete(key)
        end
    end
    dict:set("seed", seed)
    dict:incr("version", 1, 0)
end
