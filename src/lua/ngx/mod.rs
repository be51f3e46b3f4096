//! The `ngx` table, one file per area: `var`, `req`, `resp` (output, exit,
//! status, headers), `log`, `re`, `util` (encoding, hashing, args), `time`,
//! `shared` (shared dicts), `json` (cjson), plus the small areas registered
//! here (`ngx.ctx`, `ngx.arg`, `ngx.worker`, `ngx.config`, `ngx.sleep`,
//! `ngx.get_phase`, `ngx.balancer`) and luagate's own `luagate.*`.
//!
//! Functions of OpenResty's API that luagate does not provide raise an error
//! naming themselves instead of being absent (see [`UNSUPPORTED`]).

pub mod cfn;
pub mod json;
pub mod limit;
pub mod log;
pub(crate) mod raise;
pub mod re;
pub mod req;
pub mod resp;
pub mod semaphore;
pub mod shared;
pub mod socket;
pub mod thread;
pub mod time;
pub mod timer;
pub mod util;
pub mod var;

use std::net::SocketAddr;
use std::time::Duration;

use mlua::{Lua, Table, Value};

use super::request;
use super::{Phase, Settings};

/// OpenResty functions luagate does not implement; each raises a clear error.
pub const UNSUPPORTED: &[&str] = &[
    "exec",
    "location.capture",
    "location.capture_multi",
    "req.socket",
    "req.init_body",
    "req.append_body",
    "req.finish_body",
    "req.get_body_file",
    "req.set_body_file",
    "req.raw_header",
    "on_abort",
];

/// Lua-side parts of the API, built on the Rust primitives.
const PRELUDE: &str = r#"
local ngx = ...
ngx.req.get_uri_args = function(max)
    local args = ngx.var.args
    if not args then return {} end
    return ngx.decode_args(args, max or 100)
end
ngx.req.set_uri_args = function(args)
    if type(args) == "table" then args = ngx.encode_args(args) end
    ngx.var.args = args
end
ngx.req.get_post_args = function(max)
    local body = ngx.req.get_body_data()
    if not body then return {} end
    return ngx.decode_args(body, max or 100)
end
"#;

/// `%.14g`, the way lua-nginx-module prints numbers.
pub fn format_number(n: f64) -> String {
    // lua-nginx-module prints whole numbers as integers only within int32; others go through %.14g.
    if n.fract() == 0.0 && n >= i32::MIN as f64 && n <= i32::MAX as f64 {
        return format!("{}", n as i64);
    }
    if n.is_nan() {
        return "nan".into();
    }
    if n.is_infinite() {
        return if n > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let s = format!("{:.*e}", 13, n);
    let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-5..14).contains(&exp) {
        let decimals = (13 - exp).max(0) as usize;
        let f = format!("{n:.decimals$}");
        let f = if f.contains('.') { f.trim_end_matches('0').trim_end_matches('.').to_string() } else { f };
        return f;
    }
    let mant = if mant.contains('.') { mant.trim_end_matches('0').trim_end_matches('.') } else { mant };
    format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
}

pub fn register(lua: &Lua, settings: &Settings) -> mlua::Result<()> {
    let ngx = lua.create_table()?;
    constants(&ngx)?;
    log::register(lua, &ngx)?;
    resp::register(lua, &ngx)?;
    req::register(lua, &ngx)?;
    var::register(lua, &ngx, settings.variables.clone())?;
    re::register(lua, &ngx)?;
    util::register(lua, &ngx)?;
    time::register(lua, &ngx)?;
    shared::register(lua, &ngx, &settings.shared_dicts)?;
    socket::register(lua, &ngx)?;
    timer::register(lua, &ngx)?;
    thread::register(lua, &ngx)?;
    semaphore::register(lua, &ngx)?;
    let null = Value::LightUserData(mlua::LightUserData(std::ptr::null_mut()));
    ngx.set("null", null.clone())?;
    json::register(lua, null)?;
    misc(lua, &ngx, settings)?;
    dynamic_fields(lua, &ngx)?;
    unsupported(lua, &ngx)?;
    lua.globals().set("ngx", ngx.clone())?;
    balancer_module(lua)?;
    luagate_module(lua)?;
    let loaded: Table = lua.globals().get::<Table>("package")?.get("loaded")?;
    loaded.set("ngx", ngx.clone())?;
    for noop in ["resty.core", "resty.core.base"] {
        lua.preload_module(noop, lua.create_function(|lua, ()| lua.create_table())?)?;
    }
    lua.load(PRELUDE).set_name("=ngx.prelude").call::<()>(ngx)?;
    Ok(())
}

