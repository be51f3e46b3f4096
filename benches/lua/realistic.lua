-- A small, typical access rule: read two request headers, look one up in a
-- shared dict, pass the answer upstream as a header. Run unchanged by luagate
-- (routes[i].lua.access) and by nginx + lua-nginx-module (access_by_lua_file).
local h = ngx.req.get_headers()
local user, tenant = h["x-user"], h["x-tenant"]
if not user then
    return ngx.exit(ngx.HTTP_UNAUTHORIZED)
end
local plans = ngx.shared.bench
local key = tenant or "none"
local plan = plans:get(key)
if plan == nil then
    -- first request of a worker fills the dict; every later one is a hit
    plan = "pro"
    plans:set(key, plan)
end
ngx.req.set_header("x-plan", plan)
