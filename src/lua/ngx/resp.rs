//! The response side of `ngx`: `ngx.say`, `ngx.print`, `ngx.flush`,
//! `ngx.eof`, `ngx.exit`, `ngx.redirect`, `ngx.status` and `ngx.header`.
//!
//! Output is buffered in the request and sent when the phase that wrote it
//! ends (see docs/lua.md: luagate does not stream `ngx.say` output before the
//! content phase returns). `ngx.exit` ends the running phase by raising a
//! sentinel error that the `pcall` wrapper lets through, where OpenResty
//! yields instead.

use bytes::BufMut;
use http::{HeaderName, HeaderValue};
use mlua::{Lua, MultiValue, Table, Value};

use crate::lua::request;
use crate::lua::Phase;

/// True while an `ngx.exit` of the current request unwinds (pcall must re-raise).
pub fn exiting() -> bool {
    request::current().is_some_and(|r| r.try_borrow().is_ok_and(|r| r.exit.is_some()))
}

/// Append a say/print argument the way lua-nginx-module does: strings,
/// numbers, booleans, nil, ngx.null, and (nested) arrays of those.
fn append(out: &mut bytes::BytesMut, v: &Value, depth: usize) -> mlua::Result<()> {
    match v {
        Value::String(s) => out.put_slice(&s.as_bytes()),
        Value::Integer(i) => out.put_slice(super::format_number(*i as f64).as_bytes()),
        Value::Number(n) => out.put_slice(super::format_number(*n).as_bytes()),
        Value::Boolean(b) => out.put_slice(if *b { b"true" } else { b"false" }),
        Value::Nil => out.put_slice(b"nil"),
        Value::LightUserData(p) if p.0.is_null() => out.put_slice(b"null"),
        Value::Table(t) if depth < 32 => {
            let len = t.raw_len();
            let mut keys = 0usize;
            for kv in t.clone().pairs::<Value, Value>() {
                let (k, _) = kv?;
                keys += 1;
                if !matches!(k, Value::Integer(i) if i >= 1 && i as usize <= len)
                    && !matches!(k, Value::Number(n) if n.fract() == 0.0 && n >= 1.0 && n as usize <= len)
                {
                    return Err(mlua::Error::RuntimeError("bad argument #1 to 'say' (non-array table found)".into()));
                }
            }
            if keys != len {
                return Err(mlua::Error::RuntimeError("bad argument #1 to 'say' (non-array table found)".into()));
            }
            for item in t.clone().sequence_values::<Value>() {
                append(out, &item?, depth + 1)?;
            }
        }
        other => {
            return Err(mlua::Error::RuntimeError(format!(
                "bad argument #1 to 'say' (string, number, boolean, nil, ngx.null, or array table expected, got {})",
                other.type_name()
            )))
        }
    }
    Ok(())
}