/// Settings a reload may change.
pub fn on_reload(lua: &Lua, settings: &Settings) -> mlua::Result<()> {
    // Timers of the previous generation fire now with premature = true, so a
    // re-run init_worker does not add a second copy of each.
    timer::abort_pending(lua);
    let ngx: Table = lua.globals().get("ngx")?;
    shared::register(lua, &ngx, &settings.shared_dicts)?;
    var::register(lua, &ngx, settings.variables.clone())?;
    let config: Table = ngx.get("config")?;
    let prefix = settings.prefix.clone();
    config.set("prefix", lua.create_function(move |_, ()| Ok(prefix.clone()))?)?;
    Ok(())
}

fn constants(ngx: &Table) -> mlua::Result<()> {
    for (k, v) in [("OK", 0), ("ERROR", -1), ("AGAIN", -2), ("DONE", -4), ("DECLINED", -5)] {
        ngx.set(k, v)?;
    }
    for (name, code) in req::METHODS {
        ngx.set(format!("HTTP_{name}"), code)?;
    }
    let statuses: &[(&str, i64)] = &[
        ("HTTP_CONTINUE", 100),
        ("HTTP_SWITCHING_PROTOCOLS", 101),
        ("HTTP_OK", 200),
        ("HTTP_CREATED", 201),
        ("HTTP_ACCEPTED", 202),
        ("HTTP_NO_CONTENT", 204),
        ("HTTP_PARTIAL_CONTENT", 206),
        ("HTTP_SPECIAL_RESPONSE", 300),
        ("HTTP_MOVED_PERMANENTLY", 301),
        ("HTTP_MOVED_TEMPORARILY", 302),
        ("HTTP_SEE_OTHER", 303),
        ("HTTP_NOT_MODIFIED", 304),
        ("HTTP_TEMPORARY_REDIRECT", 307),
        ("HTTP_PERMANENT_REDIRECT", 308),
        ("HTTP_BAD_REQUEST", 400),
        ("HTTP_UNAUTHORIZED", 401),
        ("HTTP_PAYMENT_REQUIRED", 402),
        ("HTTP_FORBIDDEN", 403),
        ("HTTP_NOT_FOUND", 404),
        ("HTTP_NOT_ALLOWED", 405),
        ("HTTP_NOT_ACCEPTABLE", 406),
        ("HTTP_REQUEST_TIMEOUT", 408),
        ("HTTP_CONFLICT", 409),
        ("HTTP_GONE", 410),
        ("HTTP_UPGRADE_REQUIRED", 426),
        ("HTTP_TOO_MANY_REQUESTS", 429),
        ("HTTP_CLOSE", 444),
        ("HTTP_ILLEGAL", 451),
        ("HTTP_INTERNAL_SERVER_ERROR", 500),
        ("HTTP_METHOD_NOT_IMPLEMENTED", 501),
        ("HTTP_BAD_GATEWAY", 502),
        ("HTTP_SERVICE_UNAVAILABLE", 503),
        ("HTTP_GATEWAY_TIMEOUT", 504),
        ("HTTP_VERSION_NOT_SUPPORTED", 505),
        ("HTTP_INSUFFICIENT_STORAGE", 507),
    ];
    for (k, v) in statuses {
        ngx.set(*k, *v)?;
    }
    Ok(())
}

