//! A phase's coroutine, resumed directly.
//!
//! Most phase scripts never wait: they run to their end in one resume. Such a
//! run goes straight through `lua_resume` on a pooled coroutine, without
//! mlua's `AsyncThread` and the futures around it (benches/NOTES.md §13). A
//! script that waits (a cosocket, `ngx.sleep`, a semaphore) yields out of
//! that first resume inside one of mlua's async functions, whose Rust future
//! was polled once with mlua's no-op waker; the coroutine is then handed to
//! mlua ([`Waiting`]), which polls that future again with the task's waker
//! and drives the rest of the script.
//!
//! Dropping a [`Waiting`] (client gone, `ngx.exit` in a light thread) ends
//! the script at once, as dropping an mlua async call does: every async API
//! function is [`Abortable`] and drops the future it waits in when resumed
//! for an abort; the error that follows cannot be caught by `pcall` (see
//! `runtime`'s prelude).

use std::cell::{Cell, RefCell};
use std::ffi::c_int;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use mlua::{ffi, FromLuaMulti, Function, IntoLuaMulti, Lua, RegistryKey, Thread, Value, WeakLua};

use super::budget;

/// The message of the error an aborted script unwinds with.
pub const ABORTED: &str = "luagate: request aborted";

/// Idle coroutines kept for reuse (as mlua's own thread pool).
const POOL: usize = 64;

thread_local! {
    /// True while an abandoned script is resumed to unwind.
    static ABORTING: Cell<bool> = const { Cell::new(false) };
}

/// True while a script is being aborted (`pcall` must re-raise).
pub fn aborting() -> bool {
    ABORTING.with(|a| a.get())
}

/// How the first run of a phase went.
pub enum Start {
    /// It ran to its end (or failed).
    Done(mlua::Result<()>),
    /// It waits: the rest of the run.
    Waiting(Waiting),
}

/// A worker's phase coroutines.
pub struct Coroutines {
    idle: Rc<RefCell<Vec<Thread>>>,
    /// What a new coroutine is made with (replaced before its first resume).
    seed: Function,
    /// A registry slot an error value passes through on its way to mlua.
    error_slot: RegistryKey,
}

impl Coroutines {
    pub fn new(lua: &Lua) -> mlua::Result<Self> {
        Ok(Self {
            idle: Rc::new(RefCell::new(Vec::with_capacity(POOL))),
            seed: lua.create_function(|_, ()| Ok(()))?,
            error_slot: lua.create_registry_value(false)?,
        })
    }

    /// Runs the function at registry reference `key` in a coroutine until it
    /// ends or first waits.
    pub fn start(&self, lua: &Lua, key: c_int) -> Start {
        let pooled = self.idle.borrow_mut().pop();
        let thread = match pooled {
            Some(t) => t,
            None => match lua.create_thread(self.seed.clone()) {
                Ok(t) => t,
                Err(e) => return Start::Done(Err(e)),
            },
        };
        let co = thread.state();
        // SAFETY: `co` is a coroutine of this worker's state, finished or new
        // (pooled ones ended with LUA_OK), so it can be given a function and
        // resumed; a fresh coroutine has LUA_MINSTACK free slots.
        let status = unsafe {
            ffi::lua_settop(co, 0);
            ffi::lua_rawgeti(co, ffi::LUA_REGISTRYINDEX, key as ffi::lua_Integer);
            let mut results = 0;
            ffi::lua_resume(co, std::ptr::null_mut(), 0, &mut results)
        };
        match status {
            ffi::LUA_OK => {
                recycle(&self.idle, thread);
                Start::Done(Ok(()))
            }
            ffi::LUA_YIELD => {
                // SAFETY: what it yielded (mlua's pending marker) is not needed.
                unsafe { ffi::lua_settop(co, 0) };
                match thread.clone().into_async::<()>(()) {
                    Ok(inner) => Start::Waiting(Waiting {
                        lua: lua.weak(),
                        thread,
                        inner: Some(inner),
                        deferred: false,
                        idle: Rc::clone(&self.idle),
                    }),
                    Err(e) => Start::Done(Err(e)),
                }
            }
            // SAFETY: the error value is on top of the dead coroutine's stack.
            status => Start::Done(Err(unsafe { self.take_error(lua, co, status) })),
        }
    }

    /// The error a coroutine died with, as mlua reports errors: a Rust
    /// callback's error as it was raised, anything else as its message.
    ///
    /// # Safety
    /// `co` died with `status`; its error value is on top of its stack.
    unsafe fn take_error(&self, lua: &Lua, co: *mut ffi::lua_State, status: c_int) -> mlua::Error {
        // An existing registry slot: storing into it allocates nothing, even at the memory ceiling.
        let slot = self.error_slot.id() as ffi::lua_Integer;
        ffi::lua_rawseti(co, ffi::LUA_REGISTRYINDEX, slot);
        let value = super::ceiling::lifted_c(co, || lua.registry_value::<Value>(&self.error_slot));
        ffi::lua_pushboolean(co, 0);
        ffi::lua_rawseti(co, ffi::LUA_REGISTRYINDEX, slot);
        let value = match value {
            Ok(v) => v,
            Err(e) => return e,
        };
        let text = |v: &Value| match v {
            Value::String(s) => s.to_string_lossy(),
            other => other.to_string().unwrap_or_else(|_| format!("({})", other.type_name())),
        };
        match value {
            Value::Error(e) => *e,
            v if status == ffi::LUA_ERRMEM => mlua::Error::MemoryError(text(&v)),
            v => mlua::Error::RuntimeError(text(&v)),
        }
    }
}

