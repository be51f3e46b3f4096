//! `ngx.req`: the request as it will go upstream. Reads resolve on demand;
//! changes (headers, method, URI, body) apply to what luagate forwards.
//! `get_uri_args`, `set_uri_args` and `get_post_args` are written in Lua on
//! top of `ngx.decode_args`/`ngx.encode_args` (see `ngx::PRELUDE`), so
//! argument parsing has one implementation.

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use mlua::{Lua, Table, Value};

use super::resp::{header_name, header_values};
use crate::lua::request;

/// nginx's method constants (`ngx.HTTP_GET` …) and their names.
pub const METHODS: [(&str, i64); 15] = [
    ("GET", 2),
    ("HEAD", 4),
    ("POST", 8),
    ("PUT", 16),
    ("DELETE", 32),
    ("MKCOL", 64),
    ("COPY", 128),
    ("MOVE", 256),
    ("OPTIONS", 512),
    ("PROPFIND", 1024),
    ("PROPPATCH", 2048),
    ("LOCK", 4096),
    ("UNLOCK", 8192),
    ("PATCH", 16384),
    ("TRACE", 32768),
];

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let req = lua.create_table()?;
    req.set(
        "get_headers",
        lua.create_function(|lua, (max, raw): (Option<i64>, Option<bool>)| {
            let max = max.unwrap_or(100);
            let raw = raw.unwrap_or(false);
            // Lua strings are made straight from the request's headers: no intermediate copies.
            let (t, truncated) = request::with("ngx.req.get_headers", |r| -> mlua::Result<(Table, bool)> {
                let h = &r.parts.headers;
                let t = lua.create_table_with_capacity(0, h.keys_len())?;
                let mut left = if max > 0 { max as usize } else { usize::MAX };
                for name in h.keys() {
                    let mut values = h.get_all(name).iter();
                    let Some(first) = values.next() else { continue };
                    if left == 0 {
                        return Ok((t, true));
                    }
                    left -= 1;
                    let first = lua.create_string(first.as_bytes())?;
                    let Some(second) = values.next() else {
                        t.raw_set(name.as_str(), first)?;
                        continue;
                    };
                    let list = lua.create_table_with_capacity(2, 0)?;
                    list.raw_push(first)?;
                    for v in std::iter::once(second).chain(values) {
                        if left == 0 {
                            t.raw_set(name.as_str(), list)?;
                            return Ok((t, true));
                        }
                        left -= 1;
                        list.raw_push(lua.create_string(v.as_bytes())?)?;
                    }
                    t.raw_set(name.as_str(), list)?;
                }
                Ok((t, false))
            })??;
            if !raw {
                let mt: Table = lua.named_registry_value("luagate.headers_mt")?;
                t.set_metatable(Some(mt))?;
            }
            Ok((t, truncated.then_some("truncated")))
        })?,
    )?;
    req.set(
        "set_header",
        lua.create_function(|_, (name, value): (mlua::LuaString, Value)| {
            let name = header_name(&name.to_str()?)?;
            let values = header_values(&value)?;
            request::with("ngx.req.set_header", |r| {
                r.parts.headers.remove(&name);
                for v in values {
                    r.parts.headers.append(name.clone(), v);
                }
            })
        })?,
    )?;
    req.set(
        "clear_header",
        lua.create_function(|_, name: mlua::LuaString| {
            let name = header_name(&name.to_str()?)?;
            request::with("ngx.req.clear_header", |r| {
                r.parts.headers.remove(&name);
            })
        })?,
    )?;
    req.set(
        "get_method",
        lua.create_function(|_, ()| request::with("ngx.req.get_method", |r| r.parts.method.to_string()))?,
    )?;
    req.set(
        "set_method",
        lua.create_function(|_, code: i64| {
            let Some((name, _)) = METHODS.iter().find(|(_, c)| *c == code) else {
                return Err(mlua::Error::RuntimeError(format!("unsupported HTTP method: {code}")));
            };
            let m = Method::from_bytes(name.as_bytes()).map_err(mlua::Error::external)?;
            request::with("ngx.req.set_method", |r| r.parts.method = m)
        })?,
    )?;
    req.set(
        "set_uri",
        lua.create_function(|_, (uri, jump): (mlua::LuaString, Option<bool>)| {
            let uri = uri.to_str()?.to_string();
            if uri.is_empty() {
                return Err(mlua::Error::RuntimeError("attempt to use zero-length uri".into()));
            }
            if jump.unwrap_or(false) {
                return Err(mlua::Error::RuntimeError(
                    "luagate: ngx.req.set_uri with jump = true is not supported (routes are matched once)".into(),
                ));
            }
            request::with("ngx.req.set_uri", |r| {
                let escaped = escape_path(&uri);
                let pq = match r.parts.uri.query() {
                    Some(q) => format!("{escaped}?{q}"),
                    None => escaped,
                };
                let mut p = r.parts.uri.clone().into_parts();
                p.path_and_query = pq.parse().ok();
                http::Uri::from_parts(p)
                    .map(|u| r.parts.uri = u)
                    .map_err(|e| mlua::Error::RuntimeError(format!("bad uri: {e}")))
            })?
        })?,
    )?;
    req.set(
        "http_version",
        lua.create_function(|_, ()| {
            request::with("ngx.req.http_version", |r| match r.parts.version {
                http::Version::HTTP_10 => 1.0,
                http::Version::HTTP_2 => 2.0,
                http::Version::HTTP_09 => 0.9,
                _ => 1.1,
            })
        })?,
    )?;
    req.set("start_time", lua.create_function(|_, ()| request::with("ngx.req.start_time", |r| r.start_epoch()))?)?;
    req.set("is_internal", lua.create_function(|_, ()| request::with("ngx.req.is_internal", |_| false))?)?;
    req.set(
        "read_body",
        lua.create_async_function(|_, ()| async move {
            let (incoming, limit) = request::with("ngx.req.read_body", |r| (r.incoming.take(), r.body_limit))?;
            let Some(incoming) = incoming else { return Ok(()) };
            let collected = if limit > 0 {
                http_body_util::Limited::new(incoming, limit as usize).collect().await.map(|c| c.to_bytes())
            } else {
                incoming.collect().await.map(|c| c.to_bytes()).map_err(Into::into)
            };
            let body = match collected {
                Ok(b) => b,
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    // As nginx: a body over client_max_body_size ends the request with 413.
                    request::with("ngx.req.read_body", |r| {
                        r.exit = Some(413);
                        r.resp.status = 413;
                    })?;
                    return Err(mlua::Error::RuntimeError("request body too large".into()));
                }
                Err(e) => return Err(mlua::Error::RuntimeError(format!("failed to read request body: {e}"))),
            };
            request::with("ngx.req.read_body", |r| {
                r.body = Some(body);
                r.body_read = true;
            })
        })?,
    )?;
    req.set(
        "discard_body",
        lua.create_function(|_, ()| {
            request::with("ngx.req.discard_body", |r| {
                r.incoming = None;
                r.body = Some(Bytes::new());
            })
        })?,
    )?;
    req.set(
        "get_body_data",
        lua.create_function(|lua, ()| {
            let b = request::with("ngx.req.get_body_data", |r| r.body.clone())?;
            b.filter(|b| !b.is_empty()).map(|b| lua.create_string(&b)).transpose()
        })?,
    )?;
    req.set(
        "set_body_data",
        lua.create_function(|_, data: mlua::LuaString| {
            let data = Bytes::copy_from_slice(&data.as_bytes());
            request::with("ngx.req.set_body_data", |r| {
                r.incoming = None;
                r.body = Some(data);
                r.body_read = true;
            })
        })?,
    )?;
    ngx.set("req", req)
}

/// `set_uri` takes an unescaped path, as nginx does; escape what a URI may not hold.
fn escape_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@%".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
