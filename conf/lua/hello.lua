-- A content phase: luagate answers from Lua, no upstream.
local name = ngx.var.arg_name or "world"
ngx.header["content-type"] = "text/plain"
ngx.say("hello, ", name, " (worker ", ngx.worker.id(), " of ", ngx.worker.count(), ")")
