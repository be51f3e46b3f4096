-- init_worker: once per worker at start and after every reload.
-- Loads the API keys into the shared dict `api_keys` (key -> user), which all
-- workers read. Shared dicts survive reloads: keys removed from this table are
-- deleted, so editing this file and reloading revokes them. In production the
-- table would come from a file or a secret store.
local keys = {
    ["k-alice-3f9c2a7e"] = "alice",
    ["k-ci-bot-81d0e55b"] = "ci-bot",
}

local dict = ngx.shared.api_keys
-- set before deleting: another worker running this at the same time never
-- leaves the dict without a valid key
for key, user in pairs(keys) do
    local ok, err = dict:set(key, user)
    if not ok then
        ngx.log(ngx.ERR, "cannot store API key for ", user, ": ", err)
    end
end
for _, key in ipairs(dict:get_keys(0)) do
    if not keys[key] then
        dict:delete(key)
    end
end
