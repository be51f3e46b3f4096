-- JSON Web Tokens signed with HS256 (RFC 7519 / RFC 7515), on sha256.lua.
--
--   local jwt = require "jwt"
--   local token = jwt.sign({ sub = "alice", exp = ngx.time() + 3600 }, secret)
--   local claims, err = jwt.verify(token, secret)   -- claims table, or nil and why
--
-- verify accepts only alg HS256 (never "none", never another algorithm named
-- by the token itself), compares the signature in constant time, and requires
-- `exp` in the future; `nbf`, if present, must have passed.

local bit = require "bit"
local cjson = require "cjson.safe"
local sha256 = require "sha256"

local bor, bxor = bit.bor, bit.bxor
local byte, rep = string.byte, string.rep

local M = {}

-- seconds of clock skew tolerated on exp and nbf
M.leeway = 0

local TO_URL = { ["+"] = "-", ["/"] = "_" }
local FROM_URL = { ["-"] = "+", ["_"] = "/" }

-- base64url without padding (RFC 7515 section 2)
local function b64url_encode(s)
    return (ngx.encode_base64(s, true):gsub("[+/]", TO_URL))
end

local function b64url_decode(s)
    if #s % 4 == 1 then
        return nil
    end
    return ngx.decode_base64(s:gsub("[-_]", FROM_URL) .. rep("=", (4 - #s % 4) % 4))
end

M.b64url_encode = b64url_encode
M.b64url_decode = b64url_decode

-- equal strings, in time that depends on the length only
local function equal(a, b)
    if #a ~= #b then
        return false
    end
    local diff = 0
    for i = 1, #a do
        diff = bor(diff, bxor(byte(a, i), byte(b, i)))
    end
    return diff == 0
end

-- written by hand: cjson does not promise the order of keys
local HEADER = b64url_encode('{"alg":"HS256","typ":"JWT"}')

function M.sign(claims, secret)
    local input = HEADER .. "." .. b64url_encode(assert(cjson.encode(claims)))
    return input .. "." .. b64url_encode(sha256.hmac(secret, input))
end

local function decode_part(part)
    local json = b64url_decode(part)
    local value = json and cjson.decode(json)
    if type(value) ~= "table" then
        return nil
    end
    return value
end

function M.verify(token, secret, now)
    local h, p, s = token:match("^([%w_-]+)%.([%w_-]+)%.([%w_-]+)$")
    if not h then
        return nil, "malformed token"
    end
    local header = decode_part(h)
    if not header then
        return nil, "malformed token header"
    end
    if header.alg ~= "HS256" then
        return nil, "unsupported alg: " .. tostring(header.alg)
    end
    local sig = b64url_decode(s)
    if not sig or not equal(sig, sha256.hmac(secret, h .. "." .. p)) then
        return nil, "signature mismatch"
    end
    local claims = decode_part(p)
    if not claims then
        return nil, "malformed token claims"
    end
    now = now or ngx.time()
    if type(claims.exp) ~= "number" then
        return nil, "exp claim missing"
    end
    if now >= claims.exp + M.leeway then
        return nil, "token expired"
    end
    if claims.nbf ~= nil and (type(claims.nbf) ~= "number" or now < claims.nbf - M.leeway) then
        return nil, "token not yet valid"
    end
    return claims
end

return M
