-- Shared by the access script (verifies tokens) and the demo issuer (signs them).
return {
    -- HS256 key. Change it, and keep it out of the repository in real use
    -- (e.g. `jwt_secret = os.getenv("JWT_SECRET")`). The README's fixed token
    -- is signed with this one.
    jwt_secret = "luagate-example-secret-change-me",
    -- realm in WWW-Authenticate
    realm = "luagate-example",
    -- the issuer refuses a ttl above this (seconds)
    max_ttl = 86400,
}
