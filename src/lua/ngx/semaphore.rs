//! `require "ngx.semaphore"`: lua-resty-core's semaphore, per worker.
//!
//! The Lua module keeps resty.core's shape and checks (`new`, `wait`,
//! `post`, `count`, `version`; `{ sem = ... }` objects with the module as
//! `__index`; the same `error(...)` messages); the semaphore itself is Rust:
//! a resource count and a FIFO queue of waiters. `wait` yields the calling
//! coroutine to the event loop, so light threads, timers and other requests
//! of the worker run meanwhile. Semaphores are per Lua state, i.e. per
//! worker, as in OpenResty (where they cannot cross nginx workers either).
//! Like every waiting API in luagate, `wait` works in every phase and in
//! `init_worker` (OpenResty: not in header/body filters, log, balancer;
//! "no request found" in init_worker).
//!
//! Values as lua-nginx-module 0.10.23 + lua-resty-core return them (checked
//! against the real thing): a `wait` that succeeds at once returns `true`;
//! one that had to wait returns `true, nil` or, on timeout, `false,
//! "timeout"`; a `wait(0)` (or under 1 ms) that cannot succeed at once
//! returns `nil, "timeout"`. `count()` is resources minus waiters. A waiter
//! that is killed (`ngx.thread.kill`, its request ends) leaves the queue; if
//! it had just been handed a resource, the resource goes to the next waiter.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use mlua::{Lua, MultiValue, Table, UserData, Value};

/// The Lua side, after lua-resty-core's `ngx/semaphore.lua`.
const MODULE: &str = r#"
local new_sema, wait_sema, post_sema, count_sema, is_sema = ...
local type, tonumber, error, setmetatable = type, tonumber, error, setmetatable

local _M = { version = "0.1.28" }
local mt = { __index = _M }

function _M.new(n)
    n = tonumber(n) or 0
    if n < 0 then
        error("no negative number", 2)
    end
    return setmetatable({ sem = new_sema(n) }, mt)
end

function _M.wait(self, seconds)
    if type(self) ~= "table" or not is_sema(self.sem) then
        error("not a semaphore instance", 2)
    end
    local milliseconds = tonumber(seconds) * 1000
    if milliseconds < 0 then
        error("no negative number", 2)
    end
    return wait_sema(self.sem, milliseconds)
end

function _M.post(self, n)
    if type(self) ~= "table" or not is_sema(self.sem) then
        error("not a semaphore instance", 2)
    end
    local num = n and tonumber(n) or 1
    if num < 1 then
        error("positive number required", 2)
    end
    post_sema(self.sem, num)
    return true
end

function _M.count(self)
    if type(self) ~= "table" or not is_sema(self.sem) then
        error("not a semaphore instance", 2)
    end
    return count_sema(self.sem)
end

return _M
"#;

#[derive(Default)]
struct Sema {
    resources: Cell<i64>,
    queue: RefCell<VecDeque<Rc<Waiter>>>,
}

