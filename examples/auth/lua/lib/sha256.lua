-- SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104) in pure Lua, on LuaJIT's
-- `bit` library. luagate's ngx API has ngx.sha1_bin and ngx.hmac_sha1 but no
-- SHA-256, which JWT's HS256 needs.
--
--   local sha256 = require "sha256"
--   sha256.digest(s)        -- 32 raw bytes
--   sha256.hex(s)           -- 64 lower-case hex digits
--   sha256.hmac(key, s)     -- 32 raw bytes
--
-- Speed: a few microseconds per 64-byte block once JIT-compiled; fine for
-- tokens, not meant for hashing large bodies.

local bit = require "bit"

local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local rshift, lshift, ror, tobit, tohex = bit.rshift, bit.lshift, bit.ror, bit.tobit, bit.tohex
local byte, char, rep, gsub = string.byte, string.char, string.rep, string.gsub
local concat = table.concat

local K = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
for i = 1, 64 do
    K[i] = tobit(K[i])
end

local H0 = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
}

-- a 32-bit number as 4 big-endian bytes
local function be32(n)
    return char(band(rshift(n, 24), 255), band(rshift(n, 16), 255), band(rshift(n, 8), 255), band(n, 255))
end

-- the message, a 0x80 byte, zeros, and its length in bits (64-bit big-endian):
-- a multiple of 64 bytes
local function pad(msg)
    local len = #msg
    local bits = len * 8
    return msg .. "\128" .. rep("\0", (-(len + 9)) % 64)
        .. be32(math.floor(bits / 4294967296)) .. be32(bits % 4294967296)
end

local W = {}

local function block(s, at, H)
    for j = 0, 15 do
        local a, b, c, d = byte(s, at + j * 4, at + j * 4 + 3)
        W[j] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
    end
    for j = 16, 63 do
        local w15, w2 = W[j - 15], W[j - 2]
        local s0 = bxor(ror(w15, 7), ror(w15, 18), rshift(w15, 3))
        local s1 = bxor(ror(w2, 17), ror(w2, 19), rshift(w2, 10))
        W[j] = tobit(W[j - 16] + s0 + W[j - 7] + s1)
    end
    local a, b, c, d, e, f, g, h = H[1], H[2], H[3], H[4], H[5], H[6], H[7], H[8]
    for j = 0, 63 do
        local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
        local ch = bxor(band(e, f), band(bnot(e), g))
        local t1 = h + S1 + ch + K[j + 1] + W[j]
        local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
        local maj = bxor(band(a, b), band(a, c), band(b, c))
        h, g, f = g, f, e
        e = tobit(d + t1)
        d, c, b = c, b, a
        a = tobit(t1 + S0 + maj)
    end
    H[1], H[2], H[3], H[4] = tobit(H[1] + a), tobit(H[2] + b), tobit(H[3] + c), tobit(H[4] + d)
    H[5], H[6], H[7], H[8] = tobit(H[5] + e), tobit(H[6] + f), tobit(H[7] + g), tobit(H[8] + h)
end

-- the 8 state words after hashing `msg`
local function words(msg)
    local s = pad(msg)
    local H = { H0[1], H0[2], H0[3], H0[4], H0[5], H0[6], H0[7], H0[8] }
    for at = 1, #s, 64 do
        block(s, at, H)
    end
    return H
end

local M = {}

function M.digest(msg)
    local H = words(msg)
    local out = {}
    for i = 1, 8 do
        out[i] = be32(H[i])
    end
    return concat(out)
end

function M.hex(msg)
    local H = words(msg)
    local out = {}
    for i = 1, 8 do
        out[i] = tohex(H[i], 8)
    end
    return concat(out)
end

local IPAD, OPAD = {}, {}
for i = 0, 255 do
    IPAD[char(i)] = char(bxor(i, 0x36))
    OPAD[char(i)] = char(bxor(i, 0x5c))
end

function M.hmac(key, msg)
    if #key > 64 then
        key = M.digest(key)
    end
    key = key .. rep("\0", 64 - #key)
    local inner = M.digest(gsub(key, ".", IPAD) .. msg)
    return M.digest(gsub(key, ".", OPAD) .. inner)
end

return M
