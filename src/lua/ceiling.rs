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
use std::ffi::c_void;
use std::ptr;

use mlua::{ffi, IntoLuaMulti, Lua, MultiValue, WeakLua};

thread_local! {
    /// This worker's ceiling (`lua.memory_limit`; 0: none), for what Rust
    /// buffers on the state's behalf.
    static LIMIT: Cell<usize> = const { Cell::new(0) };
    /// The state the ceiling is set on, for C functions (which get no `&Lua`).
    static STATE: RefCell<Option<WeakLua>> = const { RefCell::new(None) };
    /// mlua's allocator function, once [`set`] has seen where the allocator's
    /// userdata keeps the ceiling (see [`ceiling_slot`]); `None`: not seen,
    /// C functions lift the ceiling through `Lua::set_memory_limit`.
    static ALLOCATOR: Cell<Option<ffi::lua_Alloc>> = const { Cell::new(None) };
}

/// Sets the ceiling of this worker's Lua state.
pub fn set(lua: &Lua, limit: usize) {
    LIMIT.with(|l| l.set(limit));
    STATE.with(|s| *s.borrow_mut() = Some(lua.weak()));
    if ALLOCATOR.with(|a| a.get()).is_none() {
        ALLOCATOR.with(|a| a.set(find_ceiling_slot(lua)));
    }
    let _ = lua.set_memory_limit(limit);
}

/// Where a state's ceiling lives, for [`lifted_c`]: mlua keeps it in the
/// userdata of its allocator (`MemoryState { used_memory: isize,
/// memory_limit: isize, .. }`, `repr(C)`), which C functions reach through
/// `lua_getallocf` in a few instructions — `Lua::set_memory_limit` needs a
/// `Lua` (a `WeakLua` upgrade) and costs ~40 per call, twice per C function.
/// That layout is mlua's private business, so it is checked here, not
/// assumed: the allocator is trusted only if setting two different ceilings
/// through mlua shows each in the second word, and the first word is the
/// memory in use as mlua reports it. Leaves the ceiling at 0.
fn find_ceiling_slot(lua: &Lua) -> Option<ffi::lua_Alloc> {
    let mut found = None;
    // SAFETY: only reads the state's allocator.
    let _ = unsafe {
        lua.exec_raw::<()>((), |state| {
            let mut ud: *mut c_void = ptr::null_mut();
            let f = ffi::lua_getallocf(state, &mut ud);
            found = Some((f, ud));
        })
    };
    let (f, ud) = found?;
    if ud.is_null() {
        return None;
    }
    let words = ud.cast::<isize>();
    // SAFETY: `ud` is mlua's allocator state, at least the two words checked (see above).
    let shows = |limit: usize| lua.set_memory_limit(limit).is_ok() && unsafe { words.add(1).read() } == limit as isize;
    let ok = shows(0x5a5a_5a5a) && shows(0x0123_4567) && unsafe { words.read() } == lua.used_memory() as isize;
    let _ = lua.set_memory_limit(0);
    ok.then_some(f)
}

/// The ceiling word of the state `state` belongs to, if its allocator is the
/// one [`find_ceiling_slot`] checked.
///
/// # Safety
/// `state` is a live Lua state (or thread).
unsafe fn ceiling_slot(state: *mut ffi::lua_State) -> Option<*mut isize> {
    let known = ALLOCATOR.with(|a| a.get())?;
    let mut ud: *mut c_void = ptr::null_mut();
    let f = ffi::lua_getallocf(state, &mut ud);
    (std::ptr::fn_addr_eq(f, known) && !ud.is_null()).then(|| ud.cast::<isize>().add(1))
}

/// [`lifted`] for a C function called with `state`.
///
/// # Safety
/// `state` is a live Lua state (or thread).
pub unsafe fn lifted_c<R>(state: *mut ffi::lua_State, f: impl FnOnce() -> R) -> R {
    if let Some(slot) = ceiling_slot(state) {
        // SAFETY: the ceiling word of the state's allocator (`ceiling_slot`);
        // mlua reads it only inside allocations and `set_memory_limit`, none
        // of which hold a reference to it across this write.
        let limit = slot.read();
        if limit == 0 {
            return f();
        }
        slot.write(0);
        let _restore = RestoreWord(slot, limit);
        return f();
    }
    let lua = if LIMIT.with(|l| l.get()) == 0 { None } else { STATE.with(|s| s.borrow().as_ref()?.try_upgrade()) };
    match lua {
        Some(lua) => lift(&lua, f),
        None => f(),
    }
}

/// Puts a ceiling word back however the lifted section ends (a panic included).
struct RestoreWord(*mut isize, isize);

impl Drop for RestoreWord {
    fn drop(&mut self) {
        // SAFETY: as in `lifted_c`, the state outlives the C function's call.
        unsafe { self.0.write(self.1) }
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

    /// A C function making a 4 MiB string in a lifted section.
    unsafe extern "C-unwind" fn make_big(state: *mut ffi::lua_State) -> std::ffi::c_int {
        lifted_c(state, || {
            let big = vec![b'x'; 4 << 20];
            ffi::lua_pushlstring_(state, big.as_ptr().cast(), big.len());
            1
        })
    }

    #[test]
    fn c_functions_lift_the_ceiling_through_the_allocator_state() {
        let lua = Lua::new();
        let limit = lua.used_memory() + (1 << 20);
        set(&lua, limit);
        assert!(ALLOCATOR.with(|a| a.get()).is_some(), "mlua's allocator state recognised");
        assert_eq!(lua.set_memory_limit(limit).unwrap(), limit, "set leaves the ceiling it was given");
        // SAFETY: `make_big` is a C function.
        let f = unsafe { lua.create_c_function(make_big) }.unwrap();
        let made: mlua::LuaString = f.call(()).unwrap();
        assert_eq!(made.as_bytes().len(), 4 << 20);
        assert_eq!(lua.set_memory_limit(limit).unwrap(), limit, "ceiling restored");
        let err = lua.load("local t = {} for i = 1, 1e6 do t[i] = i end").exec().unwrap_err();
        assert!(matches!(err, mlua::Error::MemoryError(_)), "{err}");
        // No ceiling: nothing to lift, nothing put back.
        lua.set_memory_limit(0).unwrap();
        let _: mlua::LuaString = f.call(()).unwrap();
        assert_eq!(lua.set_memory_limit(0).unwrap(), 0);
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
