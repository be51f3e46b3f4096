-- content phase of the admin listener: the peers in ngx.shared.lb, changed at
-- run time with no reload (every worker rebuilds its ring on the next request).
--   GET    /peers              one line per peer: NAME IP:PORT up|down
--   PUT    /peers/NAME  IP:PORT   add a peer, or move it (clears its down mark)
--   DELETE /peers/NAME            remove a peer
local ring = require "ring"
local dict = ngx.shared.lb

local function answer(status, ...)
    ngx.status = status
    ngx.header["Content-Type"] = "text/plain"
    ngx.say(...)
    return ngx.exit(status)
end

local function list()
    local peers = ring.peers()
    local names = {}
    for name in pairs(peers) do
        names[#names + 1] = name
    end
    table.sort(names)
    ngx.header["Content-Type"] = "text/plain"
    for _, name in ipairs(names) do
        ngx.say(name, " ", peers[name], dict:get("down:" .. name) and " down" or " up")
    end
end

local method, uri = ngx.req.get_method(), ngx.var.uri
if uri == "/peers" and method == "GET" then
    return list()
end
local name = uri:match("^/peers/([%w_.-]+)$")
if not name then
    return answer(404, "GET /peers | PUT /peers/NAME (body IP:PORT) | DELETE /peers/NAME")
end

if method == "PUT" then
    ngx.req.read_body()
    local addr = (ngx.req.get_body_data() or ""):match("^%s*(%d+%.%d+%.%d+%.%d+:%d+)%s*$")
    if not addr then
        return answer(400, "the body must be IP:PORT")
    end
    dict:set("peer:" .. name, addr)
    dict:delete("down:" .. name)
elseif method == "DELETE" then
    if not dict:get("peer:" .. name) then
        return answer(404, "no peer ", name)
    end
    dict:delete("peer:" .. name)
    dict:delete("down:" .. name)
else
    ngx.header["Allow"] = "PUT, DELETE"
    return answer(405, "PUT or DELETE")
end
dict:incr("version", 1, 0)
return list()
