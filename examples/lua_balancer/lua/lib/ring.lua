-- A consistent-hash ring over the peers kept in ngx.shared.lb as
-- "peer:NAME" = "IP:PORT". Each peer gets VNODES points at
-- crc32(NAME .. "#" .. i); a key goes to the first point at or after
-- crc32(key), wrapping around. Removing a peer moves only its own keys.
-- Each worker keeps the built ring and rebuilds it when the dict's "version"
-- changes (the admin API and init.lua bump it).
local M = { VNODES = 100 }

local crc32 = ngx.crc32_long
local floor = math.floor

local cached_version, cached

-- { NAME = "IP:PORT" } from the dict
function M.peers()
    local dict = ngx.shared.lb
    local peers = {}
    for _, key in ipairs(dict:get_keys(0)) do
        local name = key:match("^peer:(.+)$")
        local addr = name and dict:get(key)
        if addr then
            peers[name] = addr
        end
    end
    return peers
end

local function build(peers)
    local points, count = {}, 0
    for name, addr in pairs(peers) do
        count = count + 1
        for i = 1, M.VNODES do
            points[#points + 1] = { crc32(name .. "#" .. i), name, addr }
        end
    end
    table.sort(points, function(x, y)
        if x[1] ~= y[1] then
            return x[1] < y[1]
        end
        return x[2] < y[2]
    end)
    return { points = points, count = count }
end

function M.current()
    local version = ngx.shared.lb:get("version") or 0
    if version ~= cached_version then
        cached = build(M.peers())
        cached_version = version
    end
    return cached
end

-- every peer once, in ring order from the key's position: { {name=, addr=}, ... }
function M.order(ring, key)
    local points, out = ring.points, {}
    local n = #points
    if n == 0 then
        return out
    end
    local h = crc32(key)
    local lo, hi = 1, n + 1
    while lo < hi do
        local mid = floor((lo + hi) / 2)
        if points[mid][1] < h then
            lo = mid + 1
        else
            hi = mid
        end
    end
    local seen = {}
    for k = 0, n - 1 do
        local p = points[(lo - 1 + k) % n + 1]
        if not seen[p[2]] then
            seen[p[2]] = true
            out[#out + 1] = { name = p[2], addr = p[3] }
            if #out == ring.count then
                break
            end
        end
    end
    return out
end

return M
