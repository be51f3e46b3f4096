-- access phase of gRPC calls to echo.v1.Echo: per-method authorization.
-- Every answer here is a real gRPC status (trailers-only response), so
-- clients see UNIMPLEMENTED / UNAUTHENTICATED / PERMISSION_DENIED, not HTTP errors.
local accounts = require "grpc_accounts"

-- the role each method needs; a method not listed is not exposed
local POLICY = {
    Unary = "user",
    ServerStream = "user",
    Bidi = "admin",
}

local UNIMPLEMENTED, UNAUTHENTICATED, PERMISSION_DENIED = 12, 16, 7

local method = luagate.grpc.method()
local need = POLICY[method]
if not need then
    return luagate.grpc.exit(UNIMPLEMENTED, luagate.grpc.service() .. "/" .. method .. " is not exposed")
end

local key = luagate.grpc.metadata("x-api-key")
if not key then
    return luagate.grpc.exit(UNAUTHENTICATED, "x-api-key metadata required")
end
local account = accounts[key]
if not account then
    return luagate.grpc.exit(UNAUTHENTICATED, "unknown API key")
end
if need == "admin" and account.role ~= "admin" then
    return luagate.grpc.exit(PERMISSION_DENIED, method .. " needs the admin role")
end

-- the backend learns who called, never the key
luagate.grpc.set_metadata("x-api-key", nil)
luagate.grpc.set_metadata("x-user", account.user)
luagate.grpc.set_metadata("x-role", account.role)
