//! How the Rust-implemented `ngx` API functions raise errors.
//!
//! OpenResty's API raises caller mistakes as plain string errors at the caller's line
//! (`error(msg, 2)` in resty.core, `luaL_error`/`luaL_argerror` in C), and `pcall` sees those
//! strings. An mlua callback can only fail with an mlua error (userdata), so every API function
//! is a Rust implementation behind one thin Lua wrapper ([`WRAPPER`], installed once per Lua
//! state): the implementation returns its results, or the value of [`raise`] (or
//! [`raise_at`], [`rethrow`]), and the wrapper turns the latter into `error(value, level)`.
//! Errors the implementation returns as `Err` pass through the wrapper unchanged.

use std::ffi::c_void;

use mlua::{Function, LightUserData, Lua, MultiValue, Result, Value};

/// The address of this static identifies "raise an error" return values; no script can forge it.
static MARKER: u8 = 0;

/// Where the wrapping function of a Lua state is kept.
const WRAPPER_KEY: &str = "luagate.ngx.api_wrapper";

/// `check` is reached through a tail call, so level 2 is the script that called the API function
/// (as it is for `error(msg, 2)` in a resty.core function). It returns exactly the values the
/// implementation returned, none included.
const WRAPPER: &str = r#"
local marker, error = ...
local function check(...)
    if ... == marker then
        local _, level, err = ...
        error(err, level)
    end
    return ...
end
return function(f)
    return function(...)
        return check(f(...))
    end
end
"#;

fn marker() -> Value {
    Value::LightUserData(LightUserData(&MARKER as *const u8 as *mut c_void))
}

/// Wraps `f` (a Rust function, sync or async) as an `ngx` API function: what `f` returns is
/// returned, unless it is a [`raise_at`] value, which is raised.
pub(crate) fn wrap(lua: &Lua, f: Function) -> Result<Function> {
    let wrap = match lua.named_registry_value::<Option<Function>>(WRAPPER_KEY)? {
        Some(wrap) => wrap,
        None => {
            let error: Function = lua.globals().raw_get("error")?;
            let wrap: Function = lua.load(WRAPPER).set_name("=ngx").call((marker(), error))?;
            lua.set_named_registry_value(WRAPPER_KEY, &wrap)?;
            wrap
        }
    };
    wrap.call(f)
}

/// Wraps a Rust implementation as an `ngx` API function (see [`wrap`]).
pub(crate) fn api_function<F>(lua: &Lua, f: F) -> Result<Function>
where
    F: Fn(&Lua, MultiValue) -> Result<MultiValue> + 'static,
{
    wrap(lua, lua.create_function(f)?)
}

/// The result that makes the API function call `error(err, level)`.
pub(crate) fn raise_at(level: i64, err: Value) -> Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![marker(), Value::Integer(level), err]))
}

/// Raises `msg` at the caller's line, like `error(msg, 2)` in resty.core.
pub(crate) fn raise(lua: &Lua, msg: impl AsRef<[u8]>) -> Result<MultiValue> {
    raise_at(2, Value::String(lua.create_string(msg)?))
}

/// Re-raises an error value caught from a script callback unchanged.
pub(crate) fn rethrow(err: Value) -> Result<MultiValue> {
    raise_at(0, err)
}
