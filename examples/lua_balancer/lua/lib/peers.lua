-- The initial peers, copied into the shared dict `lb` by lua/init.lua.
-- A peer's name, not its address, places it on the hash ring: moving a peer
-- to another address (PUT /peers/NAME on the admin listener) keeps its keys.
return {
    { name = "p1", addr = "127.0.0.1:8231" },
    { name = "p2", addr = "127.0.0.1:8232" },
    { name = "p3", addr = "127.0.0.1:8233" },   -- nothing listens here: a down peer
}