fn output(args: MultiValue, newline: bool, api: &str) -> mlua::Result<(Option<i64>, Option<String>)> {
    request::with(api, |r| {
        if r.resp.eof {
            return Ok((None, Some("seen eof".to_string())));
        }
        // All arguments are checked before anything is written, as lua-nginx-module does.
        let mut out = bytes::BytesMut::new();
        for v in args.iter() {
            append(&mut out, v, 0)?;
        }
        if newline {
            out.put_u8(b'\n');
        }
        r.resp.body.extend_from_slice(&out);
        Ok((Some(1), None))
    })?
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    ngx.set("say", lua.create_function(|_, args: MultiValue| output(args, true, "ngx.say"))?)?;
    ngx.set("print", lua.create_function(|_, args: MultiValue| output(args, false, "ngx.print"))?)?;
    ngx.set("flush", lua.create_function(|_, _wait: Option<bool>| request::with("ngx.flush", |_| 1))?)?;
    ngx.set(
        "eof",
        lua.create_function(|_, ()| {
            request::with("ngx.eof", |r| {
                r.resp.eof = true;
                1
            })
        })?,
    )?;
    ngx.set(
        "exit",
        lua.create_function(|_, code: i64| -> mlua::Result<()> {
            request::with("ngx.exit", |r| {
                r.exit = Some(code);
                if code >= 200 && r.resp.status == 0 {
                    r.resp.status = code as u16;
                }
            })?;
            Err(mlua::Error::external(ExitError))
        })?,
    )?;
    ngx.set(
        "redirect",
        lua.create_function(|_, (uri, status): (mlua::LuaString, Option<i64>)| -> mlua::Result<()> {
            let status = status.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&status) {
                return Err(mlua::Error::RuntimeError(format!("only ngx.HTTP_MOVED_TEMPORARILY, ngx.HTTP_MOVED_PERMANENTLY, ngx.HTTP_PERMANENT_REDIRECT, ngx.HTTP_SEE_OTHER, and ngx.HTTP_TEMPORARY_REDIRECT are allowed, got {status}")));
            }
            let loc = HeaderValue::from_bytes(&uri.as_bytes())
                .map_err(|_| mlua::Error::RuntimeError("bad argument #1 to 'redirect' (invalid uri)".into()))?;
            request::with("ngx.redirect", |r| {
                r.resp.headers.insert(http::header::LOCATION, loc);
                r.resp.status = status as u16;
                r.exit = Some(status);
            })?;
            Err(mlua::Error::external(ExitError))
        })?,
    )?;

    let header = lua.create_table()?;
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|lua, (_, name): (Value, mlua::LuaString)| {
            let name = header_name(&name.to_str()?)?;
            let values: Vec<Vec<u8>> = request::with("ngx.header", |r| {
                r.resp.headers.get_all(&name).iter().map(|v| v.as_bytes().to_vec()).collect()
            })?;
            match values.len() {
                0 => Ok(Value::Nil),
                1 => Ok(Value::String(lua.create_string(&values[0])?)),
                _ => Ok(Value::Table(lua.create_sequence_from(
                    values.iter().map(|v| lua.create_string(v)).collect::<mlua::Result<Vec<_>>>()?,
                )?)),
            }
        })?,
    )?;
    mt.set(
        "__newindex",
        lua.create_function(|_, (_, name, value): (Value, mlua::LuaString, Value)| {
            let name = header_name(&name.to_str()?)?;
            let values = header_values(&value)?;
            request::with("ngx.header", |r| {
                if r.phase != Phase::HeaderFilter && r.phase.is_after_headers() {
                    return Err(mlua::Error::RuntimeError(
                        "attempt to set ngx.header.HEADER after sending out response headers".into(),
                    ));
                }
                r.resp.headers.remove(&name);
                for v in values {
                    r.resp.headers.append(name.clone(), v);
                }
                Ok(())
            })?
        })?,
    )?;
    header.set_metatable(Some(mt))?;
    ngx.set("header", header)?;
    Ok(())
}

/// `ngx.status` read.
pub fn status() -> mlua::Result<i64> {
    request::with("ngx.status", |r| i64::from(r.resp.status))
}

/// `ngx.status = n`.
pub fn set_status(v: Value) -> mlua::Result<()> {
    let code = match v {
        Value::Integer(i) => i,
        Value::Number(n) => n as i64,
        Value::String(s) => s
            .to_str()?
            .trim()
            .parse()
            .map_err(|_| mlua::Error::RuntimeError("attempt to set ngx.status to a non-number".into()))?,
        _ => return Err(mlua::Error::RuntimeError("attempt to set ngx.status to a non-number".into())),
    };
    request::with("ngx.status", |r| {
        if r.phase.is_after_headers() && r.phase != Phase::HeaderFilter {
            tracing::error!(target: "lua", "attempt to set ngx.status after sending out response headers");
            return;
        }
        r.resp.status = code.clamp(0, 999) as u16;
    })
}

/// `ngx.header.content_type` → `content-type`, as lua-nginx-module maps names.
pub fn header_name(name: &str) -> mlua::Result<HeaderName> {
    let n = name.replace('_', "-").to_ascii_lowercase();
    HeaderName::from_bytes(n.as_bytes()).map_err(|_| mlua::Error::RuntimeError(format!("invalid header name {name:?}")))
}

/// A header value or list of them; nil clears.
pub fn header_values(v: &Value) -> mlua::Result<Vec<HeaderValue>> {
    let one = |v: &Value| -> mlua::Result<HeaderValue> {
        let s = match v {
            Value::String(s) => s.as_bytes().to_vec(),
            Value::Integer(i) => i.to_string().into_bytes(),
            Value::Number(n) => super::format_number(*n).into_bytes(),
            Value::Boolean(b) => b.to_string().into_bytes(),
            other => return Err(mlua::Error::RuntimeError(format!("invalid header value type {}", other.type_name()))),
        };
        HeaderValue::from_bytes(&s).map_err(|_| mlua::Error::RuntimeError("invalid header value".into()))
    };
    match v {
        Value::Nil => Ok(vec![]),
        Value::Table(t) => t.clone().sequence_values::<Value>().map(|x| one(&x?)).collect(),
        other => Ok(vec![one(other)?]),
    }
}

/// The error `ngx.exit` raises; the pcall wrapper recognises the exit by the request state.
#[derive(Debug)]
struct ExitError;

impl std::fmt::Display for ExitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ngx.exit")
    }
}

impl std::error::Error for ExitError {}
