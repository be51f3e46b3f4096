//! `ngx.req`: the request as it will go upstream. Reads resolve on demand;
//! changes (headers, method, URI, body) apply to what luagate forwards.
//! `get_uri_args`, `set_uri_args` and `get_post_args` are written in Lua on
//! top of `ngx.decode_args`/`ngx.encode_args` (see `ngx::PRELUDE`), so
//! argument parsing has one implementation.

use std::ffi::c_int;

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use mlua::{ffi, Lua, Table, Value};

use super::cfn;
use super::resp::{self, header_name, header_values};
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

/// Why `read_body` could not read the body.
enum BodyFault {
    TooLarge,
    TimedOut,
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// The whole request body, at most `limit` bytes (0 = no limit), each frame within `timeout`.
async fn read_whole(
    mut incoming: hyper::body::Incoming,
    limit: u64,
    timeout: std::time::Duration,
) -> Result<Bytes, BodyFault> {
    // A body of one frame (the usual case) is kept as it came, without a copy.
    let mut first: Option<Bytes> = None;
    let mut more = bytes::BytesMut::new();
    let mut len = 0u64;
    loop {
        let frame = match tokio::time::timeout(timeout, incoming.frame()).await {
            Err(_) => return Err(BodyFault::TimedOut),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BodyFault::Failed(e.into())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        len += data.len() as u64;
        if limit > 0 && len > limit {
            return Err(BodyFault::TooLarge);
        }
        match first.take() {
            None if more.is_empty() => first = Some(data),
            None => more.extend_from_slice(&data),
            Some(f) => {
                more.extend_from_slice(&f);
                more.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| more.freeze()))
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let req = lua.create_table()?;
    req.set("get_headers", cfn::closure(lua, headers_metatable(lua)?, get_headers)?)?;
    let set_header_general = lua.create_function(|_, (name, value): (mlua::LuaString, Value)| {
        let name = header_name(&name.to_str()?)?;
        let values = header_values(&value)?;
        request::with("ngx.req.set_header", |r| {
            r.parts.headers.remove(&name);
            for v in values {
                r.parts.headers.append(name.clone(), v);
            }
        })
    })?;
    req.set("set_header", cfn::closure(lua, set_header_general, set_header)?)?;
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
        lua.create_function(|_, (uri, jump, binary): (mlua::LuaString, Option<bool>, Option<bool>)| {
            let uri = uri.as_bytes();
            if uri.is_empty() {
                return Err(mlua::Error::RuntimeError("attempt to use zero-length uri".into()));
            }
            if !binary.unwrap_or(false) {
                if let Some(&b) = uri.iter().find(|&&b| unsafe_uri_byte(b)) {
                    return Err(mlua::Error::RuntimeError(format!(
                        "unsafe byte \"0x{b:02x}\" in uri \"{}\" (maybe you want to set the 'binary' argument?)",
                        escape_log(&uri)
                    )));
                }
            }
            if jump.unwrap_or(false) {
                return Err(mlua::Error::RuntimeError(
                    "luagate: ngx.req.set_uri with jump = true is not supported (routes are matched once)".into(),
                ));
            }
            // As nginx: `ngx.var.uri` then reads exactly `uri`, not normalised; the upstream gets it escaped.
            request::with("ngx.req.set_uri", |r| {
                r.set_uri(&uri).map_err(|e| mlua::Error::RuntimeError(format!("bad uri: {e}")))
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
        crate::lua::coroutine::async_function(lua, |_, ()| async move {
            let (incoming, limit, timeout) =
                request::with("ngx.req.read_body", |r| (r.incoming.take(), r.body_limit, r.body_timeout))?;
            let Some(incoming) = incoming else { return Ok(()) };
            // As nginx, each piece of the body must come within client_body_timeout; a body
            // over client_max_body_size is 413, one that times out 408, a malformed one 400:
            // the request ends with that status, as lua-nginx-module finalizes it.
            let body = match read_whole(incoming, limit, timeout).await {
                Ok(b) => b,
                Err(fault) => {
                    let (status, msg) = match fault {
                        BodyFault::TooLarge => (413, "request body too large".to_string()),
                        BodyFault::TimedOut => (408, "client body read timed out".to_string()),
                        BodyFault::Failed(e) if crate::error::client_went_away(&*e) => {
                            (499, format!("failed to read request body: {e}"))
                        }
                        BodyFault::Failed(e) => (400, format!("malformed request body: {e}")),
                    };
                    request::with("ngx.req.read_body", |r| {
                        r.exit = Some(status);
                        r.resp.status = status as u16;
                    })?;
                    return Err(mlua::Error::RuntimeError(msg));
                }
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

/// Bytes `set_uri` refuses unless its `binary` argument is true, as
/// lua-nginx-module: control characters but tab, and DEL.
fn unsafe_uri_byte(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// A string as lua-nginx-module quotes it in an error: `"`, `\`, controls and
/// bytes from DEL up as `\xHH`.
fn escape_log(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s {
        if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

/// `ngx.req.get_headers(max?, raw?)`: a fresh table of the request headers
/// (lower-cased names, repeated headers as lists; case-insensitive lookup
/// through upvalue 1, the metatable, unless raw), built straight on the Lua
/// stack: through mlua's `Table` API each string and each set was a
/// protected call of its own (benches/NOTES.md §5).
unsafe extern "C-unwind" fn get_headers(state: *mut ffi::lua_State) -> c_int {
    cfn::call(state, || {
        // No arguments (the usual call): neither needs looking at.
        let args = ffi::lua_gettop(state);
        let max = match if args == 0 { ffi::LUA_TNONE } else { ffi::lua_type(state, 1) } {
            ffi::LUA_TNONE | ffi::LUA_TNIL => 100,
            _ if ffi::lua_isnumber(state, 1) != 0 => ffi::lua_tointeger(state, 1),
            t => {
                let got = std::ffi::CStr::from_ptr(ffi::lua_typename(state, t)).to_string_lossy();
                return Err(format!("bad argument #1 to 'get_headers' (number expected, got {got})"));
            }
        };
        let max = if max > 0 { max as usize } else { usize::MAX };
        let raw = args >= 2 && ffi::lua_toboolean(state, 2) != 0;
        let req = request::current().ok_or_else(|| request::outside_message("ngx.req.get_headers"))?;
        let r = req.try_borrow().map_err(|_| "ngx.req.get_headers: request busy".to_string())?;
        let h = &r.parts.headers;
        let mut truncated = false;
        ffi::lua_createtable(state, 0, h.keys_len().min(max) as c_int);
        let mut left = max;
        // One pass in the map's order: a name's values come one after the other.
        let mut entries = h.iter().peekable();
        'names: while let Some((name, first)) = entries.next() {
            if left == 0 {
                truncated = true;
                break;
            }
            left -= 1;
            cfn::push(state, name.as_str().as_bytes());
            cfn::push(state, first.as_bytes());
            if entries.peek().is_some_and(|(next, _)| *next == name) {
                // A repeated header: a list of its values.
                ffi::lua_createtable(state, 2, 0);
                ffi::lua_insert(state, -2);
                ffi::lua_rawseti(state, -2, 1);
                let mut i: ffi::lua_Integer = 2;
                while let Some((_, v)) = entries.next_if(|(next, _)| *next == name) {
                    if left == 0 {
                        truncated = true;
                        ffi::lua_rawset(state, -3);
                        break 'names;
                    }
                    left -= 1;
                    cfn::push(state, v.as_bytes());
                    ffi::lua_rawseti(state, -2, i);
                    i += 1;
                }
            }
            ffi::lua_rawset(state, -3);
        }
        if !raw {
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
            ffi::lua_setmetatable(state, -2);
        }
        if truncated {
            cfn::push(state, b"truncated");
            return Ok(2);
        }
        Ok(1)
    })
}

/// `ngx.req.set_header(name, value)`: a string value set directly; a list,
/// number or nil goes to the general implementation (upvalue 1).
unsafe extern "C-unwind" fn set_header(state: *mut ffi::lua_State) -> c_int {
    let simple = ffi::lua_gettop(state) == 2
        && ffi::lua_type(state, 1) == ffi::LUA_TSTRING
        && ffi::lua_type(state, 2) == ffi::LUA_TSTRING;
    if !simple {
        return cfn::delegate(state);
    }
    resp::set_string_header(state, 1, "ngx.req.set_header", |r, _| &mut r.parts.headers)
}

/// get_headers' metatable: case-insensitive lookup with `_` as `-`, as OpenResty's.
fn headers_metatable(lua: &Lua) -> mlua::Result<Table> {
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|_, (t, k): (Table, mlua::LuaString)| {
            let norm = k.to_str()?.to_ascii_lowercase().replace('_', "-");
            t.raw_get::<Value>(norm)
        })?,
    )?;
    Ok(mt)
}
