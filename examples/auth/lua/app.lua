-- The demo backend (content phase on the app listener): says who it was told
-- the caller is, and whether any credential reached it.
ngx.header["Content-Type"] = "text/plain"
ngx.say("app: user=", ngx.var.http_x_user or "-", " auth=", ngx.var.http_x_auth_method or "-",
    " credentials_forwarded=", (ngx.var.http_authorization or ngx.var.http_x_api_key) and "yes" or "no",
    " uri=", ngx.var.request_uri)
