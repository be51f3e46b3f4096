//! API functions written on LuaJIT's C API, for the calls scripts make on
//! nearly every request (`ngx.req.get_headers`, `ngx.req.set_header`,
//! `ngx.var.NAME`, `ngx.header.NAME = v`, `ngx.shared.DICT:get`).
//!
//! An mlua callback converts its arguments and results through mlua's value
//! types and guards the call for errors: ~1k instructions before the work
//! starts. These read the stack and push their results themselves
//! (benches/NOTES.md §10). What keeps them sound, in [`call`]: the body runs
//! with the memory ceiling lifted, so nothing it does raises a Lua error, and
//! its own error is raised only once everything it held is dropped.

use std::ffi::c_int;

use mlua::{ffi, Function, IntoLua, Lua};

use crate::lua::ceiling;

/// `f` as a Lua function with one upvalue (the metatable it sets, the general
/// implementation it delegates to).
pub fn closure(lua: &Lua, upvalue: impl IntoLua, f: ffi::lua_CFunction) -> mlua::Result<Function> {
    // SAFETY: pops the upvalue, pushes the closure.
    unsafe { lua.exec_raw(upvalue, |state| ffi::lua_pushcclosure(state, f, 1)) }
}

/// Runs a C function's `body`: returns the number of results it pushed, or
/// raises its error as `luaL_error` does (prefixed with the caller's position).
///
/// # Safety
/// `state` is the state the C function was called with; `body` keeps the
/// stack balanced apart from the results it reports.
pub unsafe fn call(state: *mut ffi::lua_State, body: impl FnOnce() -> Result<c_int, String>) -> c_int {
    call_where(state, 1, body)
}

/// [`call`], its error prefixed with the position of the function `level`
/// calls up (1: the caller).
///
/// # Safety
/// As [`call`].
pub unsafe fn call_where(
    state: *mut ffi::lua_State,
    level: c_int,
    body: impl FnOnce() -> Result<c_int, String>,
) -> c_int {
    let results = ceiling::lifted_c(state, || match body() {
        Ok(n) => Some(n),
        Err(msg) => {
            // SAFETY: the ceiling is lifted; three slots are free (a C function has 20).
            unsafe {
                ffi::luaL_where(state, level);
                push(state, msg.as_bytes());
                ffi::lua_concat(state, 2);
            }
            None
        }
    });
    match results {
        Some(n) => n,
        // SAFETY: nothing of `body` is alive any more; the message is on the stack.
        None => unsafe { ffi::lua_error(state) },
    }
}

/// Argument `i` as bytes, if it is a string (numbers are not converted).
///
/// # Safety
/// The bytes borrow the Lua string at `i`: use them before that slot changes.
pub unsafe fn bytes<'a>(state: *mut ffi::lua_State, i: c_int) -> Option<&'a [u8]> {
    (ffi::lua_type(state, i) == ffi::LUA_TSTRING).then(|| string(state, i))
}

/// The bytes of the string at `i`, known to be one (no type check).
///
/// # Safety
/// Slot `i` holds a string; as [`bytes`], use them before that slot changes.
pub unsafe fn string<'a>(state: *mut ffi::lua_State, i: c_int) -> &'a [u8] {
    let mut len = 0;
    let p = ffi::lua_tolstring(state, i, &mut len);
    std::slice::from_raw_parts(p.cast(), len)
}

/// Pushes `b` as a Lua string.
///
/// # Safety
/// Within [`call`] (ceiling lifted), with a free stack slot.
pub unsafe fn push(state: *mut ffi::lua_State, b: &[u8]) {
    // LuaJIT's own `lua_pushlstring`: mlua-sys's wrapper of the same name
    // also reads the new string back (`lua_tostring`) to return a pointer
    // these callers never use. An empty slice's pointer is not read.
    ffi::lua_pushlstring_(state, b.as_ptr().cast(), b.len());
}

/// Calls upvalue 1 — the general implementation, an mlua function — with
/// this call's arguments and returns all it returns: for the cases the fast
/// path leaves to it.
///
/// # Safety
/// Outside [`call`], holding nothing: the callee may raise errors.
pub unsafe fn delegate(state: *mut ffi::lua_State) -> c_int {
    let args = ffi::lua_gettop(state);
    ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
    ffi::lua_insert(state, 1);
    ffi::lua_call(state, args, ffi::LUA_MULTRET);
    ffi::lua_gettop(state)
}
