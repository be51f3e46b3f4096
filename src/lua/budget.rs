//! Stopping runaway scripts without slowing the others.
//!
//! A script may run at most `lua.time_budget` without yielding. Each worker
//! publishes the number of the Lua slice it is running (one atomic store
//! when a slice starts, one when it ends; no clock read); a watchdog thread,
//! ticking every 10 ms, times each slice number it sees and installs a count
//! hook on a worker's Lua state only once the same slice has run for the
//! budget. LuaJIT is
//! built with `LUAJIT_ENABLE_CHECKHOOK` (see `.cargo/config.toml`), so the
//! hook also fires inside JIT-compiled traces: `while true do end` is
//! stopped too. Steady-state cost: two relaxed atomic stores per slice; no
//! hook runs while scripts behave. The hook raises an error the phase
//! reports as "time budget exceeded"; `pcall` cannot swallow it (see
//! `runtime`'s prelude).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use mlua::ffi;

/// The message of the error the hook raises.
pub const EXCEEDED: &str = "luagate: script time budget exceeded";

struct Clock {
    /// The running slice's number; 0 = no Lua running.
    running: AtomicU64,
    budget_ms: AtomicU64,
    state: AtomicUsize,
    /// The slice the watchdog first saw running, and its tick then.
    seen: AtomicU64,
    seen_tick: AtomicU64,
    /// The slice the watchdog hooked, to hook once per slice.
    hooked: AtomicU64,
}

static CLOCKS: Mutex<Vec<Arc<Clock>>> = Mutex::new(Vec::new());

thread_local! {
    static CLOCK: std::cell::RefCell<Option<Arc<Clock>>> = const { std::cell::RefCell::new(None) };
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static TRIPPED: Cell<bool> = const { Cell::new(false) };
    /// Slices started on this worker (numbers them).
    static SLICES: Cell<u64> = const { Cell::new(0) };
}

/// How often the watchdog looks.
const TICK: Duration = Duration::from_millis(10);

/// Register the calling worker thread's Lua state with the watchdog.
///
/// # Safety
/// `state` must be a `lua_State` of the worker's Lua instance, alive as long as the worker.
pub unsafe fn register(state: *mut ffi::lua_State, budget: Duration) {
    let clock = Arc::new(Clock {
        running: AtomicU64::new(0),
        seen: AtomicU64::new(0),
        seen_tick: AtomicU64::new(0),
        budget_ms: AtomicU64::new(budget.as_millis().max(1) as u64),
        state: AtomicUsize::new(state as usize),
        hooked: AtomicU64::new(0),
    });
    CLOCKS.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::clone(&clock));
    CLOCK.with(|c| *c.borrow_mut() = Some(clock));
    start_watchdog();
}

/// A new budget after a reload.
pub fn set_budget(budget: Duration) {
    CLOCK.with(|c| {
        if let Some(c) = &*c.borrow() {
            c.budget_ms.store(budget.as_millis().max(1) as u64, Ordering::Relaxed);
        }
    });
}

/// True once after the hook stopped a script on this thread (and resets it).
pub fn take_tripped() -> bool {
    TRIPPED.with(|t| t.replace(false))
}

/// True while a stopped script's error is still unwinding (pcall must re-raise).
pub fn tripped() -> bool {
    TRIPPED.with(|t| t.get())
}

/// True once the watchdog has given up on the Lua slice running on this
/// thread: what code that runs long without Lua instructions (the pattern
/// matcher) asks now and then, since the hook cannot reach it.
pub fn overran() -> bool {
    CLOCK.with(|c| {
        c.borrow().as_ref().is_some_and(|c| {
            let running = c.running.load(Ordering::Relaxed);
            running != 0 && running == c.hooked.load(Ordering::Relaxed)
        })
    })
}

/// Marks the running script as stopped by the budget, as the hook does
/// before it raises (the error then reads as "time budget exceeded").
pub fn trip() {
    TRIPPED.with(|t| t.set(true));
}

/// Marks Lua as running on this worker while alive.
pub struct Slice(bool);

impl Slice {
    pub fn start() -> Self {
        let outermost = DEPTH.with(|d| {
            d.set(d.get() + 1);
            d.get() == 1
        });
        if outermost {
            CLOCK.with(|c| {
                if let Some(c) = &*c.borrow() {
                    let n = SLICES.with(|n| {
                        n.set(n.get() + 1);
                        n.get()
                    });
                    c.running.store(n, Ordering::Relaxed);
                }
            });
        }
        Slice(outermost)
    }
}

impl Drop for Slice {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get() - 1));
        if self.0 {
            CLOCK.with(|c| {
                if let Some(c) = &*c.borrow() {
                    c.running.store(0, Ordering::Relaxed);
                }
            });
        }
    }
}

fn start_watchdog() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let _ = std::thread::Builder::new().name("luagate-lua-watchdog".into()).spawn(|| {
            let mut tick: u64 = 0;
            loop {
                std::thread::sleep(TICK);
                tick += 1;
                for c in CLOCKS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    let running = c.running.load(Ordering::Relaxed);
                    if running == 0 || c.hooked.load(Ordering::Relaxed) == running {
                        continue;
                    }
                    if c.seen.swap(running, Ordering::Relaxed) != running {
                        c.seen_tick.store(tick, Ordering::Relaxed);
                        continue;
                    }
                    // Seen first at `seen_tick`: it has run at least (tick - seen_tick) ticks.
                    let ran = TICK.as_millis() as u64 * (tick - c.seen_tick.load(Ordering::Relaxed));
                    if ran < c.budget_ms.load(Ordering::Relaxed) {
                        continue;
                    }
                    c.hooked.store(running, Ordering::Relaxed);
                    let state = c.state.load(Ordering::Relaxed) as *mut ffi::lua_State;
                    // SAFETY: lua_sethook only stores the hook and mask in the global
                    // state; LuaJIT documents it as safe to call asynchronously
                    // (it is how signal handlers interrupt scripts).
                    unsafe { ffi::lua_sethook(state, Some(hook), ffi::LUA_MASKCOUNT, 1000) };
                }
            }
        });
    });
}

/// Runs on the worker thread, inside the running script.
unsafe extern "C-unwind" fn hook(state: *mut ffi::lua_State, _ar: *mut ffi::lua_Debug) {
    ffi::lua_sethook(state, None, 0, 0);
    let overran = CLOCK.with(|c| {
        c.borrow().as_ref().is_some_and(|c| {
            let running = c.running.load(Ordering::Relaxed);
            running != 0 && running == c.hooked.load(Ordering::Relaxed)
        })
    });
    if !overran {
        return; // the slice ended before the hook fired
    }
    TRIPPED.with(|t| t.set(true));
    ffi::lua_pushlstring(state, EXCEEDED.as_ptr().cast(), EXCEEDED.len());
    ffi::lua_error(state);
}
