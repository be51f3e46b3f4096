//! Where Rust callbacks step past the Lua state's memory ceiling.
//!
//! With a ceiling set (`lua.memory_limit`), mlua makes every string and
//! table inside a protected call — a `pcall` and a fresh C closure each,
//! ~3k instructions — because the allocation may fail. Callbacks that only
//! build values bounded by the request or by a shared dict's capacity
//! (`ngx.req.get_headers`, `ngx.var.*`, `ngx.shared.DICT:get`) make them
//! with the ceiling lifted instead; the script meets the ceiling at its own
//! next allocation. Callbacks whose output a script can grow without bound
//! (`cjson.decode`, `ngx.re.gsub`, …) keep it.

use std::cell::{Cell, RefCell};

use mlua::{IntoLuaMulti, Lua, MultiValue, WeakLua};

thread_local! {
    /// This worker's ceiling (`lua.memory_limit`; 0: none), for what Rust
    /// buffers on the state's behalf.
    static LIMIT: Cell<usize> = const { Cell::new(0) };
    /// The state the ceiling is set on, for C functions (which get no `&Lua`).
    static STATE: RefCell<Option<WeakLua>> = const { RefCell::new(None) };
}

/// Sets the ceiling of this worker's Lua state.
pub fn set(lua: &Lua, limit: usize) {
    LIMIT.with(|l| l.set(limit));
    STATE.with(|s| *s.borrow_mut() = Some(lua.weak()));
    let _ = lua.set_memory_limit(limit);
}

/// [`lifted`] for a C function, on the state [`set`] was last given.
pub fn lifted_c<R>(f: impl FnOnce() -> R) -> R {
    let lua = if LIMIT.with(|l| l.get()) == 0 { None } else { STATE.with(|s| s.borrow().as_ref()?.try_upgrade()) };
    match lua {
        Some(lua) => lift(&lua, f),
        None => f(),
    }
}

/// True when `len` bytes buffered for a script could never become a Lua
/// string under the ceiling (a cosocket read past it fails instead of
/// growing without bound).
pub fn exceeds(len: usize) -> bool {
    let limit = LIMIT.with(|l| l.get());
    limit != 0 && len > limit
}

/// Runs `f` with the memory ceiling lifted, and converts what it returns
/// to Lua values before the ceiling comes back.
pub fn lifted<R: IntoLuaMulti>(lua: &Lua, f: impl FnOnce() -> mlua::Result<R>) -> mlua::Result<MultiValue> {
    lift(lua, || f()?.into_lua_multi(lua))
}

/// Runs `f` with `lua`'s ceiling at 0 (none), then puts it back.
fn lift<R>(lua: &Lua, f: impl FnOnce() -> R) -> R {
    let _restore = Restore(lua, lua.set_memory_limit(0).unwrap_or(0));
    f()
}

/// Puts the ceiling back however the lifted section ends (a panic included).
struct Restore<'a>(&'a Lua, usize);

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        if self.1 != 0 {
            let _ = self.0.set_memory_limit(self.1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_is_lifted_inside_and_restored_after() {
        let lua = Lua::new();
        lua.set_memory_limit(lua.used_memory() + (1 << 20)).unwrap();
        let limit = lua.set_memory_limit(0).unwrap();
        lua.set_memory_limit(limit).unwrap();
        // 4 MiB made inside: over the 1 MiB headroom, but allowed.
        let made = lifted(&lua, || lua.create_string(vec![b'x'; 4 << 20])).unwrap();
        assert_eq!(made.len(), 1);
        assert_eq!(lua.set_memory_limit(limit).unwrap(), limit, "ceiling restored");
        // Outside, the script meets the ceiling at its next allocation.
        let err = lua.load("local t = {} for i = 1, 1e6 do t[i] = i end").exec().unwrap_err();
        assert!(matches!(err, mlua::Error::MemoryError(_)), "{err}");
        drop(made);
    }

    #[test]
    fn errors_pass_through_and_the_ceiling_comes_back() {
        let lua = Lua::new();
        lua.set_memory_limit(64 << 20).unwrap();
        let err = lifted::<()>(&lua, || Err(mlua::Error::RuntimeError("boom".into()))).unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert_eq!(lua.set_memory_limit(64 << 20).unwrap(), 64 << 20);
    }
}
