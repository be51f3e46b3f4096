-- balancer phase (runs before each try): consistent hashing on x-user (or the
-- client address) over the peers in ngx.shared.lb. The route allows one try;
-- set_more_tries(1) asks for a second, which goes to the next peer on the
-- ring when the first one failed (get_last_failure). A failed peer is marked
-- down in the dict for DOWN_FOR seconds, so the next requests skip it at once
-- (a passive health check shared by all workers).
local balancer = require "ngx.balancer"
local ring = require "ring"

local DOWN_FOR = 10
local dict = ngx.shared.lb
local ctx = ngx.ctx

local lb = ctx.lb
if not lb then
    lb = {
        order = ring.order(ring.current(), ngx.var.http_x_user or ngx.var.remote_addr),
        tried = {},
        failed = {},
        tries = 0,
    }
    ctx.lb = lb
    balancer.set_more_tries(1)
else
    local state, status = balancer.get_last_failure()
    if state and lb.peer then
        local peer = lb.peer
        lb.failed[#lb.failed + 1] = peer.name
        dict:set("down:" .. peer.name, true, DOWN_FOR)
        ngx.log(ngx.WARN, "peer ", peer.name, " (", peer.addr, ") failed (", state, ", ", status,
            "): marked down for ", DOWN_FOR, "s, trying the next peer on the ring")
    end
end

-- the first peer in ring order not tried yet and not marked down; if all
-- that remain are marked down, the first of them anyway
local pick, fallback
for _, peer in ipairs(lb.order) do
    if not lb.tried[peer.name] then
        if not dict:get("down:" .. peer.name) then
            pick = peer
            break
        end
        fallback = fallback or peer
    end
end
pick = pick or fallback
lb.peer = pick
if not pick then
    return -- no peer left (or none configured): the upstream's own policy picks
end
lb.tried[pick.name] = true
lb.tries = lb.tries + 1
local ok, err = balancer.set_current_peer(pick.addr)
if not ok then
    ngx.log(ngx.ERR, "set_current_peer(", pick.addr, "): ", err)
end