#[derive(Default)]
struct Waiter {
    granted: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Sema {
    fn count(&self) -> i64 {
        self.resources.get() - self.queue.borrow().len() as i64
    }

    fn post(&self, n: i64) {
        self.resources.set(self.resources.get().saturating_add(n));
        self.hand_off();
    }

    /// Give resources to waiters, longest-waiting first.
    fn hand_off(&self) {
        while self.resources.get() > 0 {
            let Some(w) = self.queue.borrow_mut().pop_front() else { break };
            self.resources.set(self.resources.get() - 1);
            w.granted.set(true);
            let waker = w.waker.borrow_mut().take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// A queued wait; leaving (timeout, kill) takes it out of the queue.
struct Queued {
    sema: Rc<Sema>,
    waiter: Rc<Waiter>,
    done: bool,
}

impl Drop for Queued {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.waiter.granted.get() {
            // Handed a resource but gone before using it: pass it on.
            self.sema.post(1);
        } else {
            self.sema.queue.borrow_mut().retain(|w| !Rc::ptr_eq(w, &self.waiter));
        }
    }
}

/// The `sem` field of a semaphore object.
#[derive(Clone)]
struct Handle(Rc<Sema>);

impl UserData for Handle {}

fn handle(v: &Value) -> mlua::Result<Rc<Sema>> {
    match v {
        Value::UserData(ud) => Ok(Rc::clone(&ud.borrow::<Handle>()?.0)),
        _ => Err(mlua::Error::runtime("not a semaphore instance")),
    }
}

pub fn register(lua: &Lua, _ngx: &Table) -> mlua::Result<()> {
    let new = lua.create_function(|_, n: f64| {
        let sema = Sema::default();
        sema.resources.set(n as i64);
        Ok(Handle(Rc::new(sema)))
    })?;
    let wait = crate::lua::coroutine::async_function(lua, |lua, (sem, ms): (Value, f64)| {
        let sema = handle(&sem);
        async move { wait(&lua, sema?, ms).await }
    })?;
    let post = lua.create_function(|_, (sem, n): (Value, f64)| {
        handle(&sem)?.post(n as i64);
        Ok(())
    })?;
    let count = lua.create_function(|_, sem: Value| Ok(handle(&sem)?.count()))?;
    let is_sema = lua.create_function(|_, v: Value| Ok(matches!(v, Value::UserData(ud) if ud.is::<Handle>())))?;
    let module: Table = lua.load(MODULE).set_name("=ngx.semaphore").call((new, wait, post, count, is_sema))?;
    let loaded: Table = lua.globals().get::<Table>("package")?.get("loaded")?;
    loaded.set("ngx.semaphore", module)
}

fn reply(lua: &Lua, ok: Value, err: Option<&str>, two: bool) -> mlua::Result<MultiValue> {
    let mut out = vec![ok];
    if two || err.is_some() {
        out.push(match err {
            Some(e) => Value::String(lua.create_string(e)?),
            None => Value::Nil,
        });
    }
    Ok(MultiValue::from_vec(out))
}

async fn wait(lua: &Lua, sema: Rc<Sema>, ms: f64) -> mlua::Result<MultiValue> {
    // The FFI call takes whole milliseconds (a C int).
    let ms = if ms.is_nan() { 0 } else { ms as i64 };
    if sema.queue.borrow().is_empty() && sema.resources.get() > 0 {
        sema.resources.set(sema.resources.get() - 1);
        return reply(lua, Value::Boolean(true), None, false);
    }
    if ms <= 0 {
        return reply(lua, Value::Nil, Some("timeout"), true);
    }
    let waiter = Rc::new(Waiter::default());
    sema.queue.borrow_mut().push_back(Rc::clone(&waiter));
    let mut queued = Queued { sema, waiter: Rc::clone(&waiter), done: false };
    let granted = std::future::poll_fn(|cx| {
        if waiter.granted.get() {
            return Poll::Ready(());
        }
        *waiter.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    });
    let _ = tokio::time::timeout(Duration::from_millis(ms as u64), granted).await;
    if waiter.granted.get() {
        queued.done = true;
        return reply(lua, Value::Boolean(true), None, true);
    }
    drop(queued); // leaves the queue
    reply(lua, Value::Boolean(false), Some("timeout"), true)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::lua::ngx::thread::testing::{block_on, eval, handler, lua};

    #[test]
    fn immediate_waits_posts_and_count() {
        let lua = lua();
        block_on(async {
            handler(
                &lua,
                "local function pack(...) return { n = select('#', ...), ... } end
                 local semaphore = require 'ngx.semaphore'
                 local s = semaphore.new()
                 c0 = s:count()
                 w0 = pack(s:wait(0))
                 w_tiny = pack(s:wait(0.0004))
                 p1 = s:post()
                 c1 = s:count()
                 w1 = pack(s:wait(0))
                 s:post(2.7) c2 = s:count()
                 s:post('2') c3 = s:count()
                 c_new = semaphore.new(1.5):count()
                 local function err(...) local ok, e = pcall(...) return tostring(e) end
                 e_post0 = err(s.post, s, 0)
                 e_neg = err(semaphore.new, -1)
                 e_self = err(s.wait, {}, 1)
                 e_wneg = err(s.wait, s, -1)
                 e_count = err(s.count, 5)
                 same = package.loaded['ngx.semaphore'] == semaphore",
            )
            .await
            .unwrap();
        });
        assert_eq!(eval::<i64>(&lua, "c0"), 0);
        assert_eq!(eval::<(i64, bool, String)>(&lua, "w0.n, w0[1] == nil, w0[2]"), (2, true, "timeout".into()));
        assert_eq!(eval::<String>(&lua, "w_tiny[2]"), "timeout");
        assert_eq!(eval::<(bool, i64)>(&lua, "p1, c1"), (true, 1));
        assert_eq!(eval::<(i64, bool)>(&lua, "w1.n, w1[1]"), (1, true));
        assert_eq!(eval::<(i64, i64, i64)>(&lua, "c2, c3, c_new"), (2, 4, 1));
        assert!(eval::<String>(&lua, "e_post0").contains("positive number required"));
        assert!(eval::<String>(&lua, "e_neg").contains("no negative number"));
        assert!(eval::<String>(&lua, "e_self").contains("not a semaphore instance"));
        assert!(eval::<String>(&lua, "e_wneg").contains("no negative number"));
        assert!(eval::<String>(&lua, "e_count").contains("not a semaphore instance"));
        assert!(eval::<bool>(&lua, "same"));
    }

    #[test]
    fn hand_off_between_light_threads_in_fifo_order() {
        let lua = lua();
        block_on(async {
            handler(
                &lua,
                "local function pack(...) return { n = select('#', ...), ... } end
                 local s = require('ngx.semaphore').new()
                 log = {}
                 local a = ngx.thread.spawn(function()
                     log[#log + 1] = 'A waits'
                     ra = pack(s:wait(1))
                     log[#log + 1] = 'A got'
                 end)
                 local b = ngx.thread.spawn(function()
                     log[#log + 1] = 'B waits'
                     rb = pack(s:wait(1))
                     log[#log + 1] = 'B got'
                 end)
                 waiting = s:count()
                 local c = ngx.thread.spawn(function()
                     ngx.sleep(0.01)
                     log[#log + 1] = 'C posts'
                     s:post(1)
                     after_one = s:count()
                     queued_wait = pack(s:wait(0))
                     s:post(1)
                     log[#log + 1] = 'C posted'
                 end)
                 ngx.thread.wait(a) ngx.thread.wait(b) ngx.thread.wait(c)
                 final = s:count()",
            )
            .await
            .unwrap();
        });
        assert_eq!(eval::<String>(&lua, "table.concat(log, '|')"), "A waits|B waits|C posts|C posted|A got|B got");
        assert_eq!(eval::<i64>(&lua, "waiting"), -2);
        assert_eq!(eval::<i64>(&lua, "after_one"), -1);
        // One waiter still queued: wait(0) does not jump the queue.
        assert_eq!(eval::<(bool, String)>(&lua, "queued_wait[1] == nil, queued_wait[2]"), (true, "timeout".into()));
        assert_eq!(eval::<(i64, bool, bool)>(&lua, "ra.n, ra[1], ra[2] == nil"), (2, true, true));
        assert_eq!(eval::<(bool, i64)>(&lua, "rb[1], final"), (true, 0));
    }

    #[test]
    fn wait_times_out_and_killed_waiters_leave_the_queue() {
        let lua = lua();
        let took = block_on(async {
            let start = Instant::now();
            handler(
                &lua,
                "local s = require('ngx.semaphore').new()
                 ok, err = s:wait(0.05)
                 after_timeout = s:count()
                 local k = ngx.thread.spawn(function() s:wait(5) killed_ran = true end)
                 before_kill = s:count()
                 ngx.thread.kill(k)
                 after_kill = s:count()
                 s:post(1)
                 after_post = s:count()",
            )
            .await
            .unwrap();
            start.elapsed()
        });
        assert_eq!(eval::<(bool, String)>(&lua, "ok, err"), (false, "timeout".into()));
        assert!(took >= Duration::from_millis(45) && took < Duration::from_secs(2), "{took:?}");
        assert_eq!(
            eval::<(i64, i64, i64, i64)>(&lua, "after_timeout, before_kill, after_kill, after_post"),
            (0, -1, 0, 1)
        );
        assert!(eval::<bool>(&lua, "killed_ran == nil"));
    }
}
