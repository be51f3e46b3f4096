-- access phase of /api/: an API key (x-api-key) or a JWT (Authorization: Bearer,
-- HS256). On success the upstream gets x-user and x-auth-method and not the
-- credential; otherwise the client gets 401 with a JSON error and a
-- WWW-Authenticate header (RFC 6750).
local cjson = require "cjson"
local jwt = require "jwt"
local settings = require "auth_settings"

local function deny(err, description)
    local challenge = 'Bearer realm="' .. settings.realm .. '"'
    if err then
        challenge = challenge .. ', error="' .. err .. '", error_description="' .. description .. '"'
    end
    ngx.status = ngx.HTTP_UNAUTHORIZED
    ngx.header["WWW-Authenticate"] = challenge
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Cache-Control"] = "no-store"
    ngx.say(cjson.encode({ error = err or "unauthorized", error_description = description }))
    return ngx.exit(ngx.HTTP_UNAUTHORIZED)
end

-- identity headers come from here only, never from the client
ngx.req.clear_header("x-user")
ngx.req.clear_header("x-auth-method")

local api_key = ngx.var.http_x_api_key
if api_key then
    local user = ngx.shared.api_keys:get(api_key)
    if not user then
        return deny("invalid_token", "unknown API key")
    end
    ngx.req.clear_header("x-api-key")
    ngx.req.set_header("x-user", user)
    ngx.req.set_header("x-auth-method", "api-key")
    return
end

local authorization = ngx.var.http_authorization
if not authorization then
    return deny(nil, "credentials required: x-api-key or Authorization: Bearer")
end
local token = authorization:match("^[Bb]earer +([%w_.-]+) *$")
if not token then
    return deny("invalid_request", "expected Authorization: Bearer <token>")
end
local claims, err = jwt.verify(token, settings.jwt_secret, ngx.time())
if not claims then
    return deny("invalid_token", err)
end
if type(claims.sub) ~= "string" or claims.sub == "" then
    return deny("invalid_token", "sub claim missing")
end
ngx.req.clear_header("authorization")
ngx.req.set_header("x-user", claims.sub)
ngx.req.set_header("x-auth-method", "jwt")
