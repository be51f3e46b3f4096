-- header_filter: show the balancer's work on the response
--   x-lb-peer    the peer that answered
--   x-lb-tries   tries this request took
--   x-lb-failed  peers that failed first, if any
local lb = ngx.ctx.lb
if lb and lb.peer then
    ngx.header["x-lb-peer"] = lb.peer.name
    ngx.header["x-lb-tries"] = lb.tries
    if #lb.failed > 0 then
        ngx.header["x-lb-failed"] = table.concat(lb.failed, ",")
    end
end