/// The rest of a phase that waits: mlua drives the coroutine from where it
/// yielded.
pub struct Waiting {
    lua: WeakLua,
    thread: Thread,
    inner: Option<mlua::thread::AsyncThread<()>>,
    /// The first poll only schedules the next: the future the script waits
    /// in was polled with a no-op waker, and re-polling it at once would not
    /// let the event loop run first (`ngx.sleep(0)` must yield).
    deferred: bool,
    idle: Rc<RefCell<Vec<Thread>>>,
}

impl Future for Waiting {
    type Output = mlua::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.deferred {
            self.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Err(mlua::Error::runtime("coroutine polled after it ended")));
        };
        let out = std::task::ready!(Pin::new(inner).poll(cx));
        self.inner = None;
        // SAFETY: the coroutine is not running; a status of LUA_OK with no
        // results left means it returned and can be reused.
        let finished = out.is_ok() && unsafe { ffi::lua_status(self.thread.state()) } == ffi::LUA_OK;
        if finished {
            recycle(&self.idle, self.thread.clone());
        }
        Poll::Ready(out)
    }
}

/// A coroutine that returned goes back to the pool (if there is room).
fn recycle(idle: &RefCell<Vec<Thread>>, thread: Thread) {
    let mut idle = idle.borrow_mut();
    if idle.len() < POOL {
        // SAFETY: the coroutine ended (returned): its stack holds only its results.
        unsafe { ffi::lua_settop(thread.state(), 0) };
        idle.push(thread);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // A state already gone (worker shutdown) has nothing left to unwind.
        if self.inner.take().is_some() && self.lua.try_upgrade().is_some() {
            // SAFETY: the state is alive; the coroutine is suspended (never
            // dropped while running: a running coroutine's future is being polled).
            unsafe { abort(self.thread.state()) };
        }
    }
}

/// Unwinds a coroutine suspended in an async API function: resumed with
/// [`ABORTING`] set, the function's [`Abortable`] future drops what it
/// waited in and raises [`ABORTED`].
///
/// # Safety
/// `co` is a suspended coroutine of this worker's state.
unsafe fn abort(co: *mut ffi::lua_State) {
    let _slice = budget::Slice::start();
    ABORTING.with(|a| a.set(true));
    // Bounded: a script can only be between API calls for so long while aborting.
    for _ in 0..8 {
        if ffi::lua_status(co) != ffi::LUA_YIELD || !in_async_call(co) {
            break;
        }
        ffi::lua_settop(co, 0);
        let mut results = 0;
        if ffi::lua_resume(co, std::ptr::null_mut(), 0, &mut results) != ffi::LUA_YIELD {
            break;
        }
    }
    ABORTING.with(|a| a.set(false));
}

/// Whether `co` yielded inside mlua's async call wrapper (not a plain
/// `coroutine.yield` of the script).
unsafe fn in_async_call(co: *mut ffi::lua_State) -> bool {
    let mut ar: ffi::lua_Debug = std::mem::zeroed();
    ffi::lua_getstack(co, 1, &mut ar) != 0
        && ffi::lua_getinfo(co, c"S".as_ptr(), &mut ar) != 0
        && !ar.source.is_null()
        && std::ffi::CStr::from_ptr(ar.source) == c"=__mlua_async_poll"
}

pin_project_lite::pin_project! {
    /// An async API function's future, which gives up what it waits in when
    /// its coroutine is aborted.
    pub struct Abortable<F> {
        #[pin]
        inner: Option<F>,
    }
}

impl<F: Future<Output = mlua::Result<R>>, R> Future for Abortable<F> {
    type Output = mlua::Result<R>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if aborting() {
            this.inner.set(None);
        }
        match this.inner.as_pin_mut() {
            Some(f) => f.poll(cx),
            None => Poll::Ready(Err(mlua::Error::runtime(ABORTED))),
        }
    }
}

/// `Lua::create_async_function` for the API: the function's future is
/// [`Abortable`].
pub fn async_function<F, A, FR, R>(lua: &Lua, f: F) -> mlua::Result<Function>
where
    F: Fn(Lua, A) -> FR + 'static,
    A: FromLuaMulti,
    FR: Future<Output = mlua::Result<R>> + 'static,
    R: IntoLuaMulti,
{
    lua.create_async_function(move |lua, args: A| Abortable { inner: Some(f(lua, args)) })
}
