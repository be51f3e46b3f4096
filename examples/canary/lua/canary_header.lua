-- header_filter: tell the client which side answered and why
-- (the decision was made in the balancer phase and kept in ngx.ctx).
local ctx = ngx.ctx
if ctx.pool then
    ngx.header["x-canary-pool"] = ctx.pool
    ngx.header["x-canary-reason"] = ctx.reason
end