/// `ngx.ctx`, `ngx.status` and `ngx.headers_sent` are per request: served by `ngx`'s metatable.
fn dynamic_fields(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|lua, (_, key): (Value, mlua::LuaString)| -> mlua::Result<Value> {
            match &*key.to_str()? {
                "ctx" => {
                    let existing = request::with("ngx.ctx", |r| r.ctx.clone())?;
                    let t = match existing {
                        Some(t) => t,
                        None => {
                            let t = lua.create_table()?;
                            request::with("ngx.ctx", |r| r.ctx = Some(t.clone()))?;
                            t
                        }
                    };
                    Ok(Value::Table(t))
                }
                "status" => Ok(Value::Integer(resp::status()?)),
                "headers_sent" => Ok(Value::Boolean(resp::headers_sent())),
                _ => Ok(Value::Nil),
            }
        })?,
    )?;
    mt.set(
        "__newindex",
        lua.create_function(|_, (t, key, value): (Table, mlua::LuaString, Value)| -> mlua::Result<()> {
            match &*key.to_str()? {
                "ctx" => match value {
                    Value::Table(v) => request::with("ngx.ctx", |r| r.ctx = Some(v)),
                    _ => Err(mlua::Error::RuntimeError("ctx should be a table".into())),
                },
                "status" => resp::set_status(value),
                _ => t.raw_set(key, value),
            }
        })?,
    )?;
    ngx.set_metatable(Some(mt))?;

    // ngx.arg: body_filter's chunk and eof flag.
    let arg = lua.create_table()?;
    let amt = lua.create_table()?;
    amt.set(
        "__index",
        lua.create_function(|lua, (_, i): (Value, i64)| -> mlua::Result<Value> {
            let (chunk, eof, phase) = request::with("ngx.arg", |r| (r.chunk.clone(), r.chunk_eof, r.phase))?;
            if phase != Phase::BodyFilter {
                return Ok(Value::Nil);
            }
            match i {
                1 => Ok(Value::String(lua.create_string(chunk.as_deref().unwrap_or(b""))?)),
                2 => Ok(Value::Boolean(eof)),
                _ => Ok(Value::Nil),
            }
        })?,
    )?;
    amt.set(
        "__newindex",
        lua.create_function(|_, (_, i, v): (Value, i64, Value)| {
            request::with("ngx.arg", |r| {
                if r.phase != Phase::BodyFilter {
                    return Err(mlua::Error::RuntimeError("API disabled in the current context: ngx.arg".into()));
                }
                match (i, v) {
                    (1, Value::String(s)) => r.chunk = Some(bytes::Bytes::copy_from_slice(&s.as_bytes())),
                    (1, Value::Nil) => r.chunk = Some(bytes::Bytes::new()),
                    (2, Value::Boolean(b)) => r.chunk_eof = b,
                    (1, Value::Table(t)) => {
                        let mut out = bytes::BytesMut::new();
                        for s in t.sequence_values::<mlua::LuaString>() {
                            out.extend_from_slice(&s?.as_bytes());
                        }
                        r.chunk = Some(out.freeze());
                    }
                    _ => return Err(mlua::Error::RuntimeError("bad ngx.arg assignment".into())),
                }
                Ok(())
            })?
        })?,
    )?;
    arg.set_metatable(Some(amt))?;
    ngx.raw_set("arg", arg)
}

fn misc(lua: &Lua, ngx: &Table, settings: &Settings) -> mlua::Result<()> {
    let worker = lua.create_table()?;
    worker.set("id", lua.create_function(|_, ()| Ok(super::runtime::worker().0))?)?;
    worker.set("count", lua.create_function(|_, ()| Ok(super::runtime::worker().1))?)?;
    worker.set("pid", lua.create_function(|_, ()| Ok(std::process::id()))?)?;
    worker.set("exiting", lua.create_function(|_, ()| Ok(crate::server::stopping()))?)?;
    ngx.set("worker", worker)?;

    let config = lua.create_table()?;
    config.set("subsystem", "http")?;
    config.set("ngx_lua_version", 10026)?;
    config.set("nginx_version", 1022001)?;
    config.set("debug", false)?;
    let prefix = settings.prefix.clone();
    config.set("prefix", lua.create_function(move |_, ()| Ok(prefix.clone()))?)?;
    config.set("nginx_configure", lua.create_function(|_, ()| Ok(""))?)?;
    ngx.set("config", config)?;

    ngx.set(
        "get_phase",
        lua.create_function(|_, ()| {
            let outside = request::detached_phase().name();
            Ok(request::current().map_or(outside, |r| r.try_borrow().map_or(outside, |r| r.phase.name())))
        })?,
    )?;
    ngx.set(
        "sleep",
        crate::lua::coroutine::async_function(lua, |_, secs: f64| async move {
            if secs.is_nan() || secs < 0.0 || !secs.is_finite() {
                return Err(mlua::Error::RuntimeError("bad argument #1 to 'sleep' (invalid sleep duration)".into()));
            }
            if secs == 0.0 {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            }
            Ok(())
        })?,
    )?;
    Ok(())
}

fn unsupported(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    for name in UNSUPPORTED {
        let full = format!("ngx.{name}");
        let f = lua.create_function(move |_, _: mlua::MultiValue| -> mlua::Result<()> {
            Err(mlua::Error::RuntimeError(format!("luagate: {full} is not supported (see docs/lua.md)")))
        })?;
        let mut table = ngx.clone();
        let mut parts = name.split('.').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                table.raw_set(part, f.clone())?;
            } else {
                let next: Option<Table> = table.raw_get(part)?;
                let next = match next {
                    Some(t) => t,
                    None => {
                        let t = lua.create_table()?;
                        table.raw_set(part, t.clone())?;
                        t
                    }
                };
                table = next;
            }
        }
    }
    Ok(())
}

