-- balancer phase: runs before each try to a peer.
-- Canary if `x-canary: 1`, else if cookie `canary=1`, else for `percent`% of
-- users by crc32(x-user) (so a user stays on one side); `x-canary: 0` or
-- `canary=0` opts out. Canary requests get a peer from canary_settings.peers
-- with set_current_peer; stable ones set none, so the upstream's own policy
-- (round robin over its peers) picks. If the canary peer fails, the retry
-- goes to a stable peer.
local balancer = require "ngx.balancer"
local settings = require "canary_settings"

local function choose()
    local flag = ngx.var.http_x_canary
    if flag == "1" or flag == "0" then
        return flag == "1" and "canary" or "stable", "header"
    end
    flag = ngx.var.cookie_canary
    if flag == "1" or flag == "0" then
        return flag == "1" and "canary" or "stable", "cookie"
    end
    local user = ngx.var.http_x_user
    if not user then
        return "stable", "default"
    end
    return ngx.crc32_long(user) % 100 < settings.percent and "canary" or "stable", "hash"
end

local ctx = ngx.ctx
if not ctx.pool then
    -- first try: decide once per request; later tries (and header_filter) read ngx.ctx
    ctx.pool, ctx.reason = choose()
elseif ctx.pool == "canary" then
    local state, status = balancer.get_last_failure()
    if state then
        ngx.log(ngx.WARN, "canary peer failed (", state, " ", status, "), retrying on stable")
        ctx.pool, ctx.reason = "stable", "canary-failed"
    end
end

if ctx.pool == "canary" then
    local peers = settings.peers
    local key = ngx.var.http_x_user or ngx.var.remote_addr
    local ok, err = balancer.set_current_peer(peers[ngx.crc32_long(key) % #peers + 1])
    if not ok then
        ngx.log(ngx.ERR, "set_current_peer: ", err)
    end
end
