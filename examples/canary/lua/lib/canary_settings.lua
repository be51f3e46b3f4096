-- Who goes to the canary, and where it is. The stable peers are the
-- upstream's own (luagate.yaml): the balancer script only steers canary traffic.
return {
    -- canary peers, "IP:PORT" (set_current_peer needs an IP, not a host name)
    peers = { "127.0.0.1:8223" },
    -- share of users (by a hash of x-user) sent to the canary, 0..100
    percent = 10,
}