/// `require "ngx.balancer"`.
fn balancer_module(lua: &Lua) -> mlua::Result<()> {
    let m = lua.create_table()?;
    m.set(
        "set_current_peer",
        lua.create_function(|_, (host, port): (mlua::LuaString, Option<u16>)| {
            let host = host.to_str()?.to_string();
            let addr: Result<SocketAddr, _> = match port {
                Some(p) => format!("{host}:{p}").parse().or_else(|_| format!("[{host}]:{p}").parse()),
                None => host.parse(),
            };
            let Ok(addr) = addr else {
                // As lua-nginx-module, which resolves no name here: `nil, "no host allowed"`.
                return Ok((None, Some("no host allowed".to_string())));
            };
            request::with("ngx.balancer.set_current_peer", |r| {
                if r.phase != Phase::Balancer {
                    return (None::<bool>, Some("API disabled in the current context".to_string()));
                }
                r.balancer.peer = Some(addr);
                (Some(true), None)
            })
        })?,
    )?;
    m.set(
        "set_more_tries",
        lua.create_function(|_, n: u32| {
            request::with("ngx.balancer.set_more_tries", |r| {
                r.balancer.more_tries = n;
                true
            })
        })?,
    )?;
    m.set(
        "get_last_failure",
        lua.create_function(|_, ()| {
            request::with("ngx.balancer.get_last_failure", |r| match r.balancer.last_failure {
                Some((state, status)) => (Some(state), Some(status)),
                None => (None, None),
            })
        })?,
    )?;
    m.set(
        "set_timeouts",
        lua.create_function(|_, (c, s, rd): (Option<f64>, Option<f64>, Option<f64>)| {
            let d = |v: Option<f64>| v.filter(|v| *v > 0.0).map(Duration::from_secs_f64);
            request::with("ngx.balancer.set_timeouts", |r| {
                r.balancer.connect_timeout = d(c);
                r.balancer.send_timeout = d(s);
                r.balancer.read_timeout = d(rd);
                true
            })
        })?,
    )?;
    m.set("recreate_request", lua.create_function(|_, ()| Ok(true))?)?;
    let loaded: Table = lua.globals().get::<Table>("package")?.get("loaded")?;
    loaded.set("ngx.balancer", m)
}

/// luagate's own additions: gRPC details of the request.
fn luagate_module(lua: &Lua) -> mlua::Result<()> {
    let luagate = lua.create_table()?;
    luagate.set("version", crate::VERSION)?;
    let grpc = lua.create_table()?;
    grpc.set(
        "service",
        lua.create_function(|_, ()| request::with("luagate.grpc.service", |r| r.grpc.as_ref().map(|g| g.0.clone())))?,
    )?;
    grpc.set(
        "method",
        lua.create_function(|_, ()| request::with("luagate.grpc.method", |r| r.grpc.as_ref().map(|g| g.1.clone())))?,
    )?;
    grpc.set(
        "metadata",
        lua.create_function(|lua, name: mlua::LuaString| {
            let name = resp::header_name(&name.to_str()?)?;
            let v =
                request::with("luagate.grpc.metadata", |r| r.parts.headers.get(&name).map(|v| v.as_bytes().to_vec()))?;
            v.map(|v| lua.create_string(v)).transpose()
        })?,
    )?;
    grpc.set(
        "set_metadata",
        lua.create_function(|_, (name, value): (mlua::LuaString, Value)| {
            let name = resp::header_name(&name.to_str()?)?;
            let values = resp::header_values(&value)?;
            request::with("luagate.grpc.set_metadata", |r| {
                r.parts.headers.remove(&name);
                for v in values {
                    r.parts.headers.append(name.clone(), v);
                }
            })
        })?,
    )?;
    grpc.set(
        "exit",
        lua.create_function(|_, (code, message): (u32, Option<String>)| -> mlua::Result<()> {
            if code > 16 {
                return Err(mlua::Error::RuntimeError(format!(
                    "bad argument #1 to 'exit' (gRPC status 0-16 expected, got {code})"
                )));
            }
            request::with("luagate.grpc.exit", |r| {
                r.grpc_exit = Some((code, message.unwrap_or_default()));
                r.exit = Some(200);
                r.resp.status = 200;
            })?;
            Err(mlua::Error::RuntimeError("luagate.grpc.exit".into()))
        })?,
    )?;
    luagate.set("grpc", grpc)?;
    limit::register(lua, &luagate)?;
    lua.globals().set("luagate", luagate.clone())?;
    let loaded: Table = lua.globals().get::<Table>("package")?.get("loaded")?;
    loaded.set("luagate", luagate)
}

#[cfg(test)]
mod tests {
    use super::format_number;

    #[test]
    fn numbers_print_like_nginx_lua() {
        assert_eq!(format_number(3.0), "3");
        assert_eq!(format_number(0.1), "0.1");
        assert_eq!(format_number(1.5), "1.5");
        assert_eq!(format_number(1e20), "1e+20");
        assert_eq!(format_number(1e15), "1e+15");
        assert_eq!(format_number(9007199254740992.0), "9.007199254741e+15");
        assert_eq!(format_number(2147483647.0), "2147483647");
        assert_eq!(format_number(1.234567890123456), "1.2345678901235");
        assert_eq!(format_number(-2.5e-7), "-2.5e-07");
    }
}
