//! `ngx.log(level, ...)` and `print(...)` into luagate's error log, with the
//! script's file:line, as lua-nginx-module writes `[lua] file:line: msg`.

use mlua::{Lua, MultiValue, Table, Value};

pub const STDERR: i64 = 0;
pub const EMERG: i64 = 1;
pub const ALERT: i64 = 2;
pub const CRIT: i64 = 3;
pub const ERR: i64 = 4;
pub const WARN: i64 = 5;
pub const NOTICE: i64 = 6;
pub const INFO: i64 = 7;
pub const DEBUG: i64 = 8;

fn message(args: &MultiValue) -> mlua::Result<String> {
    let mut out = String::new();
    for v in args.iter() {
        match v {
            Value::String(s) => out.push_str(&s.to_string_lossy()),
            Value::Integer(i) => out.push_str(&i.to_string()),
            Value::Number(n) => out.push_str(&super::format_number(*n)),
            Value::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Nil => out.push_str("nil"),
            Value::LightUserData(p) if p.0.is_null() => out.push_str("null"),
            Value::Table(t) if t.metatable().is_some_and(|m| m.contains_key("__tostring").unwrap_or(false)) => {
                let f: mlua::Function = t
                    .metatable()
                    .and_then(|m| m.get("__tostring").ok())
                    .ok_or_else(|| mlua::Error::RuntimeError("no __tostring".into()))?;
                out.push_str(&f.call::<mlua::LuaString>(t.clone())?.to_string_lossy());
            }
            other => {
                return Err(mlua::Error::RuntimeError(format!(
                    "bad argument #2 to 'log' (expected table to have __tostring metamethod, got {})",
                    other.type_name()
                )))
            }
        }
    }
    Ok(out)
}

fn write(lua: &Lua, level: i64, msg: &str) {
    let place = lua
        .inspect_stack(1, |d| {
            let src = d.source();
            let file = src.short_src.as_deref().unwrap_or("?").to_string();
            format!("{file}:{}", d.current_line().unwrap_or(0))
        })
        .unwrap_or_default();
    match level {
        STDERR..=ERR => tracing::error!(target: "lua", "[lua] {place}: {msg}"),
        WARN => tracing::warn!(target: "lua", "[lua] {place}: {msg}"),
        NOTICE | INFO => tracing::info!(target: "lua", "[lua] {place}: {msg}"),
        _ => tracing::debug!(target: "lua", "[lua] {place}: {msg}"),
    }
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    for (name, v) in [
        ("STDERR", STDERR),
        ("EMERG", EMERG),
        ("ALERT", ALERT),
        ("CRIT", CRIT),
        ("ERR", ERR),
        ("WARN", WARN),
        ("NOTICE", NOTICE),
        ("INFO", INFO),
        ("DEBUG", DEBUG),
    ] {
        ngx.set(name, v)?;
    }
    ngx.set(
        "log",
        lua.create_function(|lua, mut args: MultiValue| {
            let level = match args.pop_front() {
                Some(Value::Integer(l)) if (STDERR..=DEBUG).contains(&l) => l,
                Some(Value::Number(l)) if (0.0..=8.0).contains(&l) => l as i64,
                _ => return Err(mlua::Error::RuntimeError("bad argument #1 to 'log' (bad log level)".into())),
            };
            let msg = message(&args)?;
            write(lua, level, &msg);
            Ok(())
        })?,
    )?;
    lua.globals().set(
        "print",
        lua.create_function(|lua, args: MultiValue| {
            let msg = message(&args)?;
            write(lua, NOTICE, &msg);
            Ok(())
        })?,
    )?;
    Ok(())
}
