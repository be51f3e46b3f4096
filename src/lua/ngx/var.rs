//! `ngx.var.NAME`: nginx variables, resolved when read (nothing is copied
//! into Lua up front). Declared variables (`lua.variables`) and `args` may be
//! set; other names are read-only, as in nginx.

use std::cell::RefCell;
use std::ffi::c_int;
use std::rc::Rc;

use mlua::{ffi, Lua, Table, Value};

use super::cfn;
use crate::lua::ceiling;
use crate::lua::request::{self, LuaRequest};
use crate::phase::variable::Variable;

/// The value of `$name` for this request, or None when unset/unknown.
pub fn get(r: &LuaRequest, name: &str, declared: &[(String, String)]) -> Option<Vec<u8>> {
    let p = &r.parts;
    let s = |x: &str| Some(x.as_bytes().to_vec());
    match name {
        "uri" => Some(r.uri().to_vec()),
        "request_uri" => s(r.request_uri.as_str()),
        "args" | "query_string" => p.uri.query().map(|q| q.as_bytes().to_vec()),
        "is_args" => s(if p.uri.query().is_some() { "?" } else { "" }),
        "remote_addr" => s(&r.client.ip().to_string()),
        "remote_port" => s(&r.client.port().to_string()),
        "server_addr" => s(&r.server.ip().to_string()),
        "server_port" => s(&r.server.port().to_string()),
        "scheme" => s(if r.tls { "https" } else { "http" }),
        "https" => s(if r.tls { "on" } else { "" }),
        "request_method" => s(p.method.as_str()),
        "server_protocol" => s(match p.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2.0",
            _ => "HTTP/1.1",
        }),
        "host" => s(&crate::phase::pipeline::request_host(p)),
        "hostname" => s(&hostname()),
        "content_type" => p.headers.get(http::header::CONTENT_TYPE).map(|v| v.as_bytes().to_vec()),
        "content_length" => p.headers.get(http::header::CONTENT_LENGTH).map(|v| v.as_bytes().to_vec()),
        "request_time" => s(&format!("{:.3}", r.start.elapsed().as_secs_f64())),
        "status" => (r.resp.status != 0).then(|| r.resp.status.to_string().into_bytes()),
        "upstream_addr" => r.upstream.addr.map(|a| a.to_string().into_bytes()),
        "upstream_status" => r.upstream.status.map(|c| c.to_string().into_bytes()),
        "upstream_response_time" => r.upstream.response_time.map(|d| format!("{:.3}", d.as_secs_f64()).into_bytes()),
        "bytes_sent" | "body_bytes_sent" => s(&r.bytes_sent.to_string()),
        "route" => s(&r.route),
        _ => {
            if let Some(v) = r.vars.get(name) {
                return Some(v.as_bytes().to_vec());
            }
            if let Some((_, init)) = declared.iter().find(|(n, _)| n == name) {
                return Some(init.as_bytes().to_vec());
            }
            let var = Variable::parse(&format!("${name}")).ok()?;
            var.eval(p, r.client.ip()).map(|c| c.into_owned())
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

thread_local! {
    /// The declared variables of this thread's Lua state, for [`index`].
    static DECLARED: RefCell<Rc<Vec<(String, String)>>> = RefCell::new(Rc::new(Vec::new()));
}

/// `ngx.var.NAME` for a string name, on the C API (`cfn`): scripts read
/// several variables per request. Other keys go to the general `__index`
/// (upvalue 1).
unsafe extern "C-unwind" fn index(state: *mut ffi::lua_State) -> c_int {
    if ffi::lua_type(state, 2) != ffi::LUA_TSTRING {
        return cfn::delegate(state);
    }
    cfn::call(state, || {
        // Slot 2 was checked to be a string.
        let name = std::str::from_utf8(cfn::string(state, 2)).unwrap_or_default();
        let req = request::current().ok_or_else(|| request::outside_message("ngx.var"))?;
        let r = req.try_borrow().map_err(|_| "ngx.var: request busy".to_string())?;
        let value = DECLARED.with(|d| get(&r, name, &d.borrow()));
        match value {
            Some(v) => cfn::push(state, &v),
            None => ffi::lua_pushnil(state),
        }
        Ok(1)
    })
}

pub fn register(lua: &Lua, ngx: &Table, declared: Vec<(String, String)>) -> mlua::Result<()> {
    let var = lua.create_table()?;
    let mt = lua.create_table()?;
    let declared = Rc::new(declared);
    DECLARED.with(|d| *d.borrow_mut() = Rc::clone(&declared));
    let d = declared.clone();
    let general_index = lua.create_function(move |lua, (_, name): (Value, mlua::LuaString)| {
        let name = name.to_str()?;
        let v = request::with("ngx.var", |r| get(r, &name, &d))?;
        ceiling::lifted(lua, || v.map(|v| lua.create_string(v)).transpose())
    })?;
    mt.set("__index", cfn::closure(lua, general_index, index)?)?;
    mt.set(
        "__newindex",
        lua.create_function(move |_, (_, name, value): (Value, mlua::LuaString, Value)| {
            let name = name.to_str()?.to_string();
            let value = match value {
                Value::Nil => None,
                Value::String(s) => Some(s.to_str()?.to_string()),
                Value::Integer(i) => Some(i.to_string()),
                Value::Number(n) => Some(super::format_number(n)),
                other => {
                    return Err(mlua::Error::RuntimeError(format!("bad variable value type {}", other.type_name())))
                }
            };
            request::with("ngx.var", |r| {
                if name == "args" {
                    let pq = match &value {
                        Some(q) if !q.is_empty() => format!("{}?{q}", r.parts.uri.path()),
                        _ => r.parts.uri.path().to_string(),
                    };
                    let mut uri = r.parts.uri.clone().into_parts();
                    uri.path_and_query = pq.parse().ok();
                    if let Ok(u) = http::Uri::from_parts(uri) {
                        r.parts.uri = u;
                    }
                    return Ok(());
                }
                if !declared.iter().any(|(n, _)| *n == name) {
                    return Err(mlua::Error::RuntimeError(format!("variable \"{name}\" not changeable")));
                }
                match value {
                    Some(v) => r.vars.insert(name, v),
                    None => r.vars.remove(&name),
                };
                Ok(())
            })?
        })?,
    )?;
    var.set_metatable(Some(mt))?;
    ngx.set("var", var)
}
