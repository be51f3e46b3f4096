-- API keys of the gRPC gateway: key -> { user, role }. A module is loaded
-- once per worker and kept across reloads: restart luagate after editing.
return {
    ["k-alice-5e1f"] = { user = "alice", role = "user" },
    ["k-root-9b07"] = { user = "root", role = "admin" },
}
