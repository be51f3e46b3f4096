-- Demo token issuer (content phase of POST /token on the issuer listener):
--   curl -s -d sub=alice [-d ttl=600] 127.0.0.1:8211/token
-- answers {"access_token":"<jwt>","token_type":"Bearer","expires_in":600}.
-- A negative ttl mints an already-expired token, to see the 401. It signs
-- whatever `sub` it is given: a real issuer authenticates the caller first.
local jwt = require "jwt"
local settings = require "auth_settings"

local function bad(description)
    ngx.status = ngx.HTTP_BAD_REQUEST
    ngx.header["Content-Type"] = "application/json"
    ngx.say(require("cjson").encode({ error = "invalid_request", error_description = description }))
    return ngx.exit(ngx.HTTP_BAD_REQUEST)
end

ngx.req.read_body()
local args = ngx.req.get_post_args(16)   -- at most 16 form fields
local sub, ttl = args.sub, tonumber(args.ttl or 3600)
if type(sub) ~= "string" or sub == "" then
    return bad("sub is required")
end
if not ttl or ttl ~= math.floor(ttl) or ttl > settings.max_ttl then
    return bad("ttl must be a whole number of seconds up to " .. settings.max_ttl)
end

local now = ngx.time()
local token = jwt.sign({ sub = sub, iat = now, exp = now + ttl }, settings.jwt_secret)
ngx.header["Content-Type"] = "application/json"
ngx.header["Cache-Control"] = "no-store"
-- access_token first, so `cut -d'"' -f4` extracts it
ngx.say('{"access_token":"', token, '","token_type":"Bearer","expires_in":', ttl, "}")
